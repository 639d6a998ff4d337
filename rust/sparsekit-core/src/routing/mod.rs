//! MoE routing tables: top-k gating, counting-sort dispatch, capacity and dropping, offsets.
