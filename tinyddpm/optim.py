"""Adam, exactly as MATLAB's ``adamupdate`` (and ``torch.optim.Adam``) computes it.

For each parameter, at step t = 1, 2, ...:

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    p = p - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

The bias corrections are folded into two Python floats, so the update is
``p -= step_size * m / (sqrt(v) + eps_hat)`` with ``step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t)``
and ``eps_hat = eps sqrt(1 - beta2^t)``, the same expression multiplied through by
``sqrt(1 - beta2^t)``. The moments are kept per parameter NAME, so the state can
be saved next to a checkpoint and resumed.
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
        self.m = {name: _zeros_like(p.data) for name, p in self.params.items()}
        self.v = {name: _zeros_like(p.data) for name, p in self.params.items()}

    def step(self):
        """Update every parameter in place from its ``grad``."""
        self.step_count += 1
        t = self.step_count
        correction1 = 1.0 - self.beta1 ** t
        correction2 = math.sqrt(1.0 - self.beta2 ** t)
        step_size = self.lr * correction2 / correction1
        eps_hat = self.eps * correction2
        for name, param in self.params.items():
            xp = get_array_module(param.data)
            g, m, v = param.grad, self.m[name], self.v[name]
            if xp is not np:  # one fused kernel per parameter
                fused.adam_update(param.data, g, m, v, self.beta1, self.beta2, step_size, eps_hat)
                continue
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * (g * g)
            denom = xp.sqrt(v)
            denom += eps_hat
            xp.divide(m, denom, out=denom)
            denom *= step_size
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
