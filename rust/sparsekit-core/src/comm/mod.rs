//! Gradient communication planner: buckets, size classes, ready order, priorities, shard assignment.
