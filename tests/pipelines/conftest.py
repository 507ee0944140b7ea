"""Real parts for the job tests: a local Ray and synthetic shards (the S3 server is in
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory):
    """A local Ray for the whole session (never attaches to another cluster)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_shard(tmp_path_factory) -> Path:
    from grounding.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), 12, "base", seed=0)
