"""One helper for the tests that need several Ray nodes on one host: a script run in a subprocess
against a ``ray.cluster_utils.Cluster`` (a process holds one Ray session, and a test's cluster must
not outlive the test). The script's names: ``cluster``, ``nodes`` (the nodes added to the head),
``backend`` (a RayBackend joined to it, or None: the script joins it itself), ``Trainer``, ``TrainConfig``, ``TrainingError``, and each
keyword given to ``on_cluster`` bound to its value; the cluster is shut down however the script ends.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

PROLOGUE = """\
import faulthandler, json, os, signal, sys, time
faulthandler.dump_traceback_later({deadline}, exit=True)   # a wait without a deadline shows where it waits
import ray
from ray.cluster_utils import Cluster
from distnn.config import TrainConfig
from distnn.parallel import RayBackend
from distnn.train import Trainer, TrainingError
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": {head_cpus}}})
nodes = [cluster.add_node(num_cpus=cpus) for cpus in {nodes!r}]
backend = RayBackend(address=cluster.address) if {connect!r} else None
"""


class Output:
    """What a cluster script printed: ``stdout``, and ``first[KEY]`` / ``last[KEY]``, the rest of the
    first / last line that begins with the word KEY."""

    def __init__(self, stdout: str):
        self.stdout = stdout
        self.first, self.last = {}, {}
        for line in stdout.splitlines():
            key, _, rest = line.partition(" ")
            if key:
                self.first.setdefault(key, rest)
                self.last[key] = rest


def on_cluster(body: str, head_cpus: int = 1, nodes=(1,), timeout: float = 400, connect: bool = True,
               **values) -> Output:
    """Run ``body`` (indented as you like) on a cluster of a head of ``head_cpus`` CPUs and ``nodes``
    (their CPUs); ``values`` become names the script sees. ``connect=False``: no ``backend``, for a
    script whose Trainer joins the cluster itself (``address=cluster.address``: a job of its own, with
    its runtime environment). The script must end with status 0."""
    bind = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    script = (PROLOGUE.format(deadline=int(timeout * 0.6), head_cpus=head_cpus, nodes=list(nodes), connect=connect)
              + bind
              + "try:\n" + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
              + "finally:\n    ray.shutdown()\n    cluster.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Output(proc.stdout)
