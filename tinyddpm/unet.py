"""The example's U-Net: predicts the noise in a noisy image at step t.

Images are channels-last throughout tinyddpm: the network maps ``x`` of shape
(B, H, W, C) and integer steps ``t`` of shape (B,) to a noise estimate of
shape (B, H, W, C). Parameter names and shapes follow the MATLAB example's
table in ``shared/spec/matlab-example.md`` and the PyTorch reference one to one
(``r1.conv1.weight`` is (OC, C, KH, KW) in both).

The backward pass mirrors the forward line by line, in reverse. Where a
tensor feeds two places (the normalised input of every block, each skip, the
time embedding) the gradients from both places are added.
"""

from dataclasses import asdict, dataclass, replace

import numpy as np

from tinyddpm.backend import get_array_module, to_device
from tinyddpm.nn import (
    Concat,
    Conv2d,
    ConvTranspose2d,
    GroupNorm,
    GroupNormSwish,
    LabelEmbedding,
    Linear,
    Module,
    SelfAttention,
    SinusoidalEmbedding,
    Swish,
)


@dataclass(frozen=True)
class UNetConfig:
    """The network's shape. ``example`` is the MATLAB example's exactly."""

    channels: int = 1  # image channels C (1 grayscale, 3 RGB)
    widths: tuple = (64, 128, 256)  # feature channels at 32x32, 16x16, 8x8
    emb_dim: int = 256  # time-embedding width
    sinusoid_dim: int = 64  # sinusoidal step-encoding width
    groups: int = 32  # GroupNorm groups, everywhere
    num_classes: int = 0  # > 0: class-conditional, with one extra "no label" row

    def to_dict(self):
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "widths": tuple(d["widths"])})


PRESETS = {
    # The MATLAB example's network: 12,980,033 parameters for one channel.
    "example": UNetConfig(),
    # Same topology at a quarter of the width (822k parameters, about 1/16 of the
    # arithmetic): trains to legible digits on a 2-core CPU in about an hour.
    "small": UNetConfig(widths=(16, 32, 64), emb_dim=64, groups=8),
    # For tests and gradient checks.
    "tiny": UNetConfig(widths=(8, 16, 32), emb_dim=32, sinusoid_dim=16, groups=4),
}


def preset(name, channels=1):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], channels=channels)


class ResBlock(Module):
    """Residual block ``res(in -> out)`` with the time embedding added in the middle.

    x (B, H, W, in), emb (B, E) -> (B, H, W, out). The shortcut is a 1x1 conv of
    the *normalised* input, in every block, as in the example. Each GroupNorm and the
    Swish after it are one layer (``GroupNormSwish``); ``norm1`` also returns the
    normalised input for the shortcut. The projected time embedding enters ``conv1``
    as a per-sample shift of its bias, and ``conv2`` adds its result into the shortcut's
    output, so neither sum is a pass of its own.
    """

    def __init__(self, in_channels, out_channels, emb_dim, groups, rng, dtype):
        self.norm1 = GroupNormSwish(groups, in_channels, keep_normalised=True, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, rng=rng, dtype=dtype)
        self.emb_norm = GroupNorm(groups, emb_dim, dtype=dtype)
        self.emb_fc = Linear(emb_dim, out_channels, rng=rng, dtype=dtype)
        self.norm2 = GroupNormSwish(groups, out_channels, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, rng=rng, dtype=dtype)
        self.skip = Conv2d(in_channels, out_channels, 1, rng=rng, dtype=dtype)

    def forward(self, x, emb):
        n, a = self.norm1(x)
        h = self.conv1(a, shift=self.emb_fc(self.emb_norm(emb)))
        return self.conv2(self.norm2(h), add_to=self.skip(n))

    def backward(self, dout):
        dn = self.skip.backward(dout)
        da, de = self.conv1.backward(self.norm2.backward(self.conv2.backward(dout)))
        demb = self.emb_norm.backward(self.emb_fc.backward(de))
        return self.norm1.backward(da, dn), demb


class AttentionBlock(SelfAttention):
    """Attention over the H*W positions: ``n + O(attention(Q n, K n, V n))`` with n = GN(x).

    x (B, H, W, C) -> (B, H, W, C). The residual is on the *normalised* input.
    The projections ``q, k, v, o`` come from :class:`SelfAttention`.
    """

    def __init__(self, channels, groups, rng, dtype):
        self.norm = GroupNorm(groups, channels, dtype=dtype)
        super().__init__(channels, num_heads=1, rng=rng, dtype=dtype)

    def forward(self, x):
        B, H, W, C = x.shape
        n = self.norm(x)
        a = super().forward(n.reshape(B, H * W, C)).reshape(B, H, W, C)
        a += n  # in place: the output projection's result is this block's own
        return a

    def backward(self, dout):
        B, H, W, C = dout.shape
        dn = super().backward(dout.reshape(B, H * W, C)).reshape(B, H, W, C)
        dn += dout
        return self.norm.backward(dn)


class UNet(Module):
    """The example's network (see the backbone table in the spec).

    x (B, 32, 32, C), t (B,) integer steps in 1..T -> predicted noise (B, 32, 32, C).
    """

    def __init__(self, config=UNetConfig(), rng=None, dtype=np.float32):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.config = config
        c1, c2, c3 = config.widths
        E, G = config.emb_dim, config.groups

        def res(cin, cout):
            return ResBlock(cin, cout, E, G, rng, dtype)

        def attn(c):
            return AttentionBlock(c, G, rng, dtype)

        # float64 encoding, cast to the weights' dtype in forward (which astype() may change)
        self.sinusoid = SinusoidalEmbedding(config.sinusoid_dim, dtype=np.float64)
        self.fc1 = Linear(config.sinusoid_dim, E, rng=rng, dtype=dtype)
        self.time_act = Swish(inplace=True)
        self.fc2 = Linear(E, E, rng=rng, dtype=dtype)
        if config.num_classes:
            # Row num_classes is the "no label" embedding, which classifier-free guidance
            # trains by dropping labels and samples with for the unconditional estimate.
            self.label_emb = LabelEmbedding(config.num_classes + 1, E, rng=rng, dtype=dtype)

        self.conv_in = Conv2d(config.channels, c1, 3, rng=rng, dtype=dtype)
        self.conv_in.needs_input_grad = False
        self.r1, self.r2 = res(c1, c1), res(c1, c1)
        self.down1 = Conv2d(c1, c2, 3, stride=2, rng=rng, dtype=dtype)
        self.r3, self.a3 = res(c2, c2), attn(c2)
        self.r4, self.a4 = res(c2, c2), attn(c2)
        self.down2 = Conv2d(c2, c3, 3, stride=2, rng=rng, dtype=dtype)
        self.r5, self.r6 = res(c3, c3), res(c3, c3)
        self.r7, self.a7 = res(c3, c3), attn(c3)
        self.r8, self.a8 = res(c3, c3), attn(c3)
        self.r9, self.cat9 = res(2 * c3, c3), Concat()
        self.r10, self.cat10 = res(2 * c3, c3), Concat()
        self.up1 = ConvTranspose2d(c3, c2, rng=rng, dtype=dtype)
        self.r11, self.cat11, self.a11 = res(2 * c2, c2), Concat(), attn(c2)
        self.r12, self.cat12, self.a12 = res(2 * c2, c2), Concat(), attn(c2)
        self.up2 = ConvTranspose2d(c2, c1, rng=rng, dtype=dtype)
        self.r13, self.cat13 = res(2 * c1, c1), Concat()
        self.r14, self.cat14 = res(2 * c1, c1), Concat()
        self.cat_out = Concat()
        self.norm_out = GroupNormSwish(G, 2 * c1, dtype=dtype)
        self.conv_out = Conv2d(2 * c1, config.channels, 3, rng=rng, dtype=dtype)

    @property
    def null_label(self):
        """The label index that means "no label" (conditional networks only)."""
        return self.config.num_classes

    def forward(self, x, t, labels=None, intermediates=None):
        """Predicted noise. ``t`` (B,) are the steps and ``labels`` (B,) pick the class of
        a conditional network (None or :attr:`null_label`: unconditional), both ints on the
        host or already on the device of ``x``. If ``intermediates`` is a dict, every
        block's output is put in it under the golden file's names."""
        xp = get_array_module(x)
        keep = intermediates if intermediates is not None else {}
        s = self.sinusoid(to_device(t, xp)).astype(self.fc1.weight.data.dtype, copy=False)
        keep["act_sinusoid"] = s
        keep["act_time_embedding"] = emb = self.fc2(self.time_act(self.fc1(s)))
        if self.config.num_classes:
            labels = xp.full(len(x), self.null_label) if labels is None else to_device(labels, xp)
            emb = emb + self.label_emb(labels)

        keep["act_conv_in"] = h0 = self.conv_in(x)
        keep["act_r1"] = h1 = self.r1(h0, emb)
        keep["act_r2"] = h2 = self.r2(h1, emb)
        keep["act_r3"] = h3 = self.r3(self.down1(h2), emb)
        keep["act_a3"] = h = self.a3(h3)
        keep["act_r4"] = h4 = self.r4(h, emb)
        keep["act_a4"] = h = self.a4(h4)
        keep["act_r5"] = h5 = self.r5(self.down2(h), emb)
        keep["act_r6"] = h6 = self.r6(h5, emb)
        keep["act_r7"] = h = self.r7(h6, emb)
        keep["act_a7"] = h = self.a7(h)
        keep["act_r8"] = h = self.r8(h, emb)
        keep["act_a8"] = h = self.a8(h)

        keep["act_r9"] = h = self.r9(self.cat9(h, h6), emb)
        keep["act_r10"] = h = self.r10(self.cat10(h, h5), emb)
        keep["act_r11"] = h = self.r11(self.cat11(self.up1(h), h4), emb)
        keep["act_a11"] = h = self.a11(h)
        keep["act_r12"] = h = self.r12(self.cat12(h, h3), emb)
        keep["act_a12"] = h = self.a12(h)
        keep["act_r13"] = h = self.r13(self.cat13(self.up2(h), h2), emb)
        keep["act_r14"] = h = self.r14(self.cat14(h, h1), emb)
        return self.conv_out(self.norm_out(self.cat_out(h, h0)))

    def backward(self, dout):
        """Accumulate every parameter's gradient; the image input needs none."""
        demb = 0

        def res_backward(block, dh):
            nonlocal demb
            dx, de = block.backward(dh)
            demb = demb + de
            return dx

        dh, dh0 = self.cat_out.backward(self.norm_out.backward(self.conv_out.backward(dout)))
        dh, dh1 = self.cat14.backward(res_backward(self.r14, dh))
        dh, dh2 = self.cat13.backward(res_backward(self.r13, dh))
        dh = self.up2.backward(dh)
        dh = res_backward(self.r12, self.a12.backward(dh))
        dh, dh3 = self.cat12.backward(dh)
        dh = res_backward(self.r11, self.a11.backward(dh))
        dh, dh4 = self.cat11.backward(dh)
        dh = self.up1.backward(dh)
        dh, dh5 = self.cat10.backward(res_backward(self.r10, dh))
        dh, dh6 = self.cat9.backward(res_backward(self.r9, dh))

        # The skips' gradients (dh0 .. dh6, fresh arrays from the concats) gather in place.
        dh = res_backward(self.r8, self.a8.backward(dh))
        dh = res_backward(self.r7, self.a7.backward(dh))
        dh6 += dh
        dh5 += res_backward(self.r6, dh6)
        dh = self.down2.backward(res_backward(self.r5, dh5))
        dh4 += self.a4.backward(dh)
        dh = res_backward(self.r4, dh4)
        dh3 += self.a3.backward(dh)
        dh = self.down1.backward(res_backward(self.r3, dh3))
        dh2 += dh
        dh1 += res_backward(self.r2, dh2)
        dh0 += res_backward(self.r1, dh1)
        self.conv_in.backward(dh0)

        if self.config.num_classes:
            self.label_emb.backward(demb)
        self.fc1.backward(self.time_act.backward(self.fc2.backward(demb)))
        return None
