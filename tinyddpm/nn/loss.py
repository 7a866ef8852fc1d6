"""The training loss, MATLAB's ``mse``: half the summed squared error per sample.

Shapes: ``pred`` and ``target`` (N, ...) -> a Python float
``sum((pred - target) ** 2) / (2 * N)`` with N the batch size (first axis).
"""

from tinyddpm.nn.module import Module


class MSELoss(Module):
    """MATLAB ``mse``; backward(dout=1.0) returns ``dpred`` only (the target is data)."""

    def forward(self, pred, target):
        diff = pred - target
        N = pred.shape[0]
        self.save_for_backward(diff, N)
        return float((diff * diff).sum()) / (2 * N)

    def backward(self, dout=1.0):
        diff, N = self.saved()
        return diff * (dout / N)
