"""A user's own network: a builder function ``build(input_shape, num_classes, **options) -> Module``
named ``path/to/nets.py:build`` or ``mypkg.nets:build``.

The spec records the reference, the builder's module name, the sha256 of its source file, the input
shape, the classes and the options, so a run folder, model file or checkpoint can rebuild the network
and refuses to when the file is gone or has changed since. On Ray the code travels to every worker in
the actor's runtime environment (``runtime_env``): the builder file's folder (its ``.py`` files) as the
working directory, or the builder's top-level package as a ``py_module``. A worker imports the shipped
copy, checked against the same sha256; where none was shipped (a Ray session the caller started) it
loads the file from its recorded path, so a one-machine cluster works either way.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path


class BuilderError(ValueError):
    """A builder reference that cannot be resolved, or a builder that does not give a Module."""


def is_reference(text) -> bool:
    """Whether ``text`` names a builder (``FILE.py:FUNCTION`` or ``module.path:FUNCTION``)."""
    return isinstance(text, str) and ":" in text and bool(text.rpartition(":")[2])


def _parse(reference: str) -> tuple[str, str, str]:
    target, _, function = reference.rpartition(":")
    if not target or not function.isidentifier():
        raise BuilderError(f"model {reference!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    kind = "file" if target.endswith(".py") or os.sep in target or "/" in target else "module"
    if kind == "module" and not all(part.isidentifier() for part in target.split(".")):
        raise BuilderError(f"model {reference!r}: {target!r} is neither a .py file nor a module name")
    return kind, target, function


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_spec(reference: str, input_shape, num_classes: int, options: dict | None = None, seed: int = 0) -> dict:
    """The spec of a builder model: resolves the file (absolute) or module and hashes its source."""
    kind, target, function = _parse(reference)
    if kind == "file":
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise BuilderError(f"{path}: builder file not found (model {reference!r})")
        module = path.stem
        reference = f"{path}:{function}"
    else:
        module = target
        try:
            path = Path(importlib.import_module(target).__file__)
        except ImportError as e:
            raise BuilderError(f"model {reference!r}: cannot import {target!r} ({e}); is it on PYTHONPATH?") from None
    return {"builder": reference, "module": module, "function": function, "sha256": _sha256(path),
            "source": str(path), "input_shape": list(input_shape), "num_classes": int(num_classes),
            "options": dict(options or {}), "seed": seed}


def _matching_module(name: str, sha256: str):
    """The module ``name`` importable here whose source has ``sha256``, or None."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or not Path(found.origin).is_file() or _sha256(found.origin) != sha256:
        return None
    return importlib.import_module(name)


def _load_module(spec: dict):
    kind, target, _ = _parse(spec["builder"])
    shipped = _matching_module(spec["module"], spec["sha256"])
    if shipped is not None:
        return shipped
    source = Path(spec["source"])
    if not source.is_file():
        raise BuilderError(f"{source}: builder file not found; the model was built by {spec['builder']!r} "
                           "(put the file back; on a Ray cluster started by hand, pass "
                           "runtime_env=distnn.models.builders.runtime_env(spec) to its ray.init)")
    if _sha256(source) != spec["sha256"]:
        raise BuilderError(f"{source}: builder changed since the model was made (sha256 {_sha256(source)[:12]}..., "
                           f"recorded {spec['sha256'][:12]}...); restore that version of the file")
    name = f"distnn_builder_{spec['sha256'][:16]}"
    if name not in sys.modules:
        loader_spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
    return sys.modules[name]


def build(spec: dict):
    """The Module the spec's builder returns for its input shape, classes and options."""
    from ..nn import Module
    module = _load_module(spec)
    fn = getattr(module, spec["function"], None)
    if not callable(fn):
        raise BuilderError(f"{spec['source']}: no function {spec['function']!r}")
    model = fn(tuple(spec["input_shape"]), spec["num_classes"], **spec["options"])
    if not isinstance(model, Module):
        raise BuilderError(f"{spec['builder']}: returned {type(model).__name__}, not a distnn.nn.Module")
    return model


def source_file(spec: dict) -> str | None:
    """Where this process loads the builder from (the shipped copy on a Ray worker)."""
    return None if "builder" not in spec else _load_module(spec).__file__


def runtime_env(spec: dict) -> dict | None:
    """What a Ray job needs to import the builder on any node: None for zoo and layer-list specs."""
    if "builder" not in spec:
        return None
    kind, target, _ = _parse(spec["builder"])
    if kind == "module":
        top = importlib.import_module(target.split(".")[0])
        if hasattr(top, "__path__"):
            return {"py_modules": [str(Path(top.__file__).parent)]}
    return {"working_dir": str(_stage(Path(spec["source"]).parent, spec["sha256"]))}


def _stage(folder: Path, sha256: str) -> Path:
    """A copy of the ``.py`` files of ``folder`` (and of its packages), so that the working directory
    Ray uploads holds the code and not the data beside it."""
    staged = Path(tempfile.gettempdir()) / "distnn-builders" / sha256[:16]
    if staged.is_dir():
        return staged
    tmp = staged.with_name(f"{staged.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in folder.rglob("*.py"):
        rel = path.relative_to(folder)
        inside_package = all((folder / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts)))
        if any(p.startswith(".") or p == "__pycache__" for p in rel.parts) or not inside_package:
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tmp / rel)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, staged)
    except OSError:  # another process staged it first
        shutil.rmtree(tmp, ignore_errors=True)
    return staged
