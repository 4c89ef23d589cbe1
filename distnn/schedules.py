"""Learning-rate schedules: functions of the update count (0-based) -> the multiplier of the base lr.
Plain Python, no state: a resumed run's schedule is the same function of the same count."""
from __future__ import annotations

import math


def constant():
    return lambda step: 1.0


def step_decay(step_size: int, gamma: float = 0.1):
    """Multiply by gamma every step_size steps."""
    return lambda step: gamma ** (step // step_size)


def exponential(gamma: float):
    return lambda step: gamma ** step


def cosine(total_steps: int, min_factor: float = 0.0):
    """Half a cosine from 1 down to min_factor over total_steps, then min_factor."""
    def f(step):
        t = min(step, total_steps) / max(total_steps, 1)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def warmup(schedule, warmup_steps: int):
    """Linear warmup from 1/warmup_steps to 1 over warmup_steps, then ``schedule`` (shifted)."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return schedule(step - warmup_steps)
    return f


SCHEDULES = {"constant": constant, "step": step_decay, "exponential": exponential, "cosine": cosine}


def make_schedule(name: str, total_steps: int, warmup_steps: int = 0, **options):
    """A schedule by name; 'cosine' spans the steps after warmup. Returns step -> multiplier."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if name == "cosine":
        options.setdefault("total_steps", max(total_steps - warmup_steps, 1))
    if name == "step":
        options.setdefault("step_size", max(total_steps // 3, 1))
    if name == "exponential":
        options.setdefault("gamma", 0.999)
    sched = SCHEDULES[name](**options)
    return warmup(sched, warmup_steps) if warmup_steps else sched
