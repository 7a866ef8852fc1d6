"""Parameters and modules: the two building blocks of every layer.

A :class:`Module` has ``forward(*inputs)`` and ``backward(dout)`` side by side.
``forward`` keeps what ``backward`` needs with :meth:`Module.save_for_backward`;
``backward`` takes the gradient of the loss with respect to the output, adds
the gradients of its own parameters into ``param.grad`` (``+=``, so a module
whose output feeds several places gets the sum) and returns the gradient with
respect to each input. It never modifies ``dout``.

Parameters are found by walking attributes in definition order, and named by
their dotted path (``r1.conv1.weight``). The names are the keys of checkpoints,
of the optimiser state and of the PyTorch reference, never object identities.
"""

import contextlib

import numpy as np

from tinyddpm.backend import get_array_module, to_device, to_host

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Run forward passes that keep nothing for backward (sampling, evaluation)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def grad_enabled():
    """False inside :func:`no_grad`: a layer may then skip whatever only backward needs."""
    return _grad_enabled


_frozen = None  # (id(weight), form) -> (weight, prepared array), inside frozen_weights()


@contextlib.contextmanager
def frozen_weights():
    """Run a block in which no weight changes, such as the steps of a sampler.

    Inside it, :func:`prepared_weight` computes each weight's derived form (a conv's
    weight matrix, its Winograd filter transform) once and reuses it on later calls.
    Changing a weight in place inside the block would leave the old form in use.
    """
    global _frozen
    if _frozen is not None:  # nested: the outer block's cache serves
        yield
        return
    _frozen = {}
    try:
        yield
    finally:
        _frozen = None


def weights_frozen():
    """Whether this runs inside :func:`frozen_weights`."""
    return _frozen is not None


def prepared_weight(weight, form, make):
    """``make(weight)``, made once per weight array (or other object, such as a whole
    network) and ``form`` inside :func:`frozen_weights`."""
    if _frozen is None:
        return make(weight)
    entry = _frozen.get((id(weight), form))
    if entry is None:
        # The entry holds the weight, so its id cannot pass to another array meanwhile.
        entry = _frozen[id(weight), form] = (weight, make(weight))
    return entry[1]


class Parameter:
    """A trainable array ``data`` and the gradient ``grad`` accumulated into it."""

    def __init__(self, data):
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"

    def __reduce__(self):
        # A pickled Parameter (a forward worker's copy of a network) carries its value; its
        # gradient starts again at zero.
        return Parameter, (self.data,)


class Module:
    """Base class: subclasses define ``forward`` and ``backward``."""

    _cache = None

    def __call__(self, *inputs, **options):
        return self.forward(*inputs, **options)

    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    # -- the cache between forward and backward -------------------------------

    def save_for_backward(self, *values):
        """Keep ``values`` for the next ``backward`` (skipped under :func:`no_grad`)."""
        self._cache = values if _grad_enabled else None

    def saved(self):
        """Return (and drop) what the last forward kept for backward."""
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a forward that kept "
                "its inputs (was forward run under no_grad, or backward called twice?)")
        return cache

    # -- parameters -------------------------------------------------------------

    def named_parameters(self, prefix=""):
        """Yield ``(dotted_name, Parameter)`` in the order the attributes were set."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self):
        """A dict ``{dotted_name: Parameter}``."""
        return dict(self.named_parameters())

    def array_module(self):
        """NumPy or CuPy: where this module's parameters live."""
        return get_array_module(next(self.named_parameters())[1].data)

    def num_parameters(self):
        return sum(int(p.data.size) for _, p in self.named_parameters())

    def zero_grad(self):
        for _, param in self.named_parameters():
            param.grad.fill(0)

    def to(self, xp):
        """Move every parameter (and its gradient) to array module ``xp``."""
        for _, param in self.named_parameters():
            param.data = to_device(param.data, xp)
            param.grad = xp.zeros_like(param.data)
        return self

    def astype(self, dtype):
        """Cast every parameter to ``dtype`` (float64 for gradient checks)."""
        for _, param in self.named_parameters():
            param.data = param.data.astype(dtype)
            param.grad = param.grad.astype(dtype)
        return self

    def state_dict(self):
        """``{name: host NumPy array}``: a copy of every parameter, safe to keep."""
        return {name: np.array(to_host(p.data)) for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays from ``state`` into the parameters; names and shapes must match."""
        params = self.parameters()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"parameter names do not match: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for name, param in params.items():
            value = np.asarray(to_host(state[name]))
            if value.shape != param.data.shape:
                raise ValueError(f"parameter {name} has shape {value.shape}, expected {param.data.shape}")
            xp = get_array_module(param.data)
            param.data = to_device(value.astype(param.data.dtype), xp)
