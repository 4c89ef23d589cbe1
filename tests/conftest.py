import atexit
import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The convolution choices the tests calibrate go to a cache of this session's own, not the user's
# (set before any worker process or subprocess starts, so that they inherit it); removed at the end.
_CACHE = tempfile.mkdtemp(prefix="distnn-test-cache-")
os.environ["DISTNN_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)


# The quick loop (README: python3 -m pytest -q -m "not cluster") leaves out what starts Ray clusters,
# emulated machines or training subprocesses, and what kills processes on purpose.
CLUSTER_MODULES = {"test_elastic", "test_faults", "test_testbed", "test_search", "test_checkpoint", "test_sinks"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        callspec = getattr(item, "callspec", None)
        on_ray = callspec is not None and "ray" in callspec.params.values()
        if module in CLUSTER_MODULES or "ray_backend" in item.fixturenames or on_ray:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(params=["numpy", "numba"])
def kernel_path(request):
    """Run the test on the numpy reference and on the compiled kernels (distnn.kernels)."""
    from distnn import kernels
    kernels.use(request.param)
    if kernels.mode() != request.param:
        pytest.fail(f"kernel path {request.param} is not available (is numba installed?)")
    yield request.param
    kernels.use(None)


@pytest.fixture(scope="session")
def ray_backend():
    """One local Ray cluster of 4 logical CPUs for every test that trains on Ray, shut down at the end
    (tests that need a cluster of their own, e.g. with a job-level runtime_env, start it in a subprocess)."""
    from distnn.parallel import RayBackend
    backend = RayBackend(num_cpus=4)
    yield backend
    backend.ray.shutdown()


@pytest.fixture
def http_server(tmp_path):
    """A file server on loopback serving tmp_path/www (with Range requests): (root, its URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        start = int(rng.split("=")[1].split("-")[0])
        data = path.read_bytes()[start:]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
