"""The one loader of sparsekit's CUDA kernels (``cuda/*.cu``), through ``cupy.RawModule``.

``import sparsekit`` never imports cupy; the first CUDA call does, and without cupy it raises an
``ImportError`` that says what to install. Kernel sources ship inside the package (``sparsekit/cuda``,
a link to the repository's top-level ``cuda/`` in a checkout). Modules are compiled once per
(name, name expressions, device, options) and cached, kernels looked up once; the source is prefixed with ``#line 1 "<name>.cu"`` so compiler messages
point at the real file and line.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
_MISSING_CUPY = (
    "sparsekit's CUDA path needs cupy, which is not installed: pip install 'sparsekit[cuda]' "
    "(cupy-cuda13x; use cupy-cuda12x with a CUDA 12 build of torch)"
)


def kernel_dir() -> Path:
    """Directory holding the ``.cu`` sources and their headers."""
    return Path(__file__).resolve().parent / "cuda"


def kernel_source(name: str) -> str:
    """Source of ``cuda/<name>.cu`` with a ``#line`` directive naming the file."""
    path = kernel_dir() / f"{name}.cu"
    return f'#line 1 "{path.name}"\n' + path.read_text()


def compile_options() -> tuple[str, ...]:
    """NVRTC options the loader passes: the language standard and the kernels' include directory."""
    return (*NVRTC_OPTIONS, f"-I{kernel_dir()}")


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
