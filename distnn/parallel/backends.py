"""Two ways to deliver calls to workers and servers: in this process, or to Ray actors.

Both expose the same small interface, so the training loop is written once:
``create(cls, *args, cpus)`` -> handle, ``call(handle, method, *args, num_returns=1, **kw)`` -> future(s),
``get(futures)``, ``put(value)``, ``wait(futures)``, ``kill(handle)``, ``alive(handle)``,
``sync_steps(workers, servers, first, n)`` (a run of synchronous steps), and for errors ``cause(error)``
(the exception behind a backend's wrapper), ``is_failure(error)`` (a process died) and
``describe(error)`` (one line), ``discard(futures)`` (results no longer wanted),
``async_round(...)`` (a round of asynchronous updates). The local backend (``local_backend``) runs
every call in this process at once; on Ray the workers drive sync steps and async rounds themselves
(``ray_actors``), where the local backend runs the same worker code from the driver, in rank order.
"""
from __future__ import annotations

import os
import time

from .local_backend import LocalBackend, describe
from .ray_nodes import RayNodes


class NotReady(TimeoutError):
    """Futures still pending at a deadline: ``positions`` in the list waited for."""

    def __init__(self, positions):
        super().__init__(f"not ready: {positions}")
        self.positions = positions


INLINE_BYTES = 8 << 20
# Parameter vectors up to this size go back to the workers inside each push reply, larger ones through
# one object-store put (measured: inline is faster for lenet5's 244 kB, the store for cifar_convnet's
# 4.4 MB; see ray_actors.py).
PARAMS_INLINE_BYTES = 1 << 20
_started_here = {}  # what a cluster started by this process was configured with


class RayBackend(RayNodes):
    """Actors on a Ray cluster: a local one started here (no address), or an existing one.
    ``runtime_env``: what every actor's process needs beyond distnn, e.g. a user's model code
    (``models.builders.runtime_env``); Ray ships local folders only for a whole job, so it applies
    when this backend connects (not to a Ray session already started in this process)."""

    name = "ray"
    eager = False
    processes = True   # each worker a process of its own (``Fleet.pin_workers``)

    def __init__(self, address=None, num_cpus=None, runtime_env=None):
        import ray

        self.ray = ray
        self.started = False
        self.joined = None   # the address of a running cluster joined without being asked to (see below)
        if not ray.is_initialized():
            _started_here.clear()
            # Ray's own notices (a worker died, ...) stay in its log files: a recovery is reported as one line
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if runtime_env:
                kwargs["runtime_env"] = runtime_env
            address = address or os.environ.get("RAY_ADDRESS")
            if address and address != "local":
                kwargs["address"] = address
            else:   # a cluster of this process's own ("local": even where `ray start` left one running)
                if address:
                    kwargs["address"] = address
                # A cluster started here passes objects up to 8 MB (a flat gradient or parameter vector
                # of the zoo models) inside the call messages instead of through the shared-memory
                # store: measured 21.8 -> 18.3 ms per lenet5 step of 2 x 64 on 2 cores.
                kwargs["_system_config"] = {"max_direct_call_object_size": INLINE_BYTES,
                                            "task_rpc_inlined_bytes_limit": 4 * INLINE_BYTES}
                # Ray starts its workers at nice 15, below its own processes; the workers are what the
                # cluster is for: at nice 0 a lenet5 run was 1.4-3.8% faster (3 of 3 alternating pairs).
                os.environ.setdefault("RAY_worker_niceness", "0")
                _started_here["inline_bytes"] = INLINE_BYTES
                _started_here["local"] = True
                if num_cpus:
                    kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except ValueError as e:
                if "existing cluster" not in str(e) or address:
                    raise
                # `ray start` left a cluster on this machine, and ray.init without an address joins it
                # (as Ray's own scripts do): the settings of a cluster started here cannot apply to it
                for key in ("_system_config", "num_cpus"):
                    kwargs.pop(key, None)
                _started_here.clear()
                ray.init(**kwargs)
                self.joined = ray.get_runtime_context().gcs_address
            self.started = True
        # Objects up to this size travel inside call messages (100 kB is Ray's default).
        self.inline_bytes = _started_here.get("inline_bytes", 100 * 1024)
        self.local_cluster = _started_here.get("local", False)   # started by this process: its processes are ours
        self._classes = {}
        self._placed = -1   # server shards placed so far (round the nodes)

    def create(self, cls, *args, cpus=1, node=None, **kwargs):
        """An actor of ``cls``, or of its Ray subclass (ray_actors.ACTORS) where it has one, on the
        Ray node ``node`` if given. A server runs pushes concurrently: two threads per worker (an
        async worker may have two pushes there), plus a few for the driver's calls."""
        from .ray_actors import ACTORS, ServerActor
        actor_cls = ACTORS.get(cls, cls)
        if actor_cls not in self._classes:
            self._classes[actor_cls] = self.ray.remote(actor_cls)
        options = {"num_cpus": cpus, "max_restarts": 0}
        if node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        if actor_cls is ServerActor:
            options["max_concurrency"] = 2 * kwargs.get("world", 1) + 4   # async: two pushes per worker
            if self.ray.util.get_current_placement_group() is None:   # a search trial's group holds its shards
                options["scheduling_strategy"] = self._next_node()
            kwargs["inline_bytes"] = min(self.inline_bytes, PARAMS_INLINE_BYTES)
        return self._classes[actor_cls].options(**options).remote(*args, **kwargs)

    def _next_node(self):
        """Server shards go round the alive nodes in turn (K shards on K nodes where there are that
        many), so that no one node's link carries all the traffic; chosen among the nodes alive now,
        starting with the driver's (whose calls for checkpoints and tests then stay on its node)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = self.ray.get_runtime_context().get_node_id()
        nodes = sorted((n["NodeID"] != here, n["NodeID"]) for n in self.ray.nodes() if n["Alive"])
        nodes = [node for _, node in nodes]
        self._placed += 1
        return NodeAffinitySchedulingStrategy(nodes[self._placed % len(nodes)], soft=False)

    def call(self, handle, method, *args, num_returns=1, **kwargs):
        return getattr(handle, method).options(num_returns=num_returns).remote(*args, **kwargs)

    def sync_steps(self, workers, servers, first: int, n: int, bounds=None, reducers=None) -> list:
        """Worker-driven steps (``WorkerActor.run_sync``; ``reducers``: {node: plane name} of the nodes
        that have one): one future per worker of its step metrics."""
        return [self.call(w, "run_sync", servers, first, n, bounds, reducers) for w in workers]

    def async_round(self, workers, servers, counts, starts, bound=None, bounds=None, pipelined=False) -> list:
        """Worker-driven asynchronous updates (``WorkerActor.run_async``): one future per worker with
        updates to make."""
        return [self.call(w, "run_async", servers, counts[r], *starts[r], bound, bounds, pipelined)
                for r, w in enumerate(workers) if counts[r]]

    def get(self, futures, timeout: float | None = None):
        """Values of the futures; the first failure is raised as soon as it is known, not after the
        others (which may wait forever for the one that failed). ``timeout``: seconds for all of them,
        after which ``NotReady`` names the positions of those still pending."""
        if not isinstance(futures, list):
            return self.get([futures], timeout)[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(futures)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = self.ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise NotReady([i for i, f in enumerate(futures) if any(f is p for p in pending)])
            self.ray.get(ready)
        return self.ray.get(futures)

    def alive(self, handle, timeout=30.0) -> bool:
        """Whether the actor answers (its process is up)."""
        try:
            self.ray.get(handle.__ray_ready__.remote(), timeout=timeout)
            return True
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return False

    def discard(self, futures, timeout: float = 30.0) -> None:
        """Wait for futures whose results are no longer wanted and drop their errors, so that Ray does
        not print them as unhandled when they are garbage-collected."""
        futures = list(futures)
        if futures:
            ready, _ = self.ray.wait(futures, num_returns=len(futures), timeout=timeout)
            for f in ready:
                try:
                    self.ray.get(f)
                except Exception:  # the error is the reason these results are dropped
                    pass

    def cause(self, error):
        """The exception a remote call raised (``RayTaskError.cause``, through every hop: a worker's
        call that failed in a server), or ``error`` itself."""
        while isinstance(error, self.ray.exceptions.RayTaskError) and error.cause is not None:
            error = error.cause
        return error

    def is_failure(self, error) -> bool:
        """True for errors that mean a process died (as opposed to an error in distnn's code)."""
        from .shm import PeerLost
        e = self.ray.exceptions
        return isinstance(self.cause(error), (e.RayActorError, e.ObjectLostError, PeerLost))

    def describe(self, error) -> str:
        cause = self.cause(error)
        if isinstance(cause, self.ray.exceptions.RayActorError):
            return "an actor's process died"
        return describe(cause)

    def put(self, value):
        return self.ray.put(value)

    def wait(self, futures):
        return self.ray.wait(futures, num_returns=1)

    def cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 0))

    def kill(self, handle):
        self.ray.kill(handle, no_restart=True)

    def shutdown(self):
        if self.started:
            self.ray.shutdown()


def make_backend(name: str, address=None, num_cpus=None, runtime_env=None):
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend(address=address, num_cpus=num_cpus, runtime_env=runtime_env)
    raise ValueError(f"unknown backend {name!r}; choose 'ray' or 'local'")
