"""The layers of tinyddpm, each a Module with a hand-written backward.

Images are channels-last (N, H, W, C) inside every layer; weights keep the
PyTorch layouts so that parameter names and shapes map onto the reference.
"""

from tinyddpm.nn.activation import Swish
from tinyddpm.nn.attention import ScaledDotProductAttention, SelfAttention
from tinyddpm.nn.broadcast_add import BroadcastAdd
from tinyddpm.nn.concat import Concat
from tinyddpm.nn.conv import Conv2d
from tinyddpm.nn.conv_transpose import ConvTranspose2d
from tinyddpm.nn.cross_entropy import SoftmaxCrossEntropy
from tinyddpm.nn.embedding import SinusoidalEmbedding
from tinyddpm.nn.group_norm import GroupNorm, GroupNormSwish
from tinyddpm.nn.label_embedding import LabelEmbedding
from tinyddpm.nn.linear import Linear
from tinyddpm.nn.memory import array_cache
from tinyddpm.nn.loss import MSELoss
from tinyddpm.nn.module import Module, Parameter, frozen_weights, no_grad
from tinyddpm.nn.pooling import GlobalAvgPool

__all__ = [
    "BroadcastAdd", "array_cache", "Concat", "Conv2d", "ConvTranspose2d", "GlobalAvgPool", "GroupNorm",
    "GroupNormSwish", "LabelEmbedding", "Linear", "MSELoss", "Module", "Parameter", "ScaledDotProductAttention",
    "SelfAttention", "SinusoidalEmbedding", "SoftmaxCrossEntropy", "Swish", "frozen_weights", "no_grad",
]
