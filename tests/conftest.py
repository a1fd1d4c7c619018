"""Shared fixtures: where the reference data lives, deterministic seeds, a bounded hypothesis profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=25, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_dir() -> Path:
    """``../shared/reference`` beside the repository (``UNIPERCEPTION_REFERENCE`` overrides)."""
    env = os.environ.get("UNIPERCEPTION_REFERENCE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    """The reference directory; tests that need it skip (with the reason) when it is absent."""
    d = reference_dir()
    if not (d / "official_keys").is_dir():
        pytest.skip(f"reference data not found at {d} (set UNIPERCEPTION_REFERENCE)")
    return d


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
