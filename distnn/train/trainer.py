"""Trainer: one run, orchestrated. The jobs live in their own modules: ``setup`` (config -> RunPlan),
``fleet`` (the processes), ``schedule`` with ``sync`` and ``asynchronous`` (which step runs when),
``checkpoints`` (save, restore, recover) and ``report`` (progress, metrics, summary)."""
from __future__ import annotations

import signal
import threading

from .._io import WriteFailed
from ..checkpoint import save_model
from ..config import TrainConfig
from ..ops import conv_choice
from ..parallel import NonFiniteError
from . import membership, setup
from .checkpoints import Checkpoints
from .errors import MembershipChange, PlacementTimeout, RunWriteFailed, TrainingError, TrainingInterrupted
from .fleet import Fleet
from .report import RunReport
from .sinks import make_sinks
from .state import RunState
from .usage import UsageMeter


class Trainer:
    """One run: its plan (``setup.plan``), its processes (``Fleet``), its checkpoints and its report."""

    def __init__(self, config: TrainConfig, backend=None, log=print, progress=True, resume: dict | None = None,
                 on_step=None, on_epoch=None):
        """``backend``: a backend to use (default: made from the config, and shut down by ``close``);
        ``resume``: a loaded checkpoint (``checkpoint.load_checkpoint``) to continue from;
        ``on_step(trainer, step)``: called after every update (tests stop or kill processes there);
        ``on_epoch(trainer, record)``: after each epoch's test, with its metrics record and the
        checkpoint of that step saved (a search trial reports there)."""
        self.log, self.on_step, self.on_epoch = log, on_step, on_epoch
        self.state = RunState()   # where the run stands (train/state.py)
        self.fleet = self.report = None
        self.sinks, self.finished = [], False
        owned = None if backend is not None else setup.start_backend(config, log)  # shut down here until the fleet owns it
        try:
            self.plan = p = setup.plan(config, (backend or owned).cpus(), resume is not None, log, progress)
            self.config, self.out, self.spec = p.config, p.out, p.spec
            self.model, self.sinks = setup.build(p.spec), make_sinks(p.config, p.out)
            self.fleet = Fleet(backend or owned, p, convolutions=setup.kernel_choices(p, resume is not None), log=log)
            self.fleet.owns_backend, owned = owned is not None, None
            self.fleet.start_servers(self.model.flat_params, self.model.decay_mask())
            setup.write_run_files(p)
            self.checkpoints = Checkpoints(p.out / "checkpoints", p.config.keep_checkpoints, self.model, p.spec,
                                           p.config.as_dict())
            self.state.done = [0] * p.world
            if resume is not None:
                resume = self._restore(resume)
            self.report = self._report(log, progress, None if resume is None
                                       else resume.get("rescaled_from", (resume["step"],))[0])
            if resume is not None and "rescaled_from" in resume:
                self.report.membership(self.state.membership[-1], p.world, p.length.total_updates, self._lr())
        except BaseException:
            self.close()
            if owned is not None:
                owned.shutdown()
            raise

    def _report(self, log, progress, resume_step) -> RunReport:
        """The run's report, with its sinks (TensorBoard, MLflow) and each update's learning rate."""
        p = self.plan
        return RunReport(p.out, p.world, p.length.total_updates, log, progress, p.config.log_every, resume_step,
                         self._lr(), self.sinks)

    def _lr(self):
        """The learning rate of an update (0-based) in the present plan."""
        p, schedule = self.plan, self.plan.schedule.make()
        return lambda update: p.optimizer.lr * schedule(update)

    def _restore(self, ckpt: dict, reason: str = membership.RESUMED) -> dict:
        """Load ``ckpt`` into the fleet (one of another world size rescaled first); returns it as loaded."""
        loaded = membership.restore(self, ckpt, reason)
        self.log(f"resuming {self.config.model_name} from {ckpt['path']} at step {self.state.step} of "
                 f"{self.length.total_updates}")
        return loaded

    @property
    def step(self) -> int:
        """Updates applied so far (``state.step``)."""
        return self.state.step

    @property
    def length(self):
        """How many updates the run makes (``schedule.RunLength``), in its present plan."""
        return self.plan.length

    def resize(self, change: MembershipChange) -> None:
        """Go on with ``change.world`` workers from ``change.ckpt`` (``membership``): --resume with
        another worker count, inside the running job - every process anew, for the new world's plan."""
        with self.report.paused():
            self.plan, self.fleet = membership.regroup(self.fleet, self.plan, change.world, self.model, self.log)
            membership.resume_after(self, change)

    def grow_if_room(self) -> None:
        """At a checkpoint boundary: an elastic run takes the room a joining node brings."""
        membership.grow_if_room(self)

    def run(self) -> dict:
        c, n = self.config, self.length
        self.log(f"training {c.model_name} on {c.dataset}: {n.world} {c.backend} workers x batch "
                 f"{self.plan.data.batch_size}, {c.mode}"
                 f"{'' if c.staleness is None else f' (staleness {c.staleness})'}, {c.servers} server(s), "
                 f"{c.epochs} epochs of {n.steps_per_epoch} steps -> {self.out}")
        self.report.start(self.state.step)
        usage = UsageMeter(self.fleet)
        try:
            usage.start()
            self._loop()
            self.cpu = usage.stop()
            if self.state.stop_requested:
                raise TrainingInterrupted(f"stopped at step {self.state.step}{self._last_checkpoint('; checkpoint ')}"
                                          + (f"; continue with: distnn train --resume {self.out}"
                                             if self.checkpoints.last else ""))
            return self._finish()
        except WriteFailed as e:
            raise RunWriteFailed(f"{e}{self._last_checkpoint('; last good checkpoint ')}; free some space, then "
                                 f"continue with: distnn train --resume {self.out}") from None
        finally:
            self.report.close()

    def _loop(self) -> None:
        restore_signals = catch_signals(self)
        try:
            while True:
                try:
                    return self.plan.mode.loop(self)
                except MembershipChange as change:
                    self.resize(change)
        except Exception as e:
            cause = self.fleet.backend.cause(e)
            if isinstance(cause, NonFiniteError):
                raise TrainingError(f"{cause}{self._last_checkpoint('; last good checkpoint ')}") from None
            raise
        finally:
            restore_signals()

    def request_stop(self) -> None:
        """Finish the steps in flight, save a checkpoint and stop (what Ctrl-C and SIGTERM do)."""
        self.state.stop_requested = True

    def recorded(self, metrics_list: list[dict], compute: float, staleness: int | None = None) -> None:
        """The loops report each update here."""
        self.state.step += 1
        self.report.step(metrics_list, self.state.step, compute, staleness)
        if self.on_step is not None:
            self.on_step(self, self.state.step)

    def evaluate(self) -> dict:
        """Test loss and accuracy of the servers' parameters with the workers' mean statistics."""
        buffers = self.fleet.worker_buffers()
        self.state.buffers = buffers.mean(axis=0).astype(buffers.dtype)
        return self.fleet.evaluate(self.fleet.parameters(), self.state.buffers)

    def checkpoint(self):
        """The checkpoint of the current step (saved now unless it already is); its path."""
        self.checkpoints.save(self.fleet, self.state.step, self.plan.mode.done(self))
        return self.checkpoints.last

    def end_epoch(self, epoch: int) -> None:
        with self.report.paused():
            self.report.epoch(epoch, self.config.epochs, self.state.step, self.evaluate())
        if self.on_epoch is not None:
            self.on_epoch(self, self.report.epochs[-1])

    def recover(self, error) -> None:
        """A process died (Ray): replace it and go back to the step to redo (see Checkpoints.recover).
        An elastic run whose lost workers cannot be placed again goes on with fewer (``shrink``)."""
        with self.report.paused():
            here = self.checkpoints.here(self.fleet, self.plan.mode) if self.config.elastic else None
            try:
                event = self.checkpoints.recover(self.fleet, error, self.state.step)
            except PlacementTimeout as e:
                self.shrink(e, here)
        self.state.step = event["restart_step"]
        self.report.recovery(event)

    def shrink(self, error: PlacementTimeout, here: dict | None) -> None:
        """Replacements not placed in time: an elastic run goes on with fewer workers, any other stops."""
        membership.shrink(self, error, here)

    def _finish(self) -> dict:
        c, report, mode = self.config, self.report, self.plan.mode
        if not report.epochs or report.epochs[-1]["step"] != self.state.step:  # stopped by max_steps mid-epoch
            self.end_epoch(self.state.step // self.length.updates_per_epoch)
        self.model.set_flat_params(self.fleet.parameters())
        if self.state.buffers.size:
            self.model.set_buffers_vector(self.state.buffers)
        save_model(self.model, self.out / "model.h5", self.spec)
        stats = self.fleet.call_servers("stats")
        server = max(s["update_seconds"] for s in stats)
        fields = {"model": c.model_name, "dataset": c.dataset, "backend": c.backend, "mode": c.mode,
                  "workers": self.length.world, "servers": c.servers, "epochs": c.epochs, "steps": self.state.step,
                  "compress": c.compress, "data_plane": self.fleet.data_plane}
        fields.update(mode.summary(self))
        if self.state.membership:
            fields["membership"] = self.state.membership
        if self.fleet.fetched:
            fields["data_fetched"] = self.fleet.fetched
        samples = self.state.step * self.plan.data.batch_size * mode.workers_per_update(self.length.world)
        summary = report.summary(fields, server, samples, self.checkpoints.recoveries,
                                 params_bytes=params_sent(mode, self.length.world, self.model, report, stats),
                                 cpu=self.cpu)
        for sink in self.sinks:
            sink.finish(self.out, summary)
        self.finished = True
        report.log(f"done: {self.state.step} steps in {summary['wall_time_s']:.1f} s ({summary['samples_per_s']:.0f} "
                 f"samples/s); test accuracy {summary['final']['test_accuracy']:.4f}; model saved to "
                 f"{self.out / 'model.h5'}")
        return summary

    def _last_checkpoint(self, prefix: str) -> str:
        return f"{prefix}{self.checkpoints.last}" if self.checkpoints.last else ""

    def close(self) -> None:
        if self.report is not None:
            self.report.close()
        for sink in self.sinks:
            sink.close(failed=not self.finished)
        self.sinks = []
        if self.fleet is not None:
            self.fleet.close()
        conv_choice.pin(None)   # the local backend's workers pinned this process


def params_sent(mode, world: int, model, report, stats) -> int:
    """Parameter bytes sent back to the workers per update (``summary.json``'s bytes_per_step)."""
    per_update, steps_run = mode.workers_per_update(world), max(report.steps_run, 1)   # replies per update
    if stats[0]["reply_bytes"] is not None:   # compressed replies: what the shards sent, to every worker
        return round(per_update * sum(s["reply_bytes"] for s in stats) / steps_run)
    return mode.sent_back(per_update * model.flat_params.nbytes, report.replies, steps_run)


def catch_signals(trainer):
    """Ctrl-C or SIGTERM: ``trainer.request_stop()`` (finish the steps in flight, save a checkpoint,
    stop); a second one stops at once. Returns the function that puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if trainer.state.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()
        trainer.report.log(f"{signal.Signals(signum).name}: stopping after the steps in flight and saving a "
                           "checkpoint (again to stop at once)")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


def train(config: TrainConfig, backend=None, log=print, progress=True, resume: dict | None = None) -> dict:
    """Run a training to its end (or its stop) and close its processes; returns the summary."""
    trainer = Trainer(config, backend, log, progress, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
