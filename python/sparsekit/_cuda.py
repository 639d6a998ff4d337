"""The one loader of sparsekit's CUDA kernels (``cuda/*.cu``), through ``cupy.RawModule``.

``import sparsekit`` never imports cupy; the first CUDA call does, and without cupy it raises an
``ImportError`` that says what to install. Kernel sources ship inside the package (``sparsekit/cuda``,
a link to the repository's top-level ``cuda/`` in a checkout). Modules are compiled once per
(name, name expressions, device, options) and cached, kernels looked up once; the source is prefixed with ``#line 1 "<name>.cu"`` so compiler messages
point at the real file and line.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
_MISSING_CUPY = (
    "sparsekit's CUDA path needs cupy, which is not installed: pip install 'sparsekit[cuda]' "
    "(cupy-cuda13x; use cupy-cuda12x with a CUDA 12 build of torch)"
)


def kernel_dir() -> Path:
    """Directory holding the ``.cu`` sources and their headers (``SPARSEKIT_CUDA_DIR`` overrides it)."""
    override = os.environ.get("SPARSEKIT_CUDA_DIR")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parent / "cuda"


def kernel_source(name: str) -> str:
    """Source of ``cuda/<name>.cu`` with a ``#line`` directive naming the file."""
    path = kernel_dir() / f"{name}.cu"
    return f'#line 1 "{path.name}"\n' + path.read_text()


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> Path | None:
    """The CUDA headers that ``#include <mma.h>`` needs (its ``crt/mma.h``), which NVRTC does not carry:
    ``$CUDA_PATH/include`` if it has them, else the pip wheels' (``nvidia/cu13/include`` from
    ``nvidia-cuda-nvcc``, or ``nvidia/cuda_nvcc/include`` for CUDA 12). ``None`` when absent."""
    roots = [Path(os.environ["CUDA_PATH"]) / "include"] if os.environ.get("CUDA_PATH") else []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        roots += sorted(Path(site).glob("nvidia/*/include"))
    return next((r for r in roots if (r / "crt" / "mma.h").is_file()), None)


def compile_options() -> tuple[str, ...]:
    """NVRTC options the loader passes: the language standard, the kernels' include directory and the
    CUDA headers' (:func:`cuda_include_dir`, for the tensor-core kernels' ``<mma.h>``)."""
    extra = cuda_include_dir()
    return (*NVRTC_OPTIONS, f"-I{kernel_dir()}", *((f"-I{extra}",) if extra else ()))


def import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(_MISSING_CUPY) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def get_module(name: str, name_expressions: tuple[str, ...], device: int, options: tuple[str, ...] | None = None) -> Any:
    """The compiled ``cupy.RawModule`` of ``cuda/<name>.cu`` for one device, cached per
    (name, name expressions, device, options); ``options=None`` means :func:`compile_options`."""
    cupy = import_cupy()
    opts = compile_options() if options is None else options
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=kernel_source(name), options=opts, name_expressions=name_expressions)


@functools.lru_cache(maxsize=None)
def get_function(name: str, name_expressions: tuple[str, ...], device: int, kernel: str) -> Any:
    """One kernel of :func:`get_module` (a template by its name expression, or an ``extern "C"`` name),
    cached: ``RawModule.get_function`` builds a new ``RawKernel`` on every call."""
    module = get_module(name, name_expressions, device)
    cupy = import_cupy()
    with cupy.cuda.Device(device):
        return module.get_function(kernel)


# ------------------------------------------------------------------------------------------ backends
# Launch code (``_cuda_select`` and every later kernel family) is written once against a backend:
# :class:`CupyBackend` on a GPU, :class:`SimBackend` on the CPU shim. The shim runs while
# ``sparsekit.testing.simulated_cuda()`` is active (public ops given CPU tensors then take their CUDA
# launch code) and in tests that pass a backend explicitly.
UNSIGNED_TYPES: dict[str, tuple[Any, torch.dtype]] = {
    "unsigned int": (np.uint32, torch.uint32),
    "unsigned long long": (np.uint64, torch.uint64),
    "unsigned short": (np.uint16, torch.uint16),
}
_SIGNED_OF = {np.uint16: torch.int16, np.uint32: torch.int32, np.uint64: torch.int64}


class Backend(Protocol):
    """What launch code needs from a device: kernel arguments, launches, uploads and reads."""

    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        """``t`` (contiguous) as an array of the unsigned C type ``ctype``, zero-copy."""

    def plain(self, t: torch.Tensor) -> Any:
        """``t`` as a kernel argument of its own dtype."""

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: tuple[Any, ...], shared_mem: int = 0) -> None:
        """Launch kernel ``name`` (a name expression or an ``extern "C"`` name) of this family."""

    def upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array as a tensor on the device, without synchronising the host."""

    def read(self, t: torch.Tensor) -> np.ndarray:
        """``t``'s values on the host: a synchronisation point (counted by the shim)."""


class _DeviceArg:
    """A tensor waiting to be handed to cupy by DLPack, viewed as ``np_type`` if given."""

    __slots__ = ("np_type", "tensor")

    def __init__(self, tensor: torch.Tensor, np_type: Any = None) -> None:
        self.tensor, self.np_type = tensor, np_type


class CupyBackend:
    """Kernels of one family compiled by ``cupy.RawModule`` for ``device``, launched on torch's current
    stream of that device under a cupy device guard.

    Tensors cross by DLPack, zero-copy, inside the launch's stream context (producer and consumer are the
    same stream, so no cross-stream event is needed). Unsigned views go through the signed dtype of the
    same width (torch's DLPack export of uint32/uint64 is limited) and are reinterpreted by cupy. Uploads
    go through pinned memory with ``non_blocking=True``, so they never synchronise the host; reads are
    the only synchronisation points."""

    def __init__(self, family: str, name_expressions: tuple[str, ...], device: torch.device) -> None:
        self.cupy = import_cupy()
        self.family, self.name_expressions = family, name_expressions
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()

    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        return _DeviceArg(t, UNSIGNED_TYPES[ctype][0])

    def plain(self, t: torch.Tensor) -> Any:
        return _DeviceArg(t)

    def _to_cupy(self, arg: Any) -> Any:
        if not isinstance(arg, _DeviceArg):
            return arg
        if arg.np_type is None:
            return self.cupy.from_dlpack(arg.tensor)
        return self.cupy.from_dlpack(arg.tensor.view(_SIGNED_OF[arg.np_type])).view(arg.np_type)

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: tuple[Any, ...], shared_mem: int = 0) -> None:
        kernel = get_function(self.family, self.name_expressions, self.index, name)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        grid = grid if isinstance(grid, tuple) else (grid,)
        with self.cupy.cuda.Device(self.index), self.cupy.cuda.ExternalStream(stream):
            kernel(grid, (block,), tuple(self._to_cupy(a) for a in args), shared_mem=shared_mem)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        # The caching host allocator keeps the pinned block alive until the copy has run.
        return torch.from_numpy(array).pin_memory().to(self.device, non_blocking=True)

    def read(self, t: torch.Tensor) -> np.ndarray:
        return t.cpu().numpy()


class SimBackend:
    """The same kernels on the CPU through the fiber shim (``sparsekit._cudasim``): tensors are CPU
    tensors. ``syncs`` counts :meth:`read` calls, the host synchronisations a GPU run would make."""

    def __init__(
        self,
        family: str,
        name_expressions: tuple[str, ...],
        schedule: str = "forward",
        seed: int = 0,
        threads: int | None = None,
        race_check: bool = False,
    ) -> None:
        from ._cudasim import SimRawModule

        extra: dict[str, Any] = {"race_check": True} if race_check else {}
        self.module = SimRawModule(
            kernel_source(family), compile_options(), name_expressions, schedule=schedule, seed=seed, threads=threads, **extra
        )
        self.syncs = 0

    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        return t.view(UNSIGNED_TYPES[ctype][1])

    def plain(self, t: torch.Tensor) -> Any:
        return t

    def launch(self, name: str, grid: int | tuple[int, ...], block: int, args: tuple[Any, ...], shared_mem: int = 0) -> None:
        self.module.get_function(name)(grid if isinstance(grid, tuple) else (grid,), (block,), args, shared_mem=shared_mem)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

    def read(self, t: torch.Tensor) -> np.ndarray:
        self.syncs += 1
        return t.numpy()


@dataclass(frozen=True)
class Simulation:
    """Settings of an active ``sparsekit.testing.simulated_cuda()`` block, and its compiled modules."""

    schedule: str = "forward"
    seed: int = 0
    race_check: bool = False
    threads: int | None = None
    backends: dict[tuple[str, tuple[str, ...]], SimBackend] = field(default_factory=dict, compare=False, repr=False)

    def backend(self, family: str, name_expressions: tuple[str, ...]) -> SimBackend:
        key = (family, name_expressions)
        if key not in self.backends:
            self.backends[key] = SimBackend(family, name_expressions, self.schedule, self.seed, self.threads, self.race_check)
        return self.backends[key]


ACTIVE_SIMULATION: ContextVar[Simulation | None] = ContextVar("sparsekit_simulated_cuda", default=None)


def runs_on_device(t: torch.Tensor) -> bool:
    """Whether an op given ``t`` takes its CUDA launch code: ``t`` is a CUDA tensor, or a CPU tensor
    inside ``sparsekit.testing.simulated_cuda()`` (the one predicate every public op asks)."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and ACTIVE_SIMULATION.get() is not None)


def backend_for(family: str, name_expressions: tuple[str, ...], t: torch.Tensor, backend: Backend | None = None) -> Backend:
    """The backend that runs ``family``'s kernels on ``t``: an explicit one, else the active
    simulation's (CPU tensors), else cupy on ``t``'s device."""
    if backend is not None:
        return backend
    sim = ACTIVE_SIMULATION.get()
    if sim is not None and t.device.type == "cpu":
        return sim.backend(family, name_expressions)
    if t.device.type != "cuda":
        raise ValueError(
            f"sparsekit's CUDA path ({family}) needs CUDA tensors, got a {t.device.type} tensor "
            "(CPU tensors take it only inside sparsekit.testing.simulated_cuda())"
        )
    return CupyBackend(family, name_expressions, t.device)
