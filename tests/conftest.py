"""Shared fixtures: tiny offline models (no download) covering Llama/GQA, Qwen2 and Llama-3 RoPE scaling."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kvjudge.models import LoadedModel, byte_tokenizer, tiny_model
from kvjudge.models.tiny import spec_id

# Every Ray the tests start is a loopback test cluster: token authentication off for all of them, set
# once for the whole session. Ray caches the mode in the process at its first init, so a test that
# flipped it for itself would leave later in-process clusters with a driver and a GCS that disagree.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# shared test data (tests/helpers.py) is imported as ``helpers``: --import-mode=importlib adds no folder to sys.path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

TINY = {
    "tiny-llama": {},  # Llama, GQA 4 query / 2 KV heads
    "tiny-qwen2": {},  # Qwen2: q/k/v biases, tied embeddings, 4 query / 1 KV head
    "tiny-llama3-scaled": {"rope_scaling": LLAMA3_SCALING},
}


def make_tiny(name: str) -> LoadedModel:
    base = "tiny-llama" if name == "tiny-llama3-scaled" else name
    model = tiny_model(base, **TINY[name]).float()
    return LoadedModel(model, byte_tokenizer(), spec_id(name, {}))


@pytest.fixture(scope="session", params=list(TINY))
def tiny(request) -> LoadedModel:
    """Each tiny model in turn (fp32, CPU)."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def llama() -> LoadedModel:
    return make_tiny("tiny-llama")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
