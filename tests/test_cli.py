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


def test_readme_table_is_generated_from_the_bench_json():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("readme_table", root / "benches" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    out = _run("bench", "--quick", "--json", "--only", "comm")
    report = json.loads(out.stdout)
    table = mod.table(report)
    case = report["cases"][0]
    assert f"| comm | {case['name']} |" in table and f"| {case['ratio']:.2f}x | yes |" in table
    assert f"medians of {report['repeats']}" in table
    readme = (root / "README.md").read_text()
    rewritten = mod.replace_between_markers(readme, table)
    assert table in rewritten and rewritten.count(mod.START) == 1
    # everything outside the markers is kept
    assert rewritten.split(mod.START)[0] == readme.split(mod.START)[0]
    assert rewritten.split(mod.END)[1] == readme.split(mod.END)[1]
    with pytest.raises(SystemExit):
        mod.replace_between_markers("no markers", table)


def test_bench_rejects_an_unknown_capability():
    out = _run("bench", "--quick", "--only", "nonsense")
    assert out.returncode == 2 and "unknown capability 'nonsense'" in out.stdout


def test_demo_help_documents_every_option():
    out = _run("demo", "--help")
    assert out.returncode == 0
    for option in ("--quick", "--steps", "--density", "--method", "--experts", "--k", "--seed", "--out", "--threads"):
        assert option in out.stdout
    assert "``" not in out.stdout  # plain text, not reST markup


@pytest.mark.parametrize("args, message", [(["--density", "0"], "--density"), (["--k", "9", "--experts", "8"], "--k")])
def test_demo_refuses_bad_options(args, message):
    out = _run("demo", "--quick", *args)
    assert out.returncode == 2 and message in out.stdout


def _results(path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_demo_quick_trains_sparse_close_to_dense_and_balancing_lowers_the_load(tmp_path):
    out = _run("demo", "--quick", "--no-progress", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Python standard-library source" in out.stdout and "bits/char" in out.stdout
    for png in ("loss.png", "density.png", "expert_load.png"):
        assert (tmp_path / png).stat().st_size > 1000
    runs = {r["name"]: r for r in _results(tmp_path)["runs"]}
    dense, sparse, unbalanced = runs["dense"], runs["sparse"], runs["unbalanced"]
    assert sparse["final_density"] == pytest.approx(0.2, abs=0.01)
    assert sparse["flop_fraction"] < 0.5
    # the models learn (uniform over 128 bytes is ln 128 = 4.85 nats) and sparsity costs little
    assert dense["val_loss"][-1] < 3.2
    assert sparse["val_loss"][-1] < dense["val_loss"][-1] + 0.25
    # aux-loss-free balancing keeps the experts' loads closer together than no balancing
    from sparsekit.demo import RunResult, late_imbalance

    def load(run: dict) -> float:
        return late_imbalance(RunResult(run["name"], imbalance=run["imbalance"]))

    assert load(dense) < 0.8 * load(unbalanced)


def test_demo_same_seed_same_numbers_and_two_processes_match_one(tmp_path):
    args = ["--quick", "--no-progress", "--steps", "20", "--threads", "1"]
    first, second, dist = tmp_path / "a", tmp_path / "b", tmp_path / "dist"
    for folder in (first, second):
        out = _run("demo", *args, "--out", str(folder))
        assert out.returncode == 0, out.stdout + out.stderr
    assert _strip_times(first) == _strip_times(second)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
                "-m", "sparsekit", "demo", *args, "--out", str(dist)]
    out = subprocess.run(torchrun, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    one = {r["name"]: r for r in _results(first)["runs"]}
    two = {r["name"]: r for r in _results(dist)["runs"]}
    for name in one:  # equal up to the rounding of the gradient all-reduce, amplified by training
        assert two[name]["train_loss"] == pytest.approx(one[name]["train_loss"], rel=1e-2)
        assert two[name]["val_loss"] == pytest.approx(one[name]["val_loss"], rel=1e-2)


def _strip_times(folder) -> list[dict]:
    runs = _results(folder)["runs"]
    for r in runs:
        r.pop("seconds_per_step")
    return runs
