"""Testing aids: run the CUDA kernels without a GPU.

:func:`simulated_cuda` is the public switch: inside it, every public op given **CPU tensors** runs its
CUDA launch code (the very code that runs on a GPU) on the CPU shim in ``cuda/sim``, each CUDA thread a
fiber, with the same results and errors a GPU gives. Selection (``sparsekit.select``) and every later
kernel family honour it. Use it to test code paths that only run on CUDA, or to debug a kernel::

    import torch, sparsekit
    from sparsekit.testing import simulated_cuda

    x = torch.randn(10_000)
    with simulated_cuda(schedule="random", seed=3):
        mask = sparsekit.topk_mask(x, k=100)      # cuda/select.cu, executed on the CPU
    assert torch.equal(mask, sparsekit.topk_mask(x, k=100))

``race_check=True`` adds a happens-before race detector (ThreadSanitizer over the fibers): a missing
barrier or a plain ``+=`` where an atomic belongs raises :class:`RaceError`, naming the kernel, the two
source lines and the CUDA threads, whether or not any schedule exposes it. ThreadSanitizer's runtime
must be in the process from its start, so run such code in a process started with
:func:`race_check_env`::

    subprocess.run([sys.executable, "my_kernel_test.py"], env=sparsekit.testing.race_check_env())

It needs g++ >= 12 (the kernels are compiled once per source and cached under
``$SPARSEKIT_SIM_CACHE``, default ``~/.cache/sparsekit/cudasim``); it is slow (a fiber switch per
barrier), so keep inputs small.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ._cuda import ACTIVE_SIMULATION, Simulation
from ._cudasim import RaceError, race_check_env

__all__ = ["RaceError", "race_check_env", "simulated_cuda"]

_SCHEDULES = ("forward", "reverse", "random")


@contextmanager
def simulated_cuda(
    schedule: str = "forward", seed: int = 0, race_check: bool = False, threads: int | None = None
) -> Iterator[Simulation]:
    """Run the CUDA launch code of public ops on the CPU shim for CPU tensors, inside the ``with`` block.

    Args:
        schedule: the order in which a block's threads resume after each barrier or warp collective:
            ``"forward"``, ``"reverse"`` or ``"random"`` (seeded by ``seed``). A missing barrier usually
            changes the result under some order.
        seed: the seed of the ``"random"`` schedule.
        race_check: also run a happens-before race detector (ThreadSanitizer over the fibers): a data race
            (a missing barrier, a plain ``+=`` where an atomic belongs) raises an error naming the kernel,
            the two source lines and the threads, whether or not the schedule exposes it. Much slower
            (kernels run one block at a time); needs a process started with :func:`race_check_env`
            (``RuntimeError`` otherwise). Each distinct race is reported once per process.
        threads: OS worker threads running blocks (default ``$SPARSEKIT_SIM_THREADS`` or min(cores, 8)).

    Yields the active :class:`~sparsekit._cuda.Simulation`; its ``backends`` hold the compiled kernel
    families, each with a ``syncs`` count of the host synchronisations a GPU run would make.

    Nesting is allowed (the innermost block wins); the switch is per thread and per asyncio task
    (a :class:`contextvars.ContextVar`). CUDA tensors are unaffected: they still run on the GPU.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    sim = Simulation(schedule=schedule, seed=seed, race_check=bool(race_check), threads=threads)
    token = ACTIVE_SIMULATION.set(sim)
    try:
        yield sim
    finally:
        ACTIVE_SIMULATION.reset(token)
