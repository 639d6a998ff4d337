import os

from hypothesis import HealthCheck, settings

# Deterministic example counts; no deadlines (the machine is shared and noisy).
settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def gpu_unavailable_reason() -> str | None:
    """Why the ``gpu`` tests cannot run here, or None when a CUDA device and cupy are both present."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (the gpu suite needs one: make gpu-test on a GPU machine)"
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install 'sparsekit[cuda]')"
    return None


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are collected everywhere and skipped visibly, with the reason, without a GPU."""
    import pytest

    gpu_items = [item for item in items if "gpu" in item.keywords]
    reason = gpu_unavailable_reason() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
