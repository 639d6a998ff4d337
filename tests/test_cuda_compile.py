"""Proof 1 for the CUDA kernels without a GPU: NVRTC compiles every cuda/*.cu for sm_80 and sm_90 with
the loader's own options, include path and name expressions, and ptxas reports no spills and static
shared memory within 48 KiB. NVRTC comes from PyPI (torch's nvidia-cuda-nvrtc dependency)."""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sysconfig
from pathlib import Path

import pytest

from sparsekit import _cuda, _cuda_select

# Every kernel file and the template instantiations its launch code asks for.
NAME_EXPRESSIONS = {"select": _cuda_select.NAME_EXPRESSIONS}
KERNEL_FILES = sorted(p.stem for p in _cuda.kernel_dir().glob("*.cu"))


def _find_nvrtc() -> str | None:
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    candidates = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so*"))]
    if os.environ.get("CUDA_PATH"):
        candidates += glob.glob(os.path.join(os.environ["CUDA_PATH"], "lib64", "libnvrtc.so*"))
    candidates = [c for c in candidates if "builtins" not in c and "alt" not in Path(c).name]
    return sorted(candidates)[0] if candidates else None


NVRTC_PATH = _find_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC_PATH is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")


def _compile(name: str, arch: str) -> tuple[int, str, int]:
    nvrtc = ctypes.CDLL(NVRTC_PATH)
    prog = ctypes.c_void_p()
    source = _cuda.kernel_source(name).encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, f"{name}.cu".encode(), 0, None, None) == 0
    try:
        for expr in NAME_EXPRESSIONS.get(name, ()):
            assert nvrtc.nvrtcAddNameExpression(prog, expr.encode()) == 0
        options = [o.encode() for o in (*_cuda.compile_options(), f"-arch={arch}", "-Xptxas=-v")]
        status = nvrtc.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        cubin = ctypes.c_size_t()
        if status == 0:
            assert nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) == 0
        return status, log.value.decode(errors="replace"), cubin.value
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def test_every_kernel_file_is_covered():
    assert KERNEL_FILES, "no cuda/*.cu found next to the package"
    assert set(KERNEL_FILES) <= set(NAME_EXPRESSIONS)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_nvrtc_compiles_without_spills(name, arch):
    status, log, cubin_size = _compile(name, arch)
    assert status == 0, f"NVRTC failed for {name}.cu ({arch}):\n{log}"
    assert cubin_size > 0
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    assert len(entries) >= len(NAME_EXPRESSIONS[name]), log
    report = [line.strip() for line in log.splitlines() if "Used" in line or "spill" in line]
    print(f"\n{name}.cu {arch}:\n  " + "\n  ".join(report))
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and max(spills) == 0, f"register spills in {name}.cu ({arch}):\n{log}"
    smem = [int(s) for s in re.findall(r"(\d+) bytes smem", log)]
    assert max(smem, default=0) <= 48 * 1024, f"static shared memory over 48 KiB:\n{log}"
