"""Check hand-written backward passes against finite differences, in float64.

A module maps inputs and parameters to an output ``out``; the checker reduces
it to the scalar ``f = sum(out * r)`` with a random projection ``r`` and
compares two numbers along a random unit direction ``d`` in the space of the
tensors being checked:

    numerical  f'(0) of f(theta + s d) by the 5-point central difference
               (f(-2h) - 8 f(-h) + 8 f(h) - f(2h)) / (12 h)
    analytic   <grad, d>, where grad comes from module.backward(r)

Checking a direction instead of every element costs four forward passes,
whatever the size of the tensors. One direction moves every input and
parameter together; then each input and each parameter gets its own direction,
so a single broken gradient shows up under its own name.

Why the 5-point stencil with h = 1e-3 rather than the 2-point one with
h = 1e-6: the 2-point difference loses ~1e-16 / h of f to rounding, which with
h = 1e-6 alone reaches 1e-6 of the derivative in some random directions; a
larger h trades that for a truncation error of order h^2, which the 5-point
stencil pushes to h^4. Typical errors are then ~1e-12.

The relative error is ``|num - ana| / max(|num|, |ana|, floor)``. The floor is
the rounding noise of the numerical derivative, ``ROUNDING * sum|out * r| / h``,
divided by ``BOUND``. It matters only for a tensor whose true directional
derivative is (nearly) zero, such as the key bias under softmax: its numerical
derivative is pure rounding noise, and without a floor it would be compared
with nothing.

:func:`standard_checks` builds one small case per layer and a U-Net-shaped
composition of them; :func:`run_checks` runs them all (``tinyddpm gradcheck``)
and :func:`format_table` prints the result.
"""

import inspect
from typing import NamedTuple

import numpy as np

from tinyddpm.backend import get_array_module, to_device
from tinyddpm.nn import (
    BroadcastAdd,
    Concat,
    Conv2d,
    ConvTranspose2d,
    GlobalAvgPool,
    GroupNorm,
    GroupNormSwish,
    LabelEmbedding,
    Linear,
    Module,
    MSELoss,
    ScaledDotProductAttention,
    SelfAttention,
    SoftmaxCrossEntropy,
    Swish,
    no_grad,
)

BOUND = 1e-6  # a check passes when its relative error is below this
STEP = 1e-3  # the finite-difference step h along a unit direction
ROUNDING = 1e-15  # relative rounding error of one float64 evaluation of f (about 5 ulp)


class GradRow(NamedTuple):
    """One directional check: which tensor(s), their shape, the relative error."""
    name: str
    shape: tuple
    error: float


class CheckRow(NamedTuple):
    """A :class:`GradRow` of a named case, with its verdict."""
    case: str
    name: str
    shape: tuple
    error: float
    passed: bool


class Case(NamedTuple):
    """A module, its inputs, and which inputs are differentiable (None: every float input)."""
    name: str
    module: Module
    inputs: tuple
    wrt: tuple = None


class _Checked(NamedTuple):
    """A tensor under check: its name, value at the base point, setter, analytic gradient."""
    name: str
    value: object
    set_value: object
    grad: object


def check_module(module, inputs, rng, wrt=None, step=STEP, group=None):
    """Directional gradient checks of ``module`` at ``inputs``; returns a list of :class:`GradRow`.

    The module's parameters are cast to float64 in place. ``wrt`` lists the
    indices of the inputs whose gradients backward returns (default: all
    floating-point inputs). The first row ("all") checks everything at once,
    then one row per input (named after forward's argument) and per parameter,
    or, if ``group`` maps a tensor name to a group name, one row per group
    (a whole network checks block by block in a few dozen directions).
    """
    module.astype(np.float64)
    inputs = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in inputs]
    if wrt is None:
        wrt = tuple(i for i, a in enumerate(inputs) if a.dtype.kind == "f")
    xp = get_array_module(*inputs)

    out = module(*inputs)
    projection = xp.asarray(rng.standard_normal(np.shape(out)))
    magnitude = float(abs(out * projection).sum())  # the size of the terms f sums
    module.zero_grad()
    input_grads = module.backward(projection)
    if not isinstance(input_grads, tuple):
        input_grads = (input_grads,)

    arg_names = list(inspect.signature(module.forward).parameters)
    checked = []
    for i in wrt:
        if input_grads[i] is None:
            raise ValueError(f"{type(module).__name__}.backward returned no gradient for input {i}")
        checked.append(_Checked(arg_names[i], inputs[i], _input_setter(inputs, i), input_grads[i]))
    for name, param in module.named_parameters():
        checked.append(_Checked(name, param.data, _param_setter(param), param.grad.copy()))

    def f(s, directions):
        """The objective at ``theta + s * direction``."""
        for t, d in zip(checked, directions):
            t.set_value(t.value + s * d)
        with no_grad():
            return float((module(*inputs) * projection).sum())

    def relative_error(directions):
        fs = {k: f(k * step, directions) for k in (-2, -1, 1, 2)}
        for t in checked:
            t.set_value(t.value)
        numerical = (fs[-2] - 8 * fs[-1] + 8 * fs[1] - fs[2]) / (12 * step)
        analytic = sum(float((t.grad * d).sum()) for t, d in zip(checked, directions))
        floor = ROUNDING * magnitude / step / BOUND
        return abs(numerical - analytic) / max(abs(numerical), abs(analytic), floor, np.finfo(float).tiny)

    def unit(directions):
        norm = float(np.sqrt(sum(float((d * d).sum()) for d in directions)))
        return [d / norm for d in directions]

    rows = [GradRow("all", (), relative_error(
        unit([xp.asarray(rng.standard_normal(t.value.shape)) for t in checked])))]
    group = group or (lambda name: name)
    for g in dict.fromkeys(group(t.name) for t in checked):
        members = [t for t in checked if group(t.name) == g]
        directions = [xp.asarray(rng.standard_normal(t.value.shape)) if t in members else xp.zeros_like(t.value)
                      for t in checked]
        shape = tuple(members[0].value.shape) if len(members) == 1 else (sum(int(t.value.size) for t in members),)
        rows.append(GradRow(g, shape, relative_error(unit(directions))))
    return rows


def _input_setter(inputs, i):
    def set_value(value):
        inputs[i] = value
    return set_value


def _param_setter(param):
    def set_value(value):
        param.data = value
    return set_value


class TinyUNet(Module):
    """A U-Net in miniature, to check that the layers compose (fan-out, skip, embedding).

    x (N, H, W, C) and emb (N, E) -> (N, H, W, C):
    conv -> GN + swish -> + Linear(emb) -> stride-2 conv -> self-attention over
    the positions -> transposed conv -> concat with the GN's output -> conv.
    """

    def __init__(self, channels, width, emb_dim, rng):
        self.conv_in = Conv2d(channels, width, 3, rng=rng)
        self.norm = GroupNormSwish(2, width, keep_normalised=True)
        self.emb_proj = Linear(emb_dim, width, rng=rng)
        self.add_emb = BroadcastAdd()
        self.down = Conv2d(width, 2 * width, 3, stride=2, rng=rng)
        self.attn = SelfAttention(2 * width, rng=rng)
        self.up = ConvTranspose2d(2 * width, width, rng=rng)
        self.cat = Concat()
        self.conv_out = Conv2d(2 * width, channels, 3, rng=rng)

    def forward(self, x, emb):
        skip, h = self.norm(self.conv_in(x))
        h = self.add_emb(h, self.emb_proj(emb))
        h = self.down(h)
        N, H, W, C = h.shape
        h = self.attn(h.reshape(N, H * W, C)).reshape(N, H, W, C)
        h = self.cat(self.up(h), skip)
        return self.conv_out(h)

    def backward(self, dout):
        dh, dskip = self.cat.backward(self.conv_out.backward(dout))
        dh = self.up.backward(dh)
        N, H, W, C = dh.shape
        dh = self.attn.backward(dh.reshape(N, H * W, C)).reshape(N, H, W, C)
        dh, demb = self.add_emb.backward(self.down.backward(dh))
        demb = self.emb_proj.backward(demb)
        return self.conv_in.backward(self.norm.backward(dh, dskip)), demb


def standard_checks(xp, rng):
    """One small :class:`Case` per layer, plus :class:`TinyUNet`, with arrays on ``xp``."""
    def randn(*shape):
        return to_device(rng.standard_normal(shape), xp)

    cases = [
        Case("conv 3x3 stride 1", Conv2d(3, 4, 3, rng=rng), (randn(2, 6, 5, 3),)),
        Case("conv 3x3 stride 2", Conv2d(3, 4, 3, stride=2, rng=rng), (randn(2, 6, 8, 3),)),
        Case("conv 1x1", Conv2d(3, 4, 1, rng=rng), (randn(2, 4, 5, 3),)),
        Case("conv with a per-sample shift", Conv2d(3, 4, 3, rng=rng), (randn(2, 6, 5, 3), randn(2, 4))),
        Case("conv 3x3 few outputs", Conv2d(19, 2, 3, rng=rng), (randn(2, 5, 4, 19),)),
        Case("conv 3x3 stride 2 few outputs", Conv2d(19, 2, 3, stride=2, rng=rng), (randn(2, 5, 6, 19),)),
        Case("conv transpose 3x3 stride 2", ConvTranspose2d(3, 4, rng=rng), (randn(2, 3, 4, 3),)),
        Case("group norm image", GroupNorm(2, 6), (randn(2, 3, 4, 6),)),
        Case("group norm vector", GroupNorm(2, 16), (randn(3, 16),)),
        Case("swish", Swish(), (4 * randn(3, 5),)),
        Case("group norm + swish", GroupNormSwish(2, 6), (randn(2, 3, 4, 6),)),
        Case("linear", Linear(5, 4, rng=rng), (randn(2, 3, 5),)),
        Case("attention 1 head", ScaledDotProductAttention(1), (randn(2, 5, 8), randn(2, 5, 8), randn(2, 5, 8))),
        Case("attention 4 heads", ScaledDotProductAttention(4), (randn(2, 5, 8), randn(2, 5, 8), randn(2, 5, 8))),
        Case("self-attention", SelfAttention(8, rng=rng), (randn(2, 6, 8),)),
        Case("concat", Concat(), (randn(2, 3, 3, 2), randn(2, 3, 3, 4))),
        Case("broadcast add", BroadcastAdd(), (randn(2, 3, 4, 5), randn(2, 5))),
        Case("mse loss", MSELoss(), (randn(3, 4, 4, 1), randn(3, 4, 4, 1)), wrt=(0,)),
        Case("label embedding", LabelEmbedding(4, 5, rng=rng), (to_device(np.array([2, 0, 2, 3]), xp),)),
        Case("global average pool", GlobalAvgPool(), (randn(2, 3, 4, 5),)),
        Case("softmax cross-entropy", SoftmaxCrossEntropy(), (3 * randn(4, 6), to_device(np.array([5, 0, 2, 5]), xp))),
        Case("tiny u-net", TinyUNet(channels=2, width=4, emb_dim=6, rng=rng), (randn(2, 8, 8, 2), randn(2, 6))),
    ]
    for case in cases:
        for _, param in case.module.named_parameters():
            param.data = param.data + 0.1 * rng.standard_normal(param.data.shape)  # leave the init point
        case.module.to(xp)
    return cases


def run_checks(xp, seed=0):
    """Run every :func:`standard_checks` case on ``xp``; a list of :class:`CheckRow`."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in standard_checks(xp, rng):
        for row in check_module(case.module, case.inputs, rng, wrt=case.wrt):
            rows.append(CheckRow(case.name, row.name, row.shape, row.error, row.error < BOUND))
    return rows


def format_table(rows):
    """The rows of :func:`run_checks` as an aligned text table with a summary line."""
    header = ("case", "tensor", "shape", "rel. error", "")
    lines = [header] + [
        (r.case, r.name, "x".join(map(str, r.shape)) or "-", f"{r.error:.1e}", "ok" if r.passed else "FAIL")
        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    failed = sum(not r.passed for r in rows)
    text.append(f"{len(rows) - failed} of {len(rows)} checks passed (bound {BOUND:g})")
    return "\n".join(text)
