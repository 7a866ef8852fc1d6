"""An exponential moving average of the weights, kept beside training.

After every update: ``ema = decay * ema + (1 - decay) * weights``. Sampling
from the average is usually cleaner than from the last weights, because it
smooths the noise of the final updates.
"""

import numpy as np

from tinyddpm.backend import get_array_module, to_device, to_host


class EMA:
    def __init__(self, params, decay):
        """``params``: the ``{name: Parameter}`` dict of a model; starts equal to the weights."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.averages = {name: p.data.copy() for name, p in params.items()}

    def update(self):
        for name, param in self.params.items():
            average = self.averages[name]
            average *= self.decay
            average += (1.0 - self.decay) * param.data

    def state_dict(self):
        return {name: np.array(to_host(a)) for name, a in self.averages.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.averages):
            raise ValueError("EMA weights do not match the model's parameter names")
        for name, average in self.averages.items():
            xp = get_array_module(average)
            self.averages[name] = to_device(state[name].astype(average.dtype), xp)
