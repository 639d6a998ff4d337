"""python -m sparsekit {demo,bench,info}: sparsekit's command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsekit",
        description="sparsekit: sparse and Mixture-of-Experts training building blocks for PyTorch, with a Rust core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo_parser = sub.add_parser(
        "demo",
        help="train a small MoE language model dense, sparse and unbalanced on the standard library's source",
        description=(demo.__doc__ or "").split("\n\n")[0].replace("``", ""),  # plain text, not reST
    )
    demo.add_arguments(demo_parser)
    bench_parser = sub.add_parser("bench", help="every capability against its usual alternative, one table of speed-ups")
    bench_parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every case")
    bench_parser.add_argument("--json", action="store_true", help="machine-readable output")
    bench_parser.add_argument("--only", nargs="+", metavar="CAPABILITY", help="run only these capabilities")
    sub.add_parser("info", help="version, build profile, threads, CUDA availability")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .cli import info

        return info()
    if args.command == "bench":
        from . import bench

        return bench.run(quick=args.quick, as_json=args.json, only=args.only)
    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
