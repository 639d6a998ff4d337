"""Proof 2 for the CUDA kernels without a GPU: the launch code users run (``sparsekit._cuda_select``) drives
the kernels of ``cuda/select.cu`` on the CPU through the fiber shim (``sparsekit._cudasim``), and must agree
exactly with an independent eager-torch reference written here (stable sorts, nothing shared with the
kernels) and with the Rust path, under forward, reverse and random thread orders.

Sizes: chunks are 4096 elements (one block each in the mask kernels), so tensors of up to ~13k elements
make several chunks, ties that straddle chunk and tensor boundaries, and (with the hist grid capped) blocks
that take several chunks; "close" and "bits" data make every radix pass decide something."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekit import _cuda_select as cs

try:  # the Rust path, for a cross-check when the extension is built
    import sparsekit

    HAVE_RUST = hasattr(sparsekit, "global_topk_masks")
except ImportError:  # pragma: no cover
    HAVE_RUST = False

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BYS = ["abs", "value"]
KINDS = ["normal", "ties", "zeros", "extremes", "close", "bits"]
SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1)]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
ONE_BITS = {torch.float32: 0x3F80_0000, torch.float64: 0x3FF0_0000_0000_0000, torch.float16: 0x3C00, torch.bfloat16: 0x3F80}


@pytest.fixture(scope="module", params=SCHEDULES, ids=[s for s, _ in SCHEDULES])
def backend(request):
    schedule, seed = request.param
    return cs.sim_backend(schedule=schedule, seed=seed)


@pytest.fixture(scope="module")
def forward():
    return cs.sim_backend()


# ------------------------------------------------------------------------------------------- data
def make_data(kind: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """1-D data of one kind; never NaN."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 100
    elif kind == "ties":  # few distinct values, -0.0 among them
        x = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64) * 0.5
        x[torch.rand(n, generator=gen) < 0.2] = -0.0
    elif kind == "zeros":  # mostly +-0, a few others
        x = torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0).to(torch.float64)
        some = torch.rand(n, generator=gen) < 0.05
        x[some] = torch.randn(int(some.sum()), generator=gen, dtype=torch.float64)
    elif kind == "extremes":  # +-inf, +-0, +-1 and the format's largest / smallest magnitudes
        info = torch.finfo(dtype)
        pool = torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, -info.tiny],
                            dtype=torch.float64)  # fmt: skip
        x = pool[torch.randint(0, len(pool), (n,), generator=gen)]
    elif kind == "close":  # +-(1 + j ulp), j < 48: keys share all high digits, the last pass decides
        ints = torch.full((n,), ONE_BITS[dtype], dtype=torch.int64) + torch.randint(0, 48, (n,), generator=gen)
        x = ints.to(INT_VIEW[dtype]).view(dtype)
        return torch.where(torch.rand(n, generator=gen) < 0.3, -x, x)
    elif kind == "bits":  # uniformly random bit patterns (subnormals, infs, every exponent); NaN -> 0
        width = torch.finfo(dtype).bits
        lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
        if width == 64:
            ints = torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64) * 2 + torch.randint(
                0, 2, (n,), generator=gen
            )
        else:
            ints = torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int64)
        x = ints.to(INT_VIEW[dtype]).view(dtype)
        return torch.where(torch.isnan(x), torch.zeros((), dtype=dtype), x)
    else:
        raise AssertionError(kind)
    return x.to(dtype)


# ------------------------------------------------------------------------------- eager reference
def ref_order(flat: torch.Tensor, by: str) -> torch.Tensor:
    """Indices of ``flat`` by descending score, ties by ascending index; for by="value" -0.0 < +0.0."""
    v = flat.to(torch.float64)  # exact for all four dtypes
    primary = v.abs() if by == "abs" else v
    secondary = torch.zeros_like(v) if by == "abs" else (~torch.signbit(v)).to(torch.float64)
    first = torch.sort(secondary, descending=True, stable=True).indices
    second = torch.sort(primary[first], descending=True, stable=True).indices
    return first[second]


def ref_topk_masks(tensors: list[torch.Tensor], k: int, by: str) -> list[torch.Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[ref_order(flat, by)[:k]] = True
    out, start = [], 0
    for t in tensors:
        out.append(keep[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def ref_kth(x: torch.Tensor, rank: int, by: str) -> float:
    flat = x.reshape(-1)
    v = flat[ref_order(flat, by)[rank - 1]].to(torch.float64).item()
    return abs(v) if by == "abs" else v


def ref_nm(x: torch.Tensor, n: int, m: int, dim: int, by: str) -> torch.Tensor:
    groups = x.movedim(dim, -1).reshape(-1, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    for g in range(groups.shape[0]):
        mask[g, ref_order(groups[g], by)[:n]] = True
    moved_shape = x.movedim(dim, -1).shape
    return mask.reshape(moved_shape).movedim(-1, dim)


def same_floats(got: torch.Tensor, want: list[float]) -> bool:
    """A 1-D tensor equal to ``want`` including the sign of zero (values exact in the tensor's dtype)."""
    assert isinstance(got, torch.Tensor) and got.dim() == 1
    values = got.double().tolist()
    return len(values) == len(want) and all(
        x == y and math.copysign(1, x) == math.copysign(1, y) for x, y in zip(values, want)
    )


def check_masks(got: list[torch.Tensor], tensors: list[torch.Tensor], k: int, by: str) -> None:
    want = ref_topk_masks(tensors, k, by)
    assert len(got) == len(tensors)
    for i, (g, w, t) in enumerate(zip(got, want, tensors)):
        assert g.dtype == torch.bool and g.shape == t.shape and g.device == t.device, i
        assert torch.equal(g, w), f"tensor {i}: {int((g != w).sum())} mismatches (k={k}, by={by})"
    assert sum(int(g.sum()) for g in got) == k
    if HAVE_RUST and tensors:
        rust = sparsekit.global_topk_masks(tensors, k=k, by=by)
        assert all(torch.equal(g, r) for g, r in zip(got, rust)), "differs from the Rust path"


# ----------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_masks_many_tensors(backend, dtype, kind):
    x = make_data(kind, 13000, dtype, seed=KINDS.index(kind))
    cuts = [0, 1, 4097, 4097, 8997, 8998, 13000]  # empty and one-element tensors, chunk-straddling sizes
    parts = [x[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    parts[3] = parts[3].reshape(49, 100)  # 4900 elements: a 2-D tensor
    for by in BYS:
        for k in (0, 1, 2, 777, 6500, 12999, 13000):
            check_masks(cs.topk_masks(parts, k, by, backend=backend), parts, k, by)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_tensor_partial_tie_across_chunks(forward, dtype):
    # 20000 equal magnitudes (+-1, +-0 mixed) around a few larger ones: the k-th key's tie spans 5 chunks
    x = torch.ones(20000, dtype=dtype)
    x[::3] = -1.0
    x[5:20] = 2.0
    for by in BYS:
        for k in (16, 17, 4096, 9999, 15000, 20000):
            check_masks(cs.topk_masks([x], k, by, backend=forward), [x], k, by)


@settings(max_examples=50)
@given(
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(KINDS),
    sizes=st.lists(st.integers(0, 3000), min_size=0, max_size=6),
    by=st.sampled_from(BYS),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_topk_masks_property(backend, dtype, kind, sizes, by, seed, data):
    tensors = []
    for i, n in enumerate(sizes):
        t = make_data(kind, n, dtype, seed + i)
        if n and n % 2 == 0 and data.draw(st.booleans()):
            t = t.reshape(2, n // 2)
        tensors.append(t)
    total = sum(sizes)
    k = data.draw(st.sampled_from([0, min(1, total), total, total // 2]) | st.integers(0, total))
    check_masks(cs.topk_masks(tensors, k, by, backend=backend), tensors, k, by)


def test_hist_blocks_take_several_chunks(forward, monkeypatch):
    # cap the radix_hist grid so each block walks several chunks of several tensors (grid-stride)
    monkeypatch.setattr(cs, "MAX_HIST_GRID", 3)
    for dtype in DTYPES:
        x = make_data("close", 11000, dtype, seed=9)
        parts = [x[:5000], x[5000:5000], x[5000:]]
        for by in BYS:
            for k in (1, 3333, 10999):
                check_masks(cs.topk_masks(parts, k, by, backend=forward), parts, k, by)


def test_radix_passes_cover_every_bit():
    for bits, want in ((16, 2), (32, 3), (64, 6)):
        passes = cs.radix_passes(bits)
        assert len(passes) == want and passes[0][0] == bits and passes[-1][1] == 0
        assert sum(p[2] for p in passes) == bits
        assert all(a[1] == b[0] for a, b in zip(passes, passes[1:]))


# ------------------------------------------------------------------------------------ kth values
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "extremes", "close", "bits"])
def test_kth_values(backend, dtype, kind):
    x = make_data(kind, 9000, dtype, seed=40 + KINDS.index(kind)).reshape(90, 100)
    ranks = [1, 2, 1234, 4500, 4501, 8999, 9000, 1]
    for by in BYS:
        got = cs.kth_values(x, ranks, by, backend=backend)
        assert same_floats(got, [ref_kth(x, r, by) for r in ranks]), (by, got)
        if HAVE_RUST:
            assert same_floats(got, [float(sparsekit.kth_largest(x, r, by=by)) for r in ranks])
        assert got.dtype == x.dtype


@settings(max_examples=30)
@given(dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS), n=st.integers(1, 6000), by=st.sampled_from(BYS),
       seed=st.integers(0, 2**16), data=st.data())  # fmt: skip
def test_kth_values_property(forward, dtype, kind, n, by, seed, data):
    x = make_data(kind, n, dtype, seed)
    ranks = data.draw(st.lists(st.integers(1, n), min_size=0, max_size=3))
    assert same_floats(cs.kth_values(x, ranks, by, backend=forward), [ref_kth(x, r, by) for r in ranks])


def test_signed_zero_keys(forward):
    # by value -0.0 ranks just below +0.0; by abs they tie (ties by index)
    x = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.0])
    assert cs.topk_masks([x], 2, "value", backend=forward)[0].tolist() == [False, True, False, True, False]
    assert cs.topk_masks([x], 2, "abs", backend=forward)[0].tolist() == [True, False, False, False, True]
    assert cs.topk_masks([x], 3, "abs", backend=forward)[0].tolist() == [True, True, False, False, True]
    assert same_floats(cs.kth_values(x, [2, 3], "value", backend=forward), [0.0, -0.0])
    assert same_floats(cs.kth_values(x, [2], "abs", backend=forward), [0.0])


# ----------------------------------------------------------------------------------------- N:M
@settings(max_examples=50)
@given(
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["normal", "ties", "zeros", "extremes", "close"]),
    m=st.sampled_from([1, 2, 3, 4, 8, 16, 32, 33, 40]),
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    by=st.sampled_from(BYS),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_nm_mask_property(backend, dtype, kind, m, dims, by, seed, data):
    dim = data.draw(st.integers(0, len(dims) - 1))
    shape = list(dims)
    shape[dim] *= m
    n = data.draw(st.integers(0, m))
    x = make_data(kind, math.prod(shape), dtype, seed).reshape(shape)
    got = cs.nm_mask(x, n, m, dim, by, backend=backend)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, ref_nm(x, n, m, dim, by))
    if HAVE_RUST:
        assert torch.equal(got, sparsekit.nm_mask(x, n, m, dim=dim, by=by))


def test_nm_mask_grid_stride_and_empty(forward, monkeypatch):
    monkeypatch.setattr(cs, "MAX_NM_GRID", 1)  # one block walks all 1536 groups
    x = make_data("ties", 64 * 96, torch.float32, seed=3).reshape(64, 96)
    for by in BYS:
        assert torch.equal(cs.nm_mask(x, 2, 4, 1, by, backend=forward), ref_nm(x, 2, 4, 1, by))
    empty = torch.zeros(0, 8)
    assert cs.nm_mask(empty, 2, 4, 1, "abs", backend=forward).shape == (0, 8)


# ----------------------------------------------------------------------------------------- NaN
NAN_BITS = {  # the smallest NaN of each format, a negative one, and the canonical one
    torch.float32: [0x7F80_0001, -0x007F_FFFF, 0x7FC0_0000],
    torch.float64: [0x7FF0_0000_0000_0001, -1, 0x7FF8_0000_0000_0000],
    torch.float16: [0x7C01, -0x03FF, 0x7E00],
    torch.bfloat16: [0x7F81, -0x007F, 0x7FC0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_is_refused(forward, dtype):
    for bits in NAN_BITS[dtype]:
        x = make_data("extremes", 9000, dtype, seed=6)  # +-inf next to NaN: inf must not count as NaN
        x.view(INT_VIEW[dtype])[6789] = bits
        assert torch.isnan(x[6789])
        parts = [x[:100].clone(), x[100:100].clone(), x[100:].clone()]
        calls = [
            lambda: cs.topk_masks(parts, 10, "abs", backend=forward),
            lambda: cs.topk_masks(parts, 0, "value", backend=forward),
            lambda: cs.topk_masks(parts, 9000, "value", backend=forward),
            lambda: cs.kth_values(x, [1, 9000], "value", backend=forward),
            lambda: cs.kth_values(x, [], "abs", backend=forward),
            lambda: cs.nm_mask(x.reshape(100, 90), 2, 3, 1, "abs", backend=forward),
        ]
        for call in calls:
            with pytest.raises(ValueError, match="NaN"):
                call()
    clean = make_data("extremes", 9000, dtype, seed=6)
    cs.topk_masks([clean], 0, "abs", backend=forward)  # no false alarm on +-inf
    cs.kth_values(clean, [], "abs", backend=forward)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_block_topk_device_path_matches_cpu_path(forward, norm):
    _block_topk_on_device = cs.block_topk_mask
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (24, 32), generator=gen).float()  # small integers: exact norms, many ties
    for k in (0, 1, 10, 48):
        mask, blocks = _block_topk_on_device(x, (4, 4), k, norm, backend=forward)
        tiles = x.double().abs().reshape(6, 4, 8, 4)
        norms = tiles.amax(dim=(1, 3)) if norm == "max" else (tiles if norm == "l1" else tiles * tiles).sum(dim=(1, 3))
        assert torch.equal(blocks, ref_topk_masks([norms], k, "value")[0])
        assert torch.equal(mask, blocks.repeat_interleave(4, 0).repeat_interleave(4, 1))
        if HAVE_RUST:
            want_mask, want_blocks = sparsekit.block_topk_mask(x, (4, 4), k=k, norm=norm, return_block_mask=True)
            assert torch.equal(blocks, want_blocks) and torch.equal(mask, want_mask)
    x[3, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        _block_topk_on_device(x, (4, 4), 1, norm, backend=forward)


# ------------------------------------------------------------------------------------- the loader
def test_gpu_backend_without_cupy_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    from sparsekit._cuda import CupyBackend

    with pytest.raises(ImportError, match=r"pip install 'sparsekit\[cuda\]'"):
        CupyBackend("select", cs.NAME_EXPRESSIONS, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cs.topk_masks([torch.ones(4)], 1, "abs")


def test_loader_source_and_options():
    from sparsekit import _cuda

    src = _cuda.kernel_source("select")
    assert src.startswith('#line 1 "select.cu"\n')
    opts = _cuda.compile_options()
    assert opts[: len(_cuda.NVRTC_OPTIONS)] == _cuda.NVRTC_OPTIONS and "-std=c++17" in opts
    assert f"-I{_cuda.kernel_dir()}" in opts and (_cuda.kernel_dir() / "common.cuh").is_file()
    assert all(np.dtype(cs._UNSIGNED[f.ctype][0]).itemsize * 8 == f.bits for f in cs.FORMATS.values())
