"""A search space: options of ``distnn train`` mapped to what a search draws for them.

Written in TOML, as a file or an inline table::

    {lr = "loguniform(1e-4, 1e-2)", batch_size = "choice(32, 64, 128)", optimizer = "choice('adam', 'momentum')"}

A string is a distribution - ``uniform(a, b)`` and ``loguniform(a, b)`` (floats in [a, b), log-spaced
for the second), ``randint(a, b)`` (an integer in [a, b), as Ray Tune's), ``choice(v1, v2, ...)``
(values written as TOML values) - and a TOML list is a grid: every trial sample runs each of its values
(``samples`` x the grid's size trials). Unknown options, options a search sets itself, bad
distributions and values an option cannot take are refused by name before anything starts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import FIELDS, ConfigError, TrainConfig, check_type, field_kind, tomllib

KINDS = ("uniform", "loguniform", "randint", "choice")
SET_BY_THE_SEARCH = ("out", "overwrite", "backend", "address")   # each trial is a Ray run with a folder of its own
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the option and the fault."""


@dataclass(frozen=True)
class Dimension:
    """One option's range: ``kind`` in KINDS or 'grid', and its ``values`` (bounds for uniform,
    loguniform and randint; the values themselves for choice and grid)."""
    option: str
    kind: str
    values: tuple

    def corners(self) -> tuple:
        """Values a check tries: both ends of a range, each value of a choice or grid."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values

    def to_tune(self):
        """The Ray Tune domain of this dimension."""
        from ray import tune
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*self.values) if self.kind != "choice" else tune.choice(list(self.values))

    def __str__(self):
        if self.kind == "grid":
            return f"{self.option} = {list(self.values)!r}"
        return f"{self.option} = {self.kind}({', '.join(repr(v) for v in self.values)})"


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple

    @property
    def options(self) -> list[str]:
        return [d.option for d in self.dimensions]

    def to_tune(self) -> dict:
        return {d.option: d.to_tune() for d in self.dimensions}

    def largest(self, option: str, fixed):
        """The largest value ``option`` can take in a trial (``fixed``: its value when not searched)."""
        for d in self.dimensions:
            if d.option == option:
                return max(d.corners())
        return fixed

    def check(self, fixed: dict) -> None:
        """Refuse, by option and value, a value that makes an invalid run with the ``fixed`` options
        (each corner of each dimension, the other dimensions at their first corner)."""
        first = {d.option: d.corners()[0] for d in self.dimensions}
        for d in self.dimensions:
            for value in d.corners():
                try:
                    TrainConfig(**{**fixed, **first, d.option: value}).validate()
                except (ConfigError, TypeError) as e:
                    raise SpaceError(f"space: {d.option} = {value!r} makes an invalid run: {e}") from None


def parse_space(text_or_path) -> SearchSpace:
    """A SearchSpace from a TOML file's path, an inline TOML table (``{lr = "loguniform(...)"}``) or
    a dict of the same (``{"lr": "loguniform(1e-4, 1e-2)", "batch_size": [32, 64]}``)."""
    if isinstance(text_or_path, dict):
        if not text_or_path:
            raise SpaceError("space: the space is empty; map at least one option to a distribution or a list")
        return SearchSpace(tuple(_dimension("space", k, v) for k, v in text_or_path.items()))
    text = str(text_or_path).strip()
    where = "space"
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise SpaceError(f"{path}: no such space file (give a TOML file or an inline table '{{lr = ...}}')")
        where, text = str(path), path.read_text()
    else:
        text = f"space = {text}"
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"{where}: not valid TOML ({e})") from None
    if where == "space":
        table = table["space"]
    if not table:
        raise SpaceError(f"{where}: the space is empty; map at least one option to a distribution or a list")
    return SearchSpace(tuple(_dimension(where, key, value) for key, value in table.items()))


def _dimension(where: str, option: str, value) -> Dimension:
    if option not in FIELDS:
        raise SpaceError(f"{where}: unknown option {option!r}; the options of distnn train are "
                         f"{', '.join(FIELDS)}")
    if option in SET_BY_THE_SEARCH:
        raise SpaceError(f"{where}: {option} is set by the search for each trial; it cannot be searched")
    if isinstance(value, list):
        if not value:
            raise SpaceError(f"{where}: {option} = []: a grid needs at least one value")
        return Dimension(option, "grid", tuple(_typed(where, option, v) for v in value))
    if not isinstance(value, str) or not (call := _CALL.match(value)) or call.group(1) not in KINDS:
        kinds = ", ".join(f"{k}(...)" for k in KINDS)
        raise SpaceError(f"{where}: {option} = {value!r} is neither a distribution ({kinds}) nor a list (a grid); "
                         f"hold an option fixed with its flag, e.g. --{option.replace('_', '-')}")
    kind, inner = call.groups()
    try:
        args = tuple(tomllib.loads(f"v = [{inner}]")["v"])
    except tomllib.TOMLDecodeError:
        raise SpaceError(f"{where}: {option} = {value!r}: the arguments are not TOML values "
                         "(numbers, 'strings', true/false, {tables})") from None
    if kind == "choice":
        if not args:
            raise SpaceError(f"{where}: {option} = {value!r}: choice needs at least one value")
        return Dimension(option, kind, tuple(_typed(where, option, v) for v in args))
    base, _ = field_kind(option)
    wanted = "int" if kind == "randint" else "float"
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SpaceError(f"{where}: {option} = {value!r}: {kind} takes two numbers, low and high")
    low, high = args
    if base != wanted and not (base == "float" and kind == "randint"):
        takes = "an integer" if base == "int" else "a " + base
        raise SpaceError(f"{where}: {option} = {value!r}: {option} takes {takes}; {kind} draws "
                         f"{'floats' if wanted == 'float' else 'integers'} (use {'randint' if base == 'int' else 'choice'})")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}: {option} = {value!r}: randint takes two integers")
    if not low < high:
        raise SpaceError(f"{where}: {option} = {value!r}: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: {option} = {value!r}: loguniform needs low > 0")
    if kind != "randint":
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SpaceError(f"{where}: {option} = {value!r}: bounds must be finite")
    return Dimension(option, kind, (low, high))


def _typed(where: str, option: str, value):
    try:
        return check_type(option, value)
    except ConfigError as e:
        raise SpaceError(f"{where}: {e}") from None

