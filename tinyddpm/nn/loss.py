"""The training loss, MATLAB's ``mse``: half the summed squared error per sample.

Shapes: ``pred`` and ``target`` (N, ...) -> a scalar on their device,
``sum((pred - target) ** 2) / (2 * N)`` with N the batch size (first axis).

The loss stays on the device: reading it (``float(loss)``) waits for the GPU, so the
training step reads it once, after the update, and backward is queued without waiting.
"""

from tinyddpm.nn.module import Module


class MSELoss(Module):
    """MATLAB ``mse``; backward(dout=1.0) returns ``dpred`` only (the target is data)."""

    def forward(self, pred, target):
        diff = pred - target
        N = pred.shape[0]
        self.save_for_backward(diff, N)
        return (diff * diff).sum() / (2 * N)

    def backward(self, dout=1.0):
        diff, N = self.saved()
        return diff * (dout / N)
