"""The command line: ``bench`` smoke run with tiny sizes, ``demo --quick`` trained for real, their options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sparsekit", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_quick_json_reports_every_capability_with_agreeing_answers():
    from sparsekit.bench import CAPABILITIES

    out = _run("bench", "--quick", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert {"cpu", "cores", "torch"} <= set(report["machine"])
    assert {c["capability"] for c in report["cases"]} == set(CAPABILITIES)
    for case in report["cases"]:
        assert case["agree"], case
        assert case["ours_ms"] > 0 and case["baseline_ms"] > 0
        assert case["ratio"] == pytest.approx(case["baseline_ms"] / case["ours_ms"])


def test_bench_rejects_an_unknown_capability():
    out = _run("bench", "--quick", "--only", "nonsense")
    assert out.returncode == 2 and "unknown capability 'nonsense'" in out.stdout


def test_demo_help_documents_every_option():
    out = _run("demo", "--help")
    assert out.returncode == 0
    for option in ("--quick", "--steps", "--density", "--method", "--experts", "--k", "--seed", "--out", "--threads"):
        assert option in out.stdout


@pytest.mark.parametrize("args, message", [(["--density", "0"], "--density"), (["--k", "9", "--experts", "8"], "--k")])
def test_demo_refuses_bad_options(args, message):
    out = _run("demo", "--quick", *args)
    assert out.returncode == 2 and message in out.stdout
