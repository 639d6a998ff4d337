//! Dynamic sparse training helpers: mask updates (drop/grow) over many tensors at once.
