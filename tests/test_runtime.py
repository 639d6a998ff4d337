"""Thread pool, determinism across thread counts, fork safety, GIL release, and the CLI."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import sparsekit


def _tie_heavy(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-20, 21, (n,), generator=gen).float()
    return list(x.split([n // 3, 0, n // 3, n - 2 * (n // 3)]))


def test_same_masks_on_any_thread_count():
    tensors = _tie_heavy(1_000_003)
    results = []
    try:
        for threads in (1, 2, 3, 7):
            sparsekit.set_num_threads(threads)
            assert sparsekit.get_num_threads() == threads
            results.append(sparsekit.global_topk_masks(tensors, k=333_333))
    finally:
        sparsekit.set_num_threads(0)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_env_var_sizes_the_pool():
    code = "import sparsekit; print(sparsekit.get_num_threads())"
    env = dict(os.environ, SPARSEKIT_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(ValueError):
        sparsekit.set_num_threads(-1)


def _child_selects(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: torch's own OpenMP pool is not fork-safe
    tensors = _tie_heavy(300_000)
    masks = sparsekit.global_topk_masks(tensors, k=1000)
    queue.put(sum(int(m.sum()) for m in masks))


def test_pool_works_in_forked_children():
    sparsekit.topk_mask(torch.randn(500_000), 10)  # make sure the parent's pool exists before fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_selects, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0, "forked child hung or crashed"
    assert queue.get(timeout=5) == 1000


def test_gil_is_released_during_selection():
    """The main thread runs Python while a worker is inside one long Rust call. Were the GIL held for the
    call, the main thread could not run between the call's entry and exit."""
    tensors = [torch.randn(1 << 24) for _ in range(2)]
    entered = threading.Event()
    stamps: dict[str, float] = {}

    def work():
        stamps["enter"] = time.perf_counter()
        entered.set()
        sparsekit.global_topk_masks(tensors, k=1 << 20)
        stamps["exit"] = time.perf_counter()

    worker = threading.Thread(target=work)
    worker.start()
    entered.wait()
    time.sleep(0.005)  # the call takes tens of ms; by now the worker is inside it
    stamps["main"] = time.perf_counter()
    worker.join()
    assert stamps["enter"] < stamps["main"] < stamps["exit"]


def test_cli_info():
    info = subprocess.run([sys.executable, "-m", "sparsekit", "info"], capture_output=True, text=True, check=True)
    assert "sparsekit" in info.stdout and "threads:" in info.stdout and "cuda:" in info.stdout


def test_cli_help_is_plain_text():
    help_text = subprocess.run([sys.executable, "-m", "sparsekit", "--help"], capture_output=True, text=True, check=True)
    assert "``" not in help_text.stdout and ":class:" not in help_text.stdout
    assert all(cmd in help_text.stdout for cmd in ("demo", "bench", "info"))


def test_dir_lists_only_the_public_api():
    assert "annotations" not in dir(sparsekit)
    assert set(sparsekit.__all__) <= set(dir(sparsekit))


# ---------------------------------------------------------------------------- the output buffer cache
def _blocksparse_case(seed: int = 0):  # type: ignore[no-untyped-def]
    """A block-sparse product whose output (512 x 1024 float32, 2 MiB) comes from the cache."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(32, 16, generator=gen) < 0.3
    w = sparsekit.BlockSparseMatrix.from_dense(torch.randn(1024, 512, generator=gen), (32, 32), mask=mask)
    x = torch.randn(512, 512, generator=gen)
    return x, w, x @ w.to_dense().T


def test_buffer_cache_reuses_freed_outputs_and_keeps_results_right():
    sparsekit.set_buffer_cache_limit(64)
    try:
        sparsekit.empty_buffer_cache()
        x, w, ref = _blocksparse_case()
        y1 = sparsekit.ops.bsr_linear(x, w)
        torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-4)
        ptr = y1.data_ptr()
        y2 = sparsekit.ops.bsr_linear(x, w)
        assert y2.data_ptr() != ptr  # both alive: never the same memory
        del y1
        info = sparsekit.buffer_cache_info()
        assert info["idle_buffers"] == 1 and info["idle_bytes"] == 512 * 1024 * 4
        y3 = sparsekit.ops.bsr_linear(x * 2, w)  # takes the freed buffer, overwrites it fully
        assert y3.data_ptr() == ptr
        torch.testing.assert_close(y3, 2 * ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-4)
        sparsekit.empty_buffer_cache()
        del y2, y3
        assert sparsekit.buffer_cache_info()["idle_buffers"] == 2
        sparsekit.empty_buffer_cache()
        assert sparsekit.buffer_cache_info()["idle_bytes"] == 0
    finally:
        sparsekit.set_buffer_cache_limit(1024)


def test_buffer_cache_off_and_over_limit():
    x, w, ref = _blocksparse_case(1)
    try:
        for limit_mb in (0, 1):  # off; on with a cap below the 2 MiB output
            sparsekit.set_buffer_cache_limit(limit_mb)
            y = sparsekit.ops.bsr_linear(x, w)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
            del y
            assert sparsekit.buffer_cache_info()["idle_buffers"] == 0
    finally:
        sparsekit.set_buffer_cache_limit(1024)
    for bad in (-1, "1", None, True, float("nan")):
        with pytest.raises(ValueError, match="mb"):
            sparsekit.set_buffer_cache_limit(bad)  # type: ignore[arg-type]


def test_buffer_cache_routing_plan_matches_fresh_memory():
    logits = torch.randn(70000, 16, generator=torch.Generator().manual_seed(2))
    sparsekit.set_buffer_cache_limit(0)
    try:
        fresh = sparsekit.moe.route(logits, 2)
    finally:
        sparsekit.set_buffer_cache_limit(1024)
    # the cached outputs hold a previous plan's bytes before they are overwritten
    for _ in range(3):
        other = sparsekit.moe.route(logits.flip(0), 2)
        del other
        cached = sparsekit.moe.route(logits, 2)
        assert torch.equal(cached.expert_ids, fresh.expert_ids)
        assert torch.equal(cached.order, fresh.order)
        assert torch.equal(cached.weights, fresh.weights)


def _child_uses_cached_buffers(queue, x, w, ref) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)  # as DataLoader workers do: torch's own OpenMP pool is not fork-safe
    ok = all(np.allclose(sparsekit.ops.bsr_linear(x, w).numpy(), ref.numpy(), rtol=1e-5, atol=1e-4) for _ in range(3))
    queue.put((ok, sparsekit.buffer_cache_info()["idle_buffers"]))


def test_buffer_cache_in_forked_children():
    # the parent leaves idle buffers behind; a forked child (a DataLoader worker) takes and returns its own
    x, w, ref = _blocksparse_case()
    y = sparsekit.ops.bsr_linear(x, w)
    del y  # an output made and freed: one idle buffer
    assert sparsekit.buffer_cache_info()["idle_buffers"] >= 1
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_uses_cached_buffers, args=(queue, x, w, ref))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0, "forked child hung or crashed"
    ok, idle = queue.get(timeout=5)
    assert ok and idle >= 1
