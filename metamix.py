"""MetaMix: Meta-state Precision Searcher for Mixed-precision Activation Quantization.

Kim, Lee, Yoo, Kim, AAAI 2024, arXiv:2311.06798. The method and its driver, in one file that stands alone.

MetaMix picks one activation bit-width per layer under a BOPs budget. Bit selection (2 epochs) trains the FP weights
and every branch's LSQ step at each candidate bit-width in turn (*bit-meta*, Eq. 1); in epoch 2, step by step, a
*bit-search* step freezes that "meta-state" and learns per-layer logits alpha through a softmax-weighted
multi-branch quantizer (Eq. 2), an L1 BOPs regularizer and a straight-through softmax (Eq. 3-5). Weight training
then fine-tunes the network at argmax(alpha) bits (lowered to the budget if over it: our choice), weights now
quantized, from the meta-state.

Run it:
    python metamix.py                                        # built-in synthetic data, a few minutes on a CPU
    python metamix.py --arch mobilenet_v2 --dry-run          # the feasible GBOPs range, nothing trained
    torchrun --nproc_per_node=8 metamix.py --data /imagenet --pretrained --target-gbops 33
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 metamix.py --data /imagenet ...

Symbols (paper -> code):
    alpha_l      per-layer logits, one per candidate     MultiBranchQuantizer.alpha   (N,)
    s_{l,b}      LSQ step of branch b of layer l         MultiBranchQuantizer.step    (N,)
    B, b         candidate activation bit-widths         --bits, e.g. 8,4,2
    w_bits       the one weight bit-width                --w-bits
    OPs_l        MACs of layer l at 224x224 (deployment) QuantLayer.macs
    t_bops       target, in GBOPs (1e9 bit operations)   --target-gbops
    lambda       weight of the BOPs regularizer          --lam
    C_fixed      BOPs of the fixed first/last layers     c_fixed_of(model)            (GBOPs)
    b_l          the bits bit selection chose for l      QuantLayer.selected_branch   (a branch index)

Sections 1-6: the paper, in its order; 7: the speed path the driver runs, held equal to 1-2 by tests; 8: the driver.
"Our choice" marks what the paper leaves open; "the authors'" what their public code does where the paper is silent.
Left out, beside this file (each imports it): other selections and proxies (baselines.py), the supplement's (A, W)
pairs (pairs.py), its Figure 9 (figure9.py), integer export (export.py), the benchmark and the digits study.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import errno
import fcntl
import functools
import io
import json
import math
import os
import random
import signal
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

# ==== 1. LSQ quantizer (Esser et al., "Learned Step Size Quantization", ICLR 2020) ==================================
# The paper trains step sizes without naming its quantizer; we use LSQ, as the authors' code does: a value is
# divided by a learned step s, clamped to the b-bit integer range [Qn, Qp], rounded and multiplied back. What LSQ's
# paper says is written here; where the authors' code differs from it, the code says so. Two of their differences
# we do not follow: signed activations on the narrow range (ours: the full range), and an activation step's
# gradient scale from the whole batch's size (ours: per sample, as LSQ's paper).


def lsq_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """[Qn, Qp] of b bits: unsigned [0, 2^b-1], signed [-2^(b-1), 2^(b-1)-1], narrow signed [1-2^(b-1), 2^(b-1)-1].

    The narrow range is the authors' for weights: symmetric about 0, so -7..7 at 4 bits. Our choice: from 3 bits up
    only; at 2 bits it would leave 3 levels ({-1, 0, 1}) where BOPs count 2 bits, so 2-bit weights keep LSQ's 4
    levels, [-2, 1] (the authors' narrow range comes from their 4-bit code).
    """
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + (narrow and bits > 2), 2 ** (bits - 1) - 1


def lsq_grad_scale(n: int, bits: int, signed: bool) -> float:
    """LSQ's step-gradient scale g = 1/sqrt(N * Qp), N the number of values that share the step.

    LSQ scales the step's gradient so that it is as large, relative to the step, as a weight's gradient is to the
    weight. N is a weight tensor's size, or an activation's features per sample. Our choice: with a step per output
    channel, N is that channel's weights, which keeps LSQ's balance per step (the authors use the whole tensor's N).
    """
    return 1.0 / math.sqrt(n * lsq_range(bits, signed)[1])


def positive(step: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The step actually used: |s|, at least eps. Our choice: s > 0 whatever the optimizer does."""
    return step.abs().clamp_min(eps)


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, grad_scale: float | None = None, narrow: bool = False
) -> torch.Tensor:
    """LSQ fake quantization q(x; s) = round(clamp(x/s, Qn, Qp)) * s, with LSQ's gradients (v = x/s):

        d q / d x = 1 if Qn <= v <= Qp else 0                  (straight-through round)
        d q / d s = round(v) - v inside, Qn below, Qp above    (times `grad_scale`, 1/sqrt(N Qp))

    `step` is one value (a tensor's step) or one per row (an output channel's); the step used is positive(step).
    This is the readable form, written as LSQ's paper writes it; section 7 computes the same in fewer passes.
    """
    qn, qp = lsq_range(bits, signed, narrow)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.numel() // step.numel(), bits, signed)
    s = positive(step)
    if step.dim():
        # One step per row: broadcast along the remaining dimensions.
        s = s.view(-1, *[1] * (x.dim() - 1))
    # The value s, the gradient times g.
    s = s.detach() + (s * grad_scale - (s * grad_scale).detach())
    v = x / s
    # Clamp, letting the gradient with respect to s pass at the ends (Qn below, Qp above).
    v = torch.where((v >= qn) & (v <= qp), v, v.clamp(qn, qp).detach())
    # Round, with a straight-through gradient.
    return (v.round().detach() + (v - v.detach())) * s


class Stateful(nn.Module):
    """A module whose plain attributes named in `saved` are part of its state dict (its "extra state").

    The quantizers decide a few things from the data (whether a step is initialised, the grid's sign and offset);
    saving them with the weights is what makes a resumed run, or a loaded meta-state, identical to the one saved.
    """

    saved: tuple[str, ...] = ()

    def get_extra_state(self):
        return {k: copy.copy(getattr(self, k)) for k in self.saved}

    def set_extra_state(self, state):
        self.__dict__.update((k, state[k]) for k in self.saved)


class LSQQuantizer(Stateful):
    """A weight's signed LSQ. Disabled (bit selection), it is the identity.

    The paper quantizes the weights only in weight training, at one bit-width (W4 in its main results), with a
    "mixed-precision-aware initialization": each step is set at its first use, s = 2 * mean|W| / sqrt(Qp) (LSQ's
    init), from the weights of that moment. QuantLayer builds it the authors' way, one step per output channel on
    the narrow range, unless `plain`; the constructor's defaults, `channels=1, narrow=False`, are LSQ's own, one step
    per tensor on [-2^(b-1), 2^(b-1)-1].
    """

    saved = ("initialized",)

    def __init__(self, bits: int, channels: int = 1, narrow: bool = False, enabled: bool = True):
        super().__init__()
        self.bits = bits
        self.narrow = narrow
        self.enabled = enabled
        self.initialized = False
        self.step = nn.Parameter(torch.ones(channels))

    def init_step(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            # mean|W| per output channel (or of all weights, with one step)
            m = w.detach().abs().reshape(len(self.step), -1).mean(1)
            self.step.copy_(2 * m / math.sqrt(lsq_range(self.bits, True, self.narrow)[1]))
        self.initialized = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if not self.initialized:
            self.init_step(w)
        return lsq_quantize(w, self.step, self.bits, True, narrow=self.narrow)


# ==== 2. Multi-branch block (paper Fig. 4, Eq. 2) ===================================================================
# Every quantized layer gets one activation quantizer per candidate bit-width (a *branch*, with its own LSQ step)
# and one logit alpha per branch; the weights are shared by all branches (Fig. 4). A layer's bits are the bits of
# its *input*. Bit-meta runs one branch at a time; bit-search runs the softmax(alpha)-weighted sum of all (Eq. 2).


class MultiBranchQuantizer(Stateful):
    """Activation quantizer: one LSQ branch per candidate bit-width and one logit alpha per branch (Fig. 4).

    Modes: "fp" (identity), "branch" (LSQ at bits[branch]: bit-meta, weight training) and "search", Eq. 2:
        x_hat = sum_b softmax(alpha)_b * Q_b(x; s_b)
    A hardswish-fed input gets the authors' grid, `offset` 3/8: unsigned, shifted by 3/8, Q(x + 3/8) - 3/8, which
    spends no level on values below hardswish's minimum; patch_model sets it from the model's graph, as the
    authors' code does (`offset` 0 elsewhere, and with LSQ's own quantizers). The sign is read from the first
    batch the layer sees (LSQ's init uses that batch anyway): an input with negatives (the image, a residual
    stream, SiLU's outputs) is signed, the rest (after ReLU) unsigned. `offset` None (a graph torch.fx cannot
    read): the first batch decides it too, a minimum in [-3/8, 0) meaning a hardswish output. N in LSQ's gradient
    scale is the features per sample.
    """

    saved = ("signed", "offset", "initialized")

    def __init__(self, bits: Sequence[int], offset: float | None = None):
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        self.step = nn.Parameter(torch.ones(len(self.bits)))
        self.alpha = nn.Parameter(torch.zeros(len(self.bits)))
        # The grid: unknown until the first batch, unless an offset is given.
        self.signed = None
        self.offset = offset
        self.initialized = [False] * len(self.bits)
        self.mode = "fp"
        self.branch = 0

    def init_steps(self, x: torch.Tensor, branches: Sequence[int]) -> None:
        """LSQ's init from the data, s_i = 2 * mean|x| / sqrt(Qp_i), for the branches not initialised yet."""
        todo = [i for i in branches if not self.initialized[i]]
        if not todo:
            return
        with torch.no_grad():
            if self.signed is None:
                lo = float(x.min())
                if self.offset is None:
                    hardswish_like = -0.375 <= lo < 0
                    self.offset = 0.375 if hardswish_like else 0.0
                self.signed = lo < 0 and not self.offset
            m = (x.detach().float() + self.offset).abs().mean()
            for i in todo:
                self.step[i] = 2 * m / math.sqrt(lsq_range(self.bits[i], self.signed)[1])
                self.initialized[i] = True

    def quantize(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Q_{bits[i]}(x + offset; s_i) - offset, branch i's LSQ (N = features per sample)."""
        self.init_steps(x, [i])
        g = lsq_grad_scale(x.numel() // x.shape[0], self.bits[i], self.signed)
        return lsq_quantize(x + self.offset, self.step[i], self.bits[i], self.signed, g) - self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp":
            return x
        if self.mode == "branch":
            return self.quantize(x, self.branch)
        # Eq. 2: the softmax-weighted mixture of every branch
        probs = F.softmax(self.alpha, dim=0)
        return sum(p * self.quantize(x, i) for i, p in enumerate(probs))


class LayerOp(NamedTuple):
    """What a QuantLayer computes: "conv2d" with its geometry, or "linear" (geometry unused)."""

    kind: str
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLayer(Stateful):
    """A Conv2d or Linear whose input activation and weight are quantized (Fig. 4): op(act(x), weight_quant(W)) + b.

    It holds the original layer's own weight and bias Parameters, so an optimizer built before patching, or a state
    dict of the FP model, still reaches them. The weight's LSQ is off in bit selection (the paper trains FP weights
    there) and on in weight training (after the --act-only-epochs, if any). `candidates[i]` is branch i's
    (activation bits, weight bits); a `fixed` layer (the first conv and the last Linear, at 8 bits in the paper) has
    one. `macs` is OPs_l of Eq. 4; `selected_branch` is bit selection's choice; `fused` turns on section 7's speed
    path. `plain`: LSQ's own quantizers (a weight step per tensor, no shifted grid) instead of the authors'.
    """

    fused = False
    saved = ("selected_branch",)

    def __init__(
        self,
        layer: nn.Module,
        bits: Sequence[int],
        w_bits: int,
        name: str = "",
        macs: int = 0,
        fixed: bool = False,
        plain: bool = False,
    ):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ValueError(f"{name}: only zero padding with explicit sizes is supported")
        if isinstance(layer, nn.Linear):
            self.op = LayerOp("linear")
        else:
            self.op = LayerOp("conv2d", tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
        # The very same Parameters as the original layer's.
        self.weight = layer.weight
        self.bias = layer.bias
        if plain:
            self.act = MultiBranchQuantizer(bits, offset=0.0)
            self.weight_quant = LSQQuantizer(w_bits, channels=1, narrow=False, enabled=False)
        else:
            self.act = MultiBranchQuantizer(bits)
            self.weight_quant = LSQQuantizer(w_bits, channels=len(self.weight), narrow=True, enabled=False)
        self.candidates = [(a, int(w_bits)) for a in self.act.bits]
        self.name = name
        self.kind = type(layer).__name__
        self.macs = int(macs)
        self.fixed = fixed
        # The position in forward order (patch_model sets it), and the selection.
        self.order = 0
        self.selected_branch = 0

    def set_state(self, mode: str, branch: int = 0, quant_weights: bool | None = None) -> None:
        """The activation quantizer's mode and branch; weight LSQ on or off (None: as it is; always off in "fp")."""
        self.act.mode = mode
        self.act.branch = branch
        if mode == "fp":
            self.weight_quant.enabled = False
        elif quant_weights is not None:
            self.weight_quant.enabled = bool(quant_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.act.mode != "fp":
            # Section 7: the same values and gradients, in less time and memory.
            return fused_forward(self, x)
        return self.op(self.act(x), self.weight_quant(self.weight), self.bias)


# ==== 3. Straight-through softmax (Eq. 5) ===========================================================================
# The budget term must see the configuration that will be deployed, one bit-width per layer, yet give the alphas a
# gradient: forward the one-hot argmax, backward the softmax's gradient (the straight-through estimator).


def straight_through_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """hs(alpha) of Eq. 5: one-hot of argmax softmax(alpha) forward, softmax's gradient backward."""
    y_soft = F.softmax(logits, dim=dim)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, y_soft.argmax(dim, keepdim=True), 1.0)
    return y_hard - y_soft.detach() + y_soft


# ==== 4. BOPs (Eq. 6) and the L1 BOPs regularizer (Eq. 4) ===========================================================
# OPs_l = MACs of layer l at the deployment resolution (224): conv Cout*(Cin/groups)*kh*kw*Hout*Wout, linear in*out.
# BOPs = sum_l a_l * w_l * OPs_l (paper: w_l = w_bits), GBOPs = BOPs / 1e9; fixed first/last layers: Eq. 4's C_fixed.
# BOPs describe the deployed network, so they are counted at 224 px whatever the training crop. BN, activations,
# additions and pooling are not counted (the usual BOPs convention).


def quant_layers(model):
    """Quantized layers in forward order (the order patch_model recorded)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    return sorted(layers, key=lambda m: m.order)


def searched_layers(model):
    """The quantized layers whose bits are searched: all but the fixed first and last."""
    return [m for m in quant_layers(model) if not m.fixed]


def candidate_costs(model):
    """a * w of each candidate of the searched layers (they share their candidates): the paper's b * w_bits."""
    return [a * w for a, w in searched_layers(model)[0].candidates]


def c_fixed_of(model):
    """C_fixed: BOPs of the first and last layers, in GBOPs."""
    fixed = [m for m in quant_layers(model) if m.fixed]
    return sum(m.macs * a * w for m in fixed for a, w in m.candidates) / 1e9


def config_gbops(macs: Sequence[int], costs: Sequence[int], c_fixed: float) -> float:
    """Eq. 6 for the searched layers plus C_fixed: sum_l a_l * w_l * OPs_l / 1e9 + C_fixed; costs[l] = a_l * w_l."""
    return sum(m * c for m, c in zip(macs, costs)) / 1e9 + c_fixed


def branches_gbops(model, branches):
    """Eq. 6 of a configuration given as one branch index per searched layer."""
    costs = candidate_costs(model)
    macs = [m.macs for m in searched_layers(model)]
    return config_gbops(macs, [costs[i] for i in branches], c_fixed_of(model))


def gbops_range(model):
    """Feasible budgets: every searched layer at its cheapest candidate, and at its dearest."""
    macs = [m.macs for m in searched_layers(model)]
    costs = candidate_costs(model)
    lowest = config_gbops(macs, [min(costs)] * len(macs), c_fixed_of(model))
    highest = config_gbops(macs, [max(costs)] * len(macs), c_fixed_of(model))
    return lowest, highest


def bops_regularizer(
    alphas: torch.Tensor, costs: Sequence[int], macs: Sequence[int], c_fixed: float, target_gbops: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: L_reg = | sum_l sum_i hs(alpha_l)_i * bits_i * w_bits * OPs_l / 1e9 + C_fixed - t_bops |.

    alphas (L, N); costs (N,) bits_i * w_bits; macs (L,) OPs_l. Returns (L_reg, its GBOPs), differentiable in the
    alphas. Our choices: the unit is GBOPs, which makes the paper's lambdas (0.4 to 4) sensible against a task loss
    near 1; and Eq. 4 read literally, so L_reg is the distance of the *argmax* configuration from the target, not
    of an expected cost: the straight-through softmax (Eq. 5) passes the gradient to every logit.
    """
    # (L, N), one-hot forward
    hs = straight_through_softmax(alphas, dim=-1)
    c = torch.as_tensor(costs, dtype=hs.dtype, device=hs.device)
    m = torch.as_tensor(macs, dtype=hs.dtype, device=hs.device)
    gbops = (hs @ c * m).sum() * 1e-9 + c_fixed
    return (gbops - target_gbops).abs(), gbops


def repair_to_budget(
    probs: Sequence[Sequence[float]],
    branches: Sequence[int],
    costs: Sequence[int],
    macs: Sequence[int],
    c_fixed: float,
    target_gbops: float,
) -> list[int]:
    """Our choice (the paper has none): lower bits until the configuration is within the target.

    The L1 term pulls the argmax towards the target from both sides, so it can end a little over. Each move lowers
    one layer to its next lower cost (the most probable candidate at that cost), the layer that gives up the least
    softmax probability per BOP saved, until the configuration fits.
    """
    branches = list(branches)
    levels = sorted(set(costs))
    while config_gbops(macs, [costs[i] for i in branches], c_fixed) > target_gbops + 1e-9:
        best = None
        for layer, i in enumerate(branches):
            k = levels.index(costs[i])
            if k == 0:
                continue
            p = probs[layer]
            tied = [j for j in range(len(costs)) if costs[j] == levels[k - 1]]
            # the most probable candidate at the lower cost; ties: the first
            lower = max(tied, key=lambda j, p=p: (p[j], -j))
            c = (p[i] - p[lower]) / ((costs[i] - costs[lower]) * macs[layer])
            if best is None or c < best[0]:
                best = (c, layer, lower)
        if best is None:
            break
        branches[best[1]] = best[2]
    return branches


# ==== 5. Model patching =============================================================================================
# MetaMix quantizes every convolution and linear layer of a CNN; the paper keeps the first conv and the last Linear
# at 8 bits ("fully quantized network") and searches the rest. "First" and "last" mean in the order the forward
# pass calls them, which a hook records: the order in which a model defines its modules need not be the order in
# which it calls them, so nothing here depends on it.


def trace_layers(model, image_size):
    """(name, module, MACs, input values per image) of every Conv2d/Linear in forward order, from one forward pass."""
    seen = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = out.shape[1] * (mod.in_channels // mod.groups) * kh * kw * out.shape[2] * out.shape[3]
        else:
            # per image, at every position a linear layer is applied to
            macs = mod.in_features * mod.out_features * (out.numel() // out.shape[-1] // out.shape[0])
        # Our choice: a layer called twice counts once (its first call).
        if all(m is not mod for _, m, *_ in seen):
            seen.append((names[mod], mod, int(macs), inp[0][0].numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    model.train(was_training)
    return seen


# Modules and functions that pass their input's values on (a pooled or reshaped hardswish output is still one).
PASSING = ("pool", "dropout", "flatten", "reshape", "view", "identity")


def hardswish_fed(model):
    """The Conv2d/Linear modules whose input is a hardswish output, read from the model's torch.fx graph: directly,
    through pooling, dropout or a reshape, or times a [0, 1] gate (squeeze-excitation). None if fx cannot read it.

    These inputs take the authors' offset grid (MultiBranchQuantizer). Their code marks them from the graph too;
    the structure, unlike a batch's minimum, does not depend on the data.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return None
    modules = dict(model.named_modules())
    kinds = {}
    fed = set()
    for node in graph.nodes:
        target = modules.get(node.target) if node.op == "call_module" else node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", type(target).__name__).lower()
        args = [kinds.get(a) if isinstance(a, torch.fx.Node) else None for a in node.args[:2]]
        if not node.op.startswith("call"):
            continue
        if name == "hardswish":
            kinds[node] = "hardswish"
        elif name in ("hardsigmoid", "sigmoid"):
            kinds[node] = "gate"
        elif any(word in name for word in PASSING):
            kinds[node] = args[0]
        elif name == "mul" and set(args) == {"gate", "hardswish"}:
            kinds[node] = "hardswish"
        elif isinstance(target, (nn.Conv2d, nn.Linear)) and args[0] == "hardswish":
            fed.add(node.target)
    return fed


def patch_model(
    model,
    bits,
    w_bits=4,
    first_last_bits=8,
    bops_image_size=224,
    layer_type=QuantLayer,
    plain=False,
):
    """Every Conv2d and Linear replaced by a QuantLayer in "fp" mode; the first and last in forward order are fixed
    at first_last_bits. `layer_type` builds the searched layers (pairs.py passes its own); `plain`: LSQ's
    quantizers, not the authors'. The offset grid goes to the hardswish-fed inputs of the model's graph; a model
    that torch.fx cannot read leaves the grid to the first batch (init_quantizers)."""
    fed = hardswish_fed(model)
    traced = trace_layers(model, bops_image_size)
    if len(traced) < 3:
        raise ValueError("need at least three Conv2d/Linear layers (a first, a searched one, a last)")
    for i, (name, mod, macs, in_size) in enumerate(traced):
        if i in (0, len(traced) - 1):
            q = QuantLayer(mod, [first_last_bits], first_last_bits, name, macs, fixed=True, plain=plain)
        else:
            q = layer_type(mod, bits, w_bits, name, macs, plain=plain)
        q.order = i
        q.in_size = in_size
        if fed is not None and not plain:
            q.act.offset = 0.375 if name in fed else 0.0
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


def set_mode(model, mode, branch=None, quant_weights=None):
    """Every layer in a phase's mode; `quant_weights` turns weight LSQ on or off (None: as it is).

    "fp": everything in full precision, weights too (the FP model's own evaluation); "meta": the searched layers at
    branch `branch` (bit-meta, Eq. 1); "search": the searched layers on Eq. 2's mixture; "selected": each at its
    selected branch. Our choice: the fixed layers' inputs stay at 8 bits in every mode but "fp", so that the
    meta-state and the search see the inputs of the network that will be deployed.
    """
    for m in quant_layers(model):
        if mode == "fp":
            m.set_state("fp")
        elif m.fixed:
            m.set_state("branch", 0, quant_weights)
        elif mode == "search":
            m.set_state("search", 0, quant_weights)
        elif mode == "meta":
            m.set_state("branch", branch, quant_weights)
        else:
            m.set_state("branch", m.selected_branch, quant_weights)


def alphas_of(model):
    """The architecture logits alpha_l, one vector per searched layer."""
    return [m.act.alpha for m in searched_layers(model)]


def meta_params(model):
    """What bit-meta and weight training update: every parameter but the alphas (weights, BN, steps)."""
    alphas = {id(a) for a in alphas_of(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def argmax_branches(model):
    """The argmax configuration, a branch per searched layer (ties: the first)."""
    return torch.stack(alphas_of(model)).detach().argmax(1).tolist()


def apply_selection(model, branches):
    """The selection, one branch per searched layer."""
    for m, i in zip(searched_layers(model), branches):
        m.selected_branch = int(i)


# ==== 6. The two phases (paper Table 1) =============================================================================
# Table 1 as code. S = bit-selection epochs (2 in the paper), E = all epochs.
#
#   init_quantizers(model, calib)                  # every branch's LSQ step, from one batch
#   for epoch in 1 .. S:                           # bit selection
#       for images, targets in loader:             #   Eq. 1; in epoch S also Eq. 3, same batch
#           bit_selection_step(model, images, targets, opt, opt_alpha, search=epoch == S, lam=lam, target_gbops=t_bops)
#   start_weight_training(model, t_bops)           # bits = argmax alpha (fit to t_bops); weights quantized
#   for epoch in S+1 .. E:                         # weight training (a fresh optimizer)
#       for images, targets in loader:
#           weight_training_step(model, images, targets, opt)
#
# Why bit-meta and bit-search: a searched layer's input distribution depends on the bits of the layers before it,
# so a search run while the weights also train on a changing mixture sees statistics that no single configuration
# has ("activation instability"). Bit-meta first trains a *meta-state*, weights good at every candidate bit-width;
# bit-search then learns the alphas on that frozen meta-state; weight training starts from it.
#
# Each step takes `autocast` (a context factory, e.g. bf16), `sync(params, loss)`, called between backward and
# optimizer step (the driver all-reduces there), and `criterion(logits, targets)` (e.g. distillation_loss(teacher's
# logits)). Nothing here knows about processes, files or printing.


def no_sync(params, loss):
    """The default `sync` of the step functions: one process, nothing to reduce."""
    return loss


@contextlib.contextmanager
def batch_stats_bn(model):
    """BN normalises with the batch's statistics and leaves its running buffers alone; dropout off."""
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    # Train-mode BN without tracking uses the batch's statistics and leaves the buffers alone.
    for m in bns:
        m.track_running_stats = False
    for m in model.train().modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
        model.train(was_training)


def init_quantizers(model, calib):
    """LSQ's data-dependent init on one batch: every branch's step, each layer's grid (sign, offset); then "fp".

    Each branch is initialised from the inputs it sees when the whole network runs at its bit-width, as in bit-meta.
    Our choice: BN uses the batch's statistics, since a model trained from scratch has running statistics 0 and 1,
    which would give steps of 0.
    """
    undecided = [m for m in quant_layers(model) if m.act.offset is None]
    with torch.no_grad(), batch_stats_bn(model):
        for branch in range(len(searched_layers(model)[0].candidates)):
            set_mode(model, "meta", branch)
            model(calib)
    set_mode(model, "fp")
    shifted = [m.name for m in undecided if m.act.offset]
    if shifted:
        warnings.warn(f"graph not read; offset grid from the first batch: {', '.join(shifted)}", stacklevel=2)


def distillation_loss(teacher_logits):
    """The authors' loss (their code; the paper names none), as a criterion(logits, targets).

    The batch mean of -sum_c softmax(teacher)_c * log_softmax(student)_c: a frozen teacher at temperature 1, and no
    label term (the targets are not used).
    """
    probs = F.softmax(teacher_logits.detach().float(), 1)

    def criterion(logits, targets):
        return F.cross_entropy(logits.float(), probs)

    return criterion


def bit_meta_step(model, images, targets, autocast=contextlib.nullcontext, criterion=F.cross_entropy):
    """Eq. 1: L_meta = (1/N) sum_b L_task(net with every searched layer at b), returned detached.

    One forward and backward per candidate, the gradients accumulating in .grad, so that one optimizer step follows
    the mean: a backward per candidate keeps one graph in memory at a time. (The authors' code calls backward on the
    last candidate's loss only, which trains an 8-bit model; Eq. 1 and the text say the mean.) Our choice: BN layers
    are shared by all candidates, as the weights are (Fig. 4 branches only the quantizer): the meta-state is one
    network whose statistics should suit every bit-width (Figs. 2 and 6).
    """
    n = len(searched_layers(model)[0].candidates)
    total = torch.zeros((), device=images.device)
    for branch in range(n):
        set_mode(model, "meta", branch)
        with autocast():
            loss = criterion(model(images), targets) / n
        loss.backward()
        total += loss.detach()
    return total


def bit_search_step(
    model,
    images,
    targets,
    lam,
    target_gbops,
    autocast=contextlib.nullcontext,
    fixed=True,
    criterion=F.cross_entropy,
):
    """Eq. 3: L = L_task + lambda * L_reg (Eq. 4), on the frozen meta-state: only the alphas learn.

    Returns (L, GBOPs of the argmax configuration), detached. Our choice: BN uses the batch's statistics and leaves
    its buffers alone, and dropout is off, so that the search changes nothing of the meta-state (the authors' code
    lets BN update its buffers here). `fixed=False` is the paper's Figure 7(a) ablation, which trains the weights
    during bit-search: nothing frozen, BN and dropout as in training, and the caller steps the meta optimizer too.
    """
    frozen = []
    if fixed:
        frozen = [p for p in meta_params(model) if p.requires_grad]
    set_mode(model, "search")
    for p in frozen:
        p.requires_grad_(False)
    bn_mode = batch_stats_bn(model) if fixed else contextlib.nullcontext()
    try:
        with bn_mode, autocast():
            task = criterion(model(images), targets)
        alphas = torch.stack(alphas_of(model))
        macs = [m.macs for m in searched_layers(model)]
        reg, gbops = bops_regularizer(alphas, candidate_costs(model), macs, c_fixed_of(model), target_gbops)
        loss = task.float() + lam * reg
        loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return loss.detach(), gbops.detach()


def bit_selection_step(
    model,
    images,
    targets,
    opt,
    opt_alpha=None,
    *,
    search=False,
    lam=0.0,
    target_gbops=None,
    autocast=contextlib.nullcontext,
    sync=no_sync,
    fixed=True,
    criterion=F.cross_entropy,
):
    """One iteration of bit selection (Table 1); returns (meta loss, search loss, GBOPs).

    A bit-meta step (Eq. 1) and, in the search epoch, a bit-search step (Eq. 3-5) on the meta-state just updated,
    "given the same mini-batch", as the paper alternates them.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.zero_grad(set_to_none=True)
    meta_loss = sync(params, bit_meta_step(model, images, targets, autocast, criterion))
    opt.step()
    if not search:
        return meta_loss, None, None
    opt_alpha.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    loss, gbops = bit_search_step(model, images, targets, lam, target_gbops, autocast, fixed, criterion)
    learned = alphas_of(model)
    if not fixed:
        learned = learned + params
    search_loss = sync(learned, loss)
    opt_alpha.step()
    if not fixed:
        opt.step()
    return meta_loss, search_loss, gbops


def start_weight_training(model, target_gbops, repair=True, branches=None):
    """Between the phases: the bits are fixed and the weights quantized. Returns (branches, GBOPs, changed), changed
    when the branches differ from the argmax.

    The bits are argmax alpha (lowered to fit the target if `repair`), or the given `branches`. Weight LSQ is turned
    on here, each step initialised at its first use from the meta-state's weights: the paper's
    "mixed-precision-aware initialization", which keeps the meta-state's weights and selected steps. (The driver's
    --act-only-epochs turns it off again, and on after them, from the weights of that moment.)
    """
    layers = searched_layers(model)
    argmax = argmax_branches(model)
    if branches is None and repair:
        probs = [F.softmax(m.act.alpha.detach().float(), 0).tolist() for m in layers]
        macs = [m.macs for m in layers]
        branches = repair_to_budget(probs, argmax, candidate_costs(model), macs, c_fixed_of(model), target_gbops)
    if branches is None:
        branches = argmax
    branches = list(branches)
    apply_selection(model, branches)
    set_mode(model, "selected", quant_weights=True)
    return branches, branches_gbops(model, branches), branches != argmax


def weight_training_step(
    model,
    images,
    targets,
    opt,
    autocast=contextlib.nullcontext,
    sync=no_sync,
    criterion=F.cross_entropy,
):
    """One step of weight training: ordinary training of weights and steps at the selected bits."""
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = criterion(model(images), targets)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    loss = sync(params, loss.detach())
    opt.step()
    return loss


# ==== 7. The speed path: a fused layer op (what the driver runs) ====================================================
# Not the paper: machinery that computes sections 1-2 faster. A `fused` QuantLayer runs one autograd function for
# activation (a branch, or Eq. 2's mixture), weight and op. Autograd through sections 1-2 keeps every intermediate
# of the quantizers (x/s, the clamp, the round, the mixture's terms) for backward; the fused op saves only x and the
# raw weight, recomputes the integer codes in backward and masks with hardtanh's backward, in one pass each. Tests
# hold it equal to sections 1-2, value and every gradient; docs/speed.md has its time and memory.


def fused_forward(
    layer,
    x,
    probs=None,
    wq=None,
    bias=True,
):
    """layer(x) through FusedQuantOp (pairs.py's search passes its mixture `probs`, weight quantizer, bias)."""
    act = layer.act
    if wq is None:
        wq = layer.weight_quant
    if act.mode == "branch":
        branches = [act.branch]
    else:
        branches = list(range(len(act.bits)))
        if probs is None:
            probs = F.softmax(act.alpha, dim=0)
    act.init_steps(x, branches)
    a_q = [quant_params(act.bits[i], act.signed, x.numel() // x.shape[0]) for i in branches]
    w_step = None
    w_q = None
    if wq.enabled:
        if not wq.initialized:
            wq.init_step(layer.weight)
        # (C_out, 1, ...)
        w_step = positive(wq.step).view(-1, *[1] * (layer.weight.dim() - 1))
        w_q = quant_params(wq.bits, True, layer.weight.numel() // len(wq.step), wq.narrow)
    layer_bias = layer.bias if bias else None
    steps = positive(act.step[branches])
    return FusedQuantOp.apply(x, steps, probs, layer.weight, w_step, layer_bias, a_q, w_q, layer.op, act.offset)


def quant_params(bits, signed, n, narrow=False):
    """(Qn, Qp, LSQ's gradient scale) of a quantizer whose step is shared by n values."""
    return (*lsq_range(bits, signed, narrow), lsq_grad_scale(n, bits, signed))


def lsq_codes(x, step, qn, qp):
    """The integer codes round(clamp(x/s, Qn, Qp)), in one new buffer."""
    return (x / step).clamp_(qn, qp).round_()


@functools.lru_cache(maxsize=None)
def _open_bounds(qn, qp, dtype):
    """(lo, hi) with lo < v < hi exactly when Qn <= v <= Qp: hardtanh's backward passes the open interval."""
    ends = torch.tensor([qn, qp], dtype=dtype)
    outwards = torch.tensor([-math.inf, math.inf], dtype=dtype)
    return torch.nextafter(ends, outwards).tolist()


def pass_inside(g, v, qn, qp, out=None):
    """g where Qn <= v <= Qp, else 0: the straight-through mask as hardtanh's backward, one pass, into `out`."""
    lo, hi = _open_bounds(qn, qp, v.dtype)
    if out is None:
        return torch.ops.aten.hardtanh_backward(g, v, lo, hi)
    return torch.ops.aten.hardtanh_backward.grad_input(g, v, lo, hi, grad_input=out)


def sum_product(a, b, step=None):
    """sum(a * b) without a product buffer: one value (in step's shape, if given), or one per row if step has one
    value per row (an output channel's)."""
    if step is None or step.numel() == 1:
        shape = () if step is None else step.shape
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return torch.bmm(a.reshape(len(a), 1, -1), b.reshape(len(a), -1, 1)).view_as(step)


def _lsq_grads(g, x, q, qn, qp, step, need_s, grad_scale):
    """LSQ's backward for out = q * s given the codes q: d out/d s = q - v * inside, so sum(g * d out/d s) =
    <g, q> - <g * inside, v>. Returns (grad x, in g's buffer; grad s or None); v is computed in q's buffer."""
    gq = None
    if need_s:
        gq = sum_product(g, q, step)
    v = torch.div(x, step, out=q)
    gx = pass_inside(g, v, qn, qp, out=g)
    if not need_s:
        return gx, None
    return gx, (gq - sum_product(gx, v, step)) * grad_scale


def _mixture(x, steps, probs, a_q):
    """x_hat of Eq. 2, sum_i p_i * s_i * round(clamp(x/s_i, Qn_i, Qp_i)): 4 passes per branch, one scratch buffer."""
    out = None
    tmp = None
    for i, (qn, qp, _) in enumerate(a_q):
        tmp = torch.div(x, steps[i], out=tmp).clamp_(qn, qp).round_()
        if out is None:
            out = tmp * (steps[i] * probs[i])
        else:
            out.addcmul_(tmp, steps[i] * probs[i])
    return out


def _mixture_grads(g, x, steps, probs, a_q, need_s, need_p):
    """Gradients of sum_i p_i * s_i * q_i(x) given g = dL/d(mixed activation):
    d/dx = sum_i p_i * (g * inside_i); d/dp_i = s_i <g, q_i>; d/ds_i = p_i * (<g, q_i> - <g * inside_i, v_i>) * g_s.
    """
    gs = torch.zeros_like(steps) if need_s else None
    gp = torch.zeros_like(probs) if need_p else None
    # Buffers reused across branches.
    gx = v = q = gi = None
    for i, (qn, qp, grad_scale) in enumerate(a_q):
        v = torch.div(x, steps[i], out=v)
        q = torch.clamp(v, qn, qp, out=q).round_()
        # g * inside_i
        gi = pass_inside(g, v, qn, qp, out=gi)
        if gx is None:
            gx = gi * probs[i]
        else:
            gx.addcmul_(gi, probs[i])
        if need_p or need_s:
            gq = sum_product(g, q)
        if need_p:
            gp[i] = steps[i] * gq
        if need_s:
            gs[i] = probs[i] * grad_scale * (gq - sum_product(gi, v))
    return gx, gs, gp


def upcast(t):
    """A half-precision tensor in fp32 (the quantizer math runs in fp32 under autocast too); others as they are."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def op_backward(g, inp, weight, op, need_in, need_w, need_b):
    """(grad input, grad weight, grad bias) of op(inp, weight) + b given g; each None where not needed."""
    # Under autocast the forward ran in g's dtype.
    inp = inp.to(g.dtype)
    w = weight.to(g.dtype)
    if op.kind == "linear":
        # out = inp @ W^T + b over the last dimension
        g2 = g.reshape(-1, g.shape[-1])
        g_in = g @ w if need_in else None
        g_w = (g2.t() @ inp.reshape(-1, inp.shape[-1])).to(weight.dtype) if need_w else None
        g_b = g2.sum(0).to(weight.dtype) if need_b else None
        return g_in, g_w, g_b
    bias_sizes = [w.shape[0]] if need_b else None
    g_in, g_w, g_b = torch.ops.aten.convolution_backward(
        g, inp, w, bias_sizes, op.stride, op.padding, op.dilation, False, [0, 0], op.groups, [need_in, need_w, need_b]
    )
    if g_w is not None:
        g_w = g_w.to(weight.dtype)
    if g_b is not None:
        g_b = g_b.to(weight.dtype)
    return g_in, g_w, g_b


class FusedQuantOp(torch.autograd.Function):
    """out = op(sum_i p_i Q_i(x; s_i), Q_w(W; s_w)) + b, sections 1-2 in one autograd function.

    steps, a_q: the K active branches' steps and (Qn, Qp, grad scale); probs: None for one branch; w_step
    (C_out, 1, ...) and w_q: None for an FP weight; offset: the inputs' o. The op runs on integer codes and is
    scaled after, s_a s_w[c] op(q_a, q_w) + b (with o, minus o s_w[c] op(1, q_w), the border map of zero padding):
    the codes are exact in bf16 up to 256, so with one branch bf16 autocast rounds only the op's output (and FP
    weights); the search's mixture is real-valued, rounded too.
    """

    @staticmethod
    def forward(ctx, x, steps, probs, weight, w_step, bias, a_q, w_q, op, offset=0.0):
        # The quantizer math in fp32 (also under autocast), on x + o.
        xf = upcast(x)
        if offset:
            xf = xf + offset
        w = weight
        w_scale = None
        if w_q is not None:
            w = lsq_codes(weight, w_step, *w_q[:2])
            # s_w along the output channels
            if op.kind == "conv2d":
                w_scale = w_step.reshape(-1, 1, 1)
            else:
                w_scale = w_step.reshape(-1)
        if probs is None:
            x_in = lsq_codes(xf, steps[0], *a_q[0][:2])
            scale = steps[0]
            if w_scale is not None:
                scale = scale * w_scale
        else:
            # the mixture, sum_i p_i (s_i q_i - o), already scaled by the activation steps
            x_in = _mixture(xf, steps, probs, a_q)
            if offset:
                x_in = x_in.sub_(offset * probs.sum())
            scale = w_scale
        ctx.save_for_backward(x, steps, probs, weight, w_step)
        ctx.a_q = a_q
        ctx.w_q = w_q
        ctx.op = op
        ctx.has_bias = bias is not None
        ctx.offset = offset
        out = op(x_in, w)
        if scale is None and bias is None:
            return out
        # In fp32, then one rounding to out's dtype.
        y = upcast(out)
        if scale is not None:
            y = y.mul_(scale)
        if offset and probs is None:
            # s op(q - o/s, W) = s op(q, W) - o op(1, W), in fp32
            border = offset if w_scale is None else offset * w_scale
            with torch.autocast(x.device.type, enabled=False):
                y.sub_(op(xf.new_ones(1, *x.shape[1:]), w) * border)
        if bias is not None:
            y.add_(bias.view(-1, 1, 1) if op.kind == "conv2d" else bias)
        return y.to(out.dtype)

    @staticmethod
    def backward(ctx, g):
        x, steps, probs, weight, w_step = ctx.saved_tensors
        need_x, need_s, need_p, need_w, need_ws, need_b = ctx.needs_input_grad[:6]
        need_in = need_x or need_s or need_p
        need_wgrad = need_w or need_ws
        need_b = need_b and ctx.has_bias
        a_q = ctx.a_q
        w_q = ctx.w_q
        op = ctx.op
        o = ctx.offset
        w_codes = None
        w = weight
        if w_q is not None:
            w_codes = lsq_codes(weight, w_step, *w_q[:2])
            w = w_codes * w_step
        xf = upcast(x)
        if o:
            xf = xf + o
        gx = gs = gp = g_ws = None
        if probs is None:
            # One branch: bit-meta and weight training (the hot path).
            qn, qp, grad_scale = a_q[0]
            q = lsq_codes(xf, steps[0], qn, qp)
            # The op is linear in its input: grad_W(s * q) = s * grad_W(q), so the codes serve as input.
            # Only the step needs a gradient, e.g. the image's quantizer in the first layer.
            only_s = need_s and not need_x
            # s * q_in is the quantized input.
            q_in = q - o / steps[0] if o else q
            g_in, g_w, g_b = op_backward(g, q_in, w, op, need_in and not only_s, need_wgrad, need_b)
            if g_w is not None:
                g_w.mul_(steps[0])
            if only_s:
                # <g_in, r> = <g, op(r, W)> (the adjoint): one forward op instead of an input gradient, with
                # r = d(s q)/ds = q - v * inside, built in q's buffer.
                v = xf / steps[0]
                r = q.sub_(pass_inside(v, v, qn, qp, out=v))
                gs = (sum_product(upcast(g), op(r, w)) * grad_scale).reshape(1)
            elif g_in is not None:
                gx, gs = _lsq_grads(upcast(g_in), xf, q, qn, qp, steps[0], need_s, grad_scale)
                if gs is not None:
                    gs = gs.reshape(1)
        else:
            # The search (Eq. 2); with --unfixed the weights learn too, on the mixture.
            xm = xf
            if need_wgrad:
                xm = _mixture(xf, steps, probs, a_q).sub_(o * probs.sum())
            g_in, g_w, g_b = op_backward(g, xm, w, op, need_in, need_wgrad, need_b)
            del xm
            if g_in is not None:
                gx, gs, gp = _mixture_grads(upcast(g_in), xf, steps, probs, a_q, need_s, need_p)
                if o and gp is not None:
                    # d/dp_i of -p_i o
                    gp = gp.sub_(o * upcast(g_in).sum())
        if gx is not None and need_x:
            gx = gx.to(x.dtype)
        else:
            gx = None
        if g_w is not None and w_q is not None:
            # Through the weight quantizer (LSQ).
            g_w, g_ws = _lsq_grads(g_w, weight, w_codes, *w_q[:2], w_step, need_ws, w_q[2])
        if not need_w:
            g_w = None
        return gx, gs, gp, g_w, g_ws, g_b, None, None, None, None


def use_speed_path(model, on=True):
    """The fused op in every quantized layer (on), or sections 1-2's readable form (off)."""
    for m in quant_layers(model):
        m.fused = on
    return model


# ==== 8. The driver: torchrun, data, model, checkpoints, the run, the command line ==================================
# Not the paper: what it takes to run sections 1-6 on ImageNet with torchrun and on CPU. Its contract with the
# user: bad input ends in one line naming the problem (BadInput, exit 2) before anything heavy happens; a resumed
# run continues bit-exactly (the checkpoint holds every rank's RNG state and the data order follows the epoch);
# a killed run loses at most the epoch in progress (files are written whole or not at all); one run at a time
# per output folder (a lock).


class BadInput(Exception):
    """A problem the user can fix: one line on stderr, exit status 2, no traceback."""


# The signal that asked this process to stop, 0 if none.
_STOP = {"signum": 0}


def _on_signal(signum, frame):
    """The first SIGINT or SIGTERM stops at the next step boundary, on every rank; a second one at once."""
    _STOP["signum"] = signum
    signal.signal(signum, signal.SIG_DFL)


class Dist:
    """torchrun's process group (nccl on GPUs, gloo on CPU); one process without torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self.device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.cuda else "gloo")


def sync_step(dist, params, loss):
    """ONE all-reduce per step: the gradients, the loss and the stop flag. Returns (mean loss, a rank signalled).

    Our choice instead of DistributedDataParallel: bit-meta leaves the other branches' steps without gradients in
    each pass, which DDP handles only with find_unused_parameters and a second traversal. One flat all-reduce is
    also where every rank learns that one of them was signalled, so that all stop at the same step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    stop = torch.tensor(float(_STOP["signum"] > 0), device=loss.device)
    flat = torch.stack([loss.float().reshape(()), stop])
    if dist.world > 1:
        flat = torch.cat([flat] + [g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= dist.world
        for g, mean in zip(grads, flat[2:].split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))
    loss_v, stop_v = flat[:2].tolist()
    return loss_v, stop_v > 0


def synthetic_spec(data):
    """(train images, val images, classes) of --data synthetic[:TRAIN,VAL,CLASSES]; None for a folder."""
    name, _, given = data.partition(":")
    if name != "synthetic":
        return None
    spec = [2560, 1000, 10]
    if given:
        spec = [int(v) if v.isdigit() else -1 for v in given.split(",")]
    if len(spec) != 3 or min(spec[:2]) < 1 or spec[2] < 2:
        raise BadInput(f"--data {data}: expected synthetic:TRAIN,VAL,CLASSES, 1 validation image and 2 classes or more")
    return tuple(spec)


def synthetic_dataset(n, num_classes, image_size, seed, split):
    """A learnable set from the seed: its class's smooth random colour pattern, shifted, scaled, plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=image_size, mode="bilinear")
    g.manual_seed(seed * 1000 + (1 if split == "train" else 2))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    shifts = torch.randint(-image_size // 8, image_size // 8 + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(t, (int(s[0]), int(s[1])), (1, 2)) for t, s in zip(templates[labels], shifts)])
    # a random contrast and brightness per image, then noise
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.3 * torch.randn(n, 1, 1, 1, generator=g)
    x = x + 0.7 * torch.randn(x.shape, generator=g)
    return torch.utils.data.TensorDataset(x.contiguous(), labels)


def build_datasets(args):
    """(train set, val set, classes): synthetic, or ImageFolder with torchvision's reference transforms."""
    spec = synthetic_spec(args.data)
    if spec:
        train_images, val_images, classes = spec
        train = synthetic_dataset(train_images, classes, args.image_size, args.seed, "train")
        val = synthetic_dataset(val_images, classes, args.image_size, args.seed, "val")
        return train, val, classes
    if not os.path.isdir(args.data):
        raise BadInput(f"--data {args.data}: no such folder (expected train/ and val/ in it)")
    # ImageNet's mean and standard deviation
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    size = args.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), norm])
    # ImageFolder names a missing folder, a folder without classes, a class without images.
    try:
        train = ImageFolder(os.path.join(args.data, "train"), train_tf)
        val = ImageFolder(os.path.join(args.data, "val"), val_tf)
    except OSError as e:
        problem = f"{e.strerror}: {e.filename}" if e.filename else e
        raise BadInput(f"--data {args.data}: {problem}") from None
    if train.classes != val.classes:
        example = sorted(set(train.classes) ^ set(val.classes))[0]
        raise BadInput(f"--data {args.data}: train/ and val/ have different classes, e.g. {example}")
    return train, val, len(train.classes)


def build_loaders(args, dist, train_set, val_set):
    """Loaders (validation: each image once, rank r takes r, r+W, ...) and LSQ's calibration batch (from --seed)."""
    share = len(train_set) // dist.world
    if args.batch_size > share:
        raise BadInput(f"--batch-size {args.batch_size}: over a process's {share} training images; use {share} or less")
    sampler = DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=args.seed, drop_last=True)
    # Workers are re-created each epoch (not persistent) and seeded from the RNG state at its start: exact resume.
    loading = {"num_workers": 0 if synthetic_spec(args.data) else args.workers, "pin_memory": dist.cuda}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        picked = torch.randperm(len(train_set))[: args.batch_size]
        calib = torch.stack([train_set[int(i)][0] for i in picked])
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **loading)
    val_sampler = range(dist.rank, len(val_set), dist.world)
    val_loader = DataLoader(val_set, args.batch_size, sampler=val_sampler, **loading)
    return train_loader, val_loader, calib


# The paper's settings (Table 1, supplement Table 8); targets: its reported GBOPs (ResNet-18's 32.86 as 33, our
# choice); the torchvision weights nearest its FP models.
PAPER_SETTINGS = {
    "resnet18": dict(bits="8,4,2", lam=0.4, epochs=90, target_gbops=33.0, weights="IMAGENET1K_V1"),
    "mobilenet_v2": dict(bits="8,4,3", lam=1.0, epochs=140, target_gbops=5.12, weights="IMAGENET1K_V1"),
    "mobilenet_v3_large": dict(bits="8,4,3", lam=4.0, epochs=140, target_gbops=3.29, weights="IMAGENET1K_V2"),
}
# Our choice for the other archs (their target: 95% of uniform A4).
OTHER_DEFAULTS = {
    "mobilenet_v3_small": dict(bits="8,4,3", lam=4.0, epochs=140),
    None: dict(bits="8,4,2", lam=1.0, epochs=90),
}
# What metamix can neither quantize nor count in BOPs (Swin's attention shows as Linear modules not called).
UNSUPPORTED = (
    nn.Conv1d,
    nn.Conv3d,
    nn.modules.conv._ConvTransposeNd,
    nn.RNNBase,
    nn.Bilinear,
    nn.MultiheadAttention,
    torchvision.models.maxvit.RelativePositionalMultiHeadAttention,
)


def resolve_weights(arch, name, flag="--pretrained"):
    """torchvision's weights enum for --pretrained NAME ("paper": those closest to the paper's FP baseline)."""
    enum = torchvision.models.get_model_weights(arch)
    if name == "paper":
        name = PAPER_SETTINGS.get(arch, {}).get("weights", "DEFAULT")
    try:
        return enum.verify(name)
    except (KeyError, ValueError):
        names = ", ".join(w.name for w in enum)
        raise BadInput(
            f"{flag} {name!r}: no such file and no such weights for {arch}; give a state dict's path or one of: "
            f"DEFAULT, {names}"
        ) from None


def local_weights(name):
    """A full-precision state dict on disk (a PATH), rather than torchvision's weights by name."""
    return bool(name) and (os.sep in name or os.path.exists(name))


def fp_model(arch, name, num_classes, flag="--pretrained"):
    """A torchvision model: torchvision's weights by name, a local state dict, or (no name) a fresh init."""
    weights = None
    kw = {"num_classes": num_classes}
    if name and not local_weights(name):
        weights = resolve_weights(arch, name, flag)
        if num_classes != 1000:
            raise BadInput(f"{flag} {name} needs 1000 classes, the data has {num_classes}")
        kw = {}
    if arch in ("googlenet", "inception_v3"):
        # Without their auxiliary heads, the training output is a tensor.
        kw["aux_logits"] = False
        if weights is None:
            kw["init_weights"] = True
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kw)
    except Exception as e:
        raise BadInput(f"cannot load {arch}'s weights ({type(e).__name__}: {e}); try {flag} PATH") from None
    if local_weights(name):
        sd = load_checkpoint(name, flag, "a state dict")
        try:
            model.load_state_dict(sd.get("model", sd))
        except (RuntimeError, TypeError, AttributeError) as e:
            reason = str(e).splitlines()[0]
            raise BadInput(
                f"{flag} {name} is not a state dict of {arch} with {num_classes} classes ({reason})"
            ) from None
    return model


def build_model(args, num_classes, layer_type=QuantLayer):
    """The torchvision model with its FP weights, patched; refused, naming the layer, unless all is counted."""
    model = fp_model(args.arch, args.pretrained, num_classes)
    found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, UNSUPPORTED)]
    patch_model(model.train(), args.bits, args.w_bits, args.first_last_bits, 224, layer_type, args.plain_lsq)
    # A Conv2d or Linear still there was not called as a module in the forward pass (e.g. attention's projections).
    for n, m in model.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            found.append(f"{n} (not called as a module)")
    if found:
        raise BadInput(
            f"--arch {args.arch}: {', '.join(found[:3])} would stay in full precision and outside the BOPs; "
            "metamix quantizes Conv2d and Linear modules (CNNs such as resnet18, mobilenet_v2)"
        )
    # Is the crop too small for the model's pooling? The smallest size that runs, to name in the error.
    for size in [args.image_size] + list(range(16, 225, 16)):
        with contextlib.suppress(RuntimeError), torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
            break
    if size != args.image_size:
        raise BadInput(f"--image-size {args.image_size} is too small for {args.arch}; use --image-size {size} or more")
    return model.train()


def atomic_write(path, data):
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves the old file whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BadInput(f"no space left on device writing {path}; its previous version is intact") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saved_bytes(obj):
    """torch.save into memory: a full disk then fails in atomic_write, which names the path, not in torch.save."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def file_kind(head):
    """What a file that torch.save did not write looks like, from its first bytes."""
    if not head:
        return "empty"
    if not all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        return "a file of another kind"
    if head.lstrip()[:1] in b"{[":
        return "a JSON file"
    return "a text file"


def load_checkpoint(path, flag, what="a metamix checkpoint"):
    """torch.load(weights_only=True); every failure a whole sentence that says what the file is."""
    if os.path.isdir(path):
        hint = "give a file in it"
        if flag == "--resume":
            hint += ", or --resume auto"
        raise BadInput(f"{flag} {path} is a folder, not {what}; {hint}")
    if not os.path.isfile(path):
        raise BadInput(f"{flag} {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4096)
    # torch.save's zip format, or a legacy pickle
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise BadInput(f"{flag} {path} is {file_kind(head)}, not {what} (a file written by torch.save)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        problem = f"is truncated or corrupt (torch.load fails with {type(e).__name__})"
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            problem = "holds pickled Python objects, which metamix does not load (weights_only)"
        raise BadInput(f"{flag} {path} {problem}") from None
    if not isinstance(ck, dict):
        raise BadInput(f"{flag} {path} holds a {type(ck).__name__}, not {what}")
    return ck


CHECKPOINT_FORMAT = "metamix-checkpoint-4"


def load_run_checkpoint(path, flag):
    """A checkpoint of this metamix (checkpoint.pth, meta_state.pth): load_checkpoint, then its format checked."""
    ck = load_checkpoint(path, flag)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise BadInput(f"{flag} {path} is not a checkpoint of this metamix (format {ck.get('format')!r})")
    return ck


# Flags a resumed checkpoint must share; the second group may change at the phase boundary (e.g. meta_state.pth).
SAME_RUN = ("arch", "bits", "w_bits", "first_last_bits", "plain_lsq", "search_epochs", "unfixed")
SAME_SELECTION = (
    "epochs",
    "target_gbops",
    "lam",
    "lr",
    "optimizer",
    "alpha_optimizer",
    "alpha_lr",
    "bits_from",
    "no_budget_repair",
    "teacher",
    "act_only_epochs",
)
# The recipes' default rates, (from pretrained weights, from scratch). Ours for the weights, SGD: the digits study's
# (docs/digits.md); the authors', Adam: their code's. The alphas: ours SGD, Adam with the authors' betas and L2, and
# the authors' whole recipe (their rate and their random init).
LR = {"sgd": (0.01, 0.05), "adam": (5e-4, 5e-4)}
ALPHA_LR = {"sgd": (0.005, 0.05), "adam": (0.01, 0.1), "authors": (1e-4, 1e-3)}


def weights_quantized(args, epoch, selected):
    """Whether the weights are quantized after `epoch`: the bits are selected and the act-only epochs are over."""
    return selected is not None and epoch > args.search_epochs + args.act_only_epochs


class Run:
    """Everything a run carries from epoch to epoch; save() writes it as the checkpoint.

    Exact resume (our choice): the checkpoint holds the model, the optimizers and schedule, the history and every
    rank's RNG states; the data order is a function of the seed and the epoch, and DataLoader workers are re-created
    each epoch, so a run stopped after any epoch and resumed computes bit for bit what the uninterrupted run
    computes.
    """

    def __init__(self, args, dist, model, steps=1, teacher=None):
        self.args = args
        self.dist = dist
        self.model = model
        # Steps per epoch, for a schedule stepped per step.
        self.steps = steps
        self.teacher = teacher
        # The epochs finished.
        self.epoch = 0
        # A branch per searched layer, once the bits are selected.
        self.selected = None
        # The rows of log.jsonl, the FP model's top-1, how the search ended.
        self.history = []
        self.fp_top1 = None
        self.search = None
        self.build_optimizers()

    @property
    def phase(self):
        """Bit selection until the bits are selected, then weight training."""
        return "bit_selection" if self.selected is None else "weight_training"

    def build_optimizers(self):
        """The training recipes, ours and the authors', each in one branch (the paper names neither).

        A fresh optimizer and schedule for each stage: bit selection, weight training with FP weights (the act-only
        epochs, if any), weight training with quantized weights. `sched_per_step` says whether the schedule steps
        after every step or after every epoch.
        """
        a = self.args
        alphas = alphas_of(self.model)

        def groups(decay, rate):
            rest = [p for p in self.model.parameters() if all(p is not q for q in alphas + decay)]
            return [{"params": decay, "weight_decay": rate}, {"params": rest, "weight_decay": 0.0}]

        if a.optimizer == "sgd":
            # Ours: SGD, momentum 0.9, decay 1e-4 on every conv and linear weight, a constant LR in bit selection,
            # then a cosine stepped per epoch.
            decay = [m.weight for m in quant_layers(self.model)]
            self.opt = torch.optim.SGD(groups(decay, 1e-4), lr=a.lr, momentum=0.9)
            self.sched_per_step = False
        elif a.optimizer == "adam":
            # The authors': Adam, L2 5e-6 on the 4-D conv weights only, LR/5 in bit selection, a cosine stepped per
            # step, and the gradient norm clipped at 10 before each step: this optimizer's gradients only (their
            # code clips the alphas' stale gradients too).
            decay = [m.weight for m in quant_layers(self.model) if m.weight.dim() == 4]
            lr = a.lr / 5 if self.selected is None else a.lr
            self.opt = torch.optim.Adam(groups(decay, 5e-6), lr=lr)
            clipped = [p for g in self.opt.param_groups for p in g["params"]]

            def clip(optimizer, args, kwargs):
                nn.utils.clip_grad_norm_(clipped, 10)

            self.opt.register_step_pre_hook(clip)
            self.sched_per_step = True
        else:
            raise ValueError(f"--optimizer {a.optimizer}: unknown")
        if a.alpha_optimizer == "sgd":
            # Ours: SGD with momentum, alphas from zero (every candidate equally likely).
            self.opt_alpha = torch.optim.SGD(alphas, lr=a.alpha_lr, momentum=0.9)
        elif a.alpha_optimizer in ("adam", "authors"):
            # The authors' Adam: betas (0.5, 0.999), L2 1e-3; "authors" also draws the alphas at random (train).
            self.opt_alpha = torch.optim.Adam(alphas, lr=a.alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
        else:
            raise ValueError(f"--alpha-optimizer {a.alpha_optimizer}: unknown")
        self.sched = None
        if self.selected is not None:
            # A cosine over the stage the next epoch belongs to.
            epochs = a.act_only_epochs
            if weights_quantized(a, self.epoch + 1, self.selected):
                epochs = a.epochs - a.search_epochs - a.act_only_epochs
            if self.sched_per_step:
                epochs *= self.steps
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(epochs, 1))

    def init_alphas(self):
        """The alphas' start, part of the alpha recipe: ours zeros (every candidate equally likely); the authors' a
        normal draw, std 1e-3, a random initial argmax per layer (rank 0's draw reaches every rank)."""
        if self.args.alpha_optimizer == "authors":
            for alpha in alphas_of(self.model):
                nn.init.normal_(alpha, std=1e-3)

    def load_state_dict(self, ck, path):
        """Continue from a checkpoint (load_run_checkpoint's), refusing one of another run, or, with Adam's per-step
        schedule, of another number of processes."""
        a = self.args
        # At the phase boundary the optimizers are rebuilt before any step, so their flags may change.
        boundary = ck["selected"] is None and ck["epoch"] >= a.search_epochs
        keys = SAME_RUN if boundary else SAME_RUN + SAME_SELECTION
        for key in keys:
            mine = flag_text(getattr(a, key))
            theirs = flag_text(ck["args"][key])
            if mine != theirs:
                raise BadInput(f"--resume {path}: the checkpoint has --{key.replace('_', '-')} {theirs}, not {mine}")
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise BadInput(f"--resume {path}: the model does not match ({str(e).splitlines()[0]})") from None
        self.epoch = ck["epoch"]
        self.selected = ck["selected"]
        self.history = ck["history"]
        self.fp_top1 = ck["fp_top1"]
        # The mode the checkpoint's epoch was evaluated in.
        set_mode(self.model, "selected", quant_weights=weights_quantized(a, self.epoch, self.selected))
        self.build_optimizers()
        processes = len(ck["rng"])
        if self.sched_per_step and self.selected is not None and processes != self.dist.world:
            raise BadInput(f"--resume {path}: Adam's per-step schedule needs its {processes} processes again")
        if not boundary:
            self.opt.load_state_dict(ck["opt"])
            self.opt_alpha.load_state_dict(ck["opt_alpha"])
            if self.sched is not None:
                self.sched.load_state_dict(ck["sched"])
        # Another world size is valid, but not bit-exact: the ranks beyond the saved ones take the last one's.
        rng = ck["rng"][min(self.dist.rank, processes - 1)]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if self.dist.cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])

    def save(self):
        """checkpoint.pth and log.jsonl; at the phase boundary also meta_state.pth, kept (for --bits-from)."""
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.dist.cuda:
            state["cuda"] = torch.cuda.get_rng_state()
        # Every rank's RNG state: rank r resumes with its own.
        rng = [state] * self.dist.world
        if self.dist.world > 1:
            torch.distributed.all_gather_object(rng, state)
        if not self.dist.main:
            return
        sched = self.sched.state_dict() if self.sched else None
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "args": vars(self.args),
            "epoch": self.epoch,
            "phase": self.phase,
            "selected": self.selected,
            "num_classes": quant_layers(self.model)[-1].weight.shape[0],
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": sched,
            "opt_alpha": self.opt_alpha.state_dict(),
            "history": self.history,
            "fp_top1": self.fp_top1,
            "rng": rng,
        }
        data = saved_bytes(checkpoint)
        out = self.args.output_dir
        if self.selected is None and self.epoch == self.args.search_epochs:
            # The end of bit selection: the meta-state, kept for other selections (baselines.py, --bits-from).
            atomic_write(os.path.join(out, "meta_state.pth"), data)
        atomic_write(os.path.join(out, "checkpoint.pth"), data)
        log_lines = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write(os.path.join(out, "log.jsonl"), log_lines.encode())


def flag_text(value):
    """A flag's value as the command line writes it: a list as 8,4,2."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def log(dist, *msg):
    """Print on the main process only."""
    if dist.main:
        print(*msg, flush=True)


def search_report(model, last_change, steps, target_gbops):
    """How the search ended. Settled (our rule): the argmax configuration did not change in the last quarter of the
    steps, and the median top-2 margin of softmax(alpha) over the searched layers is 0.05 or more."""
    probs = torch.stack([F.softmax(alpha.detach().float(), 0) for alpha in alphas_of(model)])
    top2 = probs.topk(2, 1).values.cpu()
    # per layer
    margin = top2[:, 0] - top2[:, 1]
    median = margin.quantile(0.5).item()
    gbops = branches_gbops(model, argmax_branches(model))
    return {
        "argmax_last_changed": last_change,
        "settled": last_change <= 0.75 * steps and median >= 0.05,
        "steps": steps,
        "median_margin": median,
        "min_margin": margin.min().item(),
        "argmax_gbops": gbops,
        "vs_target": gbops / target_gbops - 1,
    }


def train_one_epoch(run, loader, epoch, autocast):
    """One epoch of the current phase (section 6's steps); returns the mean loss."""
    a = run.args
    model = run.model
    dist = run.dist
    selecting = run.phase == "bit_selection"
    # With --bits-from the selection is given: bit selection trains the meta-state only.
    searching = selecting and epoch == a.search_epochs and not a.bits_from
    model.train()
    # The search makes --search-steps steps or more: passes over the data, each in an order of its own (the first
    # in the epoch's, as without passes). ImageNet's epoch is longer than the default, so it keeps one pass.
    passes = 1
    if searching:
        passes = max(1, -(-a.search_steps // len(loader)))

    def batches():
        for p in range(passes):
            loader.sampler.set_epoch(epoch + 1000 * p)
            yield from loader

    steps = len(loader) * passes
    t0 = time.time()
    total = 0.0
    argmax = None
    run.search = None
    if searching:
        argmax = argmax_branches(model)
        run.search = 0
    for step, (images, targets) in enumerate(batches(), 1):
        images = images.to(dist.device, non_blocking=True)
        targets = targets.to(dist.device, non_blocking=True)

        def sync(params, loss, step=step):
            """One all-reduce, then the NaN and stop checks, before the update: nothing bad is ever saved."""
            loss_v, stop = sync_step(dist, params, loss)
            if not math.isfinite(loss_v):
                last = f"epoch {run.epoch} in checkpoint.pth" if run.epoch else "none written yet"
                raise BadInput(
                    f"the loss is {loss_v} at epoch {epoch} step {step}/{steps}, stopped before this update "
                    f"(last good checkpoint: {last}); try a lower --lr"
                )
            if stop:
                # On every rank at this step.
                raise KeyboardInterrupt(f"at epoch {epoch} step {step}/{steps}")
            return loss_v

        # The teacher runs once per batch, for all of the step's passes.
        criterion = F.cross_entropy
        if run.teacher is not None:
            with torch.no_grad(), autocast():
                criterion = distillation_loss(run.teacher(images))
        if selecting:
            loss_v, _, gbops = bit_selection_step(
                model,
                images,
                targets,
                run.opt,
                run.opt_alpha,
                search=searching,
                lam=a.lam,
                target_gbops=a.target_gbops,
                autocast=autocast,
                sync=sync,
                fixed=not a.unfixed,
                criterion=criterion,
            )
            if searching and argmax_branches(model) != argmax:
                # The last step at which the argmax configuration changed.
                argmax = argmax_branches(model)
                run.search = step
        else:
            loss_v = weight_training_step(model, images, targets, run.opt, autocast, sync, criterion)
            if run.sched_per_step:
                run.sched.step()
        total += loss_v
        if dist.main and (step % min(100, max(1, steps // 2)) == 0 or step == steps):
            dt = time.time() - t0
            kind = "train"
            search_gbops = ""
            if searching:
                kind = "meta+search"
                search_gbops = f" search-gbops {float(gbops):.2f}"
            elif selecting:
                kind = "meta"
            lr = run.opt.param_groups[0]["lr"]
            speed = step * len(images) * dist.world / max(dt, 1e-9)
            eta = datetime.timedelta(seconds=int(dt / step * (steps - step)))
            print(
                f"{run.phase} epoch {epoch}/{a.epochs} [{kind}] step {step}/{steps} loss {loss_v:.4f}{search_gbops} "
                f"lr {lr:.4g} {speed:.0f} img/s eta {eta}",
                flush=True,
            )
    if searching:
        report = search_report(model, run.search, steps, a.target_gbops)
        run.search = report
        settled = "settled" if report["settled"] else "NOT settled"
        log(
            dist,
            f"search {settled}: argmax last changed at step {report['argmax_last_changed']}/{steps}; top-2 margins of "
            f"softmax(alpha) median {report['median_margin']:.3f}, min {report['min_margin']:.3f}; argmax "
            f"{report['argmax_gbops']:.3f} GBOPs ({report['vs_target']:+.1%})",
        )
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model, loader, dist, autocast):
    """Top-1/top-5 of the validation set, each image once; BN statistics averaged over ranks first (timm's choice)."""
    if dist.world > 1:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for t in (m.running_mean, m.running_var):
                    torch.distributed.all_reduce(t)
                    t.div_(dist.world)
    model.eval()
    # loss sum, top-1 hits, top-5 hits, images
    tot = torch.zeros(4, dtype=torch.float64, device=dist.device)
    for images, targets in loader:
        images = images.to(dist.device, non_blocking=True)
        targets = targets.to(dist.device, non_blocking=True)
        with autocast():
            logits = model(images).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        loss_sum = F.cross_entropy(logits, targets, reduction="sum").double()
        count = torch.tensor(len(targets), device=dist.device).double()
        tot += torch.stack([loss_sum, hit[:, 0].sum().double(), hit.any(1).sum().double(), count])
    if dist.world > 1:
        torch.distributed.all_reduce(tot)
    loss, top1, top5, n = tot.tolist()
    count = max(n, 1)
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "n": int(n)}


def bits_report(model, args):
    """The content of bits.json: the selected configuration, layer by layer (the data of Fig. 7)."""
    rows = []
    for m in quant_layers(model):
        row = {"name": m.name, "type": m.kind, "macs": m.macs, "in_size": m.in_size, "fixed": m.fixed}
        # the grid: signed or not, and its offset
        row.update(signed=m.act.signed, offset=m.act.offset)
        if m.fixed:
            row["a_bits"], row["w_bits"] = m.candidates[0]
            row["probs"] = None
        else:
            row["a_bits"], row["w_bits"] = m.candidates[m.selected_branch]
            probs = F.softmax(m.act.alpha.detach().float().cpu(), 0).tolist()
            row["probs"] = [round(p, 6) for p in probs]
        rows.append(row)
    searched = [r for r in rows if not r["fixed"]]
    size = sum(r["in_size"] for r in searched)
    return {
        "arch": args.arch,
        "candidates": [list(c) for c in searched_layers(model)[0].candidates],
        "first_last_bits": args.first_last_bits,
        "target_gbops": args.target_gbops,
        "gbops": branches_gbops(model, [m.selected_branch for m in searched_layers(model)]),
        "selection": f"bits-from {args.bits_from}" if args.bits_from else "metamix",
        # The plain mean over the searched layers.
        "avg_a_bits": sum(r["a_bits"] for r in searched) / len(searched),
        # The authors' code (likely the paper's "3.85/4"): weighted by each input's values per image at 224 px.
        "avg_a_bits_weighted": sum(r["a_bits"] * r["in_size"] for r in searched) / size,
        "avg_w_bits": sum(r["w_bits"] for r in searched) / len(searched),
        "layers": rows,
    }


def mixed_weights(report):
    """Whether a report is of (A, W) pairs (the supplement's, pairs.py): each layer has its own weight bits."""
    return len({w for _, w in report["candidates"]}) > 1


def layer_table(report):
    """bits.json as text (Fig. 7): a row per layer, its MOPs and a bar of its activation bits."""
    lines = [f"{'layer':<34} {'type':<7} {'MOPs':>8}  bits"]
    for r in report["layers"]:
        line = f"{r['name']:<34} {r['type']:<7} {r['macs'] / 1e6:8.2f}  {'#' * r['a_bits']:<8} A{r['a_bits']}"
        if mixed_weights(report):
            line += f"/W{r['w_bits']}"
        if r["fixed"]:
            line += " (fixed)"
        lines.append(line)
    return "\n".join(lines)


def avg_bits_text(report):
    """The average bits of a report, as one phrase."""
    text = (
        f"average activation bits {report['avg_a_bits']:.2f} (weighted by input size, as the authors' code: "
        f"{report['avg_a_bits_weighted']:.2f})"
    )
    if mixed_weights(report):
        text += f"; weight bits {report['avg_w_bits']:.2f}"
    return text


def read_bits_from(model, path, target_gbops):
    """Branch indices from a bits.json or {layer name: a_bits} (pairs: [a_bits, w_bits]), set as the selection."""
    flag = f"--bits-from {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise BadInput(f"{flag}: cannot read it ({e})") from None
    except ValueError as e:
        raise BadInput(f"{flag}: not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), list):
        data = {r.get("name"): [r.get("a_bits"), r.get("w_bits")] for r in data["layers"] if isinstance(r, dict)}
    if not isinstance(data, dict):
        raise BadInput(f"{flag}: expected a bits.json or {{layer name: activation bits}}")
    layers = {m.name: m for m in quant_layers(model)}
    searched = searched_layers(model)
    unknown = [n for n in data if n not in layers]
    if unknown:
        raise BadInput(f"{flag}: unknown layer {unknown[0]!r}")
    missing = [m.name for m in searched if m.name not in data]
    if missing:
        raise BadInput(f"{flag}: no bits for layer {missing[0]} ({len(missing)} of {len(searched)} missing)")
    for name, b in data.items():
        m = layers[name]
        widths = {w for _, w in m.candidates}
        pair = b
        if isinstance(b, list):
            pair = tuple(b)
        elif len(widths) == 1:
            # activation bits alone: the layer's one weight bit-width
            pair = (b, *widths)
        if pair not in m.candidates or any(isinstance(v, bool) for v in pair):
            candidates = ", ".join(f"[{a}, {w}]" for a, w in m.candidates)
            raise BadInput(f"{flag}: layer {name} has {json.dumps(b)}, not one of its candidates: {candidates}")
        m.selected_branch = m.candidates.index(pair)
    branches = [m.selected_branch for m in searched]
    gbops = branches_gbops(model, branches)
    if gbops > target_gbops + 1e-9:
        raise BadInput(f"{flag}: the configuration costs {gbops:.3f} GBOPs, over --target-gbops {target_gbops:.3f}")
    return branches


def select_bits(run):
    """Between the phases (Table 1): start_weight_training (or --bits-from); prints Fig. 7 as text, writes bits.json."""
    a = run.args
    model = run.model
    given = None
    if a.bits_from:
        given = read_bits_from(model, a.bits_from, a.target_gbops)
    run.selected, _, repaired = start_weight_training(model, a.target_gbops, not a.no_budget_repair, given)
    # With --act-only-epochs the weights stay in FP first.
    set_mode(model, "selected", quant_weights=not a.act_only_epochs)
    run.build_optimizers()
    report = bits_report(model, a)
    # A --bits-from run made no search (its "selection" names the file), even when it resumed one's meta-state.
    report["search"] = next((h["search"] for h in run.history if "search" in h and not a.bits_from), None)
    if run.dist.main:
        note = ""
        if repaired and not a.bits_from:
            note = " (argmax lowered by budget repair)"
        print(layer_table(report), flush=True)
        print(
            f"selected: {report['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}{note}; {avg_bits_text(report)}",
            flush=True,
        )
        atomic_write(os.path.join(a.output_dir, "bits.json"), json.dumps(report, indent=1).encode())


def broadcast_quantizers(model):
    """Rank 0's steps, grids and signs for all ranks (they computed them from the same batch, but for float noise)."""
    for t in filter(torch.is_tensor, model.state_dict().values()):
        torch.distributed.broadcast(t, 0)
    extra = [{k: v for k, v in model.state_dict().items() if not torch.is_tensor(v)}]
    torch.distributed.broadcast_object_list(extra, 0)
    model.load_state_dict(extra[0], strict=False)


def train(run, train_loader, val_loader, calib, autocast):
    """Both phases, from wherever the run stands (fresh or resumed)."""
    a = run.args
    model = run.model
    dist = run.dist
    if run.epoch == 0:
        init_quantizers(model, calib.to(dist.device))
        run.init_alphas()
        if dist.world > 1:
            broadcast_quantizers(model)
        run.fp_top1 = evaluate(model, val_loader, dist, autocast)["top1"]
        log(dist, f"full-precision top-1 before quantization: {run.fp_top1:.2f}%")
    for epoch in range(run.epoch + 1, a.epochs + 1):
        if run.selected is None and epoch > a.search_epochs:
            select_bits(run)
        elif a.act_only_epochs and epoch == a.search_epochs + a.act_only_epochs + 1:
            # The weights are quantized from here, their steps set from these weights; a fresh optimizer.
            set_mode(model, "selected", quant_weights=True)
            run.build_optimizers()
        phase = run.phase
        t0 = time.time()
        # The rate this epoch starts with.
        lr = run.opt.param_groups[0]["lr"]
        loss = train_one_epoch(run, train_loader, epoch, autocast)
        if phase == "bit_selection":
            # Evaluate the argmax configuration, weights in full precision.
            apply_selection(model, argmax_branches(model))
            set_mode(model, "selected", quant_weights=False)
        elif not run.sched_per_step:
            run.sched.step()
        metrics = evaluate(model, val_loader, dist, autocast)
        gbops = branches_gbops(model, [m.selected_branch for m in searched_layers(model)])
        row = {"epoch": epoch, "phase": phase, "loss": loss, **metrics, "lr": lr, "gbops": gbops}
        row["seconds"] = round(time.time() - t0, 3)
        row["world_size"] = dist.world
        if run.search:
            row["search"] = run.search
        run.history.append(row)
        run.epoch = epoch
        run.save()
        log(
            dist,
            f"epoch {epoch}/{a.epochs} {phase}: loss {loss:.4f} top-1 {metrics['top1']:.2f}% top-5 "
            f"{metrics['top5']:.2f}% {gbops:.3f} GBOPs ({time.time() - t0:.1f}s)",
        )
        if a.stop_after_epoch and a.stop_after_epoch <= epoch < a.epochs:
            log(dist, f"stopping after epoch {epoch} as asked (--stop-after-epoch); continue with --resume auto")
            return
    if dist.main and run.selected is not None and run.history:
        last = run.history[-1]
        took = datetime.timedelta(seconds=int(sum(h["seconds"] for h in run.history)))
        print(
            f"summary: full-precision top-1 {run.fp_top1:.2f}% -> final top-1 {last['top1']:.2f}% (top-5 "
            f"{last['top5']:.2f}%); {last['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}; "
            f"{avg_bits_text(bits_report(model, a))}; {took} in all",
            flush=True,
        )


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line and exit 2 like every other bad input (argparse adds its usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog.removesuffix('.py')}: error: {message}\n")


def bit_list(text):
    """argparse type of --bits and --w-bits: comma-separated distinct bit-widths in 2..16."""
    bits = [int(t) if t.strip().isdigit() else 0 for t in text.split(",")]
    if not all(2 <= b <= 16 for b in bits) or len(set(bits)) != len(bits):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct bit-widths between 2 and 16, such as 8,4,2")
    return bits


def number(kind, lo, above=False):
    """argparse type of a numeric flag: a finite `kind` from lo on (above: lo itself excluded)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        inside = lo < v if above else lo <= v
        if not inside or not math.isfinite(v):
            bound = "above" if above else "at least"
            raise argparse.ArgumentTypeError(f"{text} must be {bound} {lo:g}")
        return v

    return parse


def get_args_parser():
    p = Parser(
        description="MetaMix mixed-precision activation quantization (AAAI 2024)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add(
        "--arch",
        default="resnet18",
        metavar="ARCH",
        choices=torchvision.models.list_models(module=torchvision.models),
        help="torchvision classification model",
    )
    add("--data", default="synthetic", help="a folder with train/ and val/, or synthetic[:TRAIN,VAL,CLASSES]")
    add(
        "--pretrained",
        nargs="?",
        const="paper",
        metavar="WEIGHTS|PATH",
        help="torchvision's weights (bare: nearest the paper's FP baseline), or a local state dict",
    )
    add("--target-gbops", type=number(float, 0, above=True), help="budget (default: the paper's, else 95%% of A4)")
    add("--bits", type=bit_list, help="candidate activation bits (default: resnet18 8,4,2; MobileNets 8,4,3)")
    add("--w-bits", type=bit_list, default="4", help="weight bits (a list searches (A, W) pairs: pairs.py)")
    add("--first-last-bits", type=int, choices=range(2, 17), default=8, metavar="B", help="first and last layers' bits")
    add("--lam", type=number(float, 0), help="lambda of Eq. 3 (default: resnet18 0.4, mobilenet_v2 1, v3 4)")
    add("--epochs", type=number(int, 1), help="all epochs (default: resnet18 90, MobileNets 140; synthetic 8)")
    add("--search-epochs", type=number(int, 1), default=2, help="bit-selection epochs; the last also searches")
    add("--act-only-epochs", type=number(int, 0), default=0, help="first weight-training epochs in FP (authors': 18)")
    add("--search-steps", type=number(int, 0), default=180, help="search at least this many steps (0: one epoch)")
    add("--unfixed", action="store_true", help="the paper's Figure 7(a) ablation: train the weights in bit-search")
    add("--plain-lsq", action="store_true", help="LSQ's quantizers: a weight step per tensor, no offset grid")
    add("--no-budget-repair", action="store_true", help="keep the argmax bits even if they are over the target")
    add("--bits-from", metavar="FILE", help="take these bits instead of searching: a bits.json or {layer: a_bits}")
    add("--batch-size", type=number(int, 1), default=64, help="images per process per step")
    add(
        "--teacher",
        metavar="ARCH[:WEIGHTS|PATH]",
        help="distil from this frozen torchvision model, in every phase "
        "(the authors': resnet101:IMAGENET1K_V1; weights as --pretrained takes them, default DEFAULT)",
    )
    add("--optimizer", choices=("sgd", "adam"), default="sgd", help="of the weights: ours, or the authors' Adam recipe")
    add("--lr", type=number(float, 0, above=True), help="LR (SGD .01 pretrained, else .05; Adam 5e-4, /5 in selection)")
    add("--alpha-optimizer", choices=("sgd", "adam", "authors"), default="sgd", help="authors': Adam, a random init")
    add("--alpha-lr", type=number(float, 0, above=True), help="SGD .005, Adam .01, authors 1e-4; x10 from scratch")
    add("--image-size", type=number(int, 8), help="training crop in pixels (default: 224; synthetic 32)")
    add("--workers", type=number(int, 0), default=8, help="data-loading processes per rank (an image folder)")
    add("--output-dir", default="runs/metamix", help="checkpoint.pth, meta_state.pth, bits.json, log.jsonl")
    once = p.add_mutually_exclusive_group().add_argument
    once("--resume", metavar="PATH|auto", help="continue from a checkpoint ('auto': the output dir's, if any)")
    add("--stop-after-epoch", type=number(int, 0), default=0, help="end cleanly after this epoch (0: never)")
    once("--dry-run", action="store_true", help="print the MACs, candidates and feasible GBOPs range; no training")
    add("--seed", type=number(int, 0), default=0, help="seed of everything (data order, synthetic data, init)")
    add("--amp", action="store_true", help="bf16 autocast (the quantizer math stays in fp32)")
    return p


def resolve_args(args, layer_type=QuantLayer):
    """Fill the per-arch and per-data defaults and refuse what cannot work, before anything heavy happens."""
    if len(args.w_bits) > 1 and layer_type is QuantLayer:
        raise BadInput(f"--w-bits {flag_text(args.w_bits)}: a list searches (A, W) pairs; run pairs.py")
    d = PAPER_SETTINGS.get(args.arch) or OTHER_DEFAULTS.get(args.arch) or OTHER_DEFAULTS[None]
    synthetic = synthetic_spec(args.data) is not None
    # Our choice: small data (no pretrained weights) gets larger rates.
    small = synthetic or not args.pretrained
    if args.bits is None:
        args.bits = bit_list(d["bits"])
    # Candidates: the activation bits, or with pairs.py each (A, W) pair.
    if len(args.bits) * len(args.w_bits) < 2:
        raise BadInput(f"--bits {flag_text(args.bits)}: a search needs two candidates or more")
    if args.lam is None:
        args.lam = d["lam"]
    if len(args.w_bits) == 1:
        args.w_bits = args.w_bits[0]
    if args.epochs is None:
        args.epochs = 8 if synthetic else d["epochs"]
    if args.lr is None:
        args.lr = LR[args.optimizer][small]
    if args.alpha_lr is None:
        args.alpha_lr = ALPHA_LR[args.alpha_optimizer][small]
    if args.image_size is None:
        args.image_size = 32 if synthetic else 224
    if args.pretrained and not local_weights(args.pretrained):
        # e.g. ResNet18_Weights.IMAGENET1K_V1, as args.json records it
        args.pretrained = str(resolve_weights(args.arch, args.pretrained))
    if args.epochs < args.search_epochs:
        raise BadInput(f"--epochs {args.epochs} is fewer than --search-epochs {args.search_epochs}")
    if args.act_only_epochs and args.act_only_epochs >= args.epochs - args.search_epochs:
        raise BadInput(
            f"--act-only-epochs {args.act_only_epochs} leaves no epoch with quantized weights (--epochs "
            f"{args.epochs}, --search-epochs {args.search_epochs})"
        )
    if args.teacher:
        # Its weights by name are resolved now (e.g. ResNet101_Weights.IMAGENET1K_V1); it is loaded at the start.
        arch, _, weights = args.teacher.partition(":")
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise BadInput(f"--teacher {args.teacher}: {arch!r} is not a torchvision classification model")
        if not local_weights(weights):
            weights = resolve_weights(arch, weights or "DEFAULT", "--teacher")
        args.teacher = f"{arch}:{weights}"
    return args


def check_budget(model, args):
    """The feasible range; the default target: the paper's in its setting, else (our choice) 95% of uniform A4."""
    lo, hi = gbops_range(model)
    given = args.target_gbops is not None
    paper = PAPER_SETTINGS.get(args.arch, {})
    papers_setting = (paper.get("bits"), 4, 8) == (flag_text(args.bits), args.w_bits, args.first_last_bits)
    if not given and papers_setting:
        args.target_gbops = paper["target_gbops"]
    elif not given:
        layers = searched_layers(model)
        w = args.w_bits if isinstance(args.w_bits, int) else 4
        args.target_gbops = 0.95 * config_gbops([m.macs for m in layers], [4 * w] * len(layers), c_fixed_of(model))
    if not lo - 1e-6 <= args.target_gbops <= hi + 1e-6:
        what = f"--target-gbops {args.target_gbops:.4g}"
        if not given:
            what += " (the default; set --target-gbops)"
        raise BadInput(
            f"{what} is outside the feasible range [{lo:.3f}, {hi:.3f}] GBOPs for {args.arch} with bits "
            f"{flag_text(args.bits)}, w-bits {args.w_bits}, first/last at {args.first_last_bits}"
        )
    return lo, hi


# This process's lock on its output folder, held until it exits (the kernel drops it even on kill -9).
_LOCKS: list = []


def lock_output_dir(out):
    """Create the output folder and lock it: a second run into the same folder is refused, naming the first.

    Two runs writing one checkpoint would each overwrite the other's; an advisory lock (flock) is dropped by the
    kernel when the process ends however it ends, so a killed run never leaves a stale lock behind.
    """
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")  # noqa: SIM115 (held open until the process ends)
    except OSError as e:
        raise BadInput(f"--output-dir {out}: not writable ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise BadInput(f"--output-dir {out} is in use by {holder}") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
    lock.flush()
    _LOCKS.append(lock)


def checkpoint_to_resume(args):
    """--resume's checkpoint ('auto': the output folder's, if any); a folder with a checkpoint needs --resume."""
    ck = os.path.join(args.output_dir, "checkpoint.pth")
    if args.resume == "auto":
        return ck if os.path.exists(ck) else None
    if not args.resume and os.path.exists(ck):
        raise BadInput(f"--output-dir {args.output_dir} already holds checkpoint.pth; continue it with --resume auto")
    return args.resume


def count_classes(args):
    """The classes, before the data is read: the synthetic set's (--dry-run: 1000, ImageNet's), or train/'s folders
    (1000 if none is there)."""
    spec = synthetic_spec(args.data)
    if spec and not args.dry_run:
        return spec[2]
    train_dir = os.path.join(args.data, "train")
    if not spec and os.path.isdir(train_dir):
        return sum(e.is_dir() for e in os.scandir(train_dir)) or 1000
    return 1000


def run_main(args, layer_type=QuantLayer):
    """Flag, model and budget problems are refused before the output folder is made; data, batch-size and --resume
    problems just after, before any training; then the run."""
    args = resolve_args(args, layer_type)
    torch.manual_seed(args.seed)
    classes = count_classes(args)
    model = build_model(args, classes, layer_type)
    lo, hi = check_budget(model, args)
    if args.bits_from:
        read_bits_from(model, args.bits_from, args.target_gbops)
    if args.dry_run:
        layers = quant_layers(model)
        mmacs = sum(m.macs for m in layers) / 1e6
        candidates = " ".join(f"A{a}/W{w}" for a, w in layers[1].candidates)
        print(
            f"{len(layers)} quantized layers, {mmacs:.2f} MMACs at 224 px, candidates {candidates}; feasible range "
            f"{lo:.3f} .. {hi:.3f} GBOPs; target {args.target_gbops:.3f}"
        )
        return 0
    if args.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise BadInput(f"--batch-size {args.batch_size}: BatchNorm needs 2 or more images per process")
    teacher = None
    if args.teacher:
        teacher = fp_model(*args.teacher.split(":", 1), classes, "--teacher")
    if int(os.environ.get("RANK", "0")) == 0:
        lock_output_dir(args.output_dir)
    resume = checkpoint_to_resume(args)
    dist = Dist()
    try:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _on_signal)
        use_speed_path(model.to(dist.device))
        # The model was built from the common seed; augmentation, workers and dropout get a rank's seed (the data
        # order comes from --seed and the epoch, split by rank).
        random.seed(args.seed + dist.rank)
        torch.manual_seed(args.seed + dist.rank)
        train_set, val_set, _ = build_datasets(args)
        train_loader, val_loader, calib = build_loaders(args, dist, train_set, val_set)
        if teacher is not None:
            teacher = teacher.eval().requires_grad_(False).to(dist.device)
        run = Run(args, dist, model, len(train_loader), teacher)
        if resume:
            run.load_state_dict(load_run_checkpoint(resume, "--resume"), resume)
            log(dist, f"resumed {resume} after epoch {run.epoch} ({run.phase})")
        if dist.main:
            atomic_write(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=1).encode())
            print(
                f"metamix {args.arch}: candidates {args.bits}, W{args.w_bits}, target {args.target_gbops:.3f} GBOPs "
                f"(feasible {lo:.3f} .. {hi:.3f}), world size {dist.world} on {dist.device.type}; all flags in "
                f"{args.output_dir}/args.json",
                flush=True,
            )
        autocast = functools.partial(torch.autocast, dist.device.type, torch.bfloat16, enabled=args.amp)
        train(run, train_loader, val_loader, calib, autocast)
        return 0
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def one_line(e):
    """An error as one line; from a DataLoader worker (which wraps it in a traceback), its last line."""
    text = str(e).strip() or type(e).__name__
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0]


def guarded(prog, body, *args, interrupted=lambda: ""):
    """The error contract of metamix.py and of every tool beside it: body(*args), and any failure becomes one line on
    stderr, `prog: ...`, with no traceback, and an exit status.

    Bad input, which the user can fix (a BadInput, or an OSError: a file or folder named, a full disk), exits 2; a
    signal (SIGINT, SIGTERM) exits 128 + its number, and `interrupted()` adds what survived it; anything else is a
    bug of ours and exits 1 with its exception's name. METAMIX_DEBUG=1 shows the traceback instead.
    """
    try:
        return body(*args)
    except (Exception, KeyboardInterrupt) as e:
        # The signal handler records the signal; a signal that reached a DataLoader worker first arrives here
        # as some other exception, so the record, not the exception's type, says whether we were interrupted.
        signum = _STOP["signum"]
        if not signum and isinstance(e, KeyboardInterrupt):
            signum = signal.SIGINT
        if os.environ.get("METAMIX_DEBUG") and not signum:
            raise
        if signum:
            # A KeyboardInterrupt raised by the step's sync names the step at which every rank stopped.
            where = f" {e}" if isinstance(e, KeyboardInterrupt) and str(e) else ""
            line = f"interrupted by {signal.Signals(signum).name}{where}{interrupted()}"
            code = 128 + signum
        elif isinstance(e, (BadInput, OSError)):
            line = f"error: {one_line(e)}"
            code = 2
        else:
            line = f"error: {type(e).__name__}: {one_line(e)} (METAMIX_DEBUG=1: the traceback)"
            code = 1
        print(f"{prog}: {line}", file=sys.stderr)
        return code


def main(args, layer_type=QuantLayer):
    """Run, under the error contract (`guarded`); the output folder's lock is released whatever happens."""

    def what_survived():
        ck = os.path.join(args.output_dir, "checkpoint.pth")
        if os.path.exists(ck):
            return f"; the last checkpoint is {ck}; continue with --resume auto"
        return "; no checkpoint was written yet; run the command again to start over"

    try:
        return guarded("metamix", run_main, args, layer_type, interrupted=what_survived)
    finally:
        # The output folder is free again (the kernel would free it at exit anyway).
        while _LOCKS:
            _LOCKS.pop().close()


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
