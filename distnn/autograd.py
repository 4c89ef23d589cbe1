"""The autograd engine: Variable, Operator, backward(), no_grad() and the train/eval switch.

A forward pass records a graph as it runs: calling an ``Operator`` on Variables computes the result
with plain numpy and makes the operator the output's ``creator``. ``loss.backward()`` sorts that graph
once, iteratively (no recursion, so a 1,000-step unrolled LSTM is fine), and walks it from the loss to
the leaves, accumulating gradients with ``+=`` so that a Variable used twice receives the sum. Once an
operator's backward has run, the engine drops the operator's saved arrays and the links to its inputs,
so intermediate arrays are released while backward is still going.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np


class _Config(threading.local):
    def __init__(self):
        self.enable_grad = True
        self.train = True


config = _Config()


@contextlib.contextmanager
def no_grad():
    """Run the body without recording a graph (evaluation, parameter updates)."""
    old, config.enable_grad = config.enable_grad, False
    try:
        yield
    finally:
        config.enable_grad = old


@contextlib.contextmanager
def _train_flag(value):
    old, config.train = config.train, value
    try:
        yield
    finally:
        config.train = old


def train_mode():
    """Context manager: batch norm uses batch statistics, dropout drops (the default)."""
    return _train_flag(True)


def eval_mode():
    """Context manager: batch norm uses running statistics, dropout is the identity."""
    return _train_flag(False)


def is_training() -> bool:
    return config.train


def set_training(value: bool) -> None:
    """Set the global mode for this thread; prefer the ``train_mode``/``eval_mode`` contexts."""
    config.train = bool(value)


class Variable:
    """An ndarray in the graph: ``data``, its ``grad`` (same shape, or None) and its ``creator``."""

    __array_priority__ = 200
    __slots__ = ("data", "grad", "creator", "requires_grad", "name", "__weakref__")

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if isinstance(data, Variable):
            data = data.data
        self.data = np.asarray(data)
        self.grad = None
        self.creator = None
        self.requires_grad = requires_grad
        self.name = name

    # -- shape helpers -------------------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        name = f" {self.name!r}" if self.name else ""
        return f"Variable{name}(shape={self.shape}, dtype={self.dtype})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self):
        return self.data.item()

    def zero_grad(self):
        if self.grad is not None:
            self.grad[...] = 0

    # -- backward ------------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False, on_final=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``grad``.

        ``grad`` defaults to ones (a scalar loss). Gradients of intermediate Variables are freed as
        soon as they have been passed on; leaves that require grad keep theirs (accumulated).
        ``on_final(leaf)`` is called as soon as a leaf's gradient is complete (after the last operator
        that uses it), while the rest of backward still runs: a worker sends those gradients then.
        """
        if grad is None:
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad.data if isinstance(grad, Variable) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad shape {grad.shape} != output shape {self.shape}")
        if self.creator is None:
            _accumulate(self, grad)
            return
        order = _topological_order(self.creator)
        final_after = _last_uses(order) if on_final is not None else {}
        # id -> (Variable, grad); holding the Variable keeps its id from being reused meanwhile.
        pending = {id(self): (self, grad)}
        for k, op in enumerate(order):
            _backward_one(op, pending, retain_graph)
            for leaf in final_after.get(k, ()):
                on_final(leaf)


def _backward_one(op, pending: dict, retain_graph: bool) -> None:
    """Run ``op``'s backward on the gradients of its outputs in ``pending``; pass its inputs' on."""
    gys, any_grad = [], False
    for ref, shape, dtype in zip(op.outputs, op.out_shapes, op.out_dtypes):
        out = ref()
        entry = pending.pop(id(out), None) if out is not None else None
        any_grad |= entry is not None
        if entry is not None:
            gys.append(entry[1])
        else:
            gys.append(None if op.none_for_unused_outputs else np.zeros(shape, dtype))
    if not any_grad:
        return
    op.may_overwrite_saved = not retain_graph
    gxs = op.backward(*gys)
    if not isinstance(gxs, tuple):
        gxs = (gxs,)
    for x, gx in zip(op.inputs, gxs):
        if gx is None or not x.requires_grad:
            continue
        if x.creator is None:
            _accumulate(x, gx)
        elif id(x) in pending:
            other = pending[id(x)][1]
            if op.fresh_input_grads and gx.shape == other.shape and gx.dtype == other.dtype:
                pending[id(x)] = (x, np.add(gx, other, out=gx))   # no new array: gx is the op's own
            else:
                pending[id(x)] = (x, other + gx)
        else:
            pending[id(x)] = (x, gx)
    if not retain_graph:
        op.release()


def _last_uses(order) -> dict:
    """{position in ``order``: the leaves (requiring grad) whose last use is the operator there}."""
    last = {}
    for k, op in enumerate(order):
        for x in op.inputs:
            if x.creator is None and x.requires_grad:
                last[id(x)] = (k, x)
    out = {}
    for k, x in last.values():
        out.setdefault(k, []).append(x)
    return out


def _accumulate(leaf: Variable, g: np.ndarray) -> None:
    if g.shape != leaf.shape:
        raise ValueError(f"gradient shape {g.shape} does not match {leaf!r}")
    if leaf.grad is None:
        leaf.grad = np.array(g, dtype=leaf.dtype, copy=True)
    else:
        leaf.grad += g


def _topological_order(root_op):
    """Operators reachable from ``root_op``, each before the operators that produced its inputs.

    An iterative depth-first post-order, reversed: correct for any graph depth.
    """
    post, seen = [], {id(root_op)}
    stack = [(root_op, iter(root_op.inputs))]
    while stack:
        op, it = stack[-1]
        for x in it:
            c = x.creator
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                stack.append((c, iter(c.inputs)))
                break
        else:
            stack.pop()
            post.append(op)
    post.reverse()
    return post


def as_variable(x) -> Variable:
    return x if isinstance(x, Variable) else Variable(x)


class Operator:
    """One differentiable function of ndarrays.

    Subclasses implement ``forward(*arrays) -> array or tuple of arrays`` and
    ``backward(*grad_outputs) -> grad or tuple of grads`` (one per input; None where an input is not
    differentiable), saving on ``self`` whatever backward needs. Calling the operator on Variables
    runs forward and, when any input requires grad and grad is enabled, records the graph.
    ``self.needs_grad`` (one bool per input) is set before forward, so that forward saves and
    backward computes only what is needed.
    """

    inputs: tuple = ()
    outputs: tuple = ()
    #: True: backward gets None for an output that received no gradient, instead of zeros of its
    #: shape (an operator whose unused output is large, such as an LSTM's sequence, skips that work)
    none_for_unused_outputs = False
    #: set by the engine before backward: True when it releases the operator right after (the graph
    #: is not retained), so backward may overwrite what forward saved instead of allocating anew
    may_overwrite_saved = False
    #: True: every input gradient backward returns is a new array no one else holds, which the engine
    #: may add an input's other gradients into (a residual block's input: its shortcut's and its branch's)
    fresh_input_grads = False

    def __call__(self, *inputs):
        inputs = tuple(as_variable(x) for x in inputs)
        record = config.enable_grad and any(x.requires_grad for x in inputs)
        self.needs_grad = tuple(record and x.requires_grad for x in inputs)
        ys = self.forward(*(x.data for x in inputs))
        single = not isinstance(ys, tuple)
        if single:
            ys = (ys,)
        outputs = tuple(Variable(y, requires_grad=record) for y in ys)
        if record:
            for o in outputs:
                o.creator = self
            self.inputs = inputs
            self.outputs = tuple(weakref.ref(o) for o in outputs)
            self.out_shapes = tuple(y.shape for y in ys)
            self.out_dtypes = tuple(y.dtype for y in ys)
        else:
            self.release()
        return outputs[0] if single else outputs

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    def release(self):
        """Drop everything saved for backward and the links into the graph.

        An operator instance serves one call; the functional wrappers in ``distnn.ops`` make a new one
        each time.
        """
        self.__dict__.clear()

    def __repr__(self):
        return f"{type(self).__name__}()"
