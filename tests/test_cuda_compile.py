"""Proof 1 for the CUDA kernels without a GPU: NVRTC compiles every ``cuda/*.cu`` (the shim in ``cuda/sim``
excluded) to CUBIN for sm_80 and sm_90 with the runtime loader's own source prefix, options, include path
and name expressions (imported from ``sparsekit._cuda`` / ``sparsekit._cuda_select``), so what is checked
is what runs. ``-Xptxas -v`` puts ptxas' per-kernel report in the log: registers, static shared memory,
stack and spills are printed (``pytest -s``) and the test fails on any spill or on static shared memory
over 48 KiB. NVRTC is called directly through ctypes: cupy's compile path asks the driver for a device.

libnvrtc comes from the ``nvidia`` wheels torch depends on (``nvidia/*/lib/libnvrtc.so*``) or ``$CUDA_PATH``;
without it the test is skipped with the reason."""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sysconfig
from pathlib import Path

import pytest

from sparsekit import _cuda, _cuda_route, _cuda_select, _cuda_spmm

# Every kernel file and the template instantiations its launch code asks the loader for.
NAME_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "select": _cuda_select.NAME_EXPRESSIONS,
    "route": _cuda_route.NAME_EXPRESSIONS,
    "spmm": _cuda_spmm.NAME_EXPRESSIONS,
    "spmm_tc": _cuda_spmm.TC_NAME_EXPRESSIONS,
}
KERNEL_FILES = sorted(p.stem for p in _cuda.kernel_dir().glob("*.cu"))  # top level only: cuda/sim excluded
ARCHS = ["sm_80", "sm_90"]
MAX_STATIC_SMEM = 48 * 1024


def _find_nvrtc() -> str | None:
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so*"))]
    if os.environ.get("CUDA_PATH"):
        found += glob.glob(os.path.join(os.environ["CUDA_PATH"], "lib64", "libnvrtc.so*"))
    found = [f for f in found if "builtins" not in Path(f).name and "alt" not in Path(f).name]
    return sorted(found, key=lambda f: (len(Path(f).name), f))[0] if found else None


NVRTC_PATH = _find_nvrtc()
pytestmark = pytest.mark.skipif(
    NVRTC_PATH is None,
    reason="libnvrtc not found under site-packages/nvidia/*/lib or $CUDA_PATH (pip install nvidia-cuda-nvrtc)",
)


def _check(nvrtc: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise AssertionError(f"{what}: {nvrtc.nvrtcGetErrorString(status).decode()}")


def compile_cubin(name: str, arch: str) -> tuple[int, str, int, dict[str, str]]:
    """(status, log, cubin size, name expression -> lowered name) of ``cuda/<name>.cu`` for ``arch``."""
    nvrtc = ctypes.CDLL(NVRTC_PATH)
    prog = ctypes.c_void_p()
    source = _cuda.kernel_source(name).encode()  # the loader's text, #line prefix included
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, f"{name}.cu".encode(), 0, None, None), "create")
    try:
        exprs = NAME_EXPRESSIONS.get(name, ())
        for expr in exprs:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, expr.encode()), f"name expression {expr}")
        options = [o.encode() for o in (*_cuda.compile_options(), f"--gpu-architecture={arch}", "-Xptxas", "-v")]
        status = nvrtc.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        cubin, lowered = ctypes.c_size_t(), {}
        if status == 0:
            _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)), "cubin size")
            for expr in exprs:
                out = ctypes.c_char_p()
                _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)), f"lowered {expr}")
                lowered[expr] = out.value.decode()
        return status, log.value.decode(errors="replace"), cubin.value, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def ptxas_report(log: str, lowered: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per kernel (name expression, or the extern "C" name): registers, static smem, stack, spills."""
    names = {v: k for k, v in lowered.items()}
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = names.get(m.group(1), m.group(1))
            report[current] = {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            report[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            report[current]["registers"] = int(m[1])
            if s := re.search(r"(\d+) bytes smem", line):
                report[current]["smem"] = int(s[1])
    return report


def _table(name: str, arch: str, report: dict[str, dict[str, int]]) -> str:
    rows = [f"{name}.cu {arch}: kernel | registers | static smem B | stack B | spill stores/loads B"]
    for kernel, r in report.items():
        rows.append(
            f"  {kernel:<42} {r['registers']:>3} regs {r['smem']:>6} smem {r['stack']:>4} stack "
            f"{r['spill_stores']}/{r['spill_loads']} spill"
        )
    return "\n".join(rows)


def test_every_kernel_file_is_covered():
    assert KERNEL_FILES, f"no .cu files in {_cuda.kernel_dir()}"
    assert set(KERNEL_FILES) <= set(NAME_EXPRESSIONS), "a .cu file without its name expressions here"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_nvrtc_compiles_without_spills(name, arch):
    status, log, cubin_size, lowered = compile_cubin(name, arch)
    assert status == 0, f"NVRTC failed for {name}.cu ({arch}):\n{log}"
    assert cubin_size > 0 and set(lowered) == set(NAME_EXPRESSIONS[name])
    report = ptxas_report(log, lowered)
    table = _table(name, arch, report)
    print("\n" + table)
    assert set(lowered) <= set(report), f"ptxas reported no entry for some name expressions:\n{table}\n{log}"
    spills = {k: r for k, r in report.items() if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"register spills in {sorted(spills)}:\n{table}"
    big = {k: r["smem"] for k, r in report.items() if r["smem"] > MAX_STATIC_SMEM}
    assert not big, f"static shared memory over 48 KiB in {big}:\n{table}"
