"""Shared fixtures: the toy task in the task registry, and a private model cache for the
tiny random models (tests never touch the user's cache for them). Tests marked `slow`
(end-to-end runs, kill -9 fault injection, two-process runs, the real SmolLM2 weights) run
with `--slow` (CI and README's test command pass it); plain `pytest` skips them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("FEM_JAX_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_task(monkeypatch):
    """`even_length` registered in fem_jax.tasks.TASKS for this test only."""
    from toy_tasks import EvenLengthTask, register

    register(monkeypatch)
    return EvenLengthTask


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "fem_jax_cache"


@pytest.fixture
def tiny_cache(monkeypatch, tiny_cache_dir) -> Path:
    """FEM_JAX_CACHE pointed at a session-wide private folder (tiny models built once)."""
    monkeypatch.setenv("FEM_JAX_CACHE", str(tiny_cache_dir))
    return tiny_cache_dir
