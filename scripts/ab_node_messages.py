"""A/B of one message between two nodes: a vector sent as one object against the same vector in
chunks small enough to travel inside Ray's call messages (what ``ReducerActor`` sends a shard), each way
of a round trip (the sum there, the parameters back). Two emulated nodes (``ray.cluster_utils.Cluster``)
on this machine, each with its own object store, so one object goes through the stores as between
machines.

    python scripts/ab_node_messages.py [--sizes 61706 1100000] [--repeats 2] [--out benchmarks/ab_node_messages.json]

Sizes in float32 values (61,706: lenet5; 1,100,000: about cifar_convnet). Alternates whole, chunked,
whole, chunked ... and prints the mean round trip of each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


from distnn._hardware import describe as describe_host
from distnn._io import atomic_write_text

CHUNK = (100 * 1024 - 4096) // 4   # floats per chunk under Ray's default 100 kB (as ReducerActor cuts them)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[61706, 1100000])
    ap.add_argument("--repeats", type=int, default=2, help="alternating pairs per size")
    ap.add_argument("--out", default="benchmarks/ab_node_messages.json")
    args = ap.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

    @ray.remote
    class Shard:
        def __init__(self, n):
            self.p = np.ones(n, np.float32)

        def whole(self, g):
            self.p -= g * np.float32(1e-6)
            return self.p

        def chunked(self, *chunks):
            self.p -= np.concatenate(chunks) * np.float32(1e-6)
            edges = np.cumsum([0] + [c.size for c in chunks])
            parts = tuple(self.p[a:b] for a, b in zip(edges[:-1], edges[1:]))
            return parts if len(parts) > 1 else parts[0]

    @ray.remote
    class Sender:
        def __init__(self, shard, n):
            self.shard, self.g = shard, np.ones(n, np.float32)

        def round_trips(self, k, chunked):
            start = time.perf_counter()
            for _ in range(k):
                if chunked:
                    parts = [self.g[a:a + CHUNK] for a in range(0, self.g.size, CHUNK)]
                    out = self.shard.chunked.options(num_returns=len(parts)).remote(*parts)
                    ray.get(out if len(parts) > 1 else [out])
                else:
                    ray.get(self.shard.whole.remote(self.g))
            return (time.perf_counter() - start) / k * 1e3

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    cluster.add_node(num_cpus=4)
    rows = []
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        for n in args.sizes:
            shard = Shard.options(scheduling_strategy=On(nodes[0], soft=False)).remote(n)
            sender = Sender.options(scheduling_strategy=On(nodes[1], soft=False)).remote(shard, n)
            k = max(10, int(2e7 / n))
            ray.get(sender.round_trips.remote(3, True))
            ray.get(sender.round_trips.remote(3, False))
            for _ in range(args.repeats):
                for chunked in (False, True):
                    ms = ray.get(sender.round_trips.remote(k, chunked))
                    rows.append({"floats": n, "mb": round(n * 4 / 1e6, 3), "chunked": chunked,
                                 "round_trip_ms": round(ms, 2)})
                    how = "chunks under 100 kB" if chunked else "one object"
                    print(f"{n * 4 / 1e6:7.2f} MB  {how:<20}{ms:8.2f} ms per round trip")
    finally:
        ray.shutdown()
        cluster.shutdown()
    host = describe_host()
    print(f"CPU: {host['cpu']} x {os.cpu_count()}")
    command = "python scripts/ab_node_messages.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(Path(args.out), json.dumps({"rows": rows, "host": host, "command": command}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
