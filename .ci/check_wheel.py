"""Fail unless the built wheel carries what an installed sparsekit needs at run time."""

import sys
import zipfile

REQUIRED = [
    "sparsekit/__init__.py", "sparsekit/_core.pyi", "sparsekit/py.typed", "sparsekit/select.py", "sparsekit/testing.py",
    "sparsekit/demo.py", "sparsekit/bench.py", "sparsekit/sparsity/__init__.py", "sparsekit/moe/__init__.py",
    "sparsekit/comm/__init__.py", "sparsekit/blocksparse.py", "sparsekit/ops.py", "sparsekit/nn.py",
]
REQUIRED_PREFIXES = ["sparsekit/_core."]  # the compiled extension
CUDA_DIR = "sparsekit/cuda/"


def main(path: str) -> int:
    names = set(zipfile.ZipFile(path).namelist())
    missing = [n for n in REQUIRED if n not in names]
    missing += [p + "*" for p in REQUIRED_PREFIXES if not any(n.startswith(p) and not n.endswith(".pyi") for n in names)]
    kernels = sorted(n for n in names if n.startswith(CUDA_DIR) and n.endswith((".cu", ".cuh", ".h")))
    if not any(n.endswith(".cu") for n in kernels):
        missing.append(CUDA_DIR + "*.cu")
    if missing:
        print(f"wheel {path} lacks: {', '.join(missing)}")
        return 1
    print(f"wheel ok: {len(names)} files, CUDA sources: {', '.join(kernels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
