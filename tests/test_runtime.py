"""Thread pool, determinism across thread counts, fork safety, GIL release, and the CLI."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

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
