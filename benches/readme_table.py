"""Write the README's generated performance table from ``python -m sparsekit bench --json``.

Usage (from the repository root):

    .venv/bin/python benches/readme_table.py              # run the bench command, rewrite the README table
    .venv/bin/python benches/readme_table.py --from r.json  # use a saved ``bench --json`` output instead
    .venv/bin/python benches/readme_table.py --check      # print the table only, leave README.md alone

The table goes between the ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(result: dict) -> str:
    """The machine line and ``python -m sparsekit bench``'s own table, rebuilt from its JSON."""
    from sparsekit.bench import Case, format_table

    m = result["machine"]
    head = (f"`python -m sparsekit bench` on {m['cpu']}, {m['cores']} cores ({m['sparsekit_threads']} sparsekit / "
            f"{m['torch_threads']} torch threads), torch {m['torch']}, sparsekit {m['sparsekit']}; medians of {result['repeats']} after a warm-up:")
    fields = ("capability", "name", "baseline", "ours_ms", "baseline_ms", "agree")
    cases = [Case(**{f: c[f] for f in fields}) for c in result["cases"]]
    return "\n".join([head, "", format_table(cases)])


def replace_between_markers(text: str, new: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"README.md needs exactly one {START} ... {END} pair")
    a, b = text.index(START) + len(START), text.index(END)
    return text[:a] + "\n" + new + "\n" + text[b:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", help="a saved `python -m sparsekit bench --json` output")
    ap.add_argument("--check", action="store_true", help="print the table, do not write README.md")
    ns = ap.parse_args()
    if ns.src:
        result = json.loads(Path(ns.src).read_text())
    else:
        out = subprocess.run([sys.executable, "-m", "sparsekit", "bench", "--json"], capture_output=True, text=True)
        if out.returncode not in (0, 1):
            print(out.stderr, file=sys.stderr)
            return out.returncode
        result = json.loads(out.stdout)
    new = table(result)
    print(new)
    if not ns.check:
        readme = ROOT / "README.md"
        readme.write_text(replace_between_markers(readme.read_text(), new))
    return 0 if all(c["agree"] for c in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
