"""PyTorch reference implementation of the MATLAB "Generate Images Using Diffusion" DDPM.

This module is the independent check for tinyddpm's hand-written NumPy port: parity tests run
the same weights, inputs and noise through both and compare, and benchmarks use it as the
"what would PyTorch do" baseline. It deliberately lives outside the ``tinyddpm`` package, which
must never import torch.

Everything here follows ``shared/spec/matlab-example.md``; the parameter names, layouts and the
seed rule for test weights follow ``shared/golden/README.md`` and ``example_net_params.json``, so
``ReferenceUNet().state_dict()`` has exactly the golden names, shapes and order.

Layout is NCHW throughout. Steps ``t`` are 1-based (1..T), as in the example.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.golden import default_golden_dir, golden_params, golden_state, seeded_array  # noqa: F401  (re-exported)

GN_EPS = 1e-5  # GroupNorm epsilon (spec: inferred MATLAB default)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Transformer-style encoding of the 1-based step: e[2i] = sin(t / 10000^(2i/dim)),
    e[2i+1] = cos(t / 10000^(2i/dim)), i = 0 .. dim/2 - 1 (sin and cos interleaved, not
    concatenated).

    Computed in float64 and only then cast, so a float32 model sees the correctly rounded
    encoding rather than one built from float32 frequencies (t up to 500 would amplify their
    rounding error in the sin/cos argument).
    """
    if dim % 2:
        raise ValueError(f"sinusoid_dim must be even, got {dim}")
    tt = t.to(torch.float64).reshape(-1, 1)  # (B, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=t.device)  # 2i
    freq_div = torch.pow(torch.tensor(10000.0, dtype=torch.float64, device=t.device), two_i / dim)
    arg = tt / freq_div  # (B, dim/2)
    e = torch.empty(tt.shape[0], dim, dtype=torch.float64, device=t.device)
    e[:, 0::2] = torch.sin(arg)
    e[:, 1::2] = torch.cos(arg)
    return e.to(dtype)


class ResBlock(nn.Module):
    """Residual block ``res(c_in -> c)`` of the spec.

    n   = GN(x)
    h   = conv3x3(swish(n))
    h   = h + Linear(GN(emb))[:, :, None, None]
    h   = conv3x3(swish(GN(h)))
    out = h + conv1x1(n)

    Note the shortcut is a 1x1 conv of the *normalised* input, in every block, even when
    c_in == c (there is no identity shortcut anywhere in the example's network).

    Attribute order = parameter order of the golden JSON (norm1, conv1, emb_norm, emb_fc,
    norm2, conv2, skip), so ``state_dict()`` keys come out in the golden order.
    """

    def __init__(self, c_in: int, c: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=GN_EPS)
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1)
        # GroupNorm over the emb_dim-vector with the same group count, per sample. nn.GroupNorm
        # accepts (B, C) input: each group is then emb_dim/groups scalars of one sample.
        self.emb_norm = nn.GroupNorm(groups, emb_dim, eps=GN_EPS)
        self.emb_fc = nn.Linear(emb_dim, c)
        self.norm2 = nn.GroupNorm(groups, c, eps=GN_EPS)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n = self.norm1(x)
        h = self.conv1(F.silu(n))
        # No swish between the embedding's GN and its Linear: the spec's connector is GN -> FC.
        h = h + self.emb_fc(self.emb_norm(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(n)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, ``attn(c)`` of the spec.

    n   = GN(x)
    s   = n as (B, H*W, c)
    a   = softmax(Q(s) K(s)^T / sqrt(c)) V(s)
    out = n + O(a) back to (B, c, H, W)

    The residual is added to the *normalised* input n, not to x.
    """

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=GN_EPS)
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, c)
        self.v = nn.Linear(c, c)
        self.o = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # Row-major flatten of (H, W); the transpose puts positions on the sequence axis.
        s = n.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, c)
        q, k, v = self.q(s), self.k(s), self.v(s)
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(c)  # (B, HW_query, HW_key)
        a = torch.matmul(torch.softmax(scores, dim=-1), v)  # softmax over the keys
        o = self.o(a).transpose(1, 2).reshape(b, c, h, w)  # exact inverse of the flatten above
        return n + o


class DownConv(nn.Conv2d):
    """3x3 stride-2 conv with MATLAB's "same" padding for stride 2.

    MATLAB's 'same' padding for a 3x3 stride-2 conv on an even size needs one padding row/col
    in total, and MATLAB puts it at the bottom/right: pad 0 top/left, 1 bottom/right. PyTorch's
    symmetric ``padding=1`` would instead add a row on *both* sides and shift the sampling grid
    by one pixel, so we pad explicitly and run the conv with ``padding=0``:
    (32 + 1 - 3) // 2 + 1 = 16.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad's tuple is (left, right, top, bottom) for the last two dims.
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, stride=2)


class UpConv(nn.ConvTranspose2d):
    """3x3 stride-2 transposed conv, cropped to exactly 2H x 2W.

    Without padding a stride-2 3x3 transposed conv maps H -> 2H + 1 (8 -> 17):
    y[o, 2i+a, 2j+b] += x[c, i, j] * W[c, o, a, b]. Keeping the *first* 2H rows/cols (dropping
    the last one at the bottom/right) makes this the adjoint of DownConv's pad-bottom/right
    convolution, which is what MATLAB's 'same' cropping for transposed convs does.
    Weight layout is PyTorch's ConvTranspose2d one: (in, out, kh, kw).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = F.conv_transpose2d(x, self.weight, self.bias, stride=2)  # (B, out, 2H+1, 2W+1)
        return y[:, :, : 2 * h, : 2 * w]


class ReferenceUNet(nn.Module):
    """The example's noise-prediction U-Net (12,980,033 parameters for 1 channel).

    ``widths`` = channels at 32x32 / 16x16 / 8x8. Smaller widths keep the exact topology so
    tests can build a cheap copy (``groups`` must divide every width, the doubled decoder
    widths and ``emb_dim``), e.g. ``ReferenceUNet(widths=(8, 16, 32), groups=4, emb_dim=32,
    sinusoid_dim=16)``.

    Submodules are created in the golden parameter order (fc1, fc2, conv_in, r1, r2, down1, r3,
    a3, r4, a4, down2, r5 .. r8 with a7/a8, r9, r10, up1, r11, a11, r12, a12, up2, r13, r14,
    norm_out, conv_out), so ``state_dict()`` keys equal the golden names in the golden order.

    The model is built in torch's default dtype; ``load_numpy_state`` (or ``.double()``)
    switches it to float64 for parity work.
    """

    def __init__(
        self,
        channels: int = 1,
        widths: Sequence[int] = (64, 128, 256),
        emb_dim: int = 256,
        sinusoid_dim: int = 64,
        groups: int = 32,
    ):
        super().__init__()
        w1, w2, w3 = widths
        for c in (w1, w2, w3, emb_dim):
            if c % groups:
                raise ValueError(f"groups={groups} must divide every width and emb_dim (got {c})")
        self.channels = channels
        self.widths = (w1, w2, w3)
        self.emb_dim = emb_dim
        self.sinusoid_dim = sinusoid_dim
        self.groups = groups
        g, e = groups, emb_dim

        # Time MLP: sinusoid -> Linear -> swish -> Linear.
        self.fc1 = nn.Linear(sinusoid_dim, e)
        self.fc2 = nn.Linear(e, e)

        self.conv_in = nn.Conv2d(channels, w1, 3, padding=1)
        # Encoder, 32x32.
        self.r1 = ResBlock(w1, w1, e, g)
        self.r2 = ResBlock(w1, w1, e, g)
        self.down1 = DownConv(w1, w2)
        # Encoder, 16x16 (each res block followed by attention).
        self.r3 = ResBlock(w2, w2, e, g)
        self.a3 = AttnBlock(w2, g)
        self.r4 = ResBlock(w2, w2, e, g)
        self.a4 = AttnBlock(w2, g)
        self.down2 = DownConv(w2, w3)
        # Encoder, 8x8.
        self.r5 = ResBlock(w3, w3, e, g)
        self.r6 = ResBlock(w3, w3, e, g)
        # Bridge, 8x8.
        self.r7 = ResBlock(w3, w3, e, g)
        self.a7 = AttnBlock(w3, g)
        self.r8 = ResBlock(w3, w3, e, g)
        self.a8 = AttnBlock(w3, g)
        # Decoder, 8x8: input is cat(main path, skip) on channels.
        self.r9 = ResBlock(2 * w3, w3, e, g)
        self.r10 = ResBlock(2 * w3, w3, e, g)
        self.up1 = UpConv(w3, w2)
        # Decoder, 16x16.
        self.r11 = ResBlock(2 * w2, w2, e, g)
        self.a11 = AttnBlock(w2, g)
        self.r12 = ResBlock(2 * w2, w2, e, g)
        self.a12 = AttnBlock(w2, g)
        self.up2 = UpConv(w2, w1)
        # Decoder, 32x32.
        self.r13 = ResBlock(2 * w1, w1, e, g)
        self.r14 = ResBlock(2 * w1, w1, e, g)
        # Output head on cat(r14 output, conv_in output).
        self.norm_out = nn.GroupNorm(g, 2 * w1, eps=GN_EPS)
        self.conv_out = nn.Conv2d(2 * w1, channels, 3, padding=1)

        self.reset_parameters_matlab()

    @torch.no_grad()
    def reset_parameters_matlab(self, generator: torch.Generator | None = None) -> None:
        """Initialise like the spec's (inferred) MATLAB defaults: Glorot-uniform weights,
        zero biases, GroupNorm gamma 1 / beta 0. Only the distribution matches MATLAB, not the
        numbers; parity work loads explicit weights with ``load_numpy_state``.

        Glorot fans: conv fan_in = in*kh*kw, fan_out = out*kh*kw (the same for the transposed
        convs, whose weight is stored (in, out, kh, kw)); linear fan_in = in, fan_out = out.
        """
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                wt = m.weight
                rf = wt[0, 0].numel()  # kh*kw, or 1 for a linear layer
                if isinstance(m, nn.ConvTranspose2d):
                    c_in, c_out = wt.shape[0], wt.shape[1]
                else:
                    c_out, c_in = wt.shape[0], wt.shape[1]
                bound = math.sqrt(6.0 / (c_in * rf + c_out * rf))
                wt.uniform_(-bound, bound, generator=generator)
                m.bias.zero_()

    def time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sinusoid, emb) for 1-based steps t of shape (B,)."""
        sinus = sinusoidal_embedding(t, self.sinusoid_dim, self.fc1.weight.dtype)
        emb = self.fc2(F.silu(self.fc1(sinus)))
        return sinus, emb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, return_intermediates: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Predict the noise in x (B, C, 32, 32) at 1-based steps t (B,).

        With ``return_intermediates=True`` returns a dict keyed like the golden npz:
        ``act_sinusoid``, ``act_time_embedding``, ``act_conv_in``, ``act_r1`` .. ``act_r14``,
        ``act_a3/a4/a7/a8/a11/a12`` and ``out`` (the prediction).
        """
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, value: torch.Tensor) -> torch.Tensor:
            if return_intermediates:
                acts[name] = value
            return value

        sinus, emb = self.time_embedding(t)
        keep("act_sinusoid", sinus)
        keep("act_time_embedding", emb)

        h0 = keep("act_conv_in", self.conv_in(x))
        # Encoder. r1..r6 outputs are the skips; for 3 and 4 the skip is the res-block output
        # *before* its attention block.
        r1 = keep("act_r1", self.r1(h0, emb))
        r2 = keep("act_r2", self.r2(r1, emb))
        h = self.down1(r2)
        r3 = keep("act_r3", self.r3(h, emb))
        h = keep("act_a3", self.a3(r3))
        r4 = keep("act_r4", self.r4(h, emb))
        h = keep("act_a4", self.a4(r4))
        h = self.down2(h)
        r5 = keep("act_r5", self.r5(h, emb))
        r6 = keep("act_r6", self.r6(r5, emb))
        # Bridge.
        h = keep("act_r7", self.r7(r6, emb))
        h = keep("act_a7", self.a7(h))
        h = keep("act_r8", self.r8(h, emb))
        h = keep("act_a8", self.a8(h))
        # Decoder: mirror order, cat([main path, skip]).
        h = keep("act_r9", self.r9(torch.cat([h, r6], dim=1), emb))
        h = keep("act_r10", self.r10(torch.cat([h, r5], dim=1), emb))
        h = self.up1(h)
        h = keep("act_r11", self.r11(torch.cat([h, r4], dim=1), emb))
        h = keep("act_a11", self.a11(h))
        h = keep("act_r12", self.r12(torch.cat([h, r3], dim=1), emb))
        h = keep("act_a12", self.a12(h))
        h = self.up2(h)
        h = keep("act_r13", self.r13(torch.cat([h, r2], dim=1), emb))
        h = keep("act_r14", self.r14(torch.cat([h, r1], dim=1), emb))
        # Head: the last skip is conv_in's output.
        h = torch.cat([h, h0], dim=1)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if return_intermediates:
            acts["out"] = out
            return acts
        return out


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    """Load a name -> ndarray dict into ``model``, strictly, keeping the arrays' dtype.

    Keys must match ``model.state_dict()`` exactly and shapes must agree. All arrays must share
    one floating dtype; the model is converted to it first (float64 for parity tests, float32
    for benchmarks), so no silent down- or up-cast happens on load. Returns the model.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape))
           for k in own if tuple(np.shape(state[k])) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"shape mismatch (name, given, expected): {bad[:10]}")
    dtypes = {np.asarray(v).dtype for v in state.values()}
    if len(dtypes) != 1:
        raise TypeError(f"all arrays must share one dtype, got {sorted(map(str, dtypes))}")
    np_dtype = dtypes.pop()
    if np_dtype not in (np.float32, np.float64):
        raise TypeError(f"expected float32 or float64 arrays, got {np_dtype}")
    model.to(torch.float64 if np_dtype == np.float64 else torch.float32)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(state[k])) for k in own}
    model.load_state_dict(tensors, strict=True)
    return model


def seeded_state(model: nn.Module, base_seed: int = 1000) -> dict[str, np.ndarray]:
    """The golden seed rule applied to any ``ReferenceUNet`` (e.g. a reduced-width copy): the
    k-th array of ``state_dict()`` gets seed ``base_seed + k``. For the full network this
    reproduces ``golden_state()`` exactly (the test checks that)."""
    transposed = {f"{n}.weight" for n, m in model.named_modules()
                  if isinstance(m, nn.ConvTranspose2d)}
    return {
        name: seeded_array(name, tuple(p.shape), base_seed + k, name in transposed)
        for k, (name, p) in enumerate(model.state_dict().items())
    }



# --------------------------------------------------------------------------------------------
# Diffusion
# --------------------------------------------------------------------------------------------


class Schedule(NamedTuple):
    """float64 tensors of length T; step t (1-based) lives at index t - 1."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor


def make_schedule(T: int = 500, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Linear betas (MATLAB ``linspace(1e-4, 0.02, 500)``), alphas = 1 - betas, alpha_bar =
    cumulative product. All float64; unpacks as ``betas, alphas, alpha_bar``."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    alphas = 1.0 - betas
    alpha_bar = torch.cumprod(alphas, dim=0)
    return Schedule(betas, alphas, alpha_bar)


def _sched(schedule: Schedule | None) -> Schedule:
    return make_schedule() if schedule is None else schedule


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             schedule: Schedule | None = None) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, t (B,) 1-based. The
    coefficients are formed in float64 and cast to x0's dtype."""
    s = _sched(schedule)
    idx = torch.as_tensor(t, dtype=torch.long).reshape(-1) - 1
    abar = s.alpha_bar[idx].reshape(-1, *([1] * (x0.ndim - 1)))
    a = torch.sqrt(abar).to(x0.dtype)
    b = torch.sqrt(1.0 - abar).to(x0.dtype)
    return a * x0 + b * noise


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MATLAB ``mse``: sum of squared errors / (2 * batch size)."""
    return ((pred - target) ** 2).sum() / (2 * pred.shape[0])


@torch.no_grad()
def ancestral_step(model: nn.Module, x: torch.Tensor, t: int, z: torch.Tensor | None,
                   schedule: Schedule | None = None) -> torch.Tensor:
    """One DDPM ancestral step from x_t to x_{t-1} (t is a scalar 1-based step, shared by
    the batch):

        x <- (x - beta_t / sqrt(1 - abar_t) * eps(x, t)) / sqrt(1 - beta_t) + sqrt(var_t) * z
        var_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), abar_0 = 1

    No clipping. At t = 1 no noise is added and ``z`` is ignored (may be None). The noise is an
    argument so a test can feed both implementations identical draws.
    """
    s = _sched(schedule)
    t = int(t)
    beta = float(s.betas[t - 1])
    abar = float(s.alpha_bar[t - 1])
    abar_prev = float(s.alpha_bar[t - 2]) if t > 1 else 1.0
    eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    x = (x - (beta / math.sqrt(1.0 - abar)) * eps) / math.sqrt(1.0 - beta)
    if t > 1:
        var = beta * (1.0 - abar_prev) / (1.0 - abar)
        x = x + math.sqrt(var) * z
    return x


@torch.no_grad()
def sample(model: nn.Module, x_T: torch.Tensor, noises: Sequence[torch.Tensor],
           schedule: Schedule | None = None) -> torch.Tensor:
    """Run the sampler from x_T through t = T .. 1 (T = the schedule's length).

    ``noises[k]`` is the z of the k-th step taken, i.e. of step t = T - k, in the order a
    sampler draws them; the final step (t = 1) uses none, so T - 1 entries are needed (a
    length-T sequence is accepted and its last entry ignored).
    """
    s = _sched(schedule)
    T = s.betas.shape[0]
    if len(noises) < T - 1:
        raise ValueError(f"need at least {T - 1} noise tensors, got {len(noises)}")
    x = x_T
    for k, t in enumerate(range(T, 0, -1)):
        x = ancestral_step(model, x, t, noises[k] if t > 1 else None, s)
    return x


def make_optimizer(model: nn.Module) -> torch.optim.Adam:
    """The example's Adam: lr 5e-4, beta1 0.9, beta2 0.9999, eps 1e-8, bias-corrected, no
    weight decay. torch adds eps to sqrt(v_hat), as MATLAB's ``adamupdate`` does."""
    return torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.9999), eps=1e-8)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
               t: torch.Tensor, noise: torch.Tensor, schedule: Schedule | None = None) -> float:
    """One update: x_t = q_sample(x0, t, noise), loss = mse(model(x_t, t), noise), backward,
    Adam step. Returns the loss (before the step) as a Python float."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    xt = q_sample(x0, t, noise, schedule)
    loss = mse_loss(model(xt, t), noise)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
