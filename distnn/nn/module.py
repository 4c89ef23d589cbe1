"""Module, Parameter and Sequential, with one flat parameter buffer per model.

Once packed (``model.flat_params``, ``pack_parameters`` or ``astype``), every Parameter's ``data`` is a view
into one contiguous vector and its ``grad`` a view into a second one, in the fixed order of
``named_parameters()``. A gradient step is then a few numpy expressions over the whole model, and a
model's state travels between processes as one array.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..autograd import Variable

_structure = [0]   # bumped when any module gains or loses a parameter or child: packed models re-check


class Parameter(Variable):
    """A learned array: a Variable that requires grad."""

    def __init__(self, data):
        super().__init__(np.asarray(data), requires_grad=True)


class Module:
    """A building block with named parameters, buffers (non-learned state such as running
    statistics) and child modules, all kept in registration order."""

    fuses_relu = False   # forward(x, relu=True) applies a ReLU in the same pass (Sequential pairs them)
    takes_relu = False   # forward(x, relu=True) gives what it gives for the ReLU of x (a max pool)
    is_relu = False      # a plain ReLU layer

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_flat", None)
        object.__setattr__(self, "_path", "")

    # -- registration -----------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if name in self._params or name in self._modules or isinstance(value, (Parameter, Module)):
            _structure[0] += 1
        for registry in (self._params, self._modules, self._buffers):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        for registry in ("_params", "_modules", "_buffers"):
            if registry in d and name in d[registry]:
                return d[registry][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name, array):
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self):
        seen = set()
        for path, m in self.named_modules():
            for name, p in m._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for path, m in self.named_modules():
            for name, b in m._buffers.items():
                yield (f"{path}.{name}" if path else name), b

    def describe(self):
        """'Linear' or "Linear 'features.3'": how errors name this layer."""
        return f"{type(self).__name__} {self._path!r}" if self._path else type(self).__name__

    # -- the flat buffers ---------------------------------------------------------------------------
    def pack_parameters(self, dtype=None):
        """Pack all parameters into one vector (and their gradients into a second one), as ``dtype``
        (default: the first parameter's). Buffers are converted to ``dtype`` too. Returns self."""
        params = self.parameters()
        for path, m in self.named_modules():
            object.__setattr__(m, "_path", path)
        if dtype is None:
            dtype = params[0].data.dtype if params else np.float32
        dtype = np.dtype(dtype)
        total = sum(p.data.size for p in params)
        flat = np.empty(total, dtype)
        grad = np.zeros(total, dtype)
        offset = 0
        for p in params:
            n = p.data.size
            flat[offset:offset + n] = p.data.ravel()
            if p.grad is not None:  # keep gradients accumulated before packing
                grad[offset:offset + n] = p.grad.ravel()
            p.data = flat[offset:offset + n].reshape(p.data.shape)
            p.grad = grad[offset:offset + n].reshape(p.data.shape)
            offset += n
        for _, m in self.named_modules():
            for name, b in m._buffers.items():
                if b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dtype)
        object.__setattr__(self, "_flat", (flat, grad, tuple(params), _structure[0]))
        return self

    def _packed(self):
        """(flat parameters, flat gradients), packing again if a parameter was added or removed since
        (anywhere: the structure counter) or its data or grad replaced by an array of its own."""
        packed = self._flat
        if packed is None or packed[3] != _structure[0] or any(
                p.data.base is not packed[0] or p.grad is None or p.grad.base is not packed[1] for p in packed[2]):
            self.pack_parameters()
        return self._flat

    @property
    def flat_params(self) -> np.ndarray:
        """All parameters as one contiguous vector; the parameters are views into it."""
        return self._packed()[0]

    @property
    def flat_grads(self) -> np.ndarray:
        """All gradients as one contiguous vector; each parameter's ``grad`` is a view into it."""
        return self._packed()[1]

    def astype(self, dtype):
        """Convert parameters and buffers to ``dtype`` (float64 for gradient checks). Returns self."""
        return self.pack_parameters(dtype)

    @property
    def dtype(self):
        return self.flat_params.dtype

    def zero_grad(self):
        self.flat_grads[...] = 0

    def set_flat_params(self, vector):
        flat = self.flat_params
        vector = np.asarray(vector)
        if vector.shape != flat.shape:
            raise ValueError(f"{self.describe()}: expected a parameter vector of {flat.size} values, got {vector.shape}")
        flat[...] = vector

    def param_slices(self):
        """(name, start, stop, shape) of each parameter in the flat vector."""
        out, offset = [], 0
        for name, p in self.named_parameters():
            out.append((name, offset, offset + p.data.size, p.data.shape))
            offset += p.data.size
        return out

    def decay_mask(self) -> np.ndarray:
        """1 where weight decay applies (weights: 2 or more dimensions), 0 for biases and norm scales."""
        mask = np.zeros(self.flat_params.size, self.flat_params.dtype)
        for name, start, stop, shape in self.param_slices():
            if len(shape) >= 2:
                mask[start:stop] = 1
        return mask

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Copies of every parameter and buffer, by name."""
        state = OrderedDict((n, p.data.copy()) for n, p in self.named_parameters())
        state.update((n, b.copy()) for n, b in self.named_buffers())
        return state

    def load_state_dict(self, state: dict, source="state dict"):
        """Copy arrays into the parameters and buffers of the same names and shapes."""
        own = dict(self.named_parameters())
        buffers = {n: (m, k) for path, m in self.named_modules() for k in m._buffers
                   for n in [f"{path}.{k}" if path else k]}
        expected = set(own) | set(buffers)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"{source}: missing {sorted(missing) or 'nothing'}, unexpected {sorted(unexpected) or 'nothing'}")
        for name, value in state.items():
            value = np.asarray(value)
            target = own[name].data if name in own else buffers[name][0]._buffers[buffers[name][1]]
            if value.shape != target.shape:
                raise ValueError(f"{source}: {name} has shape {value.shape}, the model expects {target.shape}")
            target[...] = value

    def buffers_vector(self) -> np.ndarray:
        """All floating-point buffers (e.g. batch-norm running statistics) as one float vector."""
        arrays = [b.ravel() for _, b in self.named_buffers() if b.dtype.kind == "f"]
        return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)

    def set_buffers_vector(self, vector):
        offset = 0
        for _, b in self.named_buffers():
            if b.dtype.kind == "f":
                b[...] = vector[offset:offset + b.size].reshape(b.shape)
                offset += b.size

    # -- calling ------------------------------------------------------------------------------------
    def forward(self, *args):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            lines.append(f"  ({name}): " + repr(m).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class Sequential(Module):
    """Calls its children in order; children are named '0', '1', ..."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Module")
            setattr(self, str(i), layer)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        """Each child in turn. A child that can apply a ReLU in its own pass (``fuses_relu``: batch
        norm) followed by a ReLU layer does so, and the ReLU layer is passed over; so is a ReLU layer
        followed by a child that gives the same for the ReLU of its input (``takes_relu``: max
        pooling, whose max commutes with the ReLU). The same maths, a pass over the data fewer."""
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            if layers[i].fuses_relu and i + 1 < len(layers) and layers[i + 1].is_relu:
                x, i = layers[i](x, relu=True), i + 2
            elif layers[i].is_relu and i + 1 < len(layers) and layers[i + 1].takes_relu:
                x, i = layers[i + 1](x, relu=True), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x
