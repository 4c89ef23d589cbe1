"""Before new workers read their data: the shards their machines lack come from the driver's machine
(``data.fetch``). Nothing moves where the data already is; a run with ``--no-fetch-data`` stops with
one line naming the machines and the files instead.

Each worker says which of its shards its machine holds nowhere with the manifest's checksum; if any,
a ``ShardSource`` starts on the driver's node, the workers stream their files from it into their
machine's cache (the workers of one machine fetch a file once), and the source is stopped. The wait
lasts while bytes move: no byte for ``--step-timeout`` seconds stops the run.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..data import open_dataset
from ..data.fetch import ShardSource
from ..parallel.backends import NotReady
from .errors import TrainingError

EVERY = 5.0   # seconds between progress lines


def bring_shards(fleet, handles) -> dict | None:
    """Fetch what the workers ``handles`` (just started) lack; returns {"bytes", "seconds", "machines"}
    of the transfer, or None when nothing was missing."""
    backend, config = fleet.backend, fleet.plan.config
    missing = fleet.get([backend.call(h, "missing") for h in handles])
    lacking = [(h, files) for h, files in zip(handles, missing) if files]
    if not lacking:
        return None
    addresses = {node: address for node, (address, _) in backend.nodes().items()}
    nodes = fleet.get([backend.node_of(h) for h, _ in lacking])
    wanted = {}   # machine -> the files its workers lack
    for node, (_, files) in zip(nodes, lacking):
        wanted.setdefault(addresses.get(node, node), set()).update(files)
    path = Path(fleet.plan.dataset)
    where = "; ".join(f"{machine} lacks {', '.join(sorted(files))}" for machine, files in sorted(wanted.items()))
    if not config.fetch_data:
        raise TrainingError(f"{path}: {where} (or a copy there differs from the manifest), and --no-fetch-data "
                            "is set: copy the dataset folder to that path on those machines, or drop --no-fetch-data")
    dataset = open_dataset(path, verify=False, manifest=fleet.data.manifest)
    entries = dataset.entries()
    total = sum((path / f).stat().st_size if (path / f).is_file() else 0 for files in wanted.values() for f in files)
    fleet.log(f"fetching shards from this machine ({_mb(total)}): {where}")
    source = backend.create(ShardSource, str(path), entries, cpus=0, node=backend.here())
    try:
        files = sorted(set().union(*wanted.values()))
        offer = fleet.get(backend.call(source, "open", backend.host(), config.step_timeout, files))
        futures = [backend.call(h, "fetch", offer, config.step_timeout) for h, _ in lacking]
        start = time.monotonic()
        received = _wait(fleet, futures, source, total)
    finally:
        backend.call(source, "close")
        backend.kill(source)
    seconds = time.monotonic() - start
    fleet.log(f"fetched {_mb(received)} of shards in {seconds:.1f} s ({_mb(received / max(seconds, 1e-9))}/s)")
    return {"bytes": received, "seconds": seconds, "machines": sorted(wanted)}


def _wait(fleet, futures, source, total: int) -> int:
    """The bytes the fetches ``futures`` received, waited for while the source serves bytes."""
    backend, timeout = fleet.backend, fleet.plan.config.step_timeout
    start = moved_at = shown_at = time.monotonic()
    moved = 0
    while True:
        try:
            return sum(backend.get(futures, timeout=1.0))
        except NotReady:
            pass
        except Exception as e:
            raise TrainingError(f"fetching shards failed: {backend.describe(e)}") from None
        served = fleet.get(backend.call(source, "progress"))
        now = time.monotonic()
        if served > moved:
            moved, moved_at = served, now
        elif now - moved_at > timeout:
            raise TrainingError(f"fetching shards: no byte moved for {timeout:g} s ({_mb(moved)} of {_mb(total)} "
                                "so far): a machine's link is down or its worker is stuck; raise --step-timeout "
                                "if the link is that slow")
        if now - shown_at >= EVERY:
            fleet.log(f"fetching shards: {_mb(served)} of {_mb(total)}, {_mb(served / (now - start))}/s")
            shown_at = now


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
