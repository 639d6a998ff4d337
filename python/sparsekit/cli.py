"""The ``info`` command of ``python -m sparsekit``."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import __version__, _core, get_num_threads


def cuda_status() -> str:
    """One line saying whether the CUDA path can run here, and if not, why."""
    if importlib.util.find_spec("cupy") is None:
        return "unavailable (cupy not installed: pip install 'sparsekit[cuda]')"
    if not torch.cuda.is_available():
        return "unavailable (cupy installed, but torch sees no CUDA device)"
    return f"available ({torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)})"


def info() -> int:
    print(f"sparsekit {__version__}")
    print(f"build profile: {_core.build_profile()}")
    print(f"threads: {get_num_threads()} (SPARSEKIT_NUM_THREADS or sparsekit.set_num_threads)")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"cuda: {cuda_status()}")
    return 0
