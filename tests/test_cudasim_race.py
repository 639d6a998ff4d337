"""The mutation script's helpers (cuda/sim/mutants.py) and the kernel-directory override it uses.

The race check itself: tests/test_cuda_race.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sparsekit import _cuda
from sparsekit._cudasim import RaceError

ROOT = Path(__file__).resolve().parents[1]


def _mutants():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "cuda" / "sim" / "mutants.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_race_error_is_runtime_error() -> None:
    assert issubclass(RaceError, RuntimeError)


def test_kernel_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "x.cu").write_text("// x\n")
    monkeypatch.setenv("SPARSEKIT_CUDA_DIR", str(tmp_path))
    assert _cuda.kernel_dir() == tmp_path.resolve()
    assert _cuda.kernel_source("x").endswith("// x\n")


def test_mutants_enumerated(tmp_path: Path) -> None:
    m = _mutants()
    cu = tmp_path / "k.cu"
    cu.write_text(
        "__global__ void k(int* c) {\n"
        "  __syncthreads();  // __syncthreads(); in a comment is left alone\n"
        "  int old = atomicAdd(&c[f(1, 2)], 3);\n"
        "}\n"
    )
    ms = m.mutants(cu)
    assert [(line, kind) for line, kind, _ in ms] == [(2, "remove __syncthreads"), (3, "atomicAdd -> +=")]
    assert "__syncthreads();" in ms[0][2].splitlines()[1]  # the comment's copy remains
    assert not ms[0][2].splitlines()[1].lstrip().startswith("__syncthreads")
    assert "atomicAdd" not in ms[1][2] and "r_ += (3)" in ms[1][2] and "*(&c[f(1, 2)])" in ms[1][2]
    assert m.tests_for("select")[0].name == "test_cuda_select.py"
