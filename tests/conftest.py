import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def ray_backend():
    """One local Ray cluster of 4 logical CPUs for every test that trains on Ray, shut down at the end
    (tests that need a cluster of their own, e.g. with a job-level runtime_env, start it in a subprocess)."""
    from distnn.parallel import RayBackend
    backend = RayBackend(num_cpus=4)
    yield backend
    backend.ray.shutdown()
