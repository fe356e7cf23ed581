import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_root():
    """../shared beside the checkout (or $SEGAWARE_SHARED)."""
    return Path(os.environ.get("SEGAWARE_SHARED", REPO.parent / "shared"))


SHARED = shared_root()
HAVE_SHARED = (SHARED / "golden").is_dir()


@pytest.fixture(scope="session")
def shared():
    if not HAVE_SHARED:
        pytest.skip(f"reference material not found at {SHARED} (set SEGAWARE_SHARED)")
    return SHARED


def _cuda_ok():
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and CuPy")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def cpu_and_cuda():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
