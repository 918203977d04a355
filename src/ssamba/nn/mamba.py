"""Mamba-1 mixer and its two bidirectional forms.

* :class:`Mamba` - the selective-SSM mixer of ``mamba_ssm.modules.mamba_simple.Mamba`` (Gu & Dao 2023).
* :class:`InnerBiMamba` - Vim's ``bimamba_type="v2"`` mixer (hustvl/Vim ``mamba-1p1p1/.../mamba_simple.py``),
  used by every SSAMBA layer: one shared ``in_proj``/``out_proj``, and a second conv1d / x_proj /
  dt_proj / A / D set that scans the reversed sequence.
* :class:`ExtBiMamba` - two independent mixers, the second one run on the reversed sequence, combined by
  addition or by concatenation + Linear (the "external" bidirectional Mamba of Mamba-HuBERT).

Parameter names equal the official ones (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj`` and ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``), so official
state dicts load without renaming.

Shape glossary
    B  batch           L  sequence length            M  d_model
    E  d_inner = expand * d_model                    N  d_state
    R  dt_rank         W  d_conv (conv kernel width)

Faithful or fast, chosen at construction (``fast_path``, as ``mamba_ssm``'s ``use_fast_path``):
    fast_path=False  the official operation order (token-major projections, ``in_proj(h)`` then transposed views)
                     and the reference scan (``backend="reference"``): the official float32 numbers bit for bit,
                     which ``ssamba conformance`` replays;
    fast_path=True   (default) on CPU (float32/float64, the scan and conv backends ``cpu``): the whole mixer,
                     in_proj to out_proj, is one fused operation with a hand-written backward,
                     ``ssamba.ops.mamba_inner_cpu`` (token-major throughout, every projection one GEMM over all
                     B*L tokens, both directions' conv in one parallel numba pass and their scans with the gate in
                     another; the backward in four; without autograd ``ssamba.ops.mamba_infer_cpu`` runs the same
                     forward kernels without keeping anything). Elsewhere (CUDA,
                     bf16 weights, autocast training, ``use_backend("triton")``...) the unfused ops: the projections
                     multiply from the left so that x, z, delta, B and C come out channel-major, the layout the
                     scan reads, and the causal conv + SiLU and the scan run on the chosen backends
                     (``ssamba.ops.selective_scan``; ``SSAMBA_SCAN_BACKEND`` / ``use_backend`` override). Both agree
                     with the faithful path to float32 rounding (tests/test_mamba.py, tests/test_mamba_inner_cpu.py
                     state the tolerances).

Padding: ``lengths`` (B,) gives each item's valid prefix. The forward direction is causal, so right
padding cannot reach valid positions; the backward direction reverses only the valid part of each item
(:func:`reverse_padded`), so it too sees the valid elements first and the padding last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.nn.layers import reverse_padded
from ssamba.ops import mamba_inner_cpu
from ssamba.ops.selective_scan import causal_conv1d, resolve_backend, resolve_conv_backend, selective_scan

__all__ = ["ExtBiMamba", "InnerBiMamba", "Mamba"]


def _at_least_f32(t: Tensor) -> Tensor:
    # mamba_simple keeps A and D in float32 (``self.A_log.float()``) even for half-precision models;
    # float64 stays float64 so that gradient checks run in double precision.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _left_mm(w: Tensor, t: Tensor) -> Tensor:
    """w (P, Q) @ t (B, Q, L) -> (B, P, L), contiguous. ``bmm`` on the expanded weight: ``matmul`` would fold
    the batch into a transposed (B*L, Q) operand, which costs a copy and returns a strided result."""
    return torch.bmm(w.unsqueeze(0).expand(t.shape[0], -1, -1), t)


# in_proj and out_proj on the fast path: batched products in the forward (channel-major results without a copy, as
# _left_mm), and a backward whose weight gradient is ONE product over all B*L tokens. bmm's own backward makes it
# B products of depth L and a sum, slow for short sequences: forward + backward of one half of SSAMBA-tiny's
# in_proj took 8.0 ms that way against 4.8 ms at B=16, L=49 (the demo's pretraining shape), and 6.4 against 6.1 ms
# at B=2, L=513 (one core of the 2-core AMD EPYC). The token-major side (in_proj's input, out_proj's output) folds
# the batch into the product for free; the channel-major side costs one transposing copy.


class _TokensToChannels(torch.autograd.Function):
    """w (P, M), h (B, L, M) -> w @ h[b]^T for each b: (B, P, L), contiguous."""

    @staticmethod
    def forward(ctx, w: Tensor, h: Tensor) -> Tensor:
        ctx.save_for_backward(w, h)
        return _left_mm(w, h.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, h = ctx.saved_tensors
        nb, seqlen, m = h.shape
        g = grad.transpose(0, 1).reshape(w.shape[0], nb * seqlen)  # (P, B*L), the one copy
        dw = g @ h.reshape(nb * seqlen, m).to(g.dtype) if ctx.needs_input_grad[0] else None
        dh = (g.t() @ w.to(g.dtype)).view(nb, seqlen, m) if ctx.needs_input_grad[1] else None
        return dw, dh


class _ChannelsToTokens(torch.autograd.Function):
    """w (M, E), y (B, E, L) -> y[b]^T @ w^T for each b: (B, L, M), contiguous."""

    @staticmethod
    def forward(ctx, w: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(w, y)
        return torch.bmm(y.transpose(1, 2), w.t().unsqueeze(0).expand(y.shape[0], -1, -1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, y = ctx.saved_tensors
        nb, e, seqlen = y.shape
        dw = dy = None
        if ctx.needs_input_grad[0]:
            y_tokens = y.transpose(1, 2).reshape(nb * seqlen, e).to(grad.dtype)  # (B*L, E), the one copy
            dw = grad.reshape(nb * seqlen, -1).t() @ y_tokens
        if ctx.needs_input_grad[1]:
            dy = _left_mm(w.t().to(grad.dtype), grad.transpose(1, 2))
        return dw, dy


class Mamba(nn.Module):
    """Mamba-1 selective-SSM mixer: (B, L, M) -> (B, L, M).

    in_proj -> [x | z]; x -> causal depthwise conv1d + SiLU -> x_proj -> (dt, B, C);
    delta = softplus(dt_proj(dt)); selective scan with D skip; gate by SiLU(z); out_proj.
    Initialisation as ``mamba_simple.Mamba``: S4D-real ``A = -[1..N]`` per channel (stored as A_log),
    ``D = 1``, dt_proj weight ~ U(+-dt_rank^-0.5 * dt_scale), dt_proj bias = softplus^-1(dt) with dt
    log-uniform in [dt_min, dt_max] (floored at dt_init_floor). ``fast_path``: see the module docstring.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        fast_path: bool = True,
    ):
        super().__init__()
        self.fast_path = fast_path
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        self._conv_bias = conv_bias
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self._add_ssm_params("")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _add_ssm_params(self, suffix: str) -> None:
        """Create one direction's conv1d / x_proj / dt_proj / A_log / D, named with ``suffix``."""
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        dt_min, dt_max, dt_floor, dt_scale = self._dt_init
        conv = nn.Conv1d(e, e, kernel_size=self.d_conv, groups=e, padding=self.d_conv - 1, bias=self._conv_bias)
        x_proj = nn.Linear(e, r + 2 * n, bias=False)
        dt_proj = nn.Linear(r, e, bias=True)
        # Keep the variance of delta's pre-activation independent of dt_rank.
        std = r**-0.5 * dt_scale
        nn.init.uniform_(dt_proj.weight, -std, std)
        # dt bias such that softplus(bias) is log-uniform in [dt_min, dt_max]: softplus^-1(y) = y + log(-expm1(-y)).
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A[d, k] = -(k + 1); stored as log(-A) so that A stays negative while training.
        a_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))  # (E, N)
        d_skip = nn.Parameter(torch.ones(e))  # (E,)
        a_log._no_weight_decay = True
        d_skip._no_weight_decay = True
        setattr(self, "conv1d" + suffix, conv)
        setattr(self, "x_proj" + suffix, x_proj)
        setattr(self, "dt_proj" + suffix, dt_proj)
        # official spelling: A_log / A_b_log and D / D_b
        setattr(self, "A" + suffix + "_log", a_log)
        setattr(self, "D" + suffix, d_skip)

    def _ssm_xz(self, x: Tensor, z: Tensor, suffix: str) -> Tensor:
        """One direction of ``MambaInnerFnNoOutProj`` on x and z (each (B, E, L), any layout) -> y * silu(z)
        (B, E, L)."""
        return self._scan(self._conv(x, suffix), z, suffix)

    def _conv(self, x: Tensor, suffix: str) -> Tensor:
        """x (B, E, L) -> SiLU(causal depthwise conv1d(x)) (B, E, L), contiguous: the scan's input u. Fast path:
        the automatic conv backend (on CPU the fused numba kernel, conv and SiLU in one pass); faithful path:
        ``F.conv1d`` + slice + SiLU as the official code."""
        conv: nn.Conv1d = getattr(self, "conv1d" + suffix)
        return causal_conv1d(x, conv.weight, conv.bias, activation="silu",
                             backend=None if self.fast_path else "reference")

    def _scan(self, u: Tensor, z: Tensor, suffix: str) -> Tensor:
        """u: the conv's output (B, E, L), gate z (B, E, L) -> x_proj, dt_proj, selective scan -> (B, E, L)."""
        x_proj: nn.Linear = getattr(self, "x_proj" + suffix)
        dt_proj: nn.Linear = getattr(self, "dt_proj" + suffix)
        a_log: Tensor = getattr(self, "A" + suffix + "_log")
        d_skip: Tensor = getattr(self, "D" + suffix)

        if self.fast_path:
            # Fast path: the projections multiply from the left, so x_dbl, B, C and delta come out channel-major
            # (B, *, L), the layout the scan reads, instead of token-major with a transposing copy per tensor.
            x_dbl = _left_mm(x_proj.weight, u)  # (B, R + 2N, L)
            dt, b_in, c_in = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
            delta = _left_mm(dt_proj.weight, dt)  # (B, E, L); dt_proj's bias is the scan's delta_bias
        else:
            # Faithful path: the official order of operations and the reference scan, bit for bit.
            x_dbl = F.linear(u.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
            dt, b_in, c_in = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
            # dt_proj without its bias: the scan adds it before softplus (delta_bias), as the fused kernel does.
            delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, E, L)
            b_in, c_in = b_in.transpose(1, 2), c_in.transpose(1, 2)  # (B, N, L)
        return selective_scan(
            u,
            delta,
            -torch.exp(_at_least_f32(a_log)),  # A (E, N)
            b_in,  # (B, N, L)
            c_in,  # (B, N, L)
            D=_at_least_f32(d_skip),
            z=z,
            delta_bias=_at_least_f32(dt_proj.bias),
            delta_softplus=True,
            backend=None if self.fast_path else "reference",
        )

    def forward(self, hidden_states: Tensor, lengths: Tensor | None = None) -> Tensor:
        """hidden_states (B, L, M) -> (B, L, M). ``lengths`` is accepted for interface parity with the
        bidirectional mixers; a causal mixer needs no mask for right padding."""
        if self._fused(hidden_states):
            return self._fused_inner(hidden_states, lengths, ("",), 1.0)
        x, z = self._in_proj(hidden_states)  # (B, E, L) each
        return self._out_proj(self._ssm_xz(x, z, ""))

    def _fused(self, hidden_states: Tensor) -> bool:
        """Whether this forward takes :mod:`ssamba.ops.mamba_inner_cpu`'s fused chain: the fast path with the scan
        and the conv both on their ``cpu`` backends (so ``use_backend`` / ``SSAMBA_SCAN_BACKEND`` choose between the
        fused chain and the reference ops as they do for the others), float32 or float64, and no autocast while
        autograd records (autocast's mixed-precision training takes the unfused ops)."""
        if not self.fast_path or not mamba_inner_cpu.is_available(hidden_states):
            return False
        if torch.is_autocast_enabled(hidden_states.device.type) and torch.is_grad_enabled():
            return False
        return resolve_backend(hidden_states) == "cpu" and resolve_conv_backend(hidden_states) == "cpu"

    def _fused_inner(self, hidden_states: Tensor, lengths: Tensor | None, suffixes: tuple[str, ...],
                     scale: float) -> Tensor:  # fmt: skip
        return mamba_inner_cpu.mamba_inner_cpu(
            hidden_states, (self.in_proj.weight, self.in_proj.bias), tuple(self._direction(s) for s in suffixes),
            (self.out_proj.weight, self.out_proj.bias), lengths, scale,
        )  # fmt: skip

    def _direction(self, suffix: str) -> mamba_inner_cpu.DirectionWeights:
        conv: nn.Conv1d = getattr(self, "conv1d" + suffix)
        dt_proj: nn.Linear = getattr(self, "dt_proj" + suffix)
        return mamba_inner_cpu.DirectionWeights(
            conv.weight, conv.bias, getattr(self, "x_proj" + suffix).weight, dt_proj.weight, dt_proj.bias,
            -torch.exp(_at_least_f32(getattr(self, "A" + suffix + "_log"))), _at_least_f32(getattr(self, "D" + suffix)),
        )  # fmt: skip

    def _in_proj(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """hidden_states (B, L, M) -> x, z (B, E, L) each. Fast path: two left-multiplications give x and z each
        contiguous channel-major, so the conv and the scan read them without a copy (``mamba_simple`` likewise
        computes ``in_proj.weight @ hidden^T``). Faithful path: the official ``in_proj(h)`` in token-major layout,
        transposed as views."""
        if self.fast_path:
            w, bias = self.in_proj.weight, self.in_proj.bias
            e = self.d_inner
            x = _TokensToChannels.apply(w[:e], hidden_states)  # (B, E, L), contiguous
            z = _TokensToChannels.apply(w[e:], hidden_states)
            if bias is not None:
                x, z = x + bias[:e, None], z + bias[e:, None]
            return x, z
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L), a view of the (B, L, 2E) projection
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each, strided views
        return x, z

    def _out_proj(self, y: Tensor) -> Tensor:
        """y (B, E, L) -> out_proj (B, L, M). Fast path: a batched product with y's transpose as a BLAS operand
        (no contiguous copy of the (B, L, E) view); faithful path: ``out_proj(y.transpose(1, 2))``."""
        if self.fast_path:
            out = _ChannelsToTokens.apply(self.out_proj.weight, y)  # (B, L, M)
            return out if self.out_proj.bias is None else out + self.out_proj.bias
        return self.out_proj(y.transpose(1, 2))


class InnerBiMamba(Mamba):
    """Vim bimamba v2 mixer: (B, L, M) -> (B, L, M).

    ``xz = in_proj(h)``; forward scan on xz with (conv1d, x_proj, dt_proj, A_log, D); backward scan on the
    reversed xz with (conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b); output
    ``out_proj((y_f + reverse(y_b)) / 2)`` when ``divide_out`` (Vim's ``if_devide_out``), else without /2.
    The backward parameters get the same standard Mamba initialisation as the forward ones (Vim's model
    init happens to zero ``dt_proj_b.bias``; that is an initialisation detail, not part of the function).
    """

    def __init__(self, d_model: int, divide_out: bool = True, **mamba_kwargs):
        super().__init__(d_model, **mamba_kwargs)
        self.divide_out = divide_out
        self._add_ssm_params("_b")

    def forward(self, hidden_states: Tensor, lengths: Tensor | None = None) -> Tensor:
        """hidden_states (B, L, M), lengths (B,) or None -> (B, L, M)."""
        if self._fused(hidden_states):
            return self._fused_inner(hidden_states, lengths, ("", "_b"), 0.5 if self.divide_out else 1.0)
        x, z = self._in_proj(hidden_states)  # (B, E, L) each
        y_f = self._ssm_xz(x, z, "")  # (B, E, L)
        # The backward direction. x and z are reversed apart: on the fast path they are contiguous and so are their
        # reversals; on the faithful path two half-size reversals of the strided views cost less than one of the
        # whole xz. Each input is dropped as soon as what replaces it exists (x by its reversal, that by its
        # convolution, z by its reversal), so at most five (B, E, L) tensors are alive at once, y_f included, as in
        # the forward direction, instead of eight (this only matters without autograd, which keeps what it needs).
        x = reverse_padded(x, lengths, dim=-1)
        u_b = self._conv(x, "_b")
        del x
        z = reverse_padded(z, lengths, dim=-1)
        y_b = self._scan(u_b, z, "_b")
        del u_b, z
        # Back in forward order; the reversal is a fresh tensor, so the sum and the halving are done in it in place
        # (a + b == b + a exactly in IEEE arithmetic; autograd needs neither operand of the add nor its result).
        y = reverse_padded(y_b, lengths, dim=-1)  # (B, E, L)
        del y_b
        y.add_(y_f)
        if self.divide_out:
            y.div_(2)
        return self._out_proj(y)

class ExtBiMamba(nn.Module):
    """External bidirectional Mamba: two independent :class:`Mamba` mixers, the second run on the
    (valid-part) reversed sequence; outputs combined by ``"add"`` or ``"concat"`` followed by
    ``output_proj`` (Linear 2M -> M). (B, L, M) -> (B, L, M)."""

    def __init__(self, d_model: int, combine: str = "add", **mamba_kwargs):
        super().__init__()
        if combine not in ("add", "concat"):
            raise ValueError(f"combine must be 'add' or 'concat', got {combine!r}")
        self.combine = combine
        self.forward_mamba = Mamba(d_model, **mamba_kwargs)
        self.backward_mamba = Mamba(d_model, **mamba_kwargs)
        self.output_proj = nn.Linear(2 * d_model, d_model) if combine == "concat" else None

    def forward(self, hidden_states: Tensor, lengths: Tensor | None = None) -> Tensor:
        """hidden_states (B, L, M), lengths (B,) or None -> (B, L, M)."""
        y_f = self.forward_mamba(hidden_states)  # (B, L, M)
        y_b = reverse_padded(self.backward_mamba(reverse_padded(hidden_states, lengths)), lengths)  # (B, L, M)
        if self.output_proj is None:
            return y_f + y_b
        return self.output_proj(torch.cat([y_f, y_b], dim=-1))
