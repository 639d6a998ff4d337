"""Hypothesis strategies for float tensors of every supported dtype, tie-heavy or not."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TIE_VALUES = [0.0, -0.0, 1.0, -1.0, 0.5, -2.0, math.inf, -math.inf]


@st.composite
def float_tensors(draw, min_size: int = 0, max_size: int = 200, dtype=None, shape=None):
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    if shape is None:
        size = draw(st.integers(min_size, max_size))
        shape = draw(st.sampled_from([(size,), (1, size), (size, 1)])) if size else (0,)
    numel = math.prod(shape)
    if draw(st.booleans()):
        values = draw(st.lists(st.sampled_from(TIE_VALUES), min_size=numel, max_size=numel))
    else:
        element = st.floats(allow_nan=False, allow_infinity=False, width=32, min_value=-60000, max_value=60000)
        values = draw(st.lists(element | st.sampled_from(TIE_VALUES), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)
