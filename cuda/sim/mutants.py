"""Mutation check of the CUDA kernels (``make mutants``).

For every ``cuda/*.cu``: remove each ``__syncthreads()`` and turn each ``atomicAdd(a, b)`` into a plain
``(a)[0] += b``-style read-modify-write, one mutant at a time, on a temporary copy of ``cuda/`` that the
loader is pointed at through ``SPARSEKIT_CUDA_DIR``. A mutant is caught when

1. the race check fails: ``tests/test_cuda_race.py::test_<stem>_kernels_race_free`` (the file's kernels
   through their public ops under ``simulated_cuda(race_check=True)``, compared with the Rust path) in a
   process with ThreadSanitizer loaded (``sparsekit.testing.race_check_env()``), or
2. failing that, the file's CUDA tests under the fiber schedules fail (``pytest -x``).

It prints caught/survived (and by which check) per mutant, then a summary.

Usage: python cuda/sim/mutants.py [--jobs N] [--only select.cu] [--no-race-check]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CUDA = ROOT / "cuda"
TESTS = ROOT / "tests"

# Tests that launch a kernel file on the shim, beyond tests/test_cuda_<stem>.py (found automatically).
EXTRA_TESTS: dict[str, list[str]] = {
    "select": ["test_cudasim.py", "test_simulated_cuda.py"],
    "route": ["test_simulated_cuda.py"],
}


def tests_for(stem: str) -> list[Path]:
    """Test files of one kernel file: tests/test_cuda_<stem>.py, the table above, any test naming '<stem>.cu'."""
    found: list[Path] = []
    own = TESTS / f"test_cuda_{stem}.py"
    if own.exists():
        found.append(own)
    for name in EXTRA_TESTS.get(stem, []):
        if (TESTS / name).exists() and TESTS / name not in found:
            found.append(TESTS / name)
    for t in sorted(TESTS.glob("test_*.py")):
        if t not in found and f"{stem}.cu" in t.read_text():
            found.append(t)
    return found


def _atomic_add_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, replacement) of each ``atomicAdd(a, b)`` call, parsed with balanced parentheses."""
    out = []
    for m in re.finditer(r"\batomicAdd\s*\(", text):
        i, depth, comma = m.end(), 1, -1
        while i < len(text) and depth:
            c = text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 1 and comma < 0:
                comma = i
            i += 1
        if comma < 0 or depth:
            continue
        a, b = text[m.end():comma].strip(), text[comma + 1:i - 1].strip()
        # Same value as atomicAdd (the old one), but a plain, racy read-modify-write.
        out.append((m.start(), i, f"([&] {{ auto& r_ = *({a}); auto o_ = r_; r_ += ({b}); return o_; }}())"))
    return out


def mutants(path: Path) -> list[tuple[int, str, str]]:
    """(line, kind, mutated text) for each mutant of one file; comments are left alone."""
    text = path.read_text()
    code = re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    out = []
    for m in re.finditer(r"\b__syncthreads\s*\(\s*\)\s*;", code):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, "remove __syncthreads", text[: m.start()] + ";" + text[m.end():]))
    for s, e, rep in _atomic_add_spans(code):
        line = text.count("\n", 0, s) + 1
        out.append((line, "atomicAdd -> +=", text[:s] + rep + text[e:]))
    return sorted(out, key=lambda x: x[0])


def _pytest(args: list[str], env: dict[str, str]) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip().splitlines()
    race = next((ln.strip()[2:].strip() for ln in out if "data race in kernel" in ln), None)
    return r.returncode != 0, (race or (out[-1] if out else ""))[:160]


def run_one(cu: Path, line: int, kind: str, text: str, race: bool) -> tuple[str, int, str, bool, str]:
    with tempfile.TemporaryDirectory(prefix="sparsekit-mutant-") as d:
        dst = Path(d) / "cuda"
        shutil.copytree(CUDA, dst, ignore=shutil.ignore_patterns("__pycache__"))
        (dst / cu.name).write_text(text)
        env = dict(os.environ, SPARSEKIT_CUDA_DIR=str(dst), PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(TESTS)]))
        if race:
            # Imported here, not at module level: the tests load this file (see main()).
            from sparsekit._cudasim import race_check_env

            race_test = f"{TESTS / 'test_cuda_race.py'}::test_{cu.stem}_kernels_race_free"
            failed, tail = _pytest([race_test], race_check_env(env))
            if failed:
                return cu.name, line, kind, True, "race check: " + tail
        failed, tail = _pytest([str(t) for t in tests_for(cu.stem)], env)
        return cu.name, line, kind, failed, ("schedules: " if failed else "") + tail


def main() -> int:
    # The checkout's sparsekit, like the tests. Only when run as a script: the tests import this file,
    # and a sys.path entry left there would make their spawned workers import python/ (no _core in CI).
    sys.path.insert(0, str(ROOT / "python"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--only", action="append", default=[], help="kernel file name(s), e.g. select.cu")
    ap.add_argument("--no-race-check", action="store_true")
    ns = ap.parse_args()
    files = [p for p in sorted(CUDA.glob("*.cu")) if not ns.only or p.name in ns.only]
    jobs = [(cu, *m) for cu in files for m in mutants(cu)]
    print(f"{len(jobs)} mutants in {', '.join(p.name for p in files)}; tests: "
          + "; ".join(f"{p.name}: {' '.join(t.name for t in tests_for(p.stem))}" for p in files), flush=True)
    # Baseline: the unmutated kernels must pass their tests in the same mode, or nothing is measured.
    for cu in files:
        name, _, _, failed, tail = run_one(cu, 0, "baseline", cu.read_text(), not ns.no_race_check)
        if failed:
            print(f"baseline {name} fails its tests ({tail}); fix that first", flush=True)
            return 2
    with ThreadPoolExecutor(ns.jobs) as ex:
        results = list(ex.map(lambda j: run_one(j[0], j[1], j[2], j[3], not ns.no_race_check), jobs))
    survived = 0
    for name, line, kind, caught, tail in results:
        survived += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {name}:{line:<5} {kind:<22} {tail}")
    print(f"summary: {len(results) - survived} caught, {survived} survived of {len(results)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
