//! The core's one error type, shared by every module (select, routing, comm, spmm, ...). Every variant names the argument at fault so the binding layer can
//! turn it into a Python `ValueError` the user can act on.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A score is NaN; NaN has no place in an order, so selection refuses it.
    NanInput { arg: &'static str },
    /// `k` is outside `0..=n`.
    KOutOfRange { k: u64, n: u64 },
    /// A 1-based rank is outside `1..=n`.
    RankOutOfRange { rank: u64, n: u64 },
    /// An output buffer does not match its input in length.
    LengthMismatch { arg: &'static str, expected: usize, got: usize },
    /// An argument has an invalid value (the message says which and why).
    Invalid { arg: &'static str, why: String },
    /// The worker thread pool could not be built (the OS refused threads): not the caller's argument.
    ThreadPool { why: String },
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::NanInput { arg } => {
                write!(f, "{arg} contains NaN; NaN scores cannot be ranked (replace them, e.g. with torch.nan_to_num)")
            }
            CoreError::KOutOfRange { k, n } => write!(f, "k must be in [0, {n}] (number of elements), got {k}"),
            CoreError::RankOutOfRange { rank, n } => write!(f, "rank must be in [1, {n}], got {rank}"),
            CoreError::LengthMismatch { arg, expected, got } => {
                write!(f, "{arg} has {got} elements, expected {expected}")
            }
            CoreError::Invalid { arg, why } => write!(f, "invalid {arg}: {why}"),
            CoreError::ThreadPool { why } => write!(f, "could not start sparsekit's worker threads: {why}"),
        }
    }
}

impl std::error::Error for CoreError {}
