"""The benchmark scripts run and write what they promise (tiny settings, in a subprocess so that the
profiler's timers do not stay on the operators of this process)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_profile_step_times_every_operator_of_the_model(tmp_path):
    out = tmp_path / "profile.json"
    proc = run_script(ROOT / "scripts" / "profile_step.py", "lenet5", "--batch", "8", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("Conv2d.forward", "Conv2d.backward", "MaxPool2d.backward", "Linear.forward", "ReLU.backward",
                "(optimizer step)", "(zero_grad)", "(engine: topological sort)", "(engine: leaf gradients)"):
        assert result["ms"][key] > 0
    assert sum(result["ms"].values()) < result["step_ms"]
    assert "Conv2d.backward" in proc.stdout


def test_benchmark_core_writes_its_table(tmp_path):
    out = tmp_path / "core.json"
    proc = run_script(ROOT / "scripts" / "benchmark_core.py", "--models", "mlp", "--batches", "8", "--threads", "1",
                      "--seconds", "0.05", "--no-torch", "--no-memory", "--ab-kernels", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"], r["threads"]) for r in rows] == [("mlp", 8, 1)]
    assert rows[0]["distnn_samples_per_s"] > 0 and rows[0]["ratio"] is None
    assert rows[0]["numpy_kernels_samples_per_s"] > 0   # timed in turns with the compiled kernels


def test_benchmark_core_counts_the_lstms_multiply_adds():
    """The input projection and the recurrent products of one sample: 28 steps of 28 -> 512 and of
    128 -> 512 (both weights found among the sequence operator's inputs, the bias after them), and the
    128 -> 10 classifier."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from benchmark_core import forward_macs_per_sample
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert forward_macs_per_sample("lstm_classifier") == 28 * (28 * 512 + 128 * 512) + 128 * 10


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_simulate_scaling_measures_fits_and_plots(tmp_path):
    """The simulation on tiny settings: every point measured, the knees found, the cost model fitted
    and checked against a real run's figures, the workers per shard for each link, the plot drawn."""
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"rows": [{"model": "lenet5", "ray_2x1": {"total": 30.0, "compute": 20.0}}]}))
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    proc = run_script(ROOT / "scripts" / "simulate_scaling.py", "--models", "lenet5", "--workers", "1", "2",
                      "--servers", "1", "2", "--compute-ms", "5", "--seconds", "0.2", "--real", real,
                      "--out", out, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    points = {(r["mode"], r["servers"], r["workers"]) for r in result["rows"]}
    assert points == {(m, k, n) for m in ("sync", "async") for k in (1, 2) for n in (1, 2)}
    assert all(r["updates_per_s"] > 0 and len(r["server_busy"]) == r["servers"] for r in result["rows"])
    assert {(k["mode"], k["servers"]) for k in result["knees"]} == {(m, k) for m in ("sync", "async") for k in (1, 2)}
    assert set(result["cost_model"]) >= {"a_ms", "per_worker_ms", "per_byte_ms"}
    (check,) = result["real_check"]
    assert check["measured_ms"] == 30.0 and check["predicted_ms"] > 20.0
    (per_shard,) = result["workers_per_shard"]
    assert per_shard["1GbE"] <= per_shard["10GbE"] <= per_shard["25GbE"]
    assert png.read_bytes()[:4] == b"\x89PNG" and "where a shard saturates" in proc.stdout


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_simulate_scaling_on_emulated_nodes_counts_one_message_per_node(tmp_path):
    """--nodes: 4 simulated workers on 1 and on 2 emulated nodes, each point over Ray calls and the
    data plane: the shard gets a message per worker over Ray calls, and over the data plane one per
    worker of its node plus one per other node; the data plane's cost model is fitted and checked
    against a real run's wait and transfer."""
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"rows": [{"model": "lenet5", "ray_2x1": {"wait_and_transfer": 0.9}}]}))
    out = tmp_path / "nodes.json"
    proc = run_script(ROOT / "scripts" / "simulate_scaling.py", "--models", "lenet5", "--nodes", "1", "2",
                      "--workers", "2", "4", "--servers", "1", "--compute-ms", "5", "--seconds", "0.2",
                      "--real", real, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    messages = {(r["nodes"], r["workers"], r["data_plane"]): r["messages_per_step"] for r in result["rows"]}
    assert messages == {(1, 2, "ray"): 2, (1, 2, "shm"): 2, (1, 4, "ray"): 4, (1, 4, "shm"): 4,
                        (2, 2, "ray"): 2, (2, 2, "shm"): 2, (2, 4, "ray"): 4, (2, 4, "shm"): 3}
    assert all(0 < r["efficiency"] <= 1.05 for r in result["rows"])
    assert set(result["node_cost_model"]) >= {"a_ms", "per_worker_on_node_ms", "per_node_ms"}
    (check,) = result["real_check"]
    assert check["measured_ms"] == 0.9 and "data plane cost model" in proc.stdout


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_node_message_ab_sends_both_ways(tmp_path):
    out = tmp_path / "ab.json"
    proc = run_script(ROOT / "scripts" / "ab_node_messages.py", "--sizes", "30000", "--repeats", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["chunked"] for r in rows) == [False, True] and all(r["round_trip_ms"] > 0 for r in rows)


@pytest.mark.cluster   # starts a Ray cluster: not in the quick loop
def test_compiled_graph_ab_runs_both_ways(tmp_path):
    from datagen import prepared_mnist
    data = prepared_mnist(tmp_path / "data", n_train=256, n_test=32, seed=1, shards=2)
    out = tmp_path / "ab.json"
    shm = set(Path("/dev/shm").glob("sem.*"))
    proc = run_script(ROOT / "scripts" / "ab_compiled_graph.py", "--dataset", data / "mnist", "--batch", "8",
                      "--steps", "3", "--rounds", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert set(Path("/dev/shm").glob("sem.*")) - shm == set()   # the channels' semaphores are gone
    ms = json.loads(out.read_text())["ms_per_step"]
    assert len(ms["compiled graph"]) == len(ms["worker-driven"]) == 1 and min(ms["compiled graph"] + ms["worker-driven"]) > 0
    assert json.loads(out.read_text())["host"]["cpu"] and "compiled graph" in proc.stdout


def test_kernel_ab_times_both_paths(tmp_path):
    out = tmp_path / "ab.json"
    proc = run_script(ROOT / "scripts" / "ab_kernels.py", "--batch", "4", "--pairs", "1", "--repeats", "1",
                      "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(min(r["numpy"]) > 0 and min(r["numba"]) > 0 for r in rows)


@pytest.mark.cluster   # starts emulated machines and local Ray clusters: not in the quick loop
def test_fetch_benchmark_measures_the_rate_and_the_start(tmp_path):
    from distnn import testbed
    out = tmp_path / "fetch.json"
    proc = run_script(ROOT / "scripts" / "benchmark_fetch.py", "--mb", "1", "--repeat", "1", "--baseline", ROOT,
                      "--pairs", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["who"] for r in result["start"]] == ["this tree", "baseline"]
    assert all(r["wall_s"] > 0 for r in result["start"]) and result["host"]["cpu"]
    if testbed.unavailable() is None:   # root: the emulated machines ran (in CI they do)
        [row] = result["fetch"]
        assert row["bytes"] > 1e6 and 0 < row["of_link"] < 1.2
    assert "median wall s" in proc.stdout


def test_conv_ab_pins_both_tables_and_writes_them(tmp_path):
    out = tmp_path / "ab_conv.json"
    proc = run_script(ROOT / "scripts" / "ab_conv.py", "lenet5", "--batch", "4", "--pairs", "1", "--repeats", "1",
                      "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["choices"]) == 2 and set(result["ms"]) == {"calibrated", "im2col"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["ms"].values()) and "calibrated / im2col" in proc.stdout


def test_conv_layer_bench_times_each_layer_of_the_model(tmp_path):
    out = tmp_path / "layers.json"
    proc = run_script(ROOT / "scripts" / "bench_conv_layers.py", "lenet5", "--batch", "4", "--pairs", "1",
                      "--repeats", "1", "--no-torch", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["w"] for r in rows] == [[6, 1, 5, 5], [16, 6, 5, 5]] and [r["x_grad"] for r in rows] == [False, True]
    assert rows[1]["order"][-1] == 1   # the second layer's input is laid out channels-last, as in the network
    assert all(min(r["ms"]["distnn"]) > 0 and "torch" not in r["ms"] for r in rows)


@pytest.mark.cluster   # trains on a local Ray cluster
def test_train_vs_ddp_reads_distnn_training_seconds(tmp_path):
    from datagen import prepared_mnist
    data = prepared_mnist(tmp_path, n_train=256, n_test=64, seed=5, shards=2) / "mnist"
    out = tmp_path / "vs.json"
    proc = run_script(ROOT / "scripts" / "train_vs_ddp.py", "--data", data, "--epochs", "1", "--workers", "1",
                      "--pairs", "1", "--no-ddp", "--out", out)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["distnn"]["train_seconds"] > 0 and 0 <= row["distnn"]["test_accuracy"] <= 1 and "ddp" not in row
