"""python -m sparsekit {info,demo}: sparsekit's command line."""

from __future__ import annotations

import argparse
import sys

from .cli import demo, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsekit", description="sparsekit: exact selection and sparse-training building blocks for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build profile, threads, CUDA availability")
    demo_parser = sub.add_parser("demo", help="exact selection on a model-sized set of tensors, checked and timed")
    demo_parser.add_argument("--numel", type=int, default=1 << 24, help="total elements across tensors")
    demo_parser.add_argument("--tensors", type=int, default=32, help="number of tensors")
    demo_parser.add_argument("--density", type=float, default=0.1, help="fraction kept")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return demo(numel=args.numel, tensors=args.tensors, density=args.density)


if __name__ == "__main__":
    sys.exit(main())
