"""Synthetic shards for the job tests (the S3 server and the local Ray are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_shard(tmp_path_factory) -> Path:
    from grounding.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), 12, "base", seed=0)
