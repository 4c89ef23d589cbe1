"""The host read once (caches, CPU, BLAS) and the CPU time of a run's processes."""
import os
import subprocess
import sys

import pytest

from distnn import _hardware
from distnn.ops import winograd
from distnn.train.usage import descendants_cpu


def fake_sysfs(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(_hardware, "_CACHES", tmp_path)
    _hardware.cache_bytes.cache_clear()
    yield tmp_path
    _hardware.cache_bytes.cache_clear()


def test_cache_sizes_come_from_sysfs_and_set_the_winograd_band(sysfs):
    fake_sysfs(sysfs, [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "512K"), (3, "Unified", "32M")])
    assert _hardware.cache_bytes(1, 0) == 48 << 10 and _hardware.cache_bytes(3, 0) == 32 << 20
    assert winograd.band_values() == (256 << 10) // 4          # half the L2, in float32 values
    _hardware.cache_bytes.cache_clear()
    (sysfs / "index2" / "size").write_text("8M\n")
    assert winograd.band_values() == (2 << 20) // 4            # capped at 2 MB


def test_unreadable_caches_fall_back(sysfs):
    assert _hardware.cache_bytes(2, 12345) == 12345             # an empty folder: the default
    fake_sysfs(sysfs, [(2, "Unified", "garbage")])
    _hardware.cache_bytes.cache_clear()
    assert _hardware.cache_bytes(2, 777) == 777


def test_describe_names_cpu_and_blas():
    host = _hardware.describe()
    assert host["cpu"] and host["blas"] != "unknown" and host["l2_bytes"] >= 0


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_descendants_cpu_counts_a_busy_child():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\ninput()"], stdin=subprocess.PIPE)
    try:
        import time
        deadline = time.time() + 30
        def childs():   # other descendants (a Ray cluster of an earlier test) may come and go
            return descendants_cpu(os.getpid()) - descendants_cpu(os.getpid(), exclude={child.pid})
        while childs() < 0.4 and time.time() < deadline:
            time.sleep(0.05)
        assert 0.4 <= childs() < 30
    finally:
        child.communicate(b"\n", timeout=30)
