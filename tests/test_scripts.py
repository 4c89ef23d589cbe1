"""The benchmark scripts run and write what they promise (tiny settings, in a subprocess so that the
profiler's timers do not stay on the operators of this process)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_profile_step_times_every_operator_of_the_model(tmp_path):
    out = tmp_path / "profile.json"
    proc = run_script(ROOT / "scripts" / "profile_step.py", "lenet5", "--batch", "8", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("Conv2d.forward", "Conv2d.backward", "MaxPool2d.backward", "Linear.forward", "ReLU.backward"):
        assert result["ms"][key] > 0
    assert sum(result["ms"].values()) < result["step_ms"]
    assert "Conv2d.backward" in proc.stdout


def test_benchmark_core_writes_its_table(tmp_path):
    out = tmp_path / "core.json"
    proc = run_script(ROOT / "scripts" / "benchmark_core.py", "--models", "mlp", "--batches", "8", "--threads", "1",
                      "--seconds", "0.05", "--no-torch", "--no-memory", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"], r["threads"]) for r in rows] == [("mlp", 8, 1)]
    assert rows[0]["distnn_samples_per_s"] > 0 and rows[0]["ratio"] is None
