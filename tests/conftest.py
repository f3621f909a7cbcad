"""Shared fixtures: the tiny offline Stable Diffusion and the tiny imbalanced dataset (pogdiff/testing.py)."""

import os

# Nothing in the suite may reach the network; set before huggingface_hub / datasets read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from pogdiff.testing import build_tiny_sd, write_tiny_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    """A tiny Stable Diffusion saved in the diffusers layout (random weights, seed 0)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory) -> str:
    """An imagefolder with metadata.jsonl: identities alice/bruno (6 images) and chen/dara (2 images)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "data")
