"""Links between machines (``parallel.link``) on loopback, without Ray: chunks up and down at once,
and the same parameters as the in-process path, bit for bit."""
import socket
import threading

import numpy as np
import pytest

from distnn.parallel import ParameterServer, StepAbandoned
from distnn.parallel.link import CONGESTION_CONTROL, LinkClient, LinkServer
from distnn.parallel.shm import PeerLost
from distnn.parallel.specs import OptimizerSpec, ScheduleSpec
from distnn.parallel.transport import InProcess, OverLink

SIZE, WORLD, STEPS = 10_000, 3, 4
OPT, SCHED = OptimizerSpec("adam", 0.01, weight_decay=0.1), ScheduleSpec("cosine", 10, 2)


def shard(chunk=None):
    p0 = np.random.default_rng(0).standard_normal(SIZE).astype(np.float32)
    mask = (np.arange(SIZE) % 3 != 0).astype(np.float32)
    s = ParameterServer(p0, OPT, SCHED, mask, world=WORLD)
    if chunk:
        s.cut(chunk)
    return s


def gradient(rank, step, params):
    rng = np.random.default_rng((rank, step))
    return (rng.standard_normal(SIZE).astype(np.float32) + 0.1 * params).astype(np.float32)


def drive(transports, steps=STEPS):
    """Each worker in a thread: send its gradient at the parameters it holds, receive the next."""
    out, errors = {}, []

    def worker(rank, transport):
        try:
            params = None
            for step in range(steps):
                held = np.zeros(SIZE, np.float32) if params is None else params
                transport.send([gradient(rank, step, held)], step)
                params = transport.receive(step)[0].copy()
            out[rank] = params
        except Exception as e:   # reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(r, t)) for r, t in enumerate(transports)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return out


@pytest.mark.parametrize("chunk", [1000, 3333, SIZE])
def test_links_in_chunks_equal_the_in_process_path_bit_for_bit(chunk):
    reference = shard()
    expected = drive([InProcess(r, [reference]) for r in range(WORLD)])
    s = shard(chunk)
    server = LinkServer(s, "127.0.0.1", chunk)
    clients = [LinkClient(server.offer(), r) for r in range(WORLD - 1)]
    try:   # the last worker on the shard's own node, whole gradients in-process
        got = drive([OverLink(c) for c in clients] + [InProcess(WORLD - 1, [s])])
    finally:
        for c in clients:
            c.close()
        server.close()
    assert np.array_equal(s.params, reference.params) and s.version == reference.version == STEPS
    assert s.optimizer.t == reference.optimizer.t == STEPS
    for r in range(WORLD):
        assert np.array_equal(got[r], expected[r])


def test_a_wrong_secret_is_refused_and_an_abort_releases_a_waiting_worker():
    s = shard(1000)
    server = LinkServer(s, "127.0.0.1", 1000)
    host, port, _ = server.offer()
    with pytest.raises(PeerLost, match="cannot connect"):
        LinkClient((host, port, b"x" * 16), 0)
    good = LinkClient(server.offer(), 0)
    good.send(np.ones(SIZE, np.float32), 0)   # the other two workers never come
    timer = threading.Timer(0.5, s.abort, args=("worker 1 died",))
    timer.start()
    with pytest.raises(StepAbandoned, match="step 0 abandoned"):
        good.receive(0)
    assert s.version == 0
    good.close()
    server.close()


def test_an_abort_releases_a_worker_waiting_in_a_top_k_step_and_new_links_redo_it():
    """A top-k step's reply comes from the thread that read the gradient: an abort while it waits
    answers -1 (the worker's receive raises), and after the shard's recovery new links (the old ones
    are stale) carry the step again."""
    from distnn.parallel.compress import Compressor, Update
    s = ParameterServer(np.zeros(SIZE, np.float32), OPT, SCHED, world=2, reply_updates=True)
    server = LinkServer(s, "127.0.0.1", 1000)
    s.cut(1000)
    clients = [LinkClient(server.offer(), r) for r in range(2)]
    compressor = Compressor("topk:0.05", SIZE)
    try:
        clients[0].send(compressor(np.ones(SIZE, np.float32))[0], 0)   # worker 1 never sends step 0
        timer = threading.Timer(0.5, s.abort, args=("worker 1 died",))
        timer.start()
        with pytest.raises(StepAbandoned, match="step 0 abandoned"):
            clients[0].receive(0)
        assert s.recover() == 0
        for c in clients:
            c.close()
        clients = [LinkClient(server.offer(), r) for r in range(2)]
        for c in clients:
            c.send(compressor(np.ones(SIZE, np.float32))[0], 0)
        for c in clients:
            update = c.receive(0)
            assert isinstance(update, Update) and update.step == 0
    finally:
        for c in clients:
            c.close()
        server.close()


def _congestion(sock) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")


def test_a_link_uses_the_first_loss_based_congestion_control_the_host_allows():
    with socket.socket() as probe:
        default = _congestion(probe)
        allowed = []
        for name in CONGESTION_CONTROL:
            try:
                probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name)
                allowed.append(name)
            except OSError:
                pass
    server = LinkServer(shard(1000), "127.0.0.1", 1000)
    client = LinkClient(server.offer(), 0)
    try:
        assert _congestion(client.sock) == (allowed[0] if allowed else default)
    finally:
        client.close()
        server.close()


def test_chunks_of_an_optimizer_update_equal_the_whole_update():
    """Optimizer.part: every optimizer, updated part by part, equals one update of the whole."""
    from distnn.optim import OPTIMIZERS, make_optimizer
    rng = np.random.default_rng(1)
    p0, mask = rng.standard_normal(1001).astype(np.float32), (rng.random(1001) > 0.3).astype(np.float32)
    for name in OPTIMIZERS:
        whole = make_optimizer(name, 1001, lr=0.01, weight_decay=0.01, decay_mask=mask)
        cut = make_optimizer(name, 1001, lr=0.01, weight_decay=0.01, decay_mask=mask)
        parts = [(cut.part(lo, min(lo + 300, 1001)), lo, min(lo + 300, 1001)) for lo in range(0, 1001, 300)]
        a, b = p0.copy(), p0.copy()
        for t in range(3):
            g = rng.standard_normal(1001).astype(np.float32)
            whole.step(a, g)
            for part, lo, hi in reversed(parts):
                part.update_part(b[lo:hi], g[lo:hi], cut.lr, cut.t + 1)
            cut.t += 1
        assert np.array_equal(a, b), name


def test_top_k_gradients_go_whole_and_the_sparse_mean_comes_back():
    """--compress topk: each worker's Sparse gradient goes up whole; every worker gets the step's
    sparse mean (an Update), and applying it with a copy of the shard gives the shard's parameters."""
    from distnn.parallel.compress import Compressor, Update
    p0 = np.random.default_rng(0).standard_normal(SIZE).astype(np.float32)
    s = ParameterServer(p0, OPT, SCHED, world=2, reply_updates=True)
    server = LinkServer(s, "127.0.0.1", 1000)
    s.cut(1000)   # as a shard with links does: replies that are updates keep the step whole
    clients = [LinkClient(server.offer(), r) for r in range(2)]
    followers = [ParameterServer(p0, OPT, SCHED, world=1) for _ in range(2)]
    compressors = [Compressor("topk:0.05", SIZE) for _ in range(2)]
    try:
        for step in range(3):
            for r, c in enumerate(clients):
                [payload] = compressors[r](np.random.default_rng((r, step)).standard_normal(SIZE).astype(np.float32))
                c.send(payload, step)
            for r, c in enumerate(clients):
                update = c.receive(step)
                assert isinstance(update, Update) and update.step == step
                followers[r].contribute(0, update.mean, update.step)
                assert np.array_equal(followers[r].params, s.state()["params"])   # once the shard has applied it
    finally:
        for c in clients:
            c.close()
        server.close()
    assert s.version == 3 and len(s.chunks) == 1
