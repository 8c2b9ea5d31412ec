"""MetaMix: Meta-state Precision Searcher for Mixed-precision Activation Quantization.

Kim, Lee, Yoo, Kim, AAAI 2024, arXiv:2311.06798. A reference implementation in one file.

MetaMix picks one activation bit-width per layer (weights share one bit-width) under a
budget in BOPs. Bit selection (2 epochs) runs *bit-meta* training, which trains the
full-precision weights and every branch's LSQ step at each candidate bit-width in turn
(Eq. 1), alone in epoch 1 and in epoch 2 alternating step by step with *bit-search*
training, which freezes that "meta-state" and learns only the per-layer architecture logits
alpha through a softmax-weighted multi-branch quantizer (Eq. 2) and an L1 BOPs regularizer
with a straight-through softmax (Eq. 3-5). Weight training then fine-tunes the quantized
network at argmax(alpha) bits, starting from the meta-state.

Run it:
    python metamix.py                                   # built-in synthetic data, 1 process, ~1 min on 2 CPUs
    python metamix.py --arch mobilenet_v2 --dry-run     # per-layer MACs and the feasible GBOPs range
    python metamix.py --resume runs/metamix/checkpoint.pth --export   # model_int.pth: integer weights, scales
    python metamix.py --search random --target-gbops 28  # a baseline selection, same schedule (section 9)
    torchrun --nproc_per_node=8 metamix.py --arch resnet18 --data /imagenet --pretrained --target-gbops 33
    torchrun --nnodes=2 --node_rank=$RANK --master_addr=$HOST --master_port=29500 \\
        --nproc_per_node=8 metamix.py --arch resnet18 --data /imagenet --pretrained --target-gbops 33

Symbols (paper -> code):
    alpha_l      per-layer logits, one per candidate     MultiBranchQuantizer.alpha   (N,)
    s_{l,b}      LSQ step of branch b of layer l         MultiBranchQuantizer.step    (N,)
    B, b         candidate activation bit-widths         --bits, e.g. 8,4,2
    w_bits       the one weight bit-width                --w-bits (a list: (A, W) pairs, the supplement's)
    OPs_l        MACs of layer l at 224x224 (deployment) QuantLayer.macs
    t_bops       target, in GBOPs (1e9 bit operations)   --target-gbops
    lambda       weight of the BOPs regularizer          --lam
    C_fixed      BOPs of the fixed first/last layers     c_fixed, c_fixed_of(model)   (GBOPs)
    b_l          the bits bit selection chose for l      QuantLayer.selected_branch   (a branch index)

Section 9, after the method and its plumbing, runs other selections (uniform, random, training-free
proxies with an exact knapsack, the Figure 7(a) ablation) through the same schedule, to compare with.

Beyond the paper's main text: `--w-bits 8,4,2` searches (A, W) pairs, the supplement's extension (its
Table 7): candidates A x W, one W step per width, one convolution per W in search, a*w*OPs in Eq. 4/6.
Section 10 adds the supplement's Figure 9 to any run: per-layer Hessian traces, OPs and their ratio
against the selected bits (bits.json, figure9.png; --no-figure9). Left out: PROFIT-style BN re-estimation,
fast integer kernels (--export writes packed integer weights and scales and checks an exact
integer forward, section 8; BN is not folded, scales are not dyadic). Choices the paper does
not make are marked "Our choice" below and listed in README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# =====================================================================================
# 1. LSQ quantizer (Esser et al., "Learned Step Size Quantization", ICLR 2020)
# =====================================================================================


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range [Qn, Qp] of a b-bit quantizer: unsigned [0, 2^b-1], signed [-2^(b-1), 2^(b-1)-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_scale(n: int, bits: int, signed: bool) -> float:
    """LSQ's step-gradient scale g = 1/sqrt(N * Qp); N = weights per step, or features per sample."""
    return 1.0 / math.sqrt(n * lsq_range(bits, signed)[1])


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                 grad_scale: float | None = None) -> torch.Tensor:
    """LSQ fake quantization: q(x; s) = round(clamp(x/s, Qn, Qp)) * s.

    Gradients, with v = x/s:
        d q / d x = 1 if Qn <= v <= Qp else 0                  (straight-through round)
        d q / d s = round(v) - v inside, Qn below, Qp above    (times `grad_scale`)
    `step` is a scalar (per-tensor) or broadcastable to x (per-channel, e.g. (C, 1, 1, 1)); its
    gradient is summed to its shape. The step used is `positive(step)`, |s| >= 1e-8: a
    non-positive step is made positive, never refused (no host sync on the hot path).
    `grad_scale` defaults to LSQ's 1/sqrt(N * Qp) with N = x.numel() / step.numel(), the
    weight quantizer's N; an activation quantizer passes `lsq_grad_scale(features per sample, ...)`.
    """
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.numel() // step.numel(), bits, signed)
    qn, qp = lsq_range(bits, signed)
    return _LSQFunction.apply(x, step, qn, qp, grad_scale)


def positive(step: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:  # eps: _LSQFunction.backward too
    """The step actually used: |s|, at least eps. Our choice: s > 0 whatever the optimizer does."""
    return step.abs().clamp_min(eps)


class LSQQuantizer(nn.Module):
    """A learnable LSQ quantizer with a per-tensor step, used for weights.

    Init on first use: s = 2 * mean|v| / sqrt(Qp). Gradient scale 1/sqrt(N * Qp), N = numel
    (weights). `enabled=False` is the identity (full precision).
    """

    def __init__(self, bits: int, signed: bool = True):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.step = nn.Parameter(torch.ones(()))
        self.enabled = True
        self.initialized = False

    def init_step(self, v: torch.Tensor) -> None:
        qp = lsq_range(self.bits, self.signed)[1]
        with torch.no_grad():
            self.step.copy_(2 * v.detach().abs().mean() / math.sqrt(qp))
        self.initialized = True

    def qparams(self, v: torch.Tensor) -> tuple[int, int, float]:
        """(Qn, Qp, gradient scale 1/sqrt(N * Qp)) for tensor v, initialising the step on first use."""
        if not self.initialized:
            self.init_step(v)
        qn, qp = lsq_range(self.bits, self.signed)
        return qn, qp, lsq_grad_scale(v.numel(), self.bits, self.signed)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return v
        qn, qp, gs = self.qparams(v)
        return _LSQFunction.apply(v, self.step, qn, qp, gs)

    def get_extra_state(self):
        return {"initialized": self.initialized}

    def set_extra_state(self, state):
        self.initialized = bool(state["initialized"])

    def extra_repr(self):
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}"


# ---- 1b. For speed only: LSQ's backward with no stored codes and no mask tensor ----------
# Same values and gradients as the formulas above (test_lsq_matches_slow_formula); what they
# change is memory and passes: forward saves only x, the codes are recomputed in backward, and
# the straight-through mask is applied in one pass by hardtanh's backward.


def _lsq_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """The integer codes q = round(clamp(x/s, Qn, Qp)), in one new buffer."""
    return (x / step).clamp_(qn, qp).round_()


def _lsq_forward(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """round(clamp(x/s, Qn, Qp)) * s in four in-place passes over one new buffer."""
    return _lsq_codes(x, step, qn, qp).mul_(step)


@functools.lru_cache(maxsize=None)
def _open_bounds(qn: int, qp: int, dtype: torch.dtype) -> tuple[float, float]:
    """(lo, hi), the floats of `dtype` next to Qn and Qp: lo < v < hi exactly when Qn <= v <= Qp."""
    t = torch.tensor([qn, qp], dtype=dtype)
    lo, hi = torch.nextafter(t, torch.tensor([-math.inf, math.inf], dtype=dtype)).tolist()
    return lo, hi


def _pass_inside(g: torch.Tensor, v: torch.Tensor, bounds: tuple[float, float], out=None) -> torch.Tensor:
    """g where Qn <= v <= Qp, else 0: the straight-through mask applied in one pass, no mask tensor.

    hardtanh's backward is exactly this on the open interval (lo, hi); `bounds` from
    `_open_bounds` make it the closed [Qn, Qp]. `out` may be g itself.
    """
    if out is None:
        return torch.ops.aten.hardtanh_backward(g, v, *bounds)
    return torch.ops.aten.hardtanh_backward.grad_input(g, v, *bounds, grad_input=out)


def _dot(a: torch.Tensor, b: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """sum(a * b) reduced to step's shape; one fused pass (a dot product) for a per-tensor step."""
    if step.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(step.shape)
    return (a * b).sum_to_size(step.shape)


def _lsq_grads(g, x, q, qrange, step, need_s: bool, grad_scale: float, inplace: bool = False):
    """LSQ backward for out = q * s, q = round(clamp(v, Qn, Qp)), v = x/s, given the codes q.

    d out / d s = round(v) - v inside, Qn below, Qp above; that is q - v * inside, so
    sum(g * d out/d s) = <g, q> - <g * inside, v>: two dot products (per-tensor step).
    Returns (grad x, grad s or None). The codes are consumed: v is computed in q's buffer.
    `inplace` lets grad x reuse g's memory.
    """
    gq = _dot(g, q, step) if need_s else None
    v = torch.div(x, step, out=q)
    gx = _pass_inside(g, v, _open_bounds(*qrange, v.dtype), out=g if inplace else None)
    gs = (gq - _dot(gx, v, step)) * grad_scale if need_s else None
    return gx, gs


class _LSQFunction(torch.autograd.Function):
    """lsq_quantize's autograd function; it uses positive(step) and differentiates through it."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale):
        ctx.save_for_backward(x, step)  # only the input: the codes are recomputed
        ctx.qrange, ctx.grad_scale = (qn, qp), grad_scale
        return _lsq_forward(x, positive(step), qn, qp)

    @staticmethod
    def backward(ctx, g):
        x, step = ctx.saved_tensors
        s = positive(step)
        q = _lsq_codes(x, s, *ctx.qrange)
        gx, gs = _lsq_grads(g, x, q, ctx.qrange, s, ctx.needs_input_grad[1], ctx.grad_scale)
        if gs is not None:  # d positive(s) / ds: sign(s), 0 where the floor eps holds
            gs = torch.where(step.abs() > 1e-8, gs * step.sign(), 0.0)
        return gx, gs, None, None, None


# =====================================================================================
# 2. Multi-branch block (paper Fig. 4, Eq. 2)
# =====================================================================================
# Each quantized layer has one activation quantizer *branch* per candidate bit-width (own LSQ
# step) and one logit per branch (alpha); the weight tensor is shared. A *branch index* i
# names the candidate bits[i]; code that holds indices says "branch", code that holds
# bit-widths says "bits".
#
# Modes, in one place. A layer's activation quantizer (MultiBranchQuantizer.mode) is in one of:
#   "fp"      identity: no quantization (a pretrained model's accuracy, the reference)
#   "branch"  one branch: LSQ at bits[branch]
#   "search"  Eq. 2: x_hat = sum_i softmax(alpha)_i * Q_{bits[i]}(x; s_i)
# set_mode(model, mode) sets every layer at once, in the terms of the paper's phases:
#   "fp"       every layer "fp"
#   "meta"     every searched layer "branch" at one common index (Eq. 1 runs each in turn)
#   "search"   every searched layer "search" (Eq. 3)
#   "selected" every searched layer "branch" at its own selected_branch (weight training)
# Fixed layers (the first conv and the last Linear) are "branch" 0 in every mode but "fp".
# Pair mode (the supplement's extension, Table 7; QuantLayer with several w_bits): a candidate is an
# (A, W) pair, "branch" is then an activation index and QuantLayer.w_branch the weight width's index.
#
# Because a convolution is linear, conv(x_hat) = sum_i p_i conv(Q_i(x)): we mix the activations
# and run ONE convolution. MultiBranchQuantizer.forward below is Eq. 2 as written, the
# reference; QuantLayer runs a fused version of conv(MultiBranchQuantizer(x)) that is held
# equal to it, value and every gradient, by test_fused_layer_equals_op_of_quantized_input.


class MultiBranchQuantizer(nn.Module):
    """Activation quantizer with one LSQ branch per candidate bit-width and logits alpha (Fig. 4).

    Signedness is detected from the data at init (min < 0 -> signed); ReLU outputs are
    unsigned, the image and residual sums are signed. Our choice: signed range rather than an
    offset. Steps are initialised per branch on first use with 2*mean|x|/sqrt(Qp_b); the
    gradient scale is 1/sqrt(N * Qp_b), N = features per sample.
    """

    def __init__(self, bits: Sequence[int], n_w: int = 1):
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        n = len(self.bits)
        self.n_w = int(n_w)  # weight widths per activation width: 1, or len(W) in pair mode (Supplement, Table 7)
        self.step = nn.Parameter(torch.ones(n))
        self.alpha = nn.Parameter(torch.zeros(n * self.n_w))  # one logit per candidate (index a_idx * n_w + w_idx)
        self.signed: bool | None = None  # unknown until the first batch
        self.initialized = [False] * n
        self.mode, self.branch = "fp", 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 2 as written (the reference): x_hat = sum_i p_i * Q_{bits[i]}(x; s_i), p = softmax(alpha).

        In "branch" mode, p is one-hot at `self.branch`: plain LSQ at that branch's bits.
        """
        if self.mode == "fp":
            return x
        branches, steps, probs, _, grad_scales = self.params_for(x)
        out = 0
        for i, branch in enumerate(branches):
            y = lsq_quantize(x, steps[i], self.bits[branch], self.signed, grad_scales[i])
            out = out + (y if probs is None else probs[i] * y)
        return out

    def active_branches(self) -> list[int]:
        return [self.branch] if self.mode == "branch" else list(range(len(self.bits)))

    def init_steps(self, x: torch.Tensor, branches: Sequence[int]) -> None:
        """LSQ init from the data: s_i = 2 * mean|x| / sqrt(Qp_i)."""
        with torch.no_grad():
            if self.signed is None:
                self.signed = bool(x.min() < 0)
            m = x.detach().float().abs().mean()
            for i in branches:
                if not self.initialized[i]:
                    self.step[i] = 2 * m / math.sqrt(lsq_range(self.bits[i], self.signed)[1])
                    self.initialized[i] = True

    def params_for(self, x: torch.Tensor):
        """(active branch indices, positive steps, probs or None, qranges, grad scales) for this mode."""
        branches = self.active_branches()
        if not all(self.initialized[i] for i in branches):
            self.init_steps(x, branches)
        per_sample = x.numel() // max(x.shape[0], 1)
        qranges = [lsq_range(self.bits[i], self.signed) for i in branches]
        grad_scales = [lsq_grad_scale(per_sample, self.bits[i], self.signed) for i in branches]
        if self.mode == "branch":
            return branches, positive(self.step[self.branch : self.branch + 1]), None, qranges, grad_scales
        if self.n_w > 1:  # pair mode: each activation width's share, summed over the weight widths
            return branches, positive(self.step), self.pair_probs().sum(1), qranges, grad_scales
        return branches, positive(self.step), F.softmax(self.alpha, dim=0), qranges, grad_scales

    def pair_probs(self) -> torch.Tensor:
        """Pair mode (Supplement, Table 7): p_aw = softmax over all (A, W) pairs, as a (len(bits), n_w) matrix."""
        return F.softmax(self.alpha, dim=0).view(len(self.bits), self.n_w)

    # --- state that must survive a checkpoint but is not a tensor
    def get_extra_state(self):
        return {"signed": self.signed, "initialized": list(self.initialized)}

    def set_extra_state(self, state):
        self.signed, self.initialized = state["signed"], [bool(v) for v in state["initialized"]]

    def extra_repr(self):
        pairs = f", n_w={self.n_w}" if self.n_w > 1 else ""
        return f"bits={self.bits}, signed={self.signed}, mode={self.mode}{pairs}"


class LayerOp(NamedTuple):
    """What a QuantLayer computes: "conv2d" with its geometry, or "linear" (geometry unused)."""

    kind: str  # "conv2d" or "linear"
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose input activation and weight are quantized (shares the original tensors).

    `act` is the multi-branch activation quantizer, `weight_quant` the weight quantizer (signed
    LSQ, off during bit selection). A `fixed` layer (first conv, last Linear) has one branch at
    that width for both its input and its weight. Our choice: a per-tensor weight step. `macs`
    is its OPs_l at the BOPs resolution; `name` its path in the model; `selected_branch` the
    candidate index that bit selection chose.
    Forward: op(MultiBranchQuantizer(x), weight_quant(W)) + bias, computed by the fused op.

    Pair mode, the supplement's extension (Supplement, Table 7): with `w_bits` a sequence of
    widths W, the candidates are the pairs A x W (`candidates`, index a_idx * len(W) + w_idx), one
    softmax over them. Each weight width has its own LSQ step on the one shared FP weight
    (`weight_quants`); `weight_quant` is then the quantizer of the current width `w_branch`
    (set by set_mode). With one int `w_bits` the layer is exactly the paper's (same state-dict keys).
    """

    def __init__(self, layer: nn.Module, bits: Sequence[int], w_bits: int | Sequence[int], name: str = "",
                 macs: int = 0, fixed: bool = False):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"{name}: only zero padding with explicit sizes is supported")
            self.op = LayerOp("conv2d", tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
        elif isinstance(layer, nn.Linear):
            self.op = LayerOp("linear")
        else:
            raise TypeError(f"{name}: cannot quantize {type(layer).__name__}")
        self.kind = type(layer).__name__
        self.weight, self.bias = layer.weight, layer.bias  # the very same Parameters
        self.pairs = not isinstance(w_bits, int)
        self.w_widths = tuple(int(w) for w in w_bits) if self.pairs else (int(w_bits),)
        self.candidates = [(int(a), w) for a in bits for w in self.w_widths]  # (a_bits, w_bits) per candidate index
        self.act = MultiBranchQuantizer(bits, len(self.w_widths) if self.pairs else 1)
        if self.pairs:  # Supplement, Table 7: one LSQ weight step per weight width, all on self.weight
            self.weight_quants = nn.ModuleList(LSQQuantizer(w, signed=True) for w in self.w_widths)
            for wq in self.weight_quants:
                wq.enabled = False
        else:  # nn.Module.__setattr__ registers it in _modules; the property below reads it from there
            self.weight_quant = LSQQuantizer(w_bits, signed=True)
            self.weight_quant.enabled = False
        self.w_branch = 0  # pair mode: index into w_widths of the weight width in use
        self.name, self.macs, self.fixed = name, int(macs), fixed
        self.order = 0  # position in forward order, set by patch_model
        self.selected_branch = 0

    @property
    def weight_quant(self) -> LSQQuantizer:
        """The weight quantizer in use: the only one, or in pair mode the one at w_widths[w_branch]."""
        if "weight_quant" in self._modules:
            return self._modules["weight_quant"]
        return self._modules["weight_quants"][self.w_branch]

    def split(self, candidate: int) -> tuple[int, int]:
        """(activation branch index, weight branch index) of a candidate index; (candidate, 0) in single-W mode."""
        return divmod(int(candidate), len(self.w_widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_quant = self.weight_quant
        if self.act.mode == "fp":
            return _op_forward(x, w_quant(self.weight), self.bias, self.op)
        if self.pairs and self.act.mode == "search":
            return self._pair_search(x)
        _, steps, probs, qranges, grad_scales = self.act.params_for(x)
        w_qparams = w_quant.qparams(self.weight) if w_quant.enabled else None
        w_step = positive(w_quant.step) if w_quant.enabled else None
        return _MixedQuantOp.apply(x, steps, probs, self.weight, w_step, self.bias, qranges, grad_scales, w_qparams,
                                   self.op)

    def _pair_search(self, x: torch.Tensor) -> torch.Tensor:
        """Search over (A, W) pairs (Supplement, Table 7) by linearity of the op in its input:
        sum_{a,w} p_aw op(Q_a(x), Q_w(W)) = sum_w op(sum_a p_aw Q_a(x), Q_w(W)), p = softmax over all pairs.

        One fused op per weight width (len(W) convolutions, not len(A) * len(W)), with the column
        p[:, w] as its mixture weights; the bias is added once. Every call saves the same x and weight.
        """
        _, steps, _, qranges, grad_scales = self.act.params_for(x)
        p = self.act.pair_probs()  # (len(A), len(W))
        out = None
        for j, wq in enumerate(self.weight_quants):
            w_qparams = wq.qparams(self.weight) if wq.enabled else None
            w_step = positive(wq.step) if wq.enabled else None
            y = _MixedQuantOp.apply(x, steps, p[:, j], self.weight, w_step, self.bias if j == 0 else None, qranges,
                                    grad_scales, w_qparams, self.op)
            out = y if out is None else out + y
        return out

    def get_extra_state(self):
        return {"selected_branch": self.selected_branch}

    def set_extra_state(self, state):
        self.selected_branch = int(state["selected_branch"])

    def extra_repr(self):
        w = "{" + ",".join(map(str, self.w_widths)) + "}" if self.pairs else self.weight_quant.bits
        return f"{self.kind}, macs={self.macs}, fixed={self.fixed}, w={w}b"


# ---- 2b. For speed only: the fused layer op ---------------------------------------------
# One autograd function per layer quantizes the activation (one branch, or the Eq. 2 mixture)
# and the weight, and runs the op. It saves only x (usually already saved by the ReLU before
# it) and the raw weight; codes and the quantized weight are recomputed in backward.


class _MixedQuantOp(torch.autograd.Function):
    """out = op(sum_i p_i * Q_i(x; s_i), Q_w(W; s_w)) + bias, op a conv2d or a linear layer (LayerOp).

    x: input activation (B, C, H, W) or (B, ..., F). steps: positive steps (K,), one per active
    branch. probs: (K,) mixture weights, or None for a single branch (p = 1). w_step /
    w_qparams: the weight's positive step and (Qn, Qp, grad scale), or None for a
    full-precision weight. qranges: K pairs (Qn, Qp); grad_scales: K floats.

    The op runs on the integer codes and its output is scaled after: op(s_a q_a, s_w q_w) + b =
    s_a s_w op(q_a, q_w) + b. Codes up to 256 are exact in bf16, so under bf16 autocast every
    operand stays on its grid (s * q formed first would land up to 0.6 of a code off at 8 bits),
    and the only bf16 rounding is that of the op's output. The search mixture sum_i p_i s_i q_i
    is on no grid: under bf16 each of its elements is rounded once (relative error <= 2^-8, as
    for any bf16 activation) while the weight codes stay exact (test_bf16_autocast_*).
    """

    @staticmethod
    def forward(ctx, x, steps, probs, weight, w_step, bias, qranges, grad_scales, w_qparams, op):
        xf = _upcast(x)  # quantizer math in fp32, also under autocast
        if probs is None:
            x_in, scale = _lsq_codes(xf, steps[0], *qranges[0]), steps[0]
        else:
            x_in, scale = _mixture(xf, steps, probs, qranges), None
        w = weight
        if w_qparams is not None:
            w = _lsq_codes(weight, w_step, w_qparams[0], w_qparams[1])
            scale = w_step if scale is None else scale * w_step
        ctx.save_for_backward(x, steps, probs, weight, w_step)
        ctx.qranges, ctx.grad_scales, ctx.w_qparams, ctx.op = qranges, grad_scales, w_qparams, op
        ctx.has_bias = bias is not None
        out = _op_forward(x_in, w, None, op)
        if scale is None and bias is None:
            return out
        y = _upcast(out)  # scale and bias in fp32 (in place: out is ours), one rounding back to out's dtype
        if scale is not None:
            y.mul_(scale)
        if bias is not None:
            y.add_(bias.view(-1, 1, 1) if op.kind == "conv2d" else bias)
        return y.to(out.dtype)

    @staticmethod
    def backward(ctx, g):
        x, steps, probs, weight, w_step = ctx.saved_tensors
        need_x, need_s, need_p, need_w, need_ws, need_b = ctx.needs_input_grad[:6]
        need_in, need_wgrad, need_b = need_x or need_s or need_p, need_w or need_ws, need_b and ctx.has_bias
        w_qp, op = ctx.w_qparams, ctx.op
        w_codes = None if w_qp is None else _lsq_codes(weight, w_step, w_qp[0], w_qp[1])
        w = weight if w_codes is None else w_codes * w_step
        xf = _upcast(x)
        gx = gs = gp = None
        if probs is None:  # one branch: weight training and bit-meta (the hot path)
            q = _lsq_codes(xf, steps[0], *ctx.qranges[0])
            # The op is linear in its input: grad_W(s * q) = s * grad_W(q), so the codes serve as input.
            only_s = need_s and not need_x  # e.g. the image's quantizer in the first layer
            g_in, g_w, g_b = _op_backward(g, q, w, op, need_in and not only_s, need_wgrad, need_b)
            if g_w is not None:
                g_w.mul_(steps[0])
            if only_s:  # <g_in, r> = <g, op(r, W)> (adjoint): one forward op instead of an input gradient
                # d(s q)/ds = q - v * inside, built in q's buffer
                v = xf / steps[0]
                r = q.sub_(_pass_inside(v, v, _open_bounds(*ctx.qranges[0], v.dtype), out=v))
                gs = torch.dot(_upcast(g).reshape(-1), _op_forward(r, w, None, op).reshape(-1))
                gs = (gs * ctx.grad_scales[0]).reshape(1)
            elif g_in is not None:
                gx, gs = _lsq_grads(_upcast(g_in), xf, q, ctx.qranges[0], steps[0], need_s, ctx.grad_scales[0],
                                    inplace=True)
                gs = gs.reshape(1) if gs is not None else None
        else:  # search (Eq. 2)
            xm = _mixture(xf, steps, probs, ctx.qranges) if need_wgrad else None
            g_in, g_w, g_b = _op_backward(g, xm if need_wgrad else xf, w, op, need_in, need_wgrad, need_b)
            del xm
            if g_in is not None:
                bounds = [_open_bounds(qn, qp, xf.dtype) for qn, qp in ctx.qranges]
                gx, gs, gp = _mixture_grads(_upcast(g_in), xf, steps, probs, ctx.qranges, bounds, ctx.grad_scales,
                                            need_s, need_p)
        if gx is not None:
            gx = gx.to(x.dtype) if need_x else None
        g_ws = None
        if g_w is not None and w_qp is not None:  # through the weight quantizer (LSQ, per-tensor step)
            g_w, g_ws = _lsq_grads(g_w, weight, w_codes, w_qp[:2], w_step, need_ws, w_qp[2], inplace=True)
        return gx, gs, gp, (g_w if need_w else None), g_ws, g_b, None, None, None, None


def _mixture_grads(g, x, steps, probs, qranges, bounds, grad_scales, need_s: bool, need_p: bool):
    """Gradients of sum_i p_i * s_i * q_i(x) given g = dL/d(mixed activation).

    d/dx = sum_i p_i * (g * inside_i); d/dp_i = s_i <g, q_i>; d/ds_i = p_i * (<g, q_i> -
    <g * inside_i, v_i>) * grad scale. `bounds`: each branch's `_open_bounds`. The v, q and
    g * inside buffers are reused across branches.
    """
    gs = torch.zeros_like(steps) if need_s else None
    gp = torch.zeros_like(probs) if need_p else None
    gx = v = q = gi = None
    for i, (qn, qp) in enumerate(qranges):
        v = torch.div(x, steps[i], out=v)
        q = torch.clamp(v, qn, qp, out=q).round_()
        gi = _pass_inside(g, v, bounds[i], out=gi)  # g * inside_i
        gx = gi * probs[i] if gx is None else gx.addcmul_(gi, probs[i])
        gq = torch.dot(g.reshape(-1), q.reshape(-1)) if need_p or need_s else None
        if need_p:
            gp[i] = steps[i] * gq
        if need_s:
            gs[i] = probs[i] * grad_scales[i] * (gq - torch.dot(gi.reshape(-1), v.reshape(-1)))
    return gx, gs, gp


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _mixture(x, steps, probs, qranges):
    """x_hat of Eq. 2: sum_i p_i * s_i * round(clamp(x / s_i, Qn_i, Qp_i)); 4 passes per branch, one scratch buffer."""
    out = tmp = None
    for i, (qn, qp) in enumerate(qranges):
        tmp = torch.div(x, steps[i], out=tmp).clamp_(qn, qp).round_()
        out = tmp * (steps[i] * probs[i]) if out is None else out.addcmul_(tmp, steps[i] * probs[i])
    return out


def _op_forward(x, weight, bias, op: LayerOp):
    """The layer's own op; under autocast, F.conv2d/F.linear cast x and the weight themselves."""
    if op.kind == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups)


def _op_backward(g, inp, weight, op: LayerOp, need_in, need_w, need_b):
    dt = g.dtype  # under autocast the forward ran in g's dtype
    inp, w = inp.to(dt), weight.to(dt)
    if op.kind == "linear":  # out = inp @ W^T + b over the last dim
        g2 = g.reshape(-1, g.shape[-1])
        g_in = (g @ w) if need_in else None
        g_w = (g2.t() @ inp.reshape(-1, inp.shape[-1])).to(weight.dtype) if need_w else None
        g_b = g2.sum(0).to(weight.dtype) if need_b else None
        return g_in, g_w, g_b
    g_in, g_w, g_b = torch.ops.aten.convolution_backward(
        g, inp, w, [w.shape[0]] if need_b else None, op.stride, op.padding, op.dilation, False, [0, 0], op.groups,
        [need_in, need_w, need_b])
    return g_in, *(t.to(weight.dtype) if t is not None else None for t in (g_w, g_b))


# =====================================================================================
# 3. Straight-through softmax (Eq. 5)
# =====================================================================================


def straight_through_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """hs(alpha): one-hot of argmax softmax(alpha) forward, softmax's gradient backward (Eq. 5)."""
    y_soft = F.softmax(logits, dim=dim)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, y_soft.argmax(dim, keepdim=True), 1.0)
    return y_hard - y_soft.detach() + y_soft


# =====================================================================================
# 4. BOPs (Eq. 6) and the L1 BOPs regularizer (Eq. 4)
# =====================================================================================
# OPs_l = MACs of layer l at the deployment resolution (224): conv Cout*(Cin/groups)*kh*kw*Hout*Wout,
# linear in*out. BOPs = sum_l a_bits_l * w_bits_l * OPs_l; GBOPs = BOPs / 1e9. The first conv
# and the last Linear are fixed at --first-last-bits for both activations and weights; their
# BOPs are Eq. 4's constant C_fixed, called `c_fixed` (in GBOPs) everywhere below.


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """Quantized layers in forward order (the order patch_model recorded)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    return sorted(layers, key=lambda m: m.order)


def searched_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in quant_layers(model) if not m.fixed]


def c_fixed_of(model: nn.Module) -> float:
    """C_fixed: BOPs of the first and last layers (activation and weight at first-last bits), in GBOPs."""
    return sum(m.macs * m.act.bits[0] * m.weight_quant.bits for m in quant_layers(model) if m.fixed) / 1e9


def config_gbops(macs: Sequence[int], a_bits: Sequence[int], w_bits: int | Sequence[int], c_fixed: float) -> float:
    """Eq. 6 for the searched layers plus C_fixed: sum_l a_l * w_l * OPs_l / 1e9 + C_fixed.

    `w_bits`: the one weight width (the paper), or one per layer (pair mode, Supplement, Table 7).
    """
    if isinstance(w_bits, int):
        return sum(m * a for m, a in zip(macs, a_bits)) * w_bits / 1e9 + c_fixed
    return sum(m * a * w for m, a, w in zip(macs, a_bits, w_bits)) / 1e9 + c_fixed


def candidate_bits(m: QuantLayer) -> tuple[list[int], int | list[int]]:
    """(activation bits per candidate, weight bits): one int in single-W mode, one per candidate in pair mode."""
    a_bits = [a for a, _ in m.candidates]
    return a_bits, ([w for _, w in m.candidates] if m.pairs else m.w_widths[0])


def branches_gbops(model: nn.Module, branches: Sequence[int]) -> float:
    """Eq. 6 of a configuration given as one candidate index per searched layer; pair mode: each layer
    at its own W (a single W keeps the paper's arithmetic exactly)."""
    layers = searched_layers(model)
    pairs = [m.candidates[i] for m, i in zip(layers, branches)]
    ws = [w for _, w in pairs]
    return config_gbops([m.macs for m in layers], [a for a, _ in pairs], ws if layers[0].pairs else ws[0],
                        c_fixed_of(model))


def gbops_range(model: nn.Module, w_bits: int | None = None) -> tuple[float, float]:
    """Feasible budgets: every searched layer at its cheapest candidate, and at its dearest (a * w).

    `w_bits`: the one weight width (the paper's setting); None reads each layer's own candidates
    (needed in pair mode).
    """
    layers = searched_layers(model)
    macs, c_fixed = [m.macs for m in layers], c_fixed_of(model)
    if w_bits is not None or not any(m.pairs for m in layers):
        w = w_bits if w_bits is not None else layers[0].w_widths[0]
        lo = config_gbops(macs, [min(m.act.bits) for m in layers], w, c_fixed)
        hi = config_gbops(macs, [max(m.act.bits) for m in layers], w, c_fixed)
        return lo, hi
    ends = [[pick(m.candidates, key=lambda c: c[0] * c[1]) for m in layers] for pick in (min, max)]
    return tuple(config_gbops(macs, [a for a, _ in e], [w for _, w in e], c_fixed) for e in ends)


def bops_regularizer(alphas: torch.Tensor, bits: Sequence[int], macs: Sequence[int], w_bits: int | Sequence[int],
                     c_fixed: float, target_gbops: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: L_reg = | sum_l sum_i hs(alpha_l)_i * bits_i * w_bits * OPs_l / 1e9 + C_fixed - t_bops |.

    Our choices: units of GBOPs (1e9), which make the paper's lambdas sensible; Eq. 4 taken
    literally, so its value is the distance of the *argmax* configuration to the target.
    alphas: (L, N) logits of the searched layers; bits: (N,) candidates; macs: (L,).
    w_bits: the one weight width, or (N,) per candidate in pair mode (Supplement, Table 7), where
    candidate i costs bits_i * w_bits_i * OPs_l.
    Returns (L_reg, GBOPs of the argmax configuration), both differentiable in alphas.
    """
    hs = straight_through_softmax(alphas, dim=-1)  # (L, N), one-hot forward
    b = torch.as_tensor(bits, dtype=hs.dtype, device=hs.device)
    m = torch.as_tensor(macs, dtype=hs.dtype, device=hs.device)
    if isinstance(w_bits, int):
        gbops = (hs @ b * m).sum() * (w_bits / 1e9) + c_fixed
    else:
        cost = b * torch.as_tensor(w_bits, dtype=hs.dtype, device=hs.device)  # (N,) a * w
        gbops = (hs @ cost * m).sum() / 1e9 + c_fixed
    return (gbops - target_gbops).abs(), gbops


def repair_to_budget(probs: Sequence[Sequence[float]], branches: Sequence[int], bits: Sequence[int],
                     macs: Sequence[int], w_bits: int | Sequence[int], c_fixed: float,
                     target_gbops: float) -> list[int]:
    """Lower bits until the configuration fits the target; returns candidate indices. Our choice,
    the paper has no repair step.

    Each move lowers one layer to the next lower cost level a * w among its candidates (single
    W: the next smaller bit-width); among candidates tied at that level (pair mode, e.g. (8,2),
    (4,4), (2,8)), the most probable. We take the move that gives up the least softmax
    probability per BOP saved, until GBOPs <= target. `w_bits`: one int, or one per candidate.
    """
    branches = list(branches)
    ws = [w_bits] * len(bits) if isinstance(w_bits, int) else list(w_bits)
    cost = [a * w for a, w in zip(bits, ws)]  # bit-ops per MAC of each candidate
    levels = sorted(set(cost))

    def gb():
        if isinstance(w_bits, int):
            return config_gbops(macs, [bits[i] for i in branches], w_bits, c_fixed)
        return config_gbops(macs, [bits[i] for i in branches], [ws[i] for i in branches], c_fixed)

    while gb() > target_gbops + 1e-9:
        best = None
        for l, i in enumerate(branches):
            k = levels.index(cost[i])
            if k == 0:
                continue
            tied = [j for j in range(len(bits)) if cost[j] == levels[k - 1]]
            lower = max(tied, key=lambda j: (probs[l][j], -j))  # the most probable; ties: the first
            saved = (cost[i] - cost[lower]) * macs[l]
            c = (probs[l][i] - probs[l][lower]) / saved
            if best is None or c < best[0]:
                best = (c, l, lower)
        if best is None:
            break
        branches[best[1]] = best[2]
    return branches


# =====================================================================================
# 5. Model patching
# =====================================================================================


def trace_layers(model: nn.Module, image_size: int) -> list[tuple[str, nn.Module, int]]:
    """(name, module, MACs) of every Conv2d/Linear in forward order, from one forward pass."""
    seen: list[tuple[str, nn.Module, int]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = out.shape[1] * (mod.in_channels // mod.groups) * kh * kw * out.shape[2] * out.shape[3]
        else:
            macs = mod.in_features * mod.out_features * (out.numel() // out.shape[-1] // out.shape[0])
        if all(m is not mod for _, m, _ in seen):  # our choice: a layer called twice counts once (its first call)
            seen.append((names[mod], mod, int(macs)))

    targets = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, QuantLayer))]
    if any(isinstance(m, QuantLayer) for m in targets):
        raise ValueError("model is already patched")
    handles = [m.register_forward_hook(hook) for m in targets]
    was_training = model.training
    try:
        p = next(model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def patch_model(model: nn.Module, bits: Sequence[int], w_bits: int | Sequence[int] = 4, first_last_bits: int = 8,
                bops_image_size: int = 224) -> nn.Module:
    """Replace every Conv2d and Linear by a QuantLayer that keeps the original weight tensors.

    The first and last layers *in forward order* get a single fixed branch at first_last_bits
    (activation and weight). Returns the model (patched in place), in "fp" mode. Works on any
    model that takes a (1, 3, bops_image_size, bops_image_size) image, torchvision's or yours.
    `w_bits`: one int (the paper), or a sequence of widths: pair mode for the searched layers
    (Supplement, Table 7); fixed layers are never in pair mode.
    """
    traced = trace_layers(model, bops_image_size)
    if len(traced) < 3:
        raise ValueError("need at least three Conv2d/Linear layers (a first, a searched one, a last)")
    for i, (name, mod, macs) in enumerate(traced):
        fixed = i in (0, len(traced) - 1)
        q = QuantLayer(mod, [first_last_bits] if fixed else bits, first_last_bits if fixed else w_bits, name, macs,
                       fixed)
        q.order = i
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def set_mode(model: nn.Module, mode: str, branch: int | None = None, quant_weights: bool | None = None) -> None:
    """Set every quantized layer's mode: "fp", "meta" (every searched layer at branch index
    `branch`), "search" or "selected"; the table of modes is at the top of section 2.

    Our choice: fixed (first/last) layers are at first-last bits from the start of bit
    selection. `quant_weights` switches weight LSQ on or off (None: leave it; "fp": off).

    Pair mode (Supplement, Table 7): `branch` and `selected_branch` are candidate indices, each
    an (A, W) pair; the weight width in use follows the pair. A pair's W is part of the
    candidate, so a pair-mode layer quantizes its weights in every mode but "fp" (bit-meta
    trains each pair with its weights at that pair's W, as the supplement does); `quant_weights`
    then concerns the single-W layers (the fixed ones).
    """
    if mode not in ("fp", "meta", "search", "selected"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "meta" and branch is None:
        raise ValueError("mode 'meta' needs a branch index")
    for m in quant_layers(model):
        if mode == "fp":
            m.act.mode = "fp"
        elif m.fixed:
            m.act.mode, m.act.branch = "branch", 0
        elif mode == "meta":
            m.act.mode = "branch"
            m.act.branch, m.w_branch = m.split(branch)
        elif mode == "search":
            m.act.mode = "search"
        else:
            m.act.mode = "branch"
            m.act.branch, m.w_branch = m.split(m.selected_branch)
        if m.pairs:
            for wq in m.weight_quants:
                wq.enabled = mode != "fp"
        elif mode == "fp":
            m.weight_quant.enabled = False
        elif quant_weights is not None:
            m.weight_quant.enabled = quant_weights


def alphas_of(model: nn.Module) -> list[nn.Parameter]:
    """The architecture logits alpha_l of the searched layers, in forward order."""
    return [m.act.alpha for m in searched_layers(model)]


def meta_params(model: nn.Module) -> list[nn.Parameter]:
    """What bit-meta and weight training update: every parameter but the alphas (weights, BN, steps)."""
    alphas = {id(a) for a in alphas_of(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def argmax_branches(model: nn.Module) -> list[int]:
    """Per searched layer, the candidate index with the largest alpha (ties: the first candidate)."""
    return [int(m.act.alpha.detach().argmax()) for m in searched_layers(model)]


def apply_selection(model: nn.Module, branches: Sequence[int]) -> None:
    """Record one branch index per searched layer as its selection (used by mode "selected")."""
    for m, i in zip(searched_layers(model), branches):
        m.selected_branch = int(i)


# =====================================================================================
# 6. The two phases (paper Table 1)
# =====================================================================================
# Table 1 as code. S = bit-selection epochs (2 in the paper), E = all epochs.
#
#   init_quantizers(model, calib)                  # every branch's LSQ step, from one batch
#   for epoch in 1 .. S:                           # bit selection
#       for images, targets in loader:             #   Eq. 1; in epoch S also Eq. 3, same batch
#           bit_selection_step(model, images, targets, opt, opt_alpha,
#                              search=(epoch == S), lam=lam, target_gbops=t_bops)
#   start_weight_training(model, t_bops)           # bits = argmax alpha; weight LSQ from the meta-state
#   for epoch in S+1 .. E:                         # weight training at the selected bits
#       for images, targets in loader:
#           weight_training_step(model, images, targets, opt)
#
# The plumbing (section 7) adds its concerns through arguments, not globals: `sync(params,
# loss)` all-reduces the gradients and stops on NaN or a signal, `autocast` is bf16 on GPUs.


def _no_sync(params, loss):
    return loss


@contextlib.contextmanager
def batch_stats_bn(model: nn.Module):
    """Train-mode BN that normalises with the batch's statistics and leaves the running buffers alone;
    dropout off. Restores everything on exit."""
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    model.train()
    for m in bns:
        m.track_running_stats = False  # train-mode BN then uses batch statistics and leaves the buffers alone
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
        model.train(was_training)


def init_quantizers(model: nn.Module, calib: torch.Tensor) -> None:
    """LSQ's data-dependent init on one batch: each branch's step 2*mean|x|/sqrt(Qp) and each
    layer's signedness. Our choice: BN normalises with the batch's statistics, as in the training
    steps that follow, and leaves the running statistics alone (eval-mode BN with a from-scratch
    model's running statistics lets deep activations vanish: steps of 0). Leaves the model in
    "fp" mode."""
    with torch.no_grad(), batch_stats_bn(model):
        for branch in range(len(searched_layers(model)[0].candidates)):  # pair mode: every weight step too
            set_mode(model, "meta", branch)
            model(calib)
    set_mode(model, "fp")


def bit_meta_step(model: nn.Module, images, targets, autocast=None) -> torch.Tensor:
    """Eq. 1: L_meta = (1/N) sum_b L_task(net with every searched layer at b).

    One forward/backward per candidate; gradients accumulate in .grad (FP weights and each
    branch's step). Our choice: BN layers are shared by all candidates (their running
    statistics see them all). Returns L_meta, detached.
    Pair mode (Supplement, Table 7): a candidate is an (A, W) pair, with the weights quantized at
    its W: len(A) * len(W) passes (9 for {8,4,2} x {8,4,2}), and each weight width's step learns.
    """
    autocast = autocast or contextlib.nullcontext
    n = len(searched_layers(model)[0].candidates)
    total = torch.zeros((), device=images.device)
    for branch in range(n):
        set_mode(model, "meta", branch)
        with autocast():
            loss = F.cross_entropy(model(images), targets) / n
        loss.backward()
        total += loss.detach()
    return total


def bit_search_step(model: nn.Module, images, targets, lam: float, target_gbops: float, autocast=None):
    """Eq. 3: L = L_task + lambda * L_reg on the frozen meta-state; only the alphas get gradients.

    Weights and steps are fixed: requires_grad is switched off for everything but the alphas,
    so no weight or step gradient is even computed. BN statistics are frozen too: our choice is
    to normalise with the batch's statistics (those of the mixed activation being searched)
    without updating the running buffers, and to switch dropout off.
    Returns (L, GBOPs of the argmax configuration), detached.
    """
    autocast = autocast or contextlib.nullcontext
    layers = searched_layers(model)
    alphas = alphas_of(model)
    frozen = [p for p in meta_params(model) if p.requires_grad]
    set_mode(model, "search")
    for p in frozen:
        p.requires_grad_(False)
    try:
        with batch_stats_bn(model), autocast():
            task = F.cross_entropy(model(images), targets)
        a_bits, w_bits = candidate_bits(layers[0])  # pair mode: candidate i costs a_i * w_i * OPs_l
        reg, gbops = bops_regularizer(torch.stack(alphas), a_bits, [m.macs for m in layers], w_bits,
                                      c_fixed_of(model), target_gbops)
        loss = task.float() + lam * reg
        loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return loss.detach(), gbops.detach()


def bit_selection_step(model: nn.Module, images, targets, opt, opt_alpha=None, *, search: bool = False,
                       lam: float = 0.0, target_gbops: float | None = None, autocast=None, sync=None):
    """One iteration of bit selection (Table 1): a bit-meta step (Eq. 1) and, in the search epoch,
    a bit-search step (Eq. 3-5) on the meta-state just updated, "given the same mini-batch"
    (the paper's section on the fixed meta-state).

    `opt` updates weights and LSQ steps (meta_params), `opt_alpha` the alphas. `sync(params,
    loss)` runs after each backward, before its optimizer step, and returns the loss to report;
    the plumbing all-reduces there and raises to stop. Returns (meta loss, search loss or
    None, GBOPs of the argmax configuration or None).
    """
    sync = sync or _no_sync
    opt.zero_grad(set_to_none=True)
    meta_loss = sync([p for g in opt.param_groups for p in g["params"]],
                     bit_meta_step(model, images, targets, autocast))
    opt.step()
    if not search:
        return meta_loss, None, None
    opt_alpha.zero_grad(set_to_none=True)
    loss, gbops = bit_search_step(model, images, targets, lam, target_gbops, autocast)
    search_loss = sync(alphas_of(model), loss)
    opt_alpha.step()
    return meta_loss, search_loss, gbops


def select_branches(model: nn.Module, target_gbops: float, repair: bool = True):
    """Bits = argmax alpha per layer; if that is over the target and `repair`, lower bits to fit.

    Records the selection in the model; returns (branch indices, GBOPs, whether repair changed any).
    """
    layers = searched_layers(model)
    probs = [F.softmax(m.act.alpha.detach().float(), 0).tolist() for m in layers]
    argmax = argmax_branches(model)
    (bits, w_bits), macs = candidate_bits(layers[0]), [m.macs for m in layers]
    branches = argmax
    if repair:
        branches = repair_to_budget(probs, argmax, bits, macs, w_bits, c_fixed_of(model), target_gbops)
    apply_selection(model, branches)
    return branches, branches_gbops(model, branches), branches != argmax


def start_weight_training(model: nn.Module, target_gbops: float, repair: bool = True):
    """Everything that happens between the phases: select the bits (select_branches), switch every
    layer to its selection with weight quantization on, and initialise each weight's LSQ step
    from the meta-state weights. The weights and the chosen branches' activation steps are
    kept: the paper's "mixed-precision-aware" initialisation. Returns select_branches' result.

    Build fresh optimizers after this (the plumbing's choice: SGD with a cosine schedule).
    """
    selection = select_branches(model, target_gbops, repair)
    switch_to_weight_training(model)
    return selection


def switch_to_weight_training(model: nn.Module) -> None:
    """Every layer at its selected_branch with weight LSQ on, each weight step initialised from the
    meta-state weights (the paper's "mixed-precision-aware" initialisation)."""
    set_mode(model, "selected", quant_weights=True)
    for m in quant_layers(model):
        if not m.pairs:
            m.weight_quant.init_step(m.weight)
        # Pair mode (Supplement, Table 7): the selected W's step was trained in bit-meta with the weights,
        # like the activation steps, so it is kept (our choice; the supplement does not say).


def weight_training_step(model: nn.Module, images, targets, opt, autocast=None, sync=None):
    """One step of weight training: ordinary training of weights and steps at the selected bits."""
    autocast, sync = autocast or contextlib.nullcontext, sync or _no_sync
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = F.cross_entropy(model(images), targets)
    loss.backward()
    loss = sync([p for g in opt.param_groups for p in g["params"]], loss.detach())
    opt.step()
    return loss


# =====================================================================================
# 7. Plumbing: errors, distributed, data, checkpoints, logging, the command line
# =====================================================================================


class BadInput(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


class Interrupted(Exception):
    def __init__(self, signum: int, where: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} {where}")
        self.signum = signum


_STOP = {"signum": 0}


def _on_signal(signum, frame):  # first signal: stop at the next step boundary; second: default action
    _STOP["signum"] = signum
    signal.signal(signum, signal.SIG_DFL)


class Dist:
    """Process-group facts from torchrun's environment; a single process when there is none."""

    def __init__(self, timeout_min: float = 30.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.cuda else "gloo",
                                                 timeout=datetime.timedelta(minutes=timeout_min))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def sync_step(dist: Dist, params: Sequence[nn.Parameter], loss: torch.Tensor) -> tuple[float, bool]:
    """ONE all-reduce per step: every gradient, the loss and the stop flag in one flat buffer.

    Our choice instead of DDP: bit-meta leaves the unused branches' steps without gradients,
    which DDP handles only with find_unused_parameters, and one buffer also carries the flag.
    Gradients are averaged over ranks. Returns (mean loss, whether any rank was signalled to
    stop), identical on every rank, so all ranks stop at the same step boundary.
    """
    grads = [p.grad for p in params if p.grad is not None]
    head = torch.stack([loss.float().reshape(()), torch.tensor(float(_STOP["signum"] > 0), device=loss.device)])
    if dist.world == 1:
        loss_v, stop = head.tolist()
        return loss_v, stop > 0
    flat = torch.cat([head] + [g.reshape(-1).float() for g in grads])
    dist.all_reduce_(flat)
    flat /= dist.world
    offset = 2
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    loss_v, stop = flat[:2].tolist()
    return loss_v, stop > 0


def sync_bn_stats(dist: Dist, model: nn.Module) -> None:
    """Average BN running statistics over ranks at epoch end. Our choice (timm's distribute_bn)."""
    if dist.world == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                dist.all_reduce_(t)
                t /= dist.world


def quantizer_flags(model: nn.Module) -> list:
    """Per quantized layer, the state that is not a tensor: input signedness and selected branch."""
    return [(m.act.signed, m.selected_branch) for m in quant_layers(model)]


def replica_fingerprint(model: nn.Module) -> torch.Tensor:
    """A checksum of every parameter, buffer, step and alpha, and of each layer's signedness and
    selected branch (plain Python state, which a tensor checksum alone would miss)."""
    sums = [torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()])
            for t in model.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
    flags = [float(-1 if signed is None else signed) * 1000 + branch for signed, branch in quantizer_flags(model)]
    return torch.cat(sums + [torch.tensor(flags, dtype=torch.float64, device=sums[0].device)])


def replicas_in_sync(dist: Dist, model: nn.Module) -> bool:
    """Compare replica_fingerprint across ranks."""
    mine = replica_fingerprint(model)
    if dist.world == 1:
        return True
    gathered = [torch.empty_like(mine) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def broadcast_model(dist: Dist, model: nn.Module) -> None:
    """Make rank 0's parameters, buffers and signedness everybody's (after data-dependent init):
    each layer's signed/unsigned range is decided once, for all ranks."""
    if dist.world > 1:
        for t in model.state_dict().values():
            if torch.is_tensor(t):
                torch.distributed.broadcast(t, 0)
        signs = [m.act.signed for m in quant_layers(model)]
        torch.distributed.broadcast_object_list(signs, 0)
        for m, signed in zip(quant_layers(model), signs):
            m.act.signed = signed


# ---- speed: torch.compile of the search mixture (--compile) ----------------------------


def compile_quantizer_kernels() -> None:
    """Our choice, off by default (--compile): torch.compile the search mixture's helpers.

    Per branch, the mixture makes several passes over an activation; compiled, a branch
    becomes one or two fused loops (CPU: C++ via a compiler on PATH; GPU: Triton), and a
    6-candidate search costs little more than a 3-candidate one. The single-branch path
    (weight training, bit-meta) stays eager: it must write its codes anyway, and
    compiling it measured slower. The autograd function looks the helpers up at call time,
    so swapping the module globals is enough.
    """
    import torch._dynamo

    # one graph per (bits, signedness, rank) rather than per layer; detached inputs (no Parameter
    # or requires_grad guards; in-place results still land, detach shares storage)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    g = globals()
    for name in ("_mixture", "_mixture_grads"):
        if not hasattr(g[name], "compiled"):
            fn = torch.compile(g[name], dynamic=True)

            def call(*a, _fn=fn, **kw):
                return _fn(*[t.detach() if isinstance(t, torch.Tensor) else t for t in a], **kw)

            call.compiled = fn
            g[name] = call


# ---- data ------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_dataset(n: int, num_classes: int, image_size: int, seed: int, split: str):
    """A learnable synthetic classification set, generated in memory from the seed.

    Each class has a smooth random colour pattern (4x4 upsampled); an image is its class
    pattern, randomly shifted, scaled in contrast and brightness, plus Gaussian noise.
    Templates depend on the seed only; train and val draw different samples.
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=image_size, mode="bilinear",
                              align_corners=False)
    g.manual_seed(seed * 1000 + (1 if split == "train" else 2))
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    x = templates[labels]
    shifts = torch.randint(-image_size // 8, image_size // 8 + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), (1, 2)) for xi, s in zip(x, shifts)])
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.3 * torch.randn(n, 1, 1, 1, generator=g)
    x = x + 0.7 * torch.randn(x.shape, generator=g)
    return torch.utils.data.TensorDataset(x.contiguous(), labels)


def _load_rgb(path: str):
    from PIL import Image  # a torchvision dependency

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # the worker's exception carries the file name back to the main process
        raise BadInput(f"cannot read image {path}: {e}") from None


def check_image_folder(root: str) -> list[str]:
    """Validate the ImageNet-style layout before any loader starts; returns the class names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what ImageFolder accepts

    if not os.path.isdir(root):
        raise BadInput(f"--data {root}: no such directory (expected {root}/train and {root}/val, or 'synthetic')")
    classes = {}
    for split in ("train", "val"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise BadInput(f"--data {root}: missing {split}/ folder (expected one sub-folder per class in {d})")
        names = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if not names:
            raise BadInput(f"--data {root}: {d} has no class sub-folders")
        for name in names:
            files = [e.name for e in os.scandir(os.path.join(d, name)) if e.is_file()]
            if not files:
                raise BadInput(f"--data {root}: class folder {os.path.join(d, name)} is empty")
            if not any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                raise BadInput(f"--data {root}: class folder {os.path.join(d, name)} holds no image file "
                               f"(e.g. {sorted(files)[0]}; images end in {', '.join(IMG_EXTENSIONS)})")
        classes[split] = names
    if classes["train"] != classes["val"]:
        diff = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise BadInput(f"--data {root}: train/ and val/ have different classes (e.g. {', '.join(diff[:5])})")
    return classes["train"]


def build_datasets(args):
    """(train set, val set, number of classes)."""
    if args.data == "synthetic":
        return (synthetic_dataset(args.synthetic_train, args.synthetic_classes, args.image_size, args.seed, "train"),
                synthetic_dataset(args.synthetic_val, args.synthetic_classes, args.image_size, args.seed, "val"),
                args.synthetic_classes)
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    classes = check_image_folder(args.data)
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(int(round(args.image_size / 0.875))), T.CenterCrop(args.image_size), T.ToTensor(),
                        norm])
    train = ImageFolder(os.path.join(args.data, "train"), train_tf, loader=_load_rgb)
    val = ImageFolder(os.path.join(args.data, "val"), val_tf, loader=_load_rgb)
    return train, val, len(classes)


def num_classes_hint(args, dry: bool = False) -> int:
    """Classes of the model, known before the data is read: --num-classes, the synthetic set's,
    the number of class folders in train/ (if it exists), else ImageNet's 1000 (also for --dry-run)."""
    if args.num_classes:
        return args.num_classes
    if args.data == "synthetic":
        return 1000 if dry else args.synthetic_classes
    train = os.path.join(args.data, "train")
    n = sum(e.is_dir() for e in os.scandir(train)) if os.path.isdir(train) else 0
    return n or 1000


def build_loaders(args, dist: Dist, train_set, val_set):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    per_rank = len(train_set) // dist.world
    if args.batch_size > per_rank:
        raise BadInput(f"--batch-size {args.batch_size} is larger than this rank's share of the training set "
                       f"({per_rank} images); lower it")
    sampler = DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=args.seed, drop_last=True)
    workers = 0 if args.data == "synthetic" else args.workers
    # workers are re-created each epoch (not persistent), seeded from the RNG state at its start: exact resume
    common = dict(num_workers=workers, pin_memory=dist.cuda)
    train = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **common)
    # Every validation image exactly once across ranks: rank r takes r, r+W, r+2W, ... (no padding).
    val = DataLoader(val_set, args.batch_size, sampler=range(dist.rank, len(val_set), dist.world), **common)
    return train, val, calibration_batch(train_set, args.batch_size, args.seed)


def calibration_batch(train_set, n: int, seed: int) -> torch.Tensor:
    """LSQ's "first batch": n random training images, the same on every rank. The picks and the
    augmentation (RandomResizedCrop and flip draw from torch's global RNG) are seeded by `seed`
    alone, in a forked RNG, so that each rank's own stream is left where it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pick = torch.randperm(len(train_set))[:n]
        return torch.stack([train_set[int(i)][0] for i in pick])


# ---- model -----------------------------------------------------------------------------

# The paper's settings (Table 1, supplement Table 8, its results table): candidates, lambda, total epochs (2 bit
# selection + the rest weight training), the target of its headline result, and its FP baseline's top-1.
PAPER_SETTINGS = {
    "resnet18": dict(bits="8,4,2", lam=0.4, epochs=90, target_gbops=33.0, fp_top1=70.5),
    "mobilenet_v2": dict(bits="8,4,3", lam=1.0, epochs=140, target_gbops=5.12, fp_top1=71.9),
    "mobilenet_v3_large": dict(bits="8,4,3", lam=4.0, epochs=140, target_gbops=3.29, fp_top1=75.3),
}
# Our choice for every other arch (not in the paper): MobileNet-v3-large's for MobileNet-v3-small,
# ResNet-18's candidates with lambda 1 and 90 epochs otherwise; the target is then 95% of uniform A4.
OTHER_DEFAULTS = {"mobilenet_v3_small": dict(bits="8,4,3", lam=4.0, epochs=140)}
FALLBACK_DEFAULTS = dict(bits="8,4,2", lam=1.0, epochs=90)
# torchvision weights closest to the paper's FP baselines (the default of a bare --pretrained).
PAPER_WEIGHTS = {"resnet18": "IMAGENET1K_V1", "mobilenet_v2": "IMAGENET1K_V1", "mobilenet_v3_large": "IMAGENET1K_V2"}


def pretrained_note(args) -> str:
    """The FP top-1 torchvision documents for the weights, beside the paper's baseline."""
    w = resolve_weights(args.arch, args.pretrained)
    note = f"pretrained {w}: torchvision documents {w.meta['_metrics']['ImageNet-1K']['acc@1']:.3f}% ImageNet top-1"
    paper = PAPER_SETTINGS.get(args.arch)
    return note + (f"; the paper's FP baseline is {paper['fp_top1']}%" if paper else "")


def arch_defaults(arch: str) -> dict:
    return PAPER_SETTINGS.get(arch) or OTHER_DEFAULTS.get(arch) or FALLBACK_DEFAULTS


def resolve_weights(arch: str, name: str):
    """torchvision weights enum for --pretrained NAME ("paper": the closest to the paper's FP baseline)."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    short = PAPER_WEIGHTS.get(arch, "DEFAULT") if name == "paper" else name.split(".")[-1]
    try:
        return enum[short] if short != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise BadInput(f"--pretrained {name!r}: no such weights for {arch}; choose one of: {names}") from None


def classification_archs() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(args, num_classes: int) -> nn.Module:
    import torchvision

    if args.pretrained:
        if num_classes != 1000:
            raise BadInput(f"--pretrained needs 1000 classes, the data has {num_classes}")
        try:
            model = torchvision.models.get_model(args.arch, weights=resolve_weights(args.arch, args.pretrained))
        except Exception as e:
            raise BadInput(f"could not load pretrained {args.arch} weights ({type(e).__name__}: {e}); "
                           "place them in the torch hub cache or use --init PATH") from None
    else:
        model = torchvision.models.get_model(args.arch, weights=None, num_classes=num_classes)
    if args.init:
        sd = load_file(args.init, "--init")
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        try:
            model.load_state_dict(sd)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise BadInput(f"--init {args.init}: not a {args.arch} state dict ({str(e).splitlines()[0]})") from None
    return patch_model(model, args.bits, args.w_bits, args.first_last_bits, args.bops_image_size)


# ---- checkpoints -----------------------------------------------------------------------


def atomic_write(path: str, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves the old file whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_file(path: str, what: str):
    if not os.path.isfile(path):
        raise BadInput(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "it holds pickled Python objects, refused (weights_only=True)"
        raise BadInput(f"{what} {path}: cannot load ({msg[:200]})") from None


def rng_state(dist: Dist) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if dist.cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, dist: Dist) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if dist.cuda and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# ---- the run ---------------------------------------------------------------------------


class Run:
    """Everything a run carries from epoch to epoch; `state_dict()` is the checkpoint."""

    def __init__(self, args, dist: Dist, model: nn.Module):
        self.args, self.dist, self.model = args, dist, model
        self.epoch = 0  # epochs finished
        self.history: list[dict] = []
        self.summary: dict = {"fp_top1": None, "seconds": {"bit_selection": 0.0, "weight_training": 0.0}}
        self.selected_branches: list[int] | None = None
        self.alpha_trace: list[dict] = []  # softmax(alpha) per search step (alphas.json); not checkpointed
        self.build_optimizers()

    @property
    def phase(self) -> str:
        return "bit_selection" if self.epoch < self.args.search_epochs else "weight_training"

    def build_optimizers(self, phase: str | None = None):
        """SGD (momentum 0.9) for weights and steps, and for the alphas (or Adam, --alpha-optimizer).
        Our choice; the paper is silent. SGD is the alphas' default from the digits study (README).

        Weight decay applies to conv/linear weights only. Bit selection keeps the LR constant;
        weight training starts a fresh SGD with a cosine schedule over its epochs.
        """
        a = self.args
        alphas = alphas_of(self.model)
        decay = [m.weight for m in quant_layers(self.model)]
        rest = [p for p in self.model.parameters() if all(p is not q for q in alphas + decay)]
        self.params = decay + rest
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}],
                                   lr=a.lr, momentum=0.9)
        if getattr(a, "alpha_optimizer", "sgd") == "sgd":  # EdMIPS's choice: plain SGD keeps Eq. 4's per-layer scale
            self.opt_alpha = torch.optim.SGD(alphas, lr=a.alpha_lr, momentum=0.9)
        else:
            self.opt_alpha = torch.optim.Adam(alphas, lr=a.alpha_lr, betas=(0.5, 0.999))
        self.sched = None
        if (phase or self.phase) == "weight_training":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(a.epochs - a.search_epochs, 1))

    def state_dict(self, rng: list) -> dict:
        return {"format": "metamix-checkpoint-1", "args": vars(self.args), "epoch": self.epoch, "phase": self.phase,
                "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "opt_alpha": self.opt_alpha.state_dict(),
                "sched": self.sched.state_dict() if self.sched else None, "selected_branches": self.selected_branches,
                "history": self.history, "summary": self.summary, "rng": rng}

    def load_state_dict(self, ck: dict, path: str) -> None:
        if not isinstance(ck, dict) or ck.get("format") != "metamix-checkpoint-1":
            raise BadInput(f"--resume {path}: not a metamix checkpoint")
        old, a = ck["args"], self.args
        for key in ("arch", "bits", "w_bits", "first_last_bits", "search_epochs", "epochs", "target_gbops", "lam",
                    "bops_image_size"):
            mine, theirs = getattr(a, key), old[key]
            if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
                mine, theirs = list(mine), list(theirs)
            if mine != theirs:
                raise BadInput(f"--resume {path}: checkpoint has {key.replace('_', '-')}={theirs}, this run {mine}")
        # a checkpoint older than these flags was made with their first defaults (the alphas then used Adam)
        for key, default in (("search", "metamix"), ("alpha_optimizer", "adam"), ("bits_from", None)):
            mine, theirs = getattr(a, key), old.get(key, default)
            if mine != theirs:
                raise BadInput(f"--resume {path}: checkpoint has {key.replace('_', '-')}={theirs}, this run {mine}")
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise BadInput(f"--resume {path}: model does not match ({str(e).splitlines()[0][:200]})") from None
        self.epoch, self.selected_branches = ck["epoch"], ck["selected_branches"]
        self.history, self.summary = ck["history"], ck["summary"]
        # the configuration evaluated at the end of the last epoch: argmax bits (FP weights) or the selection
        set_mode(self.model, "selected", quant_weights=self.phase == "weight_training")
        self.build_optimizers()
        self.opt.load_state_dict(ck["opt"])
        self.opt_alpha.load_state_dict(ck["opt_alpha"])
        if self.sched is not None and ck["sched"] is not None:
            self.sched.load_state_dict(ck["sched"])
        if a.lr != old["lr"]:  # a new --lr wins; the schedule keeps its shape (same lr: untouched, exact resume)
            scale = a.lr / old["lr"]
            for g in self.opt.param_groups:
                g["lr"] *= scale
                if "initial_lr" in g:
                    g["initial_lr"] *= scale
            if self.sched is not None:
                self.sched.base_lrs = [b * scale for b in self.sched.base_lrs]
        self.opt.param_groups[0]["weight_decay"] = a.wd  # the decayed group: a new --wd wins too
        for g in self.opt_alpha.param_groups:
            g["lr"] = a.alpha_lr
        if len(ck["rng"]) == self.dist.world:
            set_rng_state(ck["rng"][self.dist.rank], self.dist)
        else:  # another world size: a fresh per-rank stream (the run stays valid, not bit-exact)
            seed = a.seed + self.dist.rank + 7919 * self.epoch
            random.seed(seed)
            torch.manual_seed(seed)

    def save(self):
        rng = [rng_state(self.dist)]  # every rank's RNG state: rank r resumes with its own
        if self.dist.world > 1:
            rng = [None] * self.dist.world
            torch.distributed.all_gather_object(rng, rng_state(self.dist))
        if not self.dist.main:
            return
        out = self.args.output_dir
        atomic_write(os.path.join(out, "checkpoint.pth"), lambda f: torch.save(self.state_dict(rng), f))
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write(os.path.join(out, "log.jsonl"), lambda f: f.write(lines.encode()))


def log(dist: Dist, *msg) -> None:
    if dist.main:
        print(*msg, flush=True)


def _fmt_time(sec: float) -> str:
    return str(datetime.timedelta(seconds=int(sec)))


def _check_step(loss_v: float, stop: bool, run: Run, epoch: int, step: int, steps: int) -> None:
    if not math.isfinite(loss_v):
        last = f"epoch {run.epoch}" if run.epoch else "none yet"
        raise BadInput(f"loss is {loss_v} at epoch {epoch} step {step}/{steps} ({run.phase}); "
                       "stopped before this update; "
                       f"last good checkpoint: {run.args.output_dir}/checkpoint.pth ({last}); try a lower --lr")
    if stop:
        raise Interrupted(_STOP["signum"] or signal.SIGTERM, f"at epoch {epoch} step {step}/{steps}")


def train_one_epoch(run: Run, loader, epoch: int, autocast) -> float:
    """One epoch of the current phase (section 6's steps, with this run's sync); returns the mean loss."""
    a, model, dist = run.args, run.model, run.dist
    selecting = run.phase == "bit_selection"
    # Table 1: the last selection epoch alternates; methods that do not search, and --bits-from, skip it (section 9)
    searching = selecting and epoch == a.search_epochs and searches(a)
    selection_step = selection_step_for(a.search)
    kind = ("meta+search" if searching else "meta") if selecting else "train"
    model.train()
    loader.sampler.set_epoch(epoch)
    if not selecting:
        set_mode(model, "selected", quant_weights=True)
    steps, t0, total, gbops = len(loader), time.time(), 0.0, float("nan")
    for step, (images, targets) in enumerate(loader, 1):
        images = images.to(dist.device, non_blocking=True)
        targets = targets.to(dist.device, non_blocking=True)

        def sync(params, loss):  # one all-reduce, then the NaN and stop checks, before the update
            loss_v, stop = sync_step(dist, params, loss)
            _check_step(loss_v, stop, run, epoch, step, steps)
            return loss_v

        if selecting:
            loss_v, _, gb = selection_step(model, images, targets, run.opt, run.opt_alpha, search=searching,
                                           lam=a.lam, target_gbops=a.target_gbops, autocast=autocast, sync=sync)
            gbops = float(gb) if searching else gbops
            if searching and dist.main:
                run.alpha_trace.append({"epoch": epoch, "step": step, "gbops": round(gbops, 4),
                                        "probs": alpha_probs(model)})
        else:
            loss_v = weight_training_step(model, images, targets, run.opt, autocast, sync)
        total += loss_v
        if dist.main and (step % a.print_freq == 0 or step == steps):
            dt = time.time() - t0
            ips = step * images.shape[0] * dist.world / max(dt, 1e-9)
            extra = f" search-gbops {gbops:.2f}" if searching else ""
            print(f"{run.phase} epoch {epoch}/{a.epochs} [{kind}] step {step}/{steps} loss {loss_v:.4f}{extra} "
                  f"lr {run.opt.param_groups[0]['lr']:.4g} {ips:.0f} img/s eta {_fmt_time(dt / step * (steps - step))}",
                  flush=True)
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: Dist, autocast) -> dict:
    """Top-1/top-5 over the whole validation set, each image counted once, totals all-reduced."""
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss sum, top1, top5, count
    for images, targets in loader:
        images, targets = images.to(dist.device, non_blocking=True), targets.to(dist.device, non_blocking=True)
        with autocast():
            logits = model(images)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == targets[:, None]
        tot += torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum").double(),
                            hit[:, 0].sum().double(), hit.any(1).sum().double(),
                            torch.tensor(float(len(targets)), device=dist.device, dtype=torch.float64)])
    dist.all_reduce_(tot)
    n = max(tot[3].item(), 1.0)
    return {"val_loss": tot[0].item() / n, "top1": 100 * tot[1].item() / n, "top5": 100 * tot[2].item() / n,
            "n": int(tot[3].item())}


def selected_pairs(model: nn.Module) -> list[tuple[int, int]]:
    """(a_bits, w_bits) that each searched layer's selected_branch stands for."""
    return [m.candidates[m.selected_branch] for m in searched_layers(model)]


def current_gbops(model: nn.Module) -> float:
    """Eq. 6 of the selected configuration; pair mode: each layer at its own W."""
    return branches_gbops(model, [m.selected_branch for m in searched_layers(model)])


def w_bits_text(w_bits) -> str:
    """--w-bits as the user wrote it: 4, or 8,4,2 (pair mode)."""
    return str(w_bits) if isinstance(w_bits, int) else ",".join(map(str, w_bits))


def bits_report(model: nn.Module, args) -> dict:
    """The content of bits.json: the searched configuration, layer by layer."""
    layers, out = quant_layers(model), []
    for m in layers:
        probs = None if m.fixed else [round(p, 6) for p in F.softmax(m.act.alpha.detach().float().cpu(), 0).tolist()]
        a_bits, w_bits = m.candidates[0 if m.fixed else m.selected_branch]
        out.append({"name": m.name, "type": m.kind, "macs": m.macs, "fixed": m.fixed,
                    "a_bits": a_bits, "w_bits": w_bits,
                    "signed": m.act.signed, "probs": probs})
    searched = [r for r in out if not r["fixed"]]
    macs = sum(r["macs"] for r in searched)
    report = {"arch": args.arch, "candidates": list(args.bits), "w_bits": args.w_bits,
              "first_last_bits": args.first_last_bits,
              "target_gbops": args.target_gbops, "gbops": current_gbops(model),
              # How the paper averages its "3.85/4" is unknown (README); three candidate readings:
              "avg_a_bits": sum(r["a_bits"] for r in searched) / len(searched),  # plain, searched layers
              "avg_a_bits_mac_weighted": sum(r["a_bits"] * r["macs"] for r in searched) / macs,
              "avg_a_bits_with_first_last": sum(r["a_bits"] for r in out) / len(out),  # plain, every layer
              "layers": out}
    if any(m.pairs for m in layers):  # Supplement, Table 7: the (A, W) pair of each entry of "probs"
        report["pairs"] = [list(c) for c in searched_layers(model)[0].candidates]
        report["avg_w_bits"] = sum(r["w_bits"] for r in searched) / len(searched)
        report["avg_w_bits_mac_weighted"] = sum(r["w_bits"] * r["macs"] for r in searched) / macs
    return report


def avg_bits_text(report: dict) -> str:
    text = (f"average activation bits {report['avg_a_bits']:.2f} "
            f"(MAC-weighted {report['avg_a_bits_mac_weighted']:.2f}, "
            f"with first/last {report['avg_a_bits_with_first_last']:.2f})")
    if "avg_w_bits" in report:
        text += f", weight bits {report['avg_w_bits']:.2f} (MAC-weighted {report['avg_w_bits_mac_weighted']:.2f})"
    return text


def layer_table(report: dict) -> str:
    """Paper Fig. 7 in text: one row per layer, a bar of its activation bits, its MOPs."""
    rows = [f"{'layer':<34} {'type':<7} {'MOPs':>8}  bits"]
    for r in report["layers"]:
        tag = " (fixed)" if r["fixed"] else ""
        bar = "#" * r["a_bits"]
        w = f"/W{r['w_bits']}" if "pairs" in report else ""  # pair mode: each layer's own W
        rows.append(f"{r['name']:<34} {r['type']:<7} {r['macs'] / 1e6:8.2f}  {bar:<8} A{r['a_bits']}{w}{tag}")
    return "\n".join(rows)


def plot_bits(report: dict, path: str) -> bool:
    """bits.png (bits and MOPs per layer) if matplotlib is installed; otherwise nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.25), 3.5))
    if "pairs" in report:  # pair mode: activation and weight bits side by side
        x = torch.arange(len(layers), dtype=torch.float64)
        ax.bar((x - 0.2).tolist(), [r["a_bits"] for r in layers], width=0.4, color="tab:blue", label="A")
        ax.bar((x + 0.2).tolist(), [r["w_bits"] for r in layers], width=0.4, color="tab:green", label="W")
        ax.legend(loc="upper left", fontsize=7)
        ax.set_ylabel("bits (A, W)")
    else:
        ax.bar(range(len(layers)), [r["a_bits"] for r in layers], color="tab:blue")
        ax.set_ylabel("activation bits")
    ax2 = ax.twinx()
    ax2.plot(range(len(layers)), [r["macs"] / 1e6 for r in layers], "o-", color="tab:orange", ms=3)
    ax2.set_ylabel("MOPs")
    ax.set_xlabel("layer (forward order)")
    ax.set_title(f"{report['arch']}: {report['gbops']:.2f} GBOPs (target {report['target_gbops']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def finish_bit_selection(run: Run, loader=None) -> None:
    """After the last search epoch: bits = argmax alpha (repaired to the budget), weight quantizers on.
    A method other than metamix selects its own way (section 9; `loader` feeds the proxies). Then the
    supplement's Figure 9 analysis (section 10) adds Hessian traces to bits.json; it changes nothing else."""
    a, model = run.args, run.model
    extra: dict = {}
    if searches(a):
        run.selected_branches, gb, repaired = start_weight_training(model, a.target_gbops,
                                                                    repair=not a.no_budget_repair)
    else:
        run.selected_branches, extra = baseline_selection(run, loader)
        apply_selection(model, run.selected_branches)
        switch_to_weight_training(model)
        gb, repaired = current_gbops(model), False
    run.build_optimizers("weight_training")
    report = bits_report(model, a)
    report["search"] = "bits-from" if a.bits_from else a.search
    proxy, traces = extra.pop("proxy", None), extra.pop("hessian_traces", None)
    report.update(extra)
    if proxy is not None:  # each searched layer's score per candidate, in the order of "candidates"
        report["proxy"] = {k: v for k, v in proxy.items() if k != "scores"}
        for r, sc in zip([r for r in report["layers"] if not r["fixed"]], proxy["scores"]):
            r["scores"] = [round(v, 8) for v in sc]
    fig9_line = figure9_analysis(run, loader, report, traces)  # section 10, rank 0; changes nothing in the run
    if run.dist.main:
        print(layer_table(report))
        note = " (argmax was over the target: lowered by budget repair)" if repaired else ""
        flag = "" if gb <= a.target_gbops + 1e-9 else "  OVER TARGET"
        print(f"selected: {report['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}{flag}{note}; "
              f"{avg_bits_text(report)}",
              flush=True)
        if fig9_line:
            print(fig9_line, flush=True)
        atomic_write(os.path.join(a.output_dir, "bits.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
        if run.alpha_trace:  # the alpha trajectory of the search epoch
            trace = {"layers": [m.name for m in searched_layers(model)], "candidates": list(a.bits),
                     "alpha_optimizer": a.alpha_optimizer, "alpha_lr": a.alpha_lr, "steps": run.alpha_trace}
            if not isinstance(a.w_bits, int):  # pair mode: the (A, W) pair of each probability
                trace["pairs"] = [list(c) for c in searched_layers(model)[0].candidates]
            atomic_write(os.path.join(a.output_dir, "alphas.json"), lambda f: f.write(json.dumps(trace).encode()))
        plot_bits(report, os.path.join(a.output_dir, "bits.png"))
        plot_figure9(report, os.path.join(a.output_dir, "figure9.png"))


def train(run: Run, train_loader, val_loader, calib, autocast) -> None:
    """Both phases, from wherever the run stands (fresh or resumed)."""
    a, model, dist = run.args, run.model, run.dist
    if run.epoch == 0:
        # Data-dependent init on every rank from the same batch, then rank 0's values for all.
        init_quantizers(model, calib.to(dist.device))
        broadcast_model(dist, model)
        run.summary["fp_top1"] = evaluate(model, val_loader, dist, autocast)["top1"]
        log(dist, f"full-precision top-1 before quantization: {run.summary['fp_top1']:.2f}%")
    for epoch in range(run.epoch + 1, a.epochs + 1):
        phase, t0 = run.phase, time.time()
        loss = train_one_epoch(run, train_loader, epoch, autocast)
        lr = run.opt.param_groups[0]["lr"]  # the rate this epoch trained with
        if phase == "bit_selection" and epoch == a.search_epochs:
            finish_bit_selection(run, train_loader)
        elif phase == "bit_selection":
            apply_selection(model, argmax_branches(model))
            set_mode(model, "selected", quant_weights=False)
        if run.sched is not None and phase == "weight_training":
            run.sched.step()
        sync_bn_stats(dist, model)
        in_sync = replicas_in_sync(dist, model)
        if not in_sync:
            raise RuntimeError(f"replicas out of sync after epoch {epoch}: parameters differ between ranks")
        metrics = evaluate(model, val_loader, dist, autocast)
        run.summary["seconds"][phase] += time.time() - t0
        rec = {"epoch": epoch, "phase": phase, "loss": loss, **metrics, "gbops": current_gbops(model),
               "lr": lr, "seconds": round(time.time() - t0, 3)}
        if dist.world > 1:
            rec["replicas_in_sync"] = in_sync
        run.history.append(rec)
        run.epoch = epoch
        run.save()
        log(dist, f"epoch {epoch}/{a.epochs} {phase}: loss {loss:.4f} top-1 {metrics['top1']:.2f}% top-5 "
                  f"{metrics['top5']:.2f}% {rec['gbops']:.3f} GBOPs ({rec['seconds']:.1f}s)")
        if a.stop_after_epoch and epoch >= a.stop_after_epoch and epoch < a.epochs:
            log(dist, f"stopping after epoch {epoch} as asked (--stop-after-epoch); continue with --resume auto")
            return
    if dist.main and run.history:
        s, last = run.summary, run.history[-1]
        print(f"summary: full-precision top-1 {s['fp_top1']:.2f}% -> final top-1 {last['top1']:.2f}% "
              f"(top-5 {last['top5']:.2f}%); {last['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}; "
              f"{avg_bits_text(bits_report(model, a))} with W{w_bits_text(a.w_bits)}; "
              f"bit selection {_fmt_time(s['seconds']['bit_selection'])}, "
              f"weight training {_fmt_time(s['seconds']['weight_training'])}", flush=True)


# ---- command line ----------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MetaMix mixed-precision activation quantization (AAAI 2024)",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="torchvision classification model")
    p.add_argument("--data", default="synthetic", help="'synthetic' (built in) or a folder with train/ and val/")
    p.add_argument("--target-gbops", type=float, default=None,
                   help="budget in GBOPs (default: the paper's, else 95%% of A4)")
    p.add_argument("--bits", default=None, help="candidate activation bits (default: resnet18 8,4,2; MobileNets 8,4,3)")
    p.add_argument("--w-bits", default="4", help="weight bit-width of every searched layer; a list (e.g. 8,4,2) "
                   "searches (A, W) pairs, the supplement's extension: candidates --bits x --w-bits")
    p.add_argument("--first-last-bits", type=int, default=8, help="weight and input bits of the first and last layers")
    p.add_argument("--lam", type=float, default=None, help="lambda of Eq. 3 (default per arch: 0.4 / 1 / 4)")
    p.add_argument("--search-epochs", type=int, default=2, help="bit-selection epochs; the last also searches")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (default: 90 / 140; synthetic 8)")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per step")
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate (default: 0.01 with --pretrained or --init, "
                   "0.05 synthetic or a folder from scratch)")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay of conv/linear weights")
    p.add_argument("--alpha-lr", type=float, default=None,
                   help="alpha LR (default: sgd 0.005 / 0.05 small data; adam 0.01 / 0.1)")
    p.add_argument("--workers", type=int, default=8, help="data loader workers per process (ImageFolder)")
    p.add_argument("--image-size", type=int, default=None, help="training crop (default: 224 ImageNet, 32 synthetic)")
    p.add_argument("--bops-image-size", type=int, default=224, help="resolution at which MACs/BOPs are counted")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: from the data; 1000 for --dry-run)")
    p.add_argument("--pretrained", nargs="?", const="paper", default=None, metavar="WEIGHTS",
                   help="start from torchvision weights; bare: those closest to the paper's FP baseline "
                        "(resnet18 and mobilenet_v2 IMAGENET1K_V1, mobilenet_v3_large IMAGENET1K_V2)")
    p.add_argument("--init", default=None, metavar="PATH", help="start from a local full-precision state dict")
    p.add_argument("--output-dir", default="runs/metamix", help="checkpoint.pth, bits.json, log.jsonl, args.json")
    p.add_argument("--resume", default=None, metavar="PATH|auto", help="continue a run ('auto': output-dir's)")
    p.add_argument("--stop-after-epoch", type=int, default=0, help="end cleanly after this epoch (time-limited slots)")
    p.add_argument("--no-budget-repair", action="store_true", help="keep argmax bits even if over the target")
    p.add_argument("--evaluate", action="store_true", help="only evaluate (the --resume checkpoint, or the FP model)")
    p.add_argument("--dry-run", action="store_true", help="print layers, MACs, feasible GBOPs; no training")
    p.add_argument("--export", action="store_true", help="write model_int.pth (integer weights, scales) at the end "
                   "and check it; with --resume: export that checkpoint, no training")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (data order, synthetic data, init)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (quantizer math stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the quantizer's elementwise kernels")
    p.add_argument("--print-freq", type=int, default=20, help="steps between progress lines")
    p.add_argument("--synthetic-train", type=int, default=2560, help="synthetic training images")
    p.add_argument("--synthetic-val", type=int, default=1000, help="synthetic validation images")
    p.add_argument("--synthetic-classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--dist-timeout", type=float, default=30.0, help="minutes a collective may wait for a peer")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    # section 9: other selections through the same pipeline
    p.add_argument("--search", default="metamix", help="selection: " + ", ".join(SEARCH_METHODS))
    p.add_argument("--bits-from", default=None, metavar="FILE",
                   help="select these bits: a bits.json, {layer: a_bits}, or with a --w-bits list {layer: [a, w]}")
    p.add_argument("--alpha-optimizer", default="sgd",
                   help="optimizer of the alphas: sgd (momentum 0.9; the digits study's choice) "
                   "or adam (betas 0.5/0.999)")
    p.add_argument("--proxy-batches", type=int, default=4,
                   help="training batches the hessian/sensitivity proxies (and the Figure 9 analysis) use")
    p.add_argument("--hutchinson-probes", type=int, default=4,
                   help="Rademacher probes per batch (--search hessian and the Figure 9 analysis)")
    p.add_argument("--no-figure9", action="store_true", help="skip the supplement's Figure 9 analysis at the end of "
                   "bit selection (Hessian traces vs the selected bits; bits.json, figure9.png)")
    return p


def _parse_bits(text: str, flag: str) -> list[int]:
    try:
        bits = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise BadInput(f"{flag} {text!r}: expected comma-separated integers such as 8,4,2") from None
    if not bits:
        raise BadInput(f"{flag} {text!r}: no bit-width given")
    for b in bits:
        _check_bits(b, flag)
    if len(set(bits)) != len(bits):
        raise BadInput(f"{flag} {text!r}: duplicate bit-widths")
    return bits


def _check_bits(b: int, flag: str) -> None:
    if not 2 <= b <= 16:
        raise BadInput(f"{flag} {b}: bit-widths must be between 2 and 16")


def resolve_args(args) -> argparse.Namespace:
    """Fill per-arch and per-data defaults and reject bad values before anything heavy happens."""
    archs = classification_archs()
    if args.arch not in archs:
        raise BadInput(f"--arch {args.arch!r} is not a torchvision classification model; "
                       f"choose one of: {', '.join(archs)}")
    d = arch_defaults(args.arch)
    synthetic = args.data == "synthetic"
    args.bits = _parse_bits(args.bits if args.bits is not None else d["bits"], "--bits")
    w_bits = _parse_bits(args.w_bits if isinstance(args.w_bits, str) else w_bits_text(args.w_bits), "--w-bits")
    args.w_bits = w_bits[0] if len(w_bits) == 1 else w_bits  # one width: the paper; several: pair mode
    _check_bits(args.first_last_bits, "--first-last-bits")
    args.lam = d["lam"] if args.lam is None else args.lam
    args.epochs = (8 if synthetic else d["epochs"]) if args.epochs is None else args.epochs
    check_search_args(args)
    args.scratch_defaults = apply_scratch_defaults(args) if scratch_folder(args) else []  # section 9
    args.lr = (0.05 if synthetic else 0.01) if args.lr is None else args.lr
    # the synthetic search epoch is 40 steps, an ImageNet one thousands: the alphas need a larger rate to move
    args.alpha_lr = ALPHA_LR[args.alpha_optimizer][synthetic] if args.alpha_lr is None else args.alpha_lr
    args.image_size = (32 if synthetic else 224) if args.image_size is None else args.image_size
    if args.pretrained:
        args.pretrained = str(resolve_weights(args.arch, args.pretrained))  # e.g. ResNet18_Weights.IMAGENET1K_V1
    for flag, v, lo in (("--search-epochs", args.search_epochs, 1), ("--batch-size", args.batch_size, 1),
                        ("--image-size", args.image_size, 16), ("--bops-image-size", args.bops_image_size, 16),
                        ("--print-freq", args.print_freq, 1), ("--stop-after-epoch", args.stop_after_epoch, 0)):
        if v < lo:
            raise BadInput(f"{flag} {v}: must be at least {lo}")
    if args.epochs < args.search_epochs:
        raise BadInput(f"--epochs {args.epochs} is fewer than --search-epochs {args.search_epochs}")
    for flag, v in (("--lr", args.lr), ("--alpha-lr", args.alpha_lr)):
        if not (v > 0 and math.isfinite(v)):
            raise BadInput(f"{flag} {v}: must be a positive number")
    if args.lam < 0 or not math.isfinite(args.lam):
        raise BadInput(f"--lam {args.lam}: must be a non-negative number")
    if args.amp and not torch.cuda.is_available():
        raise BadInput("--amp needs a CUDA device and none is available; run without --amp")
    if args.resume and args.dry_run:
        raise BadInput("--resume and --dry-run do not go together")
    if args.export and (args.evaluate or args.dry_run):
        raise BadInput(f"--export and {'--evaluate' if args.evaluate else '--dry-run'} do not go together")
    for flag, v in (("--proxy-batches", args.proxy_batches), ("--hutchinson-probes", args.hutchinson_probes)):
        if v < 1:
            raise BadInput(f"{flag} {v}: must be at least 1")
    return args


def default_target(model: nn.Module, args) -> tuple[float, str]:
    """(GBOPs, why): the paper's target for its three archs in its setting (its candidates, W4,
    first/last at 8 bits, BOPs at 224 px); otherwise (our choice) 95% of uniform A4, which the L1
    term of Eq. 4 keeps pushing toward, where uniform A4 itself would be an exact zero of it."""
    paper = PAPER_SETTINGS.get(args.arch)
    setting = (",".join(map(str, args.bits)), args.w_bits, args.first_last_bits, args.bops_image_size)
    if paper and setting == (paper["bits"], 4, 8, 224):  # a --w-bits list (pair mode) never matches
        return paper["target_gbops"], f"the paper's for {args.arch}"
    layers = searched_layers(model)
    pairs = not isinstance(args.w_bits, int)  # pair mode: the level of the paper's single-W setting, A4/W4
    a4 = config_gbops([m.macs for m in layers], [4] * len(layers), 4 if pairs else args.w_bits, c_fixed_of(model))
    return 0.95 * a4, "95% of uniform A4/W4" if pairs else "95% of uniform A4"


def check_budget(model: nn.Module, args, dry: bool = False) -> tuple[float, float]:
    """The feasible range; fills in the default target, and refuses an infeasible one (a dry run
    only reports an infeasible default: the user is still looking for a budget)."""
    lo, hi = gbops_range(model)
    given = args.target_gbops is not None
    if not given:
        args.target_gbops, why = default_target(model, args)
    if not (lo - 1e-6 <= args.target_gbops <= hi + 1e-6) or not math.isfinite(args.target_gbops):
        if dry and not given:
            args.target_gbops = None
            return lo, hi
        what = f"--target-gbops {args.target_gbops:g}" if given else \
            f"the default target {args.target_gbops:.4g} GBOPs ({why}; set --target-gbops)"
        raise BadInput(f"{what} is outside the feasible range [{lo:.3f}, {hi:.3f}] GBOPs "
                       f"for {args.arch} with bits {','.join(map(str, args.bits))}, w-bits {w_bits_text(args.w_bits)}, "
                       f"first/last at {args.first_last_bits} bits")
    return lo, hi


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True


def prepare_output_dir(args) -> str | None:
    """Create and probe the output folder; return the checkpoint to resume, if any."""
    out = args.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"--output-dir {out}: not writable ({e.strerror or e})") from None
    for name in os.listdir(out):  # temporary files of writers killed mid-write (atomic_write)
        pid = name.rsplit(".tmp.", 1)[-1] if ".tmp." in name else ""
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(out, name))
    ck = os.path.join(out, "checkpoint.pth")
    if args.resume == "auto":
        return ck if os.path.exists(ck) else None
    if args.resume:
        return args.resume
    if os.path.exists(ck) and not args.evaluate:
        raise BadInput(f"--output-dir {out} already holds checkpoint.pth; continue it with --resume auto, "
                       "or choose another --output-dir")
    return None


def dry_run(model: nn.Module, args, lo: float, hi: float) -> None:
    layers = quant_layers(model)
    width = 12 if isinstance(args.w_bits, int) else 18
    print(f"{'#':>3} {'layer':<34} {'type':<7} {'MACs':>12}  {'bits':<{width}} input")
    for i, m in enumerate(layers):
        a_bits = str(m.act.bits[0]) if m.fixed else "{" + ",".join(map(str, m.act.bits)) + "}"
        w_bits = "{" + ",".join(map(str, m.w_widths)) + "}" if m.pairs else str(m.w_widths[0])
        bits = f"A{a_bits}/W{w_bits}" + (" fixed" if m.fixed else "")
        sign = "unknown until the first batch" if m.act.signed is None else ("signed" if m.act.signed else "unsigned")
        if i == 0:
            sign = "signed (normalised image)"
        print(f"{i:>3} {m.name:<34} {m.kind:<7} {m.macs:>12,}  {bits:<{width}} {sign}")
    macs = sum(m.macs for m in layers)
    print(f"{len(layers)} quantized layers, {macs / 1e6:.2f} MMACs at {args.bops_image_size}px; "
          f"feasible range {lo:.3f} .. {hi:.3f} GBOPs (first/last at {args.first_last_bits} bits); "
          + (f"target {args.target_gbops:.3f}" if args.target_gbops is not None else
             "the default target is outside it: set --target-gbops"))
    print(json.dumps({"arch": args.arch, "bits": args.bits, "w_bits": args.w_bits,
                      "first_last_bits": args.first_last_bits,
                      "layers": len(layers), "macs": macs, "gbops_min": lo, "gbops_max": hi,
                      "target_gbops": args.target_gbops, "c_fixed_gbops": c_fixed_of(model)}))


def run_main(args) -> int:
    args = resolve_args(args)
    if args.dry_run:
        torch.manual_seed(args.seed)
        model = build_model(args, num_classes_hint(args, dry=True))
        check_uniform_fits(model, args)
        lo, hi = check_budget(model, args, dry=True)
        check_search(model, args)
        dry_run(model, args, lo, hi)
        return 0
    torch.manual_seed(args.seed)
    model = build_model(args, num_classes_hint(args))
    check_uniform_fits(model, args)
    lo, hi = check_budget(model, args)  # before any folder is made or data is read
    check_search(model, args)
    resume = prepare_output_dir(args)
    dist = Dist(args.dist_timeout)
    try:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _on_signal)
        model.to(dist.device)
        # the model was built from the common seed (and is broadcast after init); data order,
        # augmentation, loader workers and dropout get a per-rank seed
        random.seed(args.seed + dist.rank)
        torch.manual_seed(args.seed + dist.rank)
        train_set, val_set, n_classes = build_datasets(args)
        if n_classes != quant_layers(model)[-1].weight.shape[0]:
            raise BadInput(f"the model has {quant_layers(model)[-1].weight.shape[0]} classes, the data {n_classes}")
        train_loader, val_loader, calib = build_loaders(args, dist, train_set, val_set)
        run = Run(args, dist, model)
        if resume:
            run.load_state_dict(load_file(resume, "--resume"), resume)
            log(dist, f"resumed {resume} after epoch {run.epoch} ({run.phase})")
            if args.export:  # export that checkpoint as it stands (section 8)
                export_run(run, val_loader)
                return 0
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
        if args.compile:
            compile_quantizer_kernels()
        if args.evaluate:
            if not resume:
                set_mode(model, "fp")
            m = evaluate(model, val_loader, dist, autocast)
            log(dist, json.dumps({**m, "gbops": current_gbops(model) if resume else None}))
            return 0
        if dist.main:
            text = json.dumps(vars(args), indent=1).encode()
            atomic_write(os.path.join(args.output_dir, "args.json"), lambda f: f.write(text))
            pairs = "" if isinstance(args.w_bits, int) else \
                f" ({len(args.bits) * len(args.w_bits)} (A, W) pairs per layer, the supplement's extension)"
            log(dist, f"metamix {args.arch}: candidates {args.bits}, W{w_bits_text(args.w_bits)}{pairs}, "
                      f"lambda {args.lam}, target "
                      f"{args.target_gbops:.3f} GBOPs (feasible {lo:.3f} .. {hi:.3f}), {args.epochs} epochs "
                      f"({args.search_epochs} bit selection), world size {dist.world} on {dist.device.type}")
            if args.pretrained:
                log(dist, pretrained_note(args))
            if args.search != "metamix" or args.bits_from:
                log(dist, f"selection: {'--bits-from ' + args.bits_from if args.bits_from else args.search} "
                          "(same schedule; only the selection at the end of bit selection differs)")
            if args.scratch_defaults:
                log(dist, "defaults for a folder trained from scratch (no --pretrained, no --init): "
                          + ", ".join(args.scratch_defaults))
        train(run, train_loader, val_loader, calib, autocast)
        if args.export:
            if run.epoch == args.epochs:
                export_run(run, val_loader)
            else:
                log(dist, f"export: not written, the run stopped after epoch {run.epoch}; after it finishes, "
                          "run with --resume auto --export")
        return 0
    finally:
        dist.close()


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if "Original Traceback" in text:  # an error raised in a DataLoader worker: keep its last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


def main(args) -> int:
    """Run, and turn every failure into one line on stderr and an exit status."""
    try:
        return run_main(args)
    except BadInput as e:
        if args.debug:
            raise
        print(f"metamix: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"metamix: {e}; the last checkpoint is in {args.output_dir}; continue with --resume auto",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"metamix: interrupted; the last checkpoint is in {args.output_dir}; continue with --resume auto",
              file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if _STOP["signum"]:  # e.g. Ctrl-C reached the DataLoader workers first
            print(f"metamix: interrupted by {signal.Signals(_STOP['signum']).name}; the last checkpoint is in "
                  f"{args.output_dir}; continue with --resume auto", file=sys.stderr)
            return 128 + _STOP["signum"]
        if "Original Traceback" in str(e) and "BadInput" in str(e):
            print(f"metamix: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"metamix: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


# =====================================================================================
# 8. Beyond the paper: integer export
# =====================================================================================
# The trained network as integers (--export writes model_int.pth). Per quantized layer: its
# weight codes packed at w_bits, its activation and weight steps, its bias; everything else
# (BN, anything not quantized) as a float state dict. An IntegerLayer computes what the
# QuantLayer computes, in integers:
#     q_a = round(clamp(x / s_a, Qn, Qp))      the activation's codes, as training computes them
#     acc = op(q_a, q_w)                       code x code, summed exactly (see IntegerLayer)
#     y   = s_a * s_w * acc + bias
# The op is bilinear, op(s_a q_a, s_w q_w) = s_a s_w op(q_a, q_w): the fake-quantized forward
# and this one differ only by float rounding. BN, activations, pooling and residual adds stay
# float. Our choice, not the paper's (it has no deployment section).

INT_FORMAT = "metamix-int-1"


def _slot_bits(bits: int) -> int:
    """Bits each code occupies when packed: 2 (2-bit, four per byte), 4 (3-4 bits, two per byte),
    8 (5-8 bits, one per byte), 16 (9-16 bits, two bytes, low byte first)."""
    for slot in (2, 4, 8, 16):
        if bits <= slot:
            return slot
    raise ValueError(f"cannot pack {bits}-bit codes (at most 16)")


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    slot = _slot_bits(bits)
    return numel * 2 if slot == 16 else -(-numel // (8 // slot))


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (any shape, any dtype holding integers in [Qn, Qp]) -> flat uint8.

    Each code is stored as the unsigned offset u = code - Qn in [0, 2^bits - 1], so signed and
    unsigned codes pack the same way (our choice). Row-major order; code j of a byte sits in
    bits [j*slot, (j+1)*slot) of it (the first code in the low bits); the last byte is
    zero-padded. Unpack with `unpack_codes(packed, bits, signed, codes.numel())`.
    """
    qn, qp = lsq_range(bits, signed)
    c = codes.detach().reshape(-1).cpu()
    if c.is_floating_point() and not torch.equal(c, c.round()):
        raise ValueError("codes must be integers")
    u = c.to(torch.int64) - qn
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > qp - qn):
        raise ValueError(f"codes outside [{qn}, {qp}] for {bits}-bit {'signed' if signed else 'unsigned'}")
    slot = _slot_bits(bits)
    if slot == 16:
        return torch.stack([u & 255, u >> 8], 1).reshape(-1).to(torch.uint8)
    per = 8 // slot
    u = F.pad(u, (0, (-u.numel()) % per)).reshape(-1, per)
    return (u << (torch.arange(per) * slot)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, numel: int) -> torch.Tensor:
    """The inverse of pack_codes: flat uint8 -> (numel,) int64 codes in [Qn, Qp]."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel, bits):
        raise ValueError(f"expected {packed_size(numel, bits)} packed bytes (uint8, flat) for {numel} {bits}-bit "
                         f"codes, got {tuple(packed.shape)} {packed.dtype}")
    qn = lsq_range(bits, signed)[0]
    b = packed.cpu().to(torch.int64)
    slot = _slot_bits(bits)
    if slot == 16:
        u = b[0::2] | (b[1::2] << 8)
    else:
        per = 8 // slot
        u = ((b[:, None] >> (torch.arange(per) * slot)) & (2**slot - 1)).reshape(-1)
    return u[:numel] + qn


def export_layer(m: QuantLayer) -> dict:
    """One QuantLayer at its selected bits (weight training) as plain tensors and builtins.

    Steps are the ones the forward uses, positive(s), as Python floats (a float32 value is
    exact in a Python float). The weight codes are computed as training computes them
    (`_lsq_codes` on the float32 weight) and packed by `pack_codes`.
    """
    branch, w_branch = m.split(0 if m.fixed else m.selected_branch)  # pair mode: the selected (A, W) pair
    w_quant = m.weight_quants[w_branch] if m.pairs else m.weight_quant
    if not w_quant.enabled or not w_quant.initialized or m.act.signed is None:
        raise ValueError(f"{m.name}: not in weight training (weights not quantized yet); nothing to export")
    a_bits, w_bits = m.act.bits[branch], w_quant.bits
    with torch.no_grad():
        a_step = positive(m.act.step.detach()[branch : branch + 1]).item()
        w_step_t = positive(w_quant.step.detach())
        qn, qp = lsq_range(w_bits, True)
        codes = _lsq_codes(m.weight.detach().float(), w_step_t, qn, qp)
    entry = {"name": m.name, "order": m.order, "kind": m.op.kind, "fixed": m.fixed,
             "weight_shape": list(m.weight.shape)}
    if m.op.kind == "conv2d":
        entry.update(stride=list(m.op.stride), padding=list(m.op.padding), dilation=list(m.op.dilation),
                     groups=m.op.groups)
    entry.update(a_bits=a_bits, a_signed=bool(m.act.signed), a_step=a_step,
                 w_bits=w_bits, w_signed=True, w_step=w_step_t.item(), w_packed=pack_codes(codes, w_bits, True),
                 bias=None if m.bias is None else m.bias.detach().float().cpu().clone())
    return entry


def integer_export(model: nn.Module, arch: str, num_classes: int, bits_report: dict | None = None) -> dict:
    """The content of model_int.pth: every quantized layer in forward order (export_layer), and
    the float state of the rest, keyed as in the torchvision model. Loads with weights_only=True."""
    layers = quant_layers(model)
    prefixes = tuple(m.name + "." for m in layers)
    float_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                   if torch.is_tensor(v) and not k.startswith(prefixes)}
    return {"format": INT_FORMAT, "arch": arch, "num_classes": int(num_classes),
            "packing": "codes stored as code - Qn; 2-bit four per byte, 3-4 bit two, 5-8 bit one, 9-16 bit two "
                       "bytes (low first); first code in the low bits; row-major",
            "layers": [export_layer(m) for m in layers], "float_state": float_state, "bits_report": bits_report}


class IntegerLayer(nn.Module):
    """An exported Conv2d or Linear on integer codes: y = s_a * s_w * op(q_a, q_w) + bias.

    The input is rounded to codes by the training formula itself (`_lsq_codes`: round(clamp(x /
    positive(s_a), Qn, Qp)), round half to even) on a float32 step, so the same x gives the same
    codes. The accumulation runs in float64 on integer values and is exact, as an int32 would
    be: every product and every partial sum is an integer, and float64 represents (and adds)
    integers exactly below 2^53. |acc| <= fan_in * max|q_a| * max|q_w|; at 8-bit activations and
    weights that is fan_in * 255 * 128 < fan_in * 2^15, exact up to fan_in 2^38 (int32 would
    hold up to 2^16; ResNet-18's largest fan-in is 4608, MobileNet-v3's 1280). The constructor
    refuses a layer whose bound reaches 2^53. The convolution runs with cuDNN off, so that it is
    a direct or im2col + GEMM sum of products (no Winograd/FFT transforms, which would not be
    exact); on the CPU, float64 convolutions never use those. The scale and the bias are applied
    in float64, and the result is cast to the input's float dtype.
    """

    def __init__(self, entry: dict):
        super().__init__()
        self.name, self.kind = entry["name"], entry["kind"]
        shape = [int(v) for v in entry["weight_shape"]]
        if self.kind == "conv2d":
            self.op = LayerOp("conv2d", tuple(entry["stride"]), tuple(entry["padding"]), tuple(entry["dilation"]),
                              int(entry["groups"]))
        elif self.kind == "linear":
            self.op = LayerOp("linear")
        else:
            raise ValueError(f"{self.name}: unknown layer kind {self.kind!r}")
        self.a_bits, self.a_signed, self.w_bits = int(entry["a_bits"]), bool(entry["a_signed"]), int(entry["w_bits"])
        self.a_qrange = lsq_range(self.a_bits, self.a_signed)
        fan_in = math.prod(shape[1:])
        bound = fan_in * max(abs(v) for v in self.a_qrange) * max(abs(v) for v in lsq_range(self.w_bits, True))
        if bound >= 2**53:
            raise ValueError(f"{self.name}: |accumulator| may reach {bound} >= 2^53, not exact in float64")
        codes = unpack_codes(entry["w_packed"], self.w_bits, bool(entry["w_signed"]), math.prod(shape))
        # not persistent: the layer is rebuilt from the export entry, never from a state dict
        self.register_buffer("w_codes", codes.reshape(shape).to(torch.float64), persistent=False)
        self.register_buffer("a_step", torch.tensor(float(entry["a_step"]), dtype=torch.float32), persistent=False)
        bias = entry["bias"]
        self.register_buffer("bias", None if bias is None else bias.to(torch.float64), persistent=False)
        self.scale = float(entry["a_step"]) * float(entry["w_step"])  # s_a * s_w, a float64 product

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """q_a: the input's codes, as training computes them (float tensor of integers)."""
        return _lsq_codes(_upcast(x), positive(self.a_step), *self.a_qrange)

    def accumulate(self, q: torch.Tensor) -> torch.Tensor:
        """op(q_a, q_w) in float64, exact (the int32 accumulator); q_a as from `codes`."""
        with torch.backends.cudnn.flags(enabled=False):
            return _op_forward(q.to(torch.float64), self.w_codes, None, self.op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _upcast(x).dtype
        y = self.accumulate(self.codes(x)) * self.scale
        if self.bias is not None:
            y = y + (self.bias if self.kind == "linear" else self.bias[:, None, None])
        return y.to(dtype)

    def extra_repr(self):
        return f"{self.kind}, A{self.a_bits}{'s' if self.a_signed else 'u'}/W{self.w_bits}, " \
               f"weight {tuple(self.w_codes.shape)}"


def integer_model(export: dict, model: nn.Module | None = None) -> nn.Module:
    """The model of an export (integer_export's dict) with an IntegerLayer in place of each quantized
    Conv2d and Linear and the float state loaded; in eval mode, on the CPU. `model` is the float
    architecture, unpatched (its values are replaced); by default torchvision's `export["arch"]`."""
    if not isinstance(export, dict) or export.get("format") != INT_FORMAT:
        raise ValueError(f"not a metamix integer export (format {INT_FORMAT})")
    if model is None:
        import torchvision

        model = torchvision.models.get_model(export["arch"], weights=None, num_classes=export["num_classes"])
    for entry in export["layers"]:
        name = entry["name"]
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Conv2d, nn.Linear)) or list(old.weight.shape) != list(entry["weight_shape"]):
            raise ValueError(f"{name}: the export's layer does not fit the model's {type(old).__name__}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, IntegerLayer(entry))
    model.load_state_dict(export["float_state"])  # strict: exactly the rest of the model
    return model.eval()


def load_integer_model(path: str, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the integer model from model_int.pth (see integer_model)."""
    return integer_model(torch.load(path, map_location="cpu", weights_only=True), model)


# ---- export in the driver (--export) -----------------------------------------------------


def _saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@torch.no_grad()
def compare_logits(model: nn.Module, int_model: nn.Module, loader, dist: Dist) -> dict:
    """The fake-quantized model against the integer model on the whole validation set, in float32.

    End to end: top-1 of each, the largest logit difference, the largest |logit|, and on how
    many images the argmax differs. Layer by layer: each IntegerLayer is also run on the very
    input its QuantLayer got, and `layer_rel_diff` is the largest max|y_int - y_fq| / max|y_fq|.
    On the same input both round to the same codes, so only float summation order is left;
    end to end, an activation that sits on a rounding boundary (x/s = k + 0.5) can round the
    other way after a last-bit difference in an earlier float32 sum, and that moves the
    logits by more. Totals and maxima are over all ranks.
    """
    model.eval()
    int_model.eval()
    dev = dist.device
    int_layers = {n: m for n, m in int_model.named_modules() if isinstance(m, IntegerLayer)}
    layer_rel = torch.zeros((), dtype=torch.float64, device=dev)

    def same_input(mod, inp, out):  # forward hook on each QuantLayer
        nonlocal layer_rel
        ref = out.float()
        d = (int_layers[mod.name](inp[0]).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        layer_rel = torch.maximum(layer_rel, d.double())

    handles = [m.register_forward_hook(same_input) for m in quant_layers(model)]
    tot = torch.zeros(4, dtype=torch.float64, device=dev)  # top1 fake-quantized, top1 integer, argmax differs, n
    mx = torch.zeros(2, dtype=torch.float64, device=dev)  # largest |difference|, largest |logit|
    try:
        for images, targets in loader:
            images, targets = images.to(dev), targets.to(dev)
            a, b = model(images).float(), int_model(images).float()
            pa, pb = a.argmax(1), b.argmax(1)
            tot += torch.stack([(pa == targets).sum(), (pb == targets).sum(), (pa != pb).sum(),
                                torch.tensor(len(targets), device=dev)]).double()
            mx = torch.maximum(mx, torch.stack([(a - b).abs().max(), a.abs().max()]).double())
    finally:
        for h in handles:
            h.remove()
    mx = torch.cat([mx, layer_rel.reshape(1)])
    if dist.world > 1:
        torch.distributed.all_reduce(tot)
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
    n = max(tot[3].item(), 1.0)
    return {"top1_fake_quant": 100 * tot[0].item() / n, "top1_integer": 100 * tot[1].item() / n,
            "argmax_differs": int(tot[2].item()), "n": int(tot[3].item()),
            "max_logit_diff": mx[0].item(), "max_abs_logit": mx[1].item(), "layer_rel_diff": mx[2].item()}


@torch.no_grad()
def float64_logit_diff(model: nn.Module, int_model: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """(largest |logit difference|, largest |logit|) of copies of both models run in float64 on `images`.

    Without float32 rounding no code sits close enough to a rounding boundary to flip, so this
    checks the whole model end to end (BN, residual adds, wiring). The fake-quantized copy's weights
    are set to s_w * q_w with the float32 codes, so that its own float64 division finds the same codes.
    """
    fq, im = copy.deepcopy(model).eval(), copy.deepcopy(int_model).eval()
    for m in quant_layers(fq):
        w_quant = m.weight_quants[m.split(m.selected_branch)[1]] if m.pairs else m.weight_quant
        s_w = positive(w_quant.step)
        qn, qp = lsq_range(w_quant.bits, True)
        m.weight.copy_(_lsq_forward(m.weight.float(), s_w.float(), qn, qp))
    a, b = fq.double()(images.double()), im.double()(images.double())
    return (a - b).abs().max().item(), a.abs().max().item()


# Our choice of what "float summation order" explains. Layer by layer, on the same input, float32
# sums differ from the exact ones by about 1e-7..1e-5 of the output's scale: the tolerance is 1e-4.
# End to end there is no such bound: a code that sits on a rounding boundary flips with the last
# bit of an earlier sum, and the step it moves by propagates (while the fake-quantized op summed
# s_a q_a x s_w q_w, one flipped code moved logits by half their scale, no layer differing by more
# than 1e-6; now that it sums codes too, we measured 1e-7). So end to end we only ask that
# the argmax agree on all but 1% of the images (and one more); a wrong scale, code, bias or BN
# state changes most of them. In float64 (float64_logit_diff) the two agree to about 1e-15.
LAYER_REL_TOL, FLOAT64_REL_TOL = 1e-4, 1e-9


def export_agrees(p: dict) -> bool:
    """Whether compare_logits' result is explained by float summation order (see above)."""
    return (p["layer_rel_diff"] <= LAYER_REL_TOL and p["argmax_differs"] <= 0.01 * p["n"] + 1
            and p.get("float64_diff", 0.0) <= FLOAT64_REL_TOL * max(p.get("float64_scale", 1.0), 1.0))


def export_run(run: Run, val_loader) -> str:
    """--export: write model_int.pth, then prove it: the integer model against the fake-quantized
    one on the validation set, and the file's size against FP32's. Returns the file's path."""
    a, model, dist = run.args, run.model, run.dist
    if run.phase == "bit_selection":
        raise BadInput(f"--export: the run is still in bit selection (epoch {run.epoch} of {a.search_epochs}): "
                       "bits are not chosen and weights not quantized yet; export a weight-training checkpoint")
    layers = quant_layers(model)
    report = bits_report(model, a)
    export = integer_export(model, a.arch, layers[-1].weight.shape[0], report)
    data = _saved_bytes(export)
    path = os.path.join(a.output_dir, "model_int.pth")
    if dist.main:
        atomic_write(path, lambda f: f.write(data))
    # the proof runs on what was written: the file on rank 0, the same bytes on the other ranks
    source = path if dist.main else io.BytesIO(data)
    int_model = integer_model(torch.load(source, map_location="cpu", weights_only=True)).to(dist.device)
    p = compare_logits(model, int_model, val_loader, dist)
    first_batch = next(iter(val_loader))[0].to(dist.device)
    p["float64_diff"], p["float64_scale"] = float64_logit_diff(model, int_model, first_batch)
    fp32 = {**export["float_state"], **{f"{m.name}.{k}": t.detach().float().cpu() for m in layers
                                        for k, t in (("weight", m.weight), ("bias", m.bias)) if t is not None}}
    mib, fp32_mib = len(data) / 2**20, len(_saved_bytes(fp32)) / 2**20
    unfinished = "" if run.epoch >= a.epochs else f" (checkpoint of epoch {run.epoch} of {a.epochs})"
    fl = a.first_last_bits
    w = f"W{a.w_bits}" if isinstance(a.w_bits, int) else f"per-layer W (average {report['avg_w_bits']:.2f})"
    log(dist, f"export: wrote {path}{unfinished}: {a.arch}, {w} with A{fl}/W{fl} first/last, average "
              f"activation bits {report['avg_a_bits']:.2f}: {mib:.1f} MiB vs {fp32_mib:.1f} MiB FP32 "
              f"({fp32_mib / mib:.1f}x smaller)")
    log(dist, f"export: integer model top-1 {p['top1_integer']:.2f}% vs fake-quantized {p['top1_fake_quant']:.2f}% "
              f"(float32) on {p['n']} images; end to end: largest logit difference {p['max_logit_diff']:.3g} "
              f"(largest |logit| {p['max_abs_logit']:.3g}), argmax differs on {p['argmax_differs']}; layer by layer "
              f"on the same input: largest relative difference {p['layer_rel_diff']:.2g}; end to end in float64 on "
              f"one batch: largest logit difference {p['float64_diff']:.2g}")
    if not export_agrees(p):
        log(dist, f"export: WARNING: the integer model disagrees with the fake-quantized one beyond float summation "
                  f"order (layer by layer {p['layer_rel_diff']:.2g}, tolerance {LAYER_REL_TOL:g}; argmax differs on "
                  f"{p['argmax_differs']} of {p['n']} images; float64 {p['float64_diff']:.2g}); {path} is written "
                  "anyway")
    return path


# =====================================================================================
# 9. Beyond the paper: other selections through the same pipeline (baselines)
# =====================================================================================
# Not MetaMix. To tell whether the search picks *good* bits, every method below runs the same
# schedule as MetaMix (the same bit-meta epochs, then weight training from the meta-state) and
# differs only in the selection made at the end of bit selection (--search):
#   metamix          Eq. 1-5 (sections 1-6), unchanged
#   metamix-unfixed  the paper's Figure 7(a) ablation: weights, BN and steps keep training during
#                    bit-search (one more SGD step per batch, on Eq. 3's loss)
#   uniform          the largest uniform candidate that fits the target
#   random           a random configuration, seeded by --seed, filled toward the target
#   hessian          HAWQ-v2-style: 1/2 Tr(H_l) * mean (x_l - Q_b(x_l))^2, H_l the loss Hessian with
#                    respect to layer l's input activation (Hutchinson), then the exact knapsack
#   sensitivity      loss(only layer l at b, the rest at the largest candidate) - loss(all at the
#                    largest), then the exact knapsack
#   --bits-from FILE a given configuration (a bits.json, {layer name: a_bits}, or in pair mode {name: [a, w]})
# Methods that do not search (and --bits-from) skip the alternating bit-search steps rather than take and ignore
# them: a bit-search step changes only the alphas (weights, steps and BN buffers are frozen and
# no random number is drawn), so the meta-state is the same either way (tested), at a third less
# cost per search-epoch step.

SEARCH_METHODS = ("metamix", "metamix-unfixed", "uniform", "random", "hessian", "sensitivity")
PROXIES = ("hessian", "sensitivity")


def takes_search_steps(method: str) -> bool:
    return method in ("metamix", "metamix-unfixed")


def searches(args) -> bool:
    """The run selects by the alphas' search (Eq. 3-5): a searching method, and no --bits-from."""
    return takes_search_steps(args.search) and not args.bits_from


def unfixed_bit_search_step(model: nn.Module, images, targets, opt, opt_alpha, lam: float, target_gbops: float,
                            autocast=None, sync=None):
    """Figure 7(a), "weights trained during bit-search": Eq. 3's loss, L_task + lambda * L_reg, updates
    the alphas AND the weights, BN and steps (initialised by the meta-state) in one step each.

    Our choice: BN in train mode updates its running statistics, dropout stays on, and `opt` is the
    bit-meta optimizer (its momentum carries both kinds of step). Returns (L, GBOPs of argmax).
    """
    autocast, sync = autocast or contextlib.nullcontext, sync or _no_sync
    layers = searched_layers(model)
    set_mode(model, "search")
    opt.zero_grad(set_to_none=True)
    opt_alpha.zero_grad(set_to_none=True)
    with autocast():
        task = F.cross_entropy(model(images), targets)
    a_bits, w_bits = candidate_bits(layers[0])  # pair mode: candidate i costs a_i * w_i * OPs_l
    reg, gbops = bops_regularizer(torch.stack(alphas_of(model)), a_bits, [m.macs for m in layers], w_bits,
                                  c_fixed_of(model), target_gbops)
    loss = task.float() + lam * reg
    loss.backward()
    loss_v = sync([p for g in opt.param_groups for p in g["params"]] + alphas_of(model), loss.detach())
    opt.step()
    opt_alpha.step()
    return loss_v, gbops.detach()


def unfixed_bit_selection_step(model: nn.Module, images, targets, opt, opt_alpha=None, *, search: bool = False,
                               lam: float = 0.0, target_gbops: float | None = None, autocast=None, sync=None):
    """bit_selection_step with the Figure 7(a) search step: bit-meta, then (search epoch) unfixed search."""
    meta_loss, _, _ = bit_selection_step(model, images, targets, opt, autocast=autocast, sync=sync)
    if not search:
        return meta_loss, None, None
    loss, gbops = unfixed_bit_search_step(model, images, targets, opt, opt_alpha, lam, target_gbops, autocast, sync)
    return meta_loss, loss, gbops


def selection_step_for(method: str):
    """The bit-selection step of a method; those without a search take bit_selection_step(search=False)."""
    return unfixed_bit_selection_step if method == "metamix-unfixed" else bit_selection_step


def alpha_probs(model: nn.Module) -> list[list[float]]:
    """softmax(alpha_l) per searched layer, rounded to 4 decimals (a point of the alpha trajectory)."""
    return [[round(p, 4) for p in F.softmax(a.detach().float(), 0).tolist()] for a in alphas_of(model)]


# ---- the exact knapsack ------------------------------------------------------------------


def bops_costs(model: nn.Module) -> tuple[list[list[int]], int]:
    """Exact integer BOPs: per searched layer and candidate MACs_l * a_i * w_i (w_i = w_bits but in pair
    mode), and the fixed layers' BOPs."""
    layers = searched_layers(model)
    costs = [[m.macs * a * w for a, w in m.candidates] for m in layers]
    fixed = sum(m.macs * m.act.bits[0] * m.weight_quant.bits for m in quant_layers(model) if m.fixed)
    return costs, fixed


def budget_bops(target_gbops: float, fixed_bops: int) -> int:
    """The integer BOPs left to the searched layers; 1e-3 BOPs of slack absorbs the float GBOPs' rounding."""
    return math.floor(target_gbops * 1e9 + 1e-3) - fixed_bops


def mckp_exact(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int) -> list[int] | None:
    """Exact multiple-choice knapsack: one choice i_l per layer, minimising sum_l scores[l][i_l]
    subject to sum_l costs[l][i_l] <= budget; None if no choice fits.

    Dynamic programming over exact integer costs (BOPs, no rounding to a grid), layer by layer. A
    state is (cost so far, score so far); a state that costs at least as much as another and
    scores no better is dropped (any completion of it is matched by the same completion of the
    other), so only the Pareto frontier is kept. That keeps the result exact, and the number of
    states at most the number of distinct reachable costs under the budget (a few thousand for
    ResNet-18 or MobileNet-v2 with 3 candidates). Ties go to the lower cost.
    """
    frontier = [(0, 0.0)]  # (cost, score), cost ascending, score strictly descending
    back: list[list[tuple[int, int]]] = []  # per layer, per state: (index in the previous frontier, choice)
    for sc, co in zip(scores, costs):
        cand = sorted(((c + co[i], s + float(sc[i]), k, i) for k, (c, s) in enumerate(frontier)
                       for i in range(len(co)) if c + co[i] <= budget), key=lambda t: (t[0], t[1]))
        if not cand:
            return None
        new, links, best = [], [], math.inf
        for c, s, k, i in cand:
            if s < best:  # cheaper states come first: keep it only if it scores strictly better
                best = s
                new.append((c, s))
                links.append((k, i))
        frontier, back = new, back + [links]
    k = min(range(len(frontier)), key=lambda j: (frontier[j][1], frontier[j][0]))
    choice = []
    for links in reversed(back):
        k, i = links[k]
        choice.append(i)
    return choice[::-1]


# ---- uniform, random, --bits-from ---------------------------------------------------------


def uniform_budgets(model: nn.Module) -> dict[int, float]:
    """bits -> GBOPs of every searched layer at that candidate."""
    layers = searched_layers(model)
    bits, macs = layers[0].act.bits, [m.macs for m in layers]
    return {b: config_gbops(macs, [b] * len(layers), layers[0].weight_quant.bits, c_fixed_of(model)) for b in bits}


def uniform_selection(model: nn.Module, target_gbops: float) -> list[int]:
    """Branch indices of the largest candidate that fits the target on every searched layer."""
    budgets = uniform_budgets(model)
    fits = [b for b, g in budgets.items() if g <= target_gbops + 1e-9]
    if not fits:
        listed = ", ".join(f"A{b} {g:.3f}" for b, g in sorted(budgets.items()))
        raise BadInput(f"--search uniform: no uniform configuration fits --target-gbops {target_gbops:g} "
                       f"(uniform budgets in GBOPs: {listed})")
    bits = searched_layers(model)[0].act.bits
    return [bits.index(max(fits))] * len(searched_layers(model))


def random_selection(model: nn.Module, target_gbops: float, seed: int) -> list[int]:
    """A random configuration under the target, filled toward it (our choice of procedure).

    Each layer draws a candidate uniformly; while over the target, a random layer not at its
    smallest candidate goes one candidate down; then, in random order, layers go one candidate up
    while the result still fits, until none can. Uses its own generator: the training's random
    streams are untouched, so every method sees the same data order.
    """
    rng = random.Random(seed)
    costs, fixed = bops_costs(model)
    budget = budget_bops(target_gbops, fixed)
    bits = searched_layers(model)[0].act.bits
    order = sorted(range(len(bits)), key=lambda i: bits[i])  # branch indices, smallest bits first
    rank = [rng.randrange(len(bits)) for _ in costs]  # position in `order`, per layer

    def total():
        return sum(c[order[r]] for c, r in zip(costs, rank))

    while total() > budget:
        l = rng.choice([l for l, r in enumerate(rank) if r > 0])
        rank[l] -= 1
    while True:
        up = [l for l, r in enumerate(rank) if r + 1 < len(bits)
              and total() - costs[l][order[r]] + costs[l][order[r + 1]] <= budget]
        if not up:
            break
        rank[rng.choice(up)] += 1
    return [order[r] for r in rank]


def read_bits_from(model: nn.Module, path: str, target_gbops: float) -> list[int]:
    """Candidate indices from a bits.json (its "layers" list) or a map {layer name: a_bits}, or, in pair
    mode (Supplement, Table 7), {layer name: [a_bits, w_bits]}. A bits.json row gives [a_bits, w_bits]
    (a single-W run's rows can seed a pair run). Every problem is a BadInput naming it: unreadable file,
    unknown name, missing layer, an int where a pair is needed, bits or a pair not among the layer's
    candidates, a W other than the layer's (a single --w-bits, or a fixed layer's own), a fixed layer at
    other bits, or a configuration over the target (Eq. 6, each layer at its own W)."""
    flag = f"--bits-from {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise BadInput(f"{flag}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise BadInput(f"{flag}: not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), list):
        try:
            data = {r["name"]: [r["a_bits"], r["w_bits"]] if "w_bits" in r else r["a_bits"] for r in data["layers"]}
        except (TypeError, KeyError):
            raise BadInput(f"{flag}: every entry of \"layers\" needs \"name\" and \"a_bits\"") from None
    if not isinstance(data, dict):
        raise BadInput(f"{flag}: expected a bits.json or an object {{layer name: activation bits}}")
    layers = {m.name: m for m in quant_layers(model)}
    choice = {}
    for name, b in data.items():
        if name not in layers:
            raise BadInput(f"{flag}: unknown layer {name!r} (this model's searched layers: "
                           f"{', '.join(m.name for m in searched_layers(model)[:4])}, ...)")
        choice[name] = _bits_entry(flag, layers[name], b)
    missing = [m.name for m in searched_layers(model) if m.name not in data]
    if missing:
        raise BadInput(f"{flag}: no bits for layer {missing[0]}" + (f" and {len(missing) - 1} more" if missing[1:]
                                                                      else ""))
    branches = [choice[m.name] for m in searched_layers(model)]
    gb = branches_gbops(model, branches)  # Eq. 6, each layer at its own W
    if gb > target_gbops + 1e-9:
        raise BadInput(f"{flag}: the configuration costs {gb:.3f} GBOPs, over --target-gbops {target_gbops:.3f}")
    return branches


def _bits_entry(flag: str, m: QuantLayer, b) -> int:
    """The candidate index of one --bits-from entry: activation bits (an int), or [a_bits, w_bits]."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    a_text, w_text = ",".join(map(str, m.act.bits)), ",".join(map(str, m.w_widths))
    if is_int(b) and m.pairs:
        raise BadInput(f"{flag}: layer {m.name} has {b}, not an (A, W) pair: with --w-bits {w_text} give "
                       f"[a_bits, w_bits], A among {a_text}, W among {w_text}")
    if isinstance(b, list) and len(b) == 2 and all(is_int(v) for v in b):
        a, w = b
    elif is_int(b):
        a, w = b, m.w_widths[0]
    else:
        want = "[a_bits, w_bits]" if m.pairs else "activation bits (or [a_bits, w_bits])"
        raise BadInput(f"{flag}: layer {m.name} has {json.dumps(b)}, not {want}")
    if m.pairs:
        if (a, w) not in m.candidates:
            raise BadInput(f"{flag}: layer {m.name} has the pair [{a}, {w}], not among its candidates: "
                           f"A among {a_text}, W among {w_text}")
    elif a not in m.act.bits:
        allowed = f"fixed at {m.act.bits[0]}" if m.fixed else f"candidates {a_text}"
        raise BadInput(f"{flag}: layer {m.name} has bits {a}, not among its {allowed}")
    elif w != m.w_widths[0]:
        allowed = f"fixed at W{m.w_widths[0]} (--first-last-bits)" if m.fixed else f"--w-bits {m.w_widths[0]}"
        raise BadInput(f"{flag}: layer {m.name} has W {w}, not {allowed}")
    return m.candidates.index((a, w))


# ---- training-free proxies (EMQ's family), on the meta-state --------------------------------


def _layer_inputs(model: nn.Module, layers: Sequence[QuantLayer], store: dict, replace: dict | None = None):
    """Forward pre-hooks that give each layer's input its own autograd node (a copy), so a gradient
    with respect to it flows through that layer only (a ResNet block's input also feeds its
    downsample conv); `replace` maps a layer to a tensor used instead of its input."""
    def hook(mod, inp):
        x = replace[mod] if replace and mod in replace else inp[0].clone()
        store[mod] = x
        return (x,) + tuple(inp[1:])

    return [m.register_forward_pre_hook(hook) for m in layers]


def rademacher(shape, dtype, device, generator) -> torch.Tensor:
    """A vector of independent +-1 entries, each with probability 1/2 (Hutchinson's probe)."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)


def clamp_to_top_branch(model: nn.Module) -> list:
    """Forward pre-hooks that clamp each quantized layer's input to the range of its largest candidate,
    [Qn * s, Qp * s]: the meta-state at its largest bits with rounding taken as the identity (LSQ's
    straight-through estimator), a network that autograd can differentiate twice. Use in "fp" mode.
    Registered after `_layer_inputs`' hooks, they clamp the copy that those record."""
    handles = []
    for m in quant_layers(model):
        i = max(range(len(m.act.bits)), key=lambda j: m.act.bits[j])
        qn, qp = lsq_range(m.act.bits[i], m.act.signed)
        s = float(positive(m.act.step.detach()[i]))
        handles.append(m.register_forward_pre_hook(
            lambda mod, inp, lo=qn * s, hi=qp * s: (inp[0].clamp(lo, hi),) + tuple(inp[1:])))
    return handles


# PyTorch has no double backward for hardsigmoid and hardswish (MobileNet-v3): while Hessians are taken,
# those modules compute the same functions from clamps, which it can differentiate twice.
_TWICE_DIFFERENTIABLE = {nn.Hardsigmoid: lambda x: (x + 3).clamp(0, 6) / 6,
                         nn.Hardswish: lambda x: x * (x + 3).clamp(0, 6) / 6}


@contextlib.contextmanager
def twice_differentiable(model: nn.Module):
    """Swap the forward of every module in _TWICE_DIFFERENTIABLE for its clamp form; restored on exit."""
    swapped = [m for m in model.modules() if type(m) in _TWICE_DIFFERENTIABLE]
    for m in swapped:
        m.forward = _TWICE_DIFFERENTIABLE[type(m)]  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def hutchinson_traces(model: nn.Module, images, targets, probes: int, generator=None, probe_fn=None,
                      clamp: bool = False) -> torch.Tensor:
    """Hutchinson's estimate of Tr(H_l), H_l = d^2 L / d x_l^2, for each searched layer l: the mean of
    v^T H_l v over `probes` Rademacher vectors v (E[v v^T] = I, so E[v^T H v] = Tr H).

    L is the batch's mean cross-entropy in the model's current mode; `clamp` adds
    clamp_to_top_branch's hooks (the proxy's choice, in "fp" mode: unclipped full-precision
    activations can be far outside what the meta-state's BN statistics saw). x_l is layer l's
    whole input tensor (B, C, H, W), before the clamp. H_l v by double backward: g_l = dL/dx_l with create_graph, then
    d<g_l, v>/dx_l. `probe_fn(shape, dtype, device, generator)` replaces the Rademacher draw (tests).
    Returns (L,) traces, summed over the tensor's elements (not averaged).
    """
    probe_fn = probe_fn or rademacher
    layers = searched_layers(model)
    xs: dict = {}
    handles = _layer_inputs(model, layers, xs)
    if clamp:
        handles += clamp_to_top_branch(model)
    try:
        with torch.enable_grad(), twice_differentiable(model):
            loss = F.cross_entropy(model(images), targets)
            inputs = [xs[m] for m in layers]
            grads = torch.autograd.grad(loss, inputs, create_graph=True)
            out = []
            for x, g in zip(inputs, grads):
                total = 0.0
                for _ in range(probes):
                    v = probe_fn(x.shape, x.dtype, x.device, generator)
                    (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)
                    total += float(torch.dot(hv.reshape(-1), v.reshape(-1)))
                out.append(total / probes)
    finally:
        for h in handles:
            h.remove()
    return torch.tensor(out, dtype=torch.float64)


def proxy_scores(model: nn.Module, batches, method: str, probes: int = 4, seed: int = 0,
                 traces_out: list | None = None) -> torch.Tensor:
    """(L, N) scores, an estimate of the rise in loss when layer l's input is at candidate bits[i].

    hessian:     1/2 Tr(H_l) * mean((x_l - Q_i(x_l; s_{l,i}))^2), averaged over the batches: the
                 second-order Taylor term with H_l taken as isotropic (HAWQ-v2's Tr(H)/n times
                 the squared error, n the number of elements), at each branch's meta-state step.
                 H_l is taken on the meta-state at its largest candidate with straight-through
                 rounding (clamp_to_top_branch): our choice, the network the search starts from.
    sensitivity: mean over the batches of loss(layer l at bits[i], every other searched layer at
                 the largest candidate) - loss(every searched layer at the largest candidate).
    Both run on the meta-state in eval mode (BN running statistics, no dropout, no update) and
    leave its parameters and buffers as they were (and the model in "fp" mode: set the mode after).
    `traces_out` (hessian): each batch's (L,) traces are appended to it (section 10 reuses them).
    """
    layers = searched_layers(model)
    bits = layers[0].act.bits
    top = max(range(len(bits)), key=lambda i: bits[i])
    scores = torch.zeros(len(layers), len(bits), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for images, targets in batches:
            if method == "hessian":
                set_mode(model, "fp")
                g = torch.Generator(device=images.device).manual_seed(seed)
                traces = hutchinson_traces(model, images, targets, probes, g, clamp=True)
                if traces_out is not None:
                    traces_out.append(traces)
                xs: dict = {}
                handles = _layer_inputs(model, layers, xs)
                with torch.no_grad():
                    model(images)
                for h in handles:
                    h.remove()
                for l, m in enumerate(layers):
                    x = xs[m].float()
                    for i, b in enumerate(bits):
                        s = positive(m.act.step.detach()[i])
                        mse = (x - _lsq_forward(x, s, *lsq_range(b, m.act.signed))).pow(2).mean().item()
                        scores[l, i] += 0.5 * traces[l] * mse
            else:
                set_mode(model, "meta", top)
                with torch.no_grad():
                    base = F.cross_entropy(model(images), targets).item()
                    for l, m in enumerate(layers):
                        for i in range(len(bits)):
                            if i == top:
                                continue
                            m.act.branch = i
                            scores[l, i] += F.cross_entropy(model(images), targets).item() - base
                        m.act.branch = top
    finally:
        model.train(was_training)
    return scores / max(len(batches), 1)


def proxy_batches(loader, n: int, seed: int, device) -> list:
    """The first n batches of the training loader in a fixed order, drawn without touching the
    training's random streams (fork_rng), so every method's weight training sees the same data."""
    import itertools

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = random.getstate()
        try:
            loader.sampler.set_epoch(10**6 + seed)  # a fixed permutation, not one an epoch uses
            return [(x.to(device), y.to(device)) for x, y in itertools.islice(loader, n)]
        finally:
            random.setstate(state)


def baseline_selection(run: Run, loader) -> tuple[list[int], dict]:
    """The selection of a method that does not search: (branch indices, extra fields for bits.json).
    Proxies are computed on rank 0 and broadcast, so every rank selects the same bits."""
    a, model, dist = run.args, run.model, run.dist
    if a.bits_from:
        return read_bits_from(model, a.bits_from, a.target_gbops), {"bits_from": a.bits_from}
    if a.search == "uniform":
        return uniform_selection(model, a.target_gbops), {}
    if a.search == "random":
        return random_selection(model, a.target_gbops, a.seed), {}
    layers = searched_layers(model)
    scores = torch.zeros(len(layers), len(layers[0].act.bits), dtype=torch.float64)
    t0 = time.time()
    traces: list = []  # hessian: per batch, the (L,) Hutchinson traces (reused by Figure 9, section 10)
    if dist.main:
        batches = proxy_batches(loader, a.proxy_batches, a.seed, dist.device)
        scores = proxy_scores(model, batches, a.search, a.hutchinson_probes, a.seed, traces)
    if dist.world > 1:
        scores = scores.to(dist.device)
        torch.distributed.broadcast(scores, 0)
        scores = scores.cpu()
    costs, fixed = bops_costs(model)
    branches = mckp_exact(scores.tolist(), costs, budget_bops(a.target_gbops, fixed))
    if branches is None:  # check_budget makes this impossible; kept as a clear failure
        raise BadInput(f"--target-gbops {a.target_gbops:g}: no configuration fits")
    log(dist, f"{a.search} proxy on {a.proxy_batches} batch(es): {time.time() - t0:.1f}s")
    extra = {"proxy": {"batches": a.proxy_batches, "probes": a.hutchinson_probes if a.search == "hessian"
                       else None, "scores": scores.tolist()}}
    if traces:
        extra["hessian_traces"] = (torch.stack(traces).mean(0), len(traces))
    return branches, extra


# alpha LR per optimizer: [ImageNet-size search epoch, small data (synthetic, or a folder from scratch)]
ALPHA_LR = {"adam": (0.01, 0.1), "sgd": (0.005, 0.05)}
# Our choice, from the digits study (README): what a folder trained from scratch gets unless told
SCRATCH_DEFAULTS = {"lr": 0.05}


def scratch_folder(args) -> bool:
    """A folder of the user's own data trained from scratch: no --pretrained, no --init."""
    return args.data != "synthetic" and not args.pretrained and not args.init


def apply_scratch_defaults(args) -> list[str]:
    """Fill SCRATCH_DEFAULTS where the user gave no value; returns the flags taken ("--lr 0.05")."""
    taken = []
    for key, v in {**SCRATCH_DEFAULTS, "alpha_lr": ALPHA_LR[args.alpha_optimizer][1]}.items():
        if getattr(args, key) is None:
            setattr(args, key, v)
            taken.append(f"--{key.replace('_', '-')} {v}")
    return taken


def check_search_args(args) -> None:
    if args.search not in SEARCH_METHODS:
        raise BadInput(f"--search {args.search!r}: choose one of {', '.join(SEARCH_METHODS)}")
    if args.alpha_optimizer not in ALPHA_LR:
        raise BadInput(f"--alpha-optimizer {args.alpha_optimizer!r}: choose adam or sgd")
    if args.bits_from and args.search != "metamix":
        raise BadInput(f"--bits-from and --search {args.search} do not go together (--bits-from is the selection)")
    if not isinstance(args.w_bits, int) and not args.bits_from and not takes_search_steps(args.search):
        raise BadInput(f"--search {args.search} with a --w-bits list ({w_bits_text(args.w_bits)}, (A, W) pair "
                       "search) is not implemented yet; use --search metamix or metamix-unfixed, --bits-from, "
                       "or one --w-bits")


def check_uniform_fits(model: nn.Module, args) -> None:
    """--search uniform with a target under every uniform budget: refused with the uniform budgets
    (before check_budget's range check, whose lower end is the smallest uniform budget)."""
    if args.search == "uniform" and args.target_gbops is not None:
        uniform_selection(model, args.target_gbops)


def check_search(model: nn.Module, args) -> None:
    """Refuse, before any data is read, a --bits-from file that does not fit this model and target."""
    if args.bits_from:
        read_bits_from(model, args.bits_from, args.target_gbops)


# =====================================================================================
# 10. Beyond the paper: the supplement's Figure 9 (what did the selection follow?)
# =====================================================================================
# The supplement's Figure 9 sets each layer's selected bits beside its Hessian trace, its OPs and
# the trace divided by OPs: the bits follow the trace in early layers but not in late ones, whose
# OPs are high, and trace / OPs follows them better than either. At the end of bit selection,
# for any run (every --search, --bits-from, single W or pairs), rank 0 adds to bits.json:
#   hessian_trace   Tr(H_l), H_l = d^2 L / d x_l^2, section 9's Hutchinson estimate taken exactly as
#                   --search hessian takes it (proxy_batches, hutchinson_traces(clamp=True) in "fp"
#                   and eval mode, one generator seeded by --seed per batch), averaged over the
#                   --proxy-batches batches; --search hessian's own traces are reused
#   trace_per_op    Tr(H_l) / OPs_l (OPs_l = the row's "macs")
#   figure9         Spearman's rank correlation of the selected A bits (pair mode: also W, and a*w)
#                   with each of the two and with OPs
# and figure9.png (matplotlib, optional). It changes nothing in the run (tested): the batches are
# drawn in a forked RNG, BN uses its running statistics, no .grad is written, and every layer's mode
# and every module's train/eval flag are restored. --no-figure9 skips it (cost: README).


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks with ties at their average rank (Spearman's convention): [8, 4, 4, 2] -> [4, 2.5, 2.5, 1]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # positions i..j (0-based) share the rank (i + j) / 2 + 1
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the average ranks. None where it is undefined:
    a constant series (every layer at the same bits), fewer than 2 values, or a value that is not finite."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    if len(x) < 2 or not all(math.isfinite(v) for v in list(x) + list(y)):
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


@contextlib.contextmanager
def kept_modes(model: nn.Module):
    """Restore, on exit, every quantized layer's mode (activation mode and branch, weight width, which weight
    quantizers are on) and every module's train/eval flag."""
    flags = [(mod, mod.training) for mod in model.modules()]
    layers = [(m, m.act.mode, m.act.branch, m.w_branch,
               [wq.enabled for wq in (m.weight_quants if m.pairs else [m.weight_quant])]) for m in quant_layers(model)]
    try:
        yield
    finally:
        for mod, training in flags:
            mod.training = training
        for m, mode, branch, w_branch, enabled in layers:
            m.act.mode, m.act.branch, m.w_branch = mode, branch, w_branch
            for wq, e in zip(m.weight_quants if m.pairs else [m.weight_quant], enabled):
                wq.enabled = e


def mean_hessian_traces(model: nn.Module, batches, probes: int, seed: int) -> torch.Tensor:
    """(L,) Tr(H_l) per searched layer, the mean over `batches` of hutchinson_traces as proxy_scores's
    hessian takes them (the same values: eval and "fp" mode, clamp, a generator seeded by `seed` per
    batch). Leaves the model's modes, parameters and buffers as they were."""
    traces = []
    with kept_modes(model):
        model.eval()
        set_mode(model, "fp")
        for images, targets in batches:
            g = torch.Generator(device=images.device).manual_seed(seed)
            traces.append(hutchinson_traces(model, images, targets, probes, g, clamp=True))
    return torch.stack(traces).mean(0)


FIGURE9_SERIES = (("hessian_trace", "Hessian trace"), ("macs", "OPs"), ("trace_per_op", "trace/OPs"))


def figure9_fields(report: dict, traces: Sequence[float], batches: int, probes: int) -> dict:
    """Add hessian_trace and trace_per_op to each searched row of a bits report, and return its "figure9"
    entry: the Spearman correlation of the selected bits (pair mode: also W and a*w) with each series."""
    rows = [r for r in report["layers"] if not r["fixed"]]
    for r, t in zip(rows, traces):
        r["hessian_trace"], r["trace_per_op"] = float(t), float(t) / r["macs"]
    selected = {"a_bits": [r["a_bits"] for r in rows]}
    if "pairs" in report:  # Supplement, Table 7: the selected W, and the pair's cost per OP
        selected["w_bits"] = [r["w_bits"] for r in rows]
        selected["a_times_w"] = [r["a_bits"] * r["w_bits"] for r in rows]
    corr = {k: {key: spearman(bits, [r[key] for r in rows]) for key, _ in FIGURE9_SERIES}
            for k, bits in selected.items()}
    return {"layers": len(rows), "batches": batches, "probes": probes, "spearman": corr}


def figure9_text(fig9: dict, cost: str = "") -> str:
    """The line the run prints: the rank correlations, "n/a" where one is undefined; `cost` ends it."""
    names = {"a_bits": "selected A bits", "w_bits": "selected W bits", "a_times_w": "selected a*w"}
    parts = []
    for k, corr in fig9["spearman"].items():
        vals = ", ".join(f"{label} {'n/a' if corr[key] is None else f'{corr[key]:+.2f}'}"
                         for key, label in FIGURE9_SERIES)
        parts.append(f"{names[k]} with {vals}")
    return f"Figure 9: rank correlation of {'; '.join(parts)} ({fig9['layers']} layers{cost})"


def figure9_analysis(run: Run, loader, report: dict, traces=None) -> str | None:
    """The hook finish_bit_selection calls on every rank: on rank 0, the traces (those of --search hessian
    if given as (mean traces, batches), else computed here), the bits.json fields, the printed line."""
    a, dist = run.args, run.dist
    if getattr(a, "no_figure9", False) or loader is None or not dist.main:
        return None
    t0, cost = time.time(), "; traces of --search hessian"
    if traces is None:
        batches = proxy_batches(loader, a.proxy_batches, a.seed, dist.device)
        try:
            traces = (mean_hessian_traces(run.model, batches, a.hutchinson_probes, a.seed), len(batches))
        except RuntimeError as e:  # an analysis, not the run: a model autograd cannot differentiate twice
            report["figure9"] = {"error": _one_line(e)}  # (mean_hessian_traces restored every mode)
            return f"Figure 9: not computed ({_one_line(e)}); the run goes on"
        cost = f"; traces on {traces[1]} batch(es) x {a.hutchinson_probes} probe(s), {time.time() - t0:.1f}s"
    mean, n = traces
    report["figure9"] = figure9_fields(report, mean.tolist(), n, a.hutchinson_probes)
    return figure9_text(report["figure9"], cost)


def plot_figure9(report: dict, path: str) -> bool:
    """figure9.png as the supplement's Figure 9: per searched layer, the selected bits (pair mode: A and W),
    the Hessian trace, OPs and trace / OPs (log scale; symmetric log where a trace is not positive).
    Needs matplotlib (optional); False without it or without the figure9 fields."""
    if "spearman" not in report.get("figure9", {}):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["layers"] if not r["fixed"]]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(max(6, len(rows) * 0.3), 8))
    if "pairs" in report:
        axes[0].bar([i - 0.2 for i in x], [r["a_bits"] for r in rows], width=0.4, color="tab:blue", label="A")
        axes[0].bar([i + 0.2 for i in x], [r["w_bits"] for r in rows], width=0.4, color="tab:green", label="W")
        axes[0].legend(loc="upper right", fontsize=7)
    else:
        axes[0].bar(x, [r["a_bits"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("selected bits")
    corr = report["figure9"]["spearman"]["a_bits"]
    for ax, (key, label), colour in zip(axes[1:], FIGURE9_SERIES, ("tab:red", "tab:orange", "tab:purple")):
        vals = [r[key] for r in rows]
        ax.plot(x, vals, "o-", color=colour, ms=3)
        if min(vals) > 0:
            ax.set_yscale("log")
        elif any(vals):  # linear within the smallest nonzero magnitude, log beyond it
            ax.set_yscale("symlog", linthresh=min(abs(v) for v in vals if v))
        rho = corr[key]
        ax.set_ylabel(label)
        ax.set_title(f"{label}: Spearman with A bits {'n/a' if rho is None else f'{rho:+.2f}'}", fontsize=8)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    axes[0].set_title(f"{report['arch']} ({report['search']}, {report['gbops']:.2f} GBOPs): the supplement's Figure 9",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
