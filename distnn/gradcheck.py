"""Numerical gradient check by central differences along random directions.

For a function with array output y, the check draws a random cotangent r and looks at the scalar
L = sum(r * y). For each checked array x and a few random unit directions d, the analytic directional
derivative <dL/dx, d> (from backward) must match the central difference
(L(x + eps d) - L(x - eps d)) / (2 eps). Run it in float64: the error of a correct gradient is then
around 1e-9, far below the default tolerance of 1e-6.
"""
from __future__ import annotations

import numpy as np

from .autograd import Variable, no_grad


class GradcheckError(AssertionError):
    pass


def _compare(evaluate, targets, r, rng, eps, directions, rtol, raise_error):
    """``targets``: (label, array perturbed in place, analytic gradient). Returns the worst error."""
    def loss():
        with no_grad():
            out = evaluate()
        return float(np.sum(np.asarray(out.data, np.float64) * r))

    worst, report = 0.0, []
    for label, x, grad in targets:
        if x.dtype != np.float64:
            raise ValueError(f"gradcheck: {label} is {x.dtype}; check in float64")
        grad = np.zeros_like(x) if grad is None else grad
        for _ in range(directions):
            d = rng.standard_normal(x.shape)
            d /= np.linalg.norm(d) or 1.0
            analytic = float(np.sum(grad * d))
            saved = x.copy()
            x += eps * d
            up = loss()
            x[...] = saved - eps * d
            down = loss()
            x[...] = saved
            numeric = (up - down) / (2 * eps)
            err = abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-8)
            worst = max(worst, err)
            report.append((label, analytic, numeric, err))
    if raise_error and worst > rtol:
        lines = "\n".join(f"  {label}: analytic {a:.10g} numeric {n:.10g} rel.err {e:.2e}"
                          for label, a, n, e in report if e > rtol)
        raise GradcheckError(f"gradient check failed (max rel. error {worst:.2e} > {rtol:.0e}):\n{lines}")
    return worst


def gradcheck(fn, inputs, wrt=None, eps=1e-5, directions=3, rtol=1e-6, seed=0, raise_error=True):
    """Check ``fn(*Variables) -> Variable`` at ``inputs``.

    ``inputs``: float64 arrays to check, or anything else (integer labels, constants) passed as is.
    ``wrt``: indices of the inputs to check (default: every floating-point array). ``fn`` must be
    deterministic (fix dropout masks). Returns the largest relative error
    |analytic - numeric| / max(|analytic|, |numeric|, 1e-8); raises GradcheckError above ``rtol``.
    """
    rng = np.random.default_rng((seed, 0x6C0DE))  # a stream unlike the tests' own default_rng(seed)
    if wrt is None:
        wrt = [i for i, v in enumerate(inputs) if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    variables = [Variable(np.array(v, copy=True), requires_grad=i in wrt) if isinstance(v, np.ndarray) else v
                 for i, v in enumerate(inputs)]
    out = fn(*variables)
    r = rng.standard_normal(out.shape)
    out.backward(r.astype(out.dtype))
    targets = [(f"input {i}", variables[i].data, variables[i].grad) for i in wrt]
    return _compare(lambda: fn(*variables), targets, r, rng, eps, directions, rtol, raise_error)


def gradcheck_module(module, *inputs, loss=None, wrt_inputs=True, eps=1e-5, directions=3, rtol=1e-6, seed=0,
                     raise_error=True):
    """Check a Module's gradients with respect to its floating-point inputs and all its parameters.

    The module is converted to float64 in place (``module.astype``). ``loss`` maps the module's
    output to the Variable checked (default: the output itself; for a tuple, its first element).
    The module must be deterministic in the current mode (seed dropout identically, or check eval).
    """
    rng = np.random.default_rng((seed, 0x6C0DE))  # a stream unlike the tests' own default_rng(seed)
    module.astype(np.float64)
    module.zero_grad()
    xs = [Variable(np.array(x, copy=True), requires_grad=wrt_inputs and x.dtype.kind == "f")
          if isinstance(x, np.ndarray) else x for x in inputs]

    def evaluate():
        out = module(*xs)
        if loss is not None:
            return loss(out)
        return out[0] if isinstance(out, tuple) else out

    out = evaluate()
    r = rng.standard_normal(out.shape)
    out.backward(r.astype(out.dtype))
    targets = [(f"input {i}", x.data, x.grad) for i, x in enumerate(xs)
               if isinstance(x, Variable) and x.requires_grad]
    targets += [(name, p.data, p.grad.copy()) for name, p in module.named_parameters()]
    return _compare(evaluate, targets, r, rng, eps, directions, rtol, raise_error)
