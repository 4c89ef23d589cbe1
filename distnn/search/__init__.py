"""Hyperparameter searches: Ray Tune scheduling ordinary distnn runs.

``space`` parses and checks a search space (plain Python, no Ray); ``trial`` is what runs inside one
Tune trial (a distnn run in the trial's placement group, reporting once per epoch); ``tuner`` starts,
resumes and summarises a search (``results.csv``, ``search.json``, the console table).
"""
from .space import SearchSpace, SpaceError, parse_space

__all__ = ["SearchSpace", "SpaceError", "parse_space", "load_tuner"]


def load_tuner():
    """The ``tuner`` module; a one-line ``pip install`` hint where Ray Tune is missing."""
    try:
        from . import tuner as module
    except ImportError as e:
        if "tune" not in str(e) and "pandas" not in str(e) and "pyarrow" not in str(e):
            raise
        raise SpaceError("searching needs Ray Tune: pip install 'distnn[tune]'") from None
    return module
