"""Session-wide fixtures: one Ray instance and one Prefect test harness per test session.

``ray.init`` costs seconds and Prefect's first flow in a fresh home costs ~15 s, so both are
started lazily, once, by the tests that need them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AVAT3R_RAY_DASHBOARD", "0")
# Ray workers inherit the environment of the raylet, which inherits ours: this lets them import
# test-only stage classes from the ``tests`` package.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from stages.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2, dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
