"""The training commands of ``distnn``: train, eval, plot."""
from __future__ import annotations


class UsageError(Exception):
    """A wrong flag, config key or value: printed as one line, exit status 2."""


def add_training_commands(sub):
    pass
