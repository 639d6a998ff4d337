"""Run the selection benchmarks and print a markdown summary.

Usage (from the repository root):

    .venv/bin/python benches/report.py                      # run benches/bench_select.py 3 times, print tables
    .venv/bin/python benches/report.py --repeat 1           # one run (about a minute on 2 cores)
    .venv/bin/python benches/report.py --json OUT.json      # also keep pytest-benchmark's JSON (OUT.1.json, ...)
    .venv/bin/python benches/report.py --from-json A.json [B.json ...]  # no run: summarise earlier JSONs
    .venv/bin/python benches/report.py --rust               # also summarise the last criterion run of
                                                            # `cargo bench -p sparsekit-core --bench select`
                                                            # (read from target/criterion; run it first)

Each run times every benchmark several rounds and keeps the median; with several runs (default 3, for a
shared, noisy machine) each figure is the median of the runs' medians, with the runs' range beside it.

Tables: per operation, ours (median ms) next to each baseline (median ms) and the ratio
baseline / ours (> 1: ours is faster), the read-pass floor of global_topk_masks, the peak extra memory
of each global_topk_masks method relative to the size of its output masks, and with ``--rust`` the
core routines' throughput in GB/s (1e9 bytes of f32 input per second) next to a streaming pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_FILE = os.path.join("benches", "bench_select.py")

# Targets: minimum speed-up of ours over the named baseline (impl prefix), per operation.
TARGETS = {
    ("global_topk_masks", "torch"): 10.0,
    ("global_topk_masks", "numpy"): 2.0,
    ("quantile", "torch.quantile"): 20.0,
    ("topk_mask", "torch.topk(|x|) + scatter"): 5.0,
}
CORE_FLOOR_TARGET = 3.0  # core select at most this many times slower than a streaming pass


def run_benchmarks(json_path: str) -> None:
    cmd = [
        sys.executable, "-m", "pytest", BENCH_FILE, "--benchmark-enable", "-p", "no:cacheprovider",
        f"--benchmark-json={json_path}", "-q", "--benchmark-columns=median,min,max,rounds",
    ]
    print("$ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}" if seconds >= 0.01 else f"{seconds * 1e3:,.2f}"


def target_for(op: str, impl: str) -> float | None:
    for (top, prefix), value in TARGETS.items():
        if op == top and impl.startswith(prefix):
            return value
    return None


def merge_runs(runs: list[dict]) -> dict:
    """One pytest-benchmark JSON whose medians are the median over runs; `spread` = (min, max) of them."""
    merged = json.loads(json.dumps(runs[-1]))
    for b in merged["benchmarks"]:
        medians = sorted(r_b["stats"]["median"] for r in runs for r_b in r["benchmarks"] if r_b["name"] == b["name"])
        mid = len(medians) // 2
        b["stats"]["median"] = medians[mid] if len(medians) % 2 else 0.5 * (medians[mid - 1] + medians[mid])
        b["spread"] = (medians[0], medians[-1], len(medians))
    return merged


def fmt(b: dict) -> str:
    lo, hi, runs = b.get("spread", (None, None, 1))
    text = ms(b["stats"]["median"])
    return text if runs < 2 else f"{text} ({ms(lo)}–{ms(hi)})"


def summarise(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["extra_info"].get("op", b["group"])].append(b)
    lines = []
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "?"))
    runs = data["benchmarks"][0].get("spread", (0, 0, 1))[2] if data["benchmarks"] else 1
    lines.append(f"Run {data.get('datetime', '?')} on {cpu} ({os.cpu_count()} cores), "
                 f"python {info.get('python_version', '?')}; medians of {runs} run(s)"
                 f"{' (range of the runs in parentheses)' if runs > 1 else ''}.\n")
    lines.append("| operation | size | ours (median ms) | baseline | baseline (median ms) | ratio baseline/ours | target | met |")
    lines.append("|---|---|---:|---|---:|---:|---:|:---:|")
    floors, memory = [], []
    for op, benches in groups.items():
        ours = [b for b in benches if b["extra_info"].get("role") == "ours"]
        if not ours:
            continue
        o = ours[0]
        om = o["stats"]["median"]
        for b in benches:
            role, impl = b["extra_info"].get("role"), b["extra_info"].get("impl", b["name"])
            if "memory" in b["extra_info"]:
                memory.append((op, impl, b["extra_info"]["memory"]))
            if role == "floor":
                    floors.append((op, o["extra_info"]["size"], o, impl, b))
            if role != "baseline":
                continue
            bm = b["stats"]["median"]
            ratio = bm / om
            target = target_for(op, impl)
            met = "" if target is None else ("yes" if ratio >= target else "**no**")
            lines.append(f"| {op} | {o['extra_info']['size']} | {fmt(o)} | {impl} | {fmt(b)} | {ratio:.1f}x | "
                         f"{'' if target is None else f'{target:g}x'} | {met} |")
    if floors:
        lines.append("\n| operation | size | ours (median ms) | floor | floor (median ms) | ours / floor |")
        lines.append("|---|---|---:|---|---:|---:|")
        for op, size, o, impl, f in floors:
            lines.append(f"| {op} | {size} | {fmt(o)} | {impl} | {fmt(f)} | "
                         f"{o['stats']['median'] / f['stats']['median']:.1f}x |")
    if memory:
        lines.append("\nPeak extra memory of one global_topk_masks call (fresh subprocess, VmHWM above the RSS "
                     "with the inputs resident; includes the output masks):\n")
        lines.append("| method | peak extra (MiB) | x output masks | x input |")
        lines.append("|---|---:|---:|---:|")
        for op, impl, m in memory:
            peak = m["peak_extra_bytes"]
            lines.append(f"| {impl} | {peak / 2**20:,.0f} | {peak / m['mask_bytes']:.2f} | "
                         f"{peak / m['input_bytes']:.2f} |")
        m0 = memory[0][2]
        lines.append(f"\n(output masks: {m0['mask_bytes'] / 2**20:,.0f} MiB; input: "
                     f"{m0['input_bytes'] / 2**20:,.0f} MiB.)")
    return "\n".join(lines)


def summarise_rust(criterion_dir: str) -> str:
    rows = {}
    for dirpath, _, files in os.walk(criterion_dir):
        if os.path.basename(dirpath) != "new" or "benchmark.json" not in files:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            meta = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        if meta["group_id"] not in ("select", "matrix"):
            continue
        nbytes = (meta.get("throughput") or {}).get("Bytes")
        median_ns = est["median"]["point_estimate"]
        key = (meta["group_id"], meta["value_str"], meta["function_id"])
        rows[key] = (median_ns, nbytes / median_ns if nbytes else None)  # bytes per ns = GB/s
    if not rows:
        return f"(no criterion results under {criterion_dir}: run `cargo bench -p sparsekit-core --bench select` first)"
    lines = ["| routine | size | median ms | GB/s | floor GB/s (sum_abs_lanes_par) | x slower than floor | within 3x |",
             "|---|---|---:|---:|---:|---:|:---:|"]
    order = {"select": 0, "matrix": 1}
    for (group, size, fid), (ns, gbs) in sorted(rows.items(), key=lambda r: (order[r[0][0]], r[0][1], r[0][2])):
        floor = rows.get((group, size, "floor/sum_abs_lanes_par"))
        fg = floor[1] if floor else None
        if not (gbs and fg):
            lines.append(f"| {fid} | {size} | {ns / 1e6:,.2f} | | | | |")
            continue
        slower = fg / gbs
        judged = fid.startswith(("topk_masks", "kth_values"))
        met = ("yes" if slower <= CORE_FLOOR_TARGET else "**no**") if judged else ""
        lines.append(f"| {fid} | {size} | {ns / 1e6:,.2f} | {gbs:.2f} | {fg:.2f} | {slower:.1f}x | {met} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="where to keep pytest-benchmark's JSON (default: a temporary file)")
    ap.add_argument("--from-json", nargs="+", help="summarise these JSONs (one per run) instead of running")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the benchmark file (default 3)")
    ap.add_argument("--rust", action="store_true", help="also summarise target/criterion (cargo bench results)")
    args = ap.parse_args()
    if args.from_json:
        paths = args.from_json
    else:
        stem = args.json[:-5] if args.json and args.json.endswith(".json") else args.json
        stem = stem or os.path.join(tempfile.mkdtemp(prefix="sparsekit-bench-"), "bench")
        paths = [f"{stem}.{i + 1}.json" for i in range(max(1, args.repeat))]
        for path in paths:
            run_benchmarks(path)
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    print(summarise(merge_runs(runs)))
    if args.rust:
        print("\nCore routines (criterion, rust/sparsekit-core/benches/select.rs):\n")
        print(summarise_rust(os.path.join(ROOT, "target", "criterion")))


if __name__ == "__main__":
    main()
