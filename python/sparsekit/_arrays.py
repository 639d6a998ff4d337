"""How tensors cross into the Rust core: flat numpy views of their memory (never a copy of a contiguous
tensor), float16 and bfloat16 as int16 views of their bits (numpy has no bfloat16) with a dtype tag by which
the core reinterprets them."""

from __future__ import annotations

import numpy as np
import torch

#: The core's name for each floating dtype it reads.
DTYPE_TAGS = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}
HALF = (torch.float16, torch.bfloat16)


def bits(t: torch.Tensor) -> np.ndarray:
    """The flat, writable numpy view the core borrows of a contiguous CPU tensor (the same memory; 16-bit
    floats as int16 bits). A non-contiguous tensor raises: callers pass ``t.contiguous()`` where a copy of
    an input is acceptable."""
    flat = t.detach().view(-1)
    return (flat.view(torch.int16) if flat.dtype in HALF else flat).numpy()


def contiguous_bits(t: torch.Tensor) -> np.ndarray:
    """:func:`bits` of ``t``, a non-contiguous tensor copied first: for inputs the core only reads, and for
    outputs allocated contiguous (never copied). Not for tensors the core writes in place."""
    return bits(t.contiguous())
