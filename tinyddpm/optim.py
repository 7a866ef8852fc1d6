"""Adam, exactly as MATLAB's ``adamupdate`` (and ``torch.optim.Adam``) computes it.

For each parameter, at step t = 1, 2, ...:

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    p = p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

The bias corrections are folded into two numbers, so the update is
``p -= step_size * m / (sqrt(v) + eps_hat)`` with ``step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t)``
and ``eps_hat = eps sqrt(1 - beta2^t)``, the same expression multiplied through by
``sqrt(1 - beta2^t)``. The moments are kept per parameter NAME, so the state can
be saved next to a checkpoint and resumed.

A step is :meth:`Adam.advance` (count it, work out the two numbers) and then
:meth:`Adam.update` (apply it). On the GPU the two numbers live in a small device
array that ``advance`` overwrites, and the fused update kernels read them there: a
training step recorded as a CUDA graph (``cuda_graph.py``) replays ``update`` with
the numbers of the step at hand rather than those of the step it was recorded at.
"""

import math

import numpy as np

from tinyddpm.backend import get_array_module, to_device, to_host
from tinyddpm.nn import fused


class Adam:
    """Adam over ``params``, the ``{dotted_name: Parameter}`` dict of ``module.parameters()``."""

    def __init__(self, params, lr=5e-4, beta1=0.9, beta2=0.9999, eps=1e-8):
        self.params = dict(params)
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.step_count = 0
        self.step_size = self.eps_hat = None
        self._device_scalars = None  # (step_size, eps_hat) on the GPU, read by fused.adam_update
        self.m = {name: _zeros_like(p.data) for name, p in self.params.items()}
        self.v = {name: _zeros_like(p.data) for name, p in self.params.items()}

    def step(self):
        """Update every parameter in place from its ``grad``."""
        self.advance()
        self.update()

    def advance(self):
        """Count one more step and set its bias-corrected ``step_size`` and ``eps_hat``."""
        self.step_count += 1
        t = self.step_count
        correction1 = 1.0 - self.beta1 ** t
        correction2 = math.sqrt(1.0 - self.beta2 ** t)
        self.step_size = self.lr * correction2 / correction1
        self.eps_hat = self.eps * correction2
        xp = get_array_module(next(iter(self.params.values())).data) if self.params else np
        if xp is not np:
            if self._device_scalars is None:
                self._device_scalars = xp.empty(2, dtype=np.float64)
            self._device_scalars.set(np.array([self.step_size, self.eps_hat]))

    def update(self):
        """Apply the step that :meth:`advance` set up to every parameter, in place."""
        for name, param in self.params.items():
            xp = get_array_module(param.data)
            g, m, v = param.grad, self.m[name], self.v[name]
            if xp is not np:  # one fused kernel per parameter
                fused.adam_update(param.data, g, m, v, self.beta1, self.beta2, self._device_scalars)
                continue
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * (g * g)
            denom = xp.sqrt(v)
            denom += self.eps_hat
            xp.divide(m, denom, out=denom)
            denom *= self.step_size
            param.data -= denom

    def state_dict(self):
        """``{"step": int, "m": {name: host array}, "v": {name: host array}}``, copies of the moments."""
        return {
            "step": self.step_count,
            "m": {name: np.array(to_host(a)) for name, a in self.m.items()},
            "v": {name: np.array(to_host(a)) for name, a in self.v.items()},
        }

    def load_state_dict(self, state):
        """Restore a :meth:`state_dict`; names and shapes must match the parameters."""
        for key in ("m", "v"):
            names, expected = set(state[key]), set(self.params)
            if names != expected:
                raise ValueError(
                    f"Adam state {key!r} names do not match the parameters: missing "
                    f"{sorted(expected - names)[:3]}, unexpected {sorted(names - expected)[:3]}")
            for name, array in state[key].items():
                if np.shape(array) != self.params[name].data.shape:
                    raise ValueError(f"Adam state {key}[{name!r}] has shape {np.shape(array)}, "
                                     f"expected {self.params[name].data.shape}")
        for key, moments in (("m", self.m), ("v", self.v)):
            for name, param in self.params.items():
                xp = get_array_module(param.data)
                moments[name] = to_device(np.array(to_host(state[key][name]), dtype=param.data.dtype), xp)
        self.step_count = int(state["step"])


def _zeros_like(array):
    return get_array_module(array).zeros_like(array)
