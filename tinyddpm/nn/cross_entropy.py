"""Softmax cross-entropy, the classifier's loss, averaged over the batch.

Shapes: logits (N, K), labels (N,) integers in 0..K-1 -> a Python float
``mean(-log softmax(logits)[n, labels[n]])``. The gradient with respect to the
logits is ``(softmax(logits) - onehot(labels)) / N``.
"""

from tinyddpm.backend import get_array_module
from tinyddpm.nn.module import Module


def log_softmax(logits):
    """``log softmax`` over the last axis, shifted by the maximum so exp cannot overflow."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


class SoftmaxCrossEntropy(Module):
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits)``."""

    def forward(self, logits, labels):
        xp = get_array_module(logits)
        log_p = log_softmax(logits)
        self.save_for_backward(log_p, labels)
        return -float(log_p[xp.arange(len(labels)), labels].mean())

    def backward(self, dout=1.0):
        log_p, labels = self.saved()
        xp = get_array_module(log_p)
        dlogits = xp.exp(log_p)
        dlogits[xp.arange(len(labels)), labels] -= 1.0
        dlogits *= dout / len(labels)
        return dlogits, None
