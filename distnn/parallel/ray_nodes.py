"""What a Ray backend sees of the cluster: its alive, draining and dead nodes, their CPUs, and which
node a process runs on. Mixed into ``backends.RayBackend`` (``self.ray``: the ray module)."""
from __future__ import annotations


class RayNodes:
    def here(self) -> str:
        """The node the driver runs on."""
        return self.ray.get_runtime_context().get_node_id()

    def node_of(self, handle):
        """A future of the node ``handle``'s process runs on."""
        return handle.node.remote()

    def host(self) -> str:
        """The address other nodes reach the driver's node at."""
        return self.nodes()[self.here()][0]

    def nodes(self) -> dict[str, tuple[str, int]]:
        """{node id: (address, CPUs)} of the alive nodes."""
        return {n["NodeID"]: (n["NodeManagerAddress"], int(n["Resources"].get("CPU", 0)))
                for n in self.ray.nodes() if n["Alive"]}

    def node_cpus(self) -> list[tuple[str, int]]:
        """(address, CPUs) of each alive node."""
        return list(self.nodes().values())

    def free_cpus(self) -> int:
        """CPUs of the cluster no actor or task holds now."""
        return int(self.ray.available_resources().get("CPU", 0))

    def draining_nodes(self) -> dict[str, str]:
        """{node id: address} of the live nodes Ray is draining (a preemption notice, an autoscaler's
        scale-down): they take no new processes and will go. (Ray's internal state API: where it is
        missing, no node is seen draining.)"""
        try:
            from ray._private.state import state
            ids = state.get_draining_nodes()
        except Exception:
            return {}
        if not ids:
            return {}
        alive = self.nodes()
        return {i: alive[i][0] for i in ids if i in alive}

    def dead_nodes(self) -> dict[str, str]:
        """{node id: address} of the nodes Ray counts as dead."""
        return {n["NodeID"]: n["NodeManagerAddress"] for n in self.ray.nodes() if not n["Alive"]}
