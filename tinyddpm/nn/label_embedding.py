"""A learnt lookup table: one vector per class label.

Shapes: labels (N,) integers in 0..num_labels-1, weight (num_labels, D),
output (N, D). The gradient of a row is the sum of the output gradients of the
samples that looked it up, computed as ``onehot(labels)^T @ dout`` so the same
code runs on NumPy and CuPy and repeated labels add up.
"""

import numpy as np

from tinyddpm.backend import get_array_module
from tinyddpm.nn.matmul import matmul
from tinyddpm.nn.module import Module, Parameter
from tinyddpm.nn.parallel import one_blas_thread


class LabelEmbedding(Module):
    """``weight[labels]``. Shapes: labels (N,) -> (N, D); weight (num_labels, D)."""

    def __init__(self, num_labels, dim, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        self.weight = Parameter(rng.standard_normal((num_labels, dim)).astype(dtype))

    def forward(self, labels):
        self.save_for_backward(labels)
        return self.weight.data[labels]

    def backward(self, dout):
        (labels,) = self.saved()
        xp = get_array_module(dout)
        onehot = xp.eye(self.weight.data.shape[0], dtype=dout.dtype)[labels]
        with one_blas_thread():  # a small product: see parallel.py for why not on BLAS's threads
            self.weight.grad += matmul(onehot.T, dout)
        return None
