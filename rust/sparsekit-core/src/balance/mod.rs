//! MoE load-balance counters: EMA loads, imbalance metrics, aux-loss-free bias updates.
