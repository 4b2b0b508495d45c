"""Shared fixtures: tiny models (built once per session) and tiny story files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VSTORE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny_models


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """``make(family="llama", layers=2, inter=48)`` -> folder of a tiny random model (cached)."""
    root = tmp_path_factory.mktemp("models")

    def make(family: str = "llama", layers: int = 2, inter: int = 48) -> Path:
        return tiny_models.make_model(root / f"{family}-{layers}-{inter}", family, layers, inter)

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    """A tiny Llama (2 layers, 48 neurons) with a BOS-adding tokenizer."""
    return tiny_model_factory("llama")


@pytest.fixture
def stories(tmp_path: Path) -> Path:
    """A small activation story file (3 values x 2 stems x 2 languages)."""
    path = tmp_path / "stories.jsonl"
    tiny_models.make_stories(path, per_value=2)
    return path


@pytest.fixture
def eval_stories(tmp_path: Path) -> Path:
    """A small evaluation story file (3 values x 2 stems x 2 languages)."""
    path = tmp_path / "eval.jsonl"
    tiny_models.make_stories(path, per_value=2, split="evaluation", seed=3)
    return path
