import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden" / "chat_formats.json"


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def golden():
    import json

    if not GOLDEN.exists():
        pytest.fail(f"golden chat formats not found at {GOLDEN} (shared/ must sit beside the checkout)")
    return json.loads(GOLDEN.read_text(encoding="utf-8"))
