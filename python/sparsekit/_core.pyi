"""Type stubs of the native module ``sparsekit._core`` (the PyO3 binding of sparsekit-core).

Low-level: arrays are contiguous 1-D numpy views; float16/bfloat16 data cross as int16 views of
their bits with the ``dtype`` tag. Use the checked wrappers in ``sparsekit.select`` instead.
"""

from typing import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "MAX_THREADS",
    "topk_masks",
    "kth_values",
    "nm_mask",
    "block_topk_mask",
    "set_num_threads",
    "get_num_threads",
    "build_profile",
    "bsr_kernel",
    "sparsity_update",
    "sparsity_count",
    "sparsity_zero_off",
]

__version__: str
MAX_THREADS: int

def topk_masks(
    sources: Sequence[npt.NDArray[np.generic]],
    masks: Sequence[npt.NDArray[np.bool_]],
    dtype: str,
    k: int,
    by: str,
) -> None:
    """Write a top-k selection over all ``sources`` together into ``masks`` (same lengths)."""

def kth_values(sources: Sequence[npt.NDArray[np.generic]], dtype: str, ranks: Sequence[int], by: str) -> list[float]:
    """The ``rank``-th largest score (1-based) over all ``sources``, for each rank."""

def nm_mask(
    x: npt.NDArray[np.generic],
    out: npt.NDArray[np.bool_],
    dtype: str,
    length: int,
    inner: int,
    n: int,
    m: int,
    by: str,
) -> None:
    """N:M mask of ``x`` viewed as (outer, length, inner), groups of ``m`` along ``length``."""

def block_topk_mask(
    x: npt.NDArray[np.generic],
    mask: npt.NDArray[np.bool_],
    block_mask: npt.NDArray[np.bool_],
    dtype: str,
    shape: tuple[int, int],
    block: tuple[int, int],
    k: int,
    norm: str,
) -> None:
    """Keep the ``k`` blocks of highest norm; fills the element mask and the block mask."""

def set_num_threads(n: int) -> None:
    """Set the worker thread count (0: back to the default)."""

def get_num_threads() -> int:
    """The worker thread count the next parallel call will use."""

def build_profile() -> str:
    """"release" or "debug"."""

# ---- buffer cache (rust/sparsekit-py/src/buffers.rs) ----
__all__ += ["buffer_cache_min_bytes", "cached_empty", "buffer_cache_stats", "buffer_cache_set_limit", "buffer_cache_clear"]

buffer_cache_min_bytes: int

def cached_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` (>= buffer_cache_min_bytes), 2 MiB aligned, from the cache."""

def buffer_cache_stats() -> tuple[int, int, int]:
    """(idle buffers, idle bytes, limit in bytes)."""

def buffer_cache_set_limit(nbytes: int) -> None:
    """Cap the idle bytes (0 turns the cache off), freeing the oldest idle buffers over it."""

def buffer_cache_clear() -> None:
    """Free every idle buffer."""

# ---- routing (rust/sparsekit-py/src/routing.rs) ----
__all__ += ["route_topk", "route_tables", "route_plan", "moe_permute", "moe_gather_sum", "moe_unpermute", "moe_unpermute_backward"]

def route_topk(
    logits: npt.NDArray[np.generic],
    bias: npt.NDArray[np.generic] | None,
    dtype: str,
    n_experts: int,
    k: int,
    score: str,
    n_groups: int,
    topk_groups: int,
    group_mode: str,
    normalize: bool,
    scale: float,
    ids: npt.NDArray[np.generic],
    sel: npt.NDArray[np.generic],
    weights: npt.NDArray[np.generic],
) -> None: ...
def route_tables(
    ids: npt.NDArray[np.generic],
    n_experts: int,
    capacity: int | None,
    drop_policy: str,
    priority: npt.NDArray[np.generic] | None,
    order: npt.NDArray[np.generic],
    inverse: npt.NDArray[np.generic],
    counts: npt.NDArray[np.generic],
    offsets: npt.NDArray[np.generic],
    kept: npt.NDArray[np.generic],
) -> None: ...
def route_plan(
    logits: npt.NDArray[np.generic],
    bias: npt.NDArray[np.generic] | None,
    dtype: str,
    n_experts: int,
    k: int,
    score: str,
    n_groups: int,
    topk_groups: int,
    group_mode: str,
    normalize: bool,
    scale: float,
    capacity: int | None,
    drop_policy: str,
    ids: npt.NDArray[np.generic],
    sel: npt.NDArray[np.generic],
    weights: npt.NDArray[np.generic],
    order: npt.NDArray[np.generic],
    inverse: npt.NDArray[np.generic],
    counts: npt.NDArray[np.generic],
    offsets: npt.NDArray[np.generic],
    kept: npt.NDArray[np.generic],
) -> None: ...
def moe_permute(x: npt.NDArray[np.generic], d: int, order: npt.NDArray[np.generic], inverse: npt.NDArray[np.generic], k: int, out: npt.NDArray[np.generic], dtype: str) -> None: ...
def moe_gather_sum(g: npt.NDArray[np.generic], d: int, order: npt.NDArray[np.generic], inverse: npt.NDArray[np.generic], k: int, gx: npt.NDArray[np.generic], dtype: str) -> None: ...
def moe_unpermute(y: npt.NDArray[np.generic], d: int, w: npt.NDArray[np.generic], order: npt.NDArray[np.generic], inverse: npt.NDArray[np.generic], k: int, out: npt.NDArray[np.generic], dtype: str) -> None: ...
def moe_unpermute_backward(
    g: npt.NDArray[np.generic], y: npt.NDArray[np.generic], d: int, w: npt.NDArray[np.generic], order: npt.NDArray[np.generic], inverse: npt.NDArray[np.generic], k: int, gy: npt.NDArray[np.generic], gw: npt.NDArray[np.generic], dtype: str
) -> None: ...
# (end of routing)

# ---- balance (rust/sparsekit-py/src/balance.rs) ----
from typing import final

__all__ += ["BalanceCounters", "balance_stats", "aux_free_update"]

@final
class BalanceCounters:
    def __new__(cls, n_experts: int, ema: float) -> BalanceCounters: ...
    def update(self, counts: Sequence[int], dropped: int) -> None: ...
    def step_counts(self) -> list[float]: ...
    def ema_counts(self) -> list[float]: ...
    @property
    def steps(self) -> int: ...
    def dropped_fraction(self) -> float: ...
    def totals(self) -> tuple[int, int]: ...

def balance_stats(counts: Sequence[float]) -> tuple[float, float, float, int]: ...
def aux_free_update(bias: npt.NDArray[np.generic], counts: npt.NDArray[np.generic], rate: float) -> None: ...
# (end of balance)

# ---- comm (rust/sparsekit-py/src/comm.rs) ----
__all__ += ["comm_read_specs", "comm_plan", "comm_fingerprint", "comm_assign_shards", "comm_chunk_bounds"]

def comm_read_specs(
    items: list[object], tensor_type: type, parameter_type: type
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], list[str]]: ...
def comm_plan(
    nbytes: npt.NDArray[np.int64],
    keys: npt.NDArray[np.int64],
    sparse: npt.NDArray[np.int64],
    order: npt.NDArray[np.int64] | None,
    positional: bool,
    limits: Sequence[int],
    sort_by_min: bool,
    classes: Sequence[int] | None,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]: ...
def comm_fingerprint(
    indices: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    limits: npt.NDArray[np.int64],
    classes: npt.NDArray[np.int64],
    nbytes: npt.NDArray[np.int64],
    keys: npt.NDArray[np.int64],
    key_names: Sequence[str],
) -> int: ...
def comm_assign_shards(
    nbytes: npt.NDArray[np.int64], world_size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def comm_chunk_bounds(numel: int, nbytes: int, chunk_bytes: int) -> list[int]: ...
# (end of comm)

# ---- spmm (rust/sparsekit-py/src/spmm.rs) ----
def bsr_kernel(
    op: str,
    shape: tuple[int, int],
    block: tuple[int, int],
    layout: Sequence[npt.NDArray[np.int64]],
    a: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    b: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    m: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: str = "float32",
) -> None:
    """Run the block-sparse kernel ``op`` ("linear", "linear_grad_input" or "sdd") with the GIL released.
    ``dtype`` "float32" takes float32 arrays; "float16" / "bfloat16" take int16 views of the raw bits
    (accumulated in float32, ``out`` rounded once to nearest even). An array of another dtype is a
    ``ValueError`` naming it."""
# (end of spmm)

# ---- sparsity (rust/sparsekit-py/src/sparsity.rs) ----
def sparsity_update(
    weights: Sequence[npt.NDArray[np.generic]],
    masks: Sequence[npt.NDArray[np.bool_]],
    grows: Sequence[npt.NDArray[np.generic]],
    states: Sequence[npt.NDArray[np.generic]],
    state_layers: Sequence[int],
    dtype: str,
    grow_dtype: str,
    keep: Sequence[int],
    grow: Sequence[int],
    global_: bool,
) -> list[tuple[int, int, int]]:
    """One fused mask update in place: keep the top ``keep`` |w| among the active, grow the top ``grow``
    |grow score| among the rest, zero dropped / new weights and their states. Returns (kept, grown,
    dropped) per layer."""

def sparsity_count(masks: Sequence[npt.NDArray[np.bool_]]) -> list[int]:
    """Number of true entries of each mask."""

def sparsity_zero_off(xs: Sequence[npt.NDArray[np.generic]], masks: Sequence[npt.NDArray[np.bool_]], dtype: str) -> None:
    """``x[i] = 0`` wherever ``mask[i]`` is false, in place."""

# (end of sparsity)
