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
    python metamix.py --arch mobilenet_v2 --target-gbops 0.001   # refused in one line that names the feasible range
    torchrun --nproc_per_node=8 metamix.py --data /imagenet --pretrained --target-gbops 33
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 metamix.py --data /imagenet ...

Symbols (paper -> code):
    alpha_l      per-layer logits, one per candidate     MultiBranchQuantizer.alpha   (N,)
    s_{l,b}      LSQ step of branch b of layer l         MultiBranchQuantizer.step    (N,)
    B, b         candidate activation bit-widths         --bits, e.g. 8,4,2
    w_bits       the one weight bit-width                --w-bits
    OPs_l        MACs of layer l at 224x224 (deployment) QuantLayer.macs
    t_bops       target, in GBOPs (1e9 bit operations)   --target-gbops
    lambda       weight of the BOPs regularizer          args.lam (the paper's; ablations.py --lam)
    C_fixed      BOPs of the fixed first/last layers     c_fixed_of(model)            (GBOPs)
    b_l          the bits bit selection chose for l      QuantLayer.selected_branch   (a branch index)

Sections 1-6: the paper, in its order; 7: the speed path the driver runs, held equal to 1-2 by tests; 8: the driver.
"Our choice" marks what the paper leaves open; "the authors'" what their public code does where the paper is silent.
Left out, beside this file (each imports it): other selections and proxies (baselines.py), the supplement's (A, W)
pairs (pairs.py), the ablations' settings as flags (ablations.py), its Figure 9 (figure9.py), integer export
(export.py), the benchmark and the digits study.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
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
from collections.abc import Callable, Iterator, Sequence
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
    qp = 2 ** (bits - 1) - 1
    if narrow and bits > 2:
        return -qp, qp
    return -qp - 1, qp


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

    def get_extra_state(self) -> dict:
        return {k: copy.copy(getattr(self, k)) for k in self.saved}

    def set_extra_state(self, state: dict) -> None:
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


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """Quantized layers in forward order (the order patch_model recorded)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    return sorted(layers, key=lambda m: m.order)


def searched_layers(model: nn.Module) -> list[QuantLayer]:
    """The quantized layers whose bits are searched: all but the fixed first and last."""
    return [m for m in quant_layers(model) if not m.fixed]


def candidate_costs(model: nn.Module) -> list[int]:
    """a * w of each candidate of the searched layers (they share their candidates): the paper's b * w_bits."""
    return [a * w for a, w in searched_layers(model)[0].candidates]


def c_fixed_of(model: nn.Module) -> float:
    """C_fixed: BOPs of the first and last layers, in GBOPs."""
    fixed = [m for m in quant_layers(model) if m.fixed]
    return sum(m.macs * a * w for m in fixed for a, w in m.candidates) / 1e9


def config_gbops(macs: Sequence[int], costs: Sequence[int], c_fixed: float) -> float:
    """Eq. 6 for the searched layers plus C_fixed: sum_l a_l * w_l * OPs_l / 1e9 + C_fixed; costs[l] = a_l * w_l."""
    return sum(m * c for m, c in zip(macs, costs)) / 1e9 + c_fixed


def branches_gbops(model: nn.Module, branches: Sequence[int]) -> float:
    """Eq. 6 of a configuration given as one branch index per searched layer."""
    costs = candidate_costs(model)
    macs = [m.macs for m in searched_layers(model)]
    return config_gbops(macs, [costs[i] for i in branches], c_fixed_of(model))


def gbops_range(model: nn.Module) -> tuple[float, float]:
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


def trace_layers(model: nn.Module, image_size: int) -> list[tuple[str, nn.Module, int, int]]:
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
# Train-mode dropout scales them by 1/(1-p), so MobileNet-v3's classifier.3 sees values down to -0.469 (p = 0.2)
# in training, below the grid's -3/8: those are clamped there, as the authors' code clamps them.
PASSING = ("pool", "dropout", "flatten", "reshape", "view", "identity")


def hardswish_fed(model: nn.Module) -> set[str] | None:
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
    model: nn.Module,
    bits: Sequence[int],
    w_bits: int = 4,
    first_last_bits: int = 8,
    bops_image_size: int = 224,
    layer_type: type[QuantLayer] = QuantLayer,
    plain: bool = False,
) -> nn.Module:
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


def set_mode(model: nn.Module, mode: str, branch: int | None = None, quant_weights: bool | None = None) -> None:
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


def alphas_of(model: nn.Module) -> list[nn.Parameter]:
    """The architecture logits alpha_l, one vector per searched layer."""
    return [m.act.alpha for m in searched_layers(model)]


def meta_params(model: nn.Module) -> list[nn.Parameter]:
    """What bit-meta and weight training update: every parameter but the alphas (weights, BN, steps)."""
    alphas = {id(a) for a in alphas_of(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def argmax_branches(model: nn.Module) -> list[int]:
    """The argmax configuration, a branch per searched layer (ties: the first)."""
    return torch.stack(alphas_of(model)).detach().argmax(1).tolist()


def apply_selection(model: nn.Module, branches: Sequence[int]) -> None:
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


# A loss function criterion(logits, targets), and a step's sync(params, loss) -> loss (the driver all-reduces there).
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sync = Callable[[list[nn.Parameter], torch.Tensor], torch.Tensor]


def no_sync(params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """The default `sync` of the step functions: one process, nothing to reduce."""
    return loss


@contextlib.contextmanager
def batch_stats_bn(model: nn.Module) -> Iterator[None]:
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


def init_quantizers(model: nn.Module, calib: torch.Tensor) -> None:
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


def distillation_loss(teacher_logits: torch.Tensor) -> Criterion:
    """The authors' loss (their code; the paper names none), as a criterion(logits, targets).

    The batch mean of -sum_c softmax(teacher)_c * log_softmax(student)_c: a frozen teacher at temperature 1, and no
    label term (the targets are not used).
    """
    probs = F.softmax(teacher_logits.detach().float(), 1)

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), probs)

    return criterion


def bit_meta_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    autocast: Callable = contextlib.nullcontext,
    criterion: Criterion = F.cross_entropy,
) -> torch.Tensor:
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
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    target_gbops: float,
    autocast: Callable = contextlib.nullcontext,
    fixed: bool = True,
    criterion: Criterion = F.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    opt: torch.optim.Optimizer,
    opt_alpha: torch.optim.Optimizer | None = None,
    *,
    search: bool = False,
    lam: float = 0.0,
    target_gbops: float | None = None,
    autocast: Callable = contextlib.nullcontext,
    sync: Sync = no_sync,
    fixed: bool = True,
    criterion: Criterion = F.cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
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


def start_weight_training(
    model: nn.Module, target_gbops: float, repair: bool = True, branches: Sequence[int] | None = None
) -> tuple[list[int], float, bool]:
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
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    opt: torch.optim.Optimizer,
    autocast: Callable = contextlib.nullcontext,
    sync: Sync = no_sync,
    criterion: Criterion = F.cross_entropy,
) -> torch.Tensor:
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


def fused_forward(layer, x, probs=None, wq=None, bias=True):
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
    """sum(a * b): one value (in step's shape, if given), without a product buffer; or one per row if step has one
    value per row (an output channel's: a weight's, by vecdot, 4-5x faster than a batched matrix product on CPU)."""
    if step is None or step.numel() == 1:
        shape = () if step is None else step.shape
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return torch.linalg.vecdot(a.reshape(len(a), -1), b.reshape(len(a), -1)).view_as(step)


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


# ==== 8. The driver: what a run does ================================================================================
# Not the paper: what it takes to run sections 1-6 on ImageNet with torchrun, or on a CPU. `run` does, in order:
#   1. the flags, the data, the torchvision model (patched) and the budget are checked: a problem ends here, in one
#      line naming it (exit 2), before the output folder exists;
#   2. the output folder is locked (one run per folder), the processes join, a checkpoint is loaded (--resume);
#   3. `train`: every quantizer is initialised from one batch and the FP model evaluated; bit selection trains the
#      meta-state and searches; the bits are selected (bits.json); weight training follows. Each epoch ends with an
#      evaluation and checkpoint.pth, log.jsonl (and meta_state.pth when bit selection ends).
# Files are written whole or not at all, so a run killed at any moment loses at most the epoch in progress, and
# `--resume auto` then computes bit for bit what the uninterrupted run computes: the checkpoint holds the state
# dicts and every rank's RNG states, and the data order is a function of the seed and the epoch.


class BadInput(Exception):
    """A problem the user can fix: one line on stderr, exit status 2, no traceback."""


# The signal that asked this process to stop, 0 if none.
STOP = {"signum": 0}


def on_signal(signum, frame):
    """The first SIGINT or SIGTERM stops every rank at the same step (the step's all-reduce carries it); a second
    one stops at once."""
    STOP["signum"] = signum
    signal.signal(signum, signal.SIG_DFL)


class Dist:
    """torchrun's process group (nccl on GPUs, gloo on CPU); one process without torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cpu")
        if self.cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.cuda else "gloo")


def sync_step(dist, params, loss):
    """ONE all-reduce per step: the gradients, the loss and the stop flag. Returns (mean loss, a rank signalled).

    Our choice instead of DistributedDataParallel: bit-meta leaves the other branches' steps without gradients in
    each pass, which DDP handles only with find_unused_parameters and a second traversal.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.stack([loss.float().reshape(()), torch.tensor(float(STOP["signum"] > 0), device=loss.device)])
    if dist.world > 1:
        flat = torch.cat([flat] + [g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= dist.world
        for g, mean in zip(grads, flat[2:].split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))
    loss_v, stop = flat[:2].tolist()
    return loss_v, stop > 0


def synthetic_spec(data):
    """(train images, val images, classes) of --data synthetic[:TRAIN,VAL,CLASSES]; None for a folder."""
    name, _, given = data.partition(":")
    if name != "synthetic":
        return None
    spec = [int(v) for v in (given or "2560,1000,10").split(",") if v.isdigit()]
    if len(spec) != 3 or min(spec) < 1 or spec[2] < 2:
        raise BadInput(f"--data {data}: expected synthetic:TRAIN,VAL,CLASSES, 1 image each and 2 classes or more")
    return spec


def synthetic_dataset(n, classes, size, seed, split):
    """A learnable set from the seed: its class's smooth random colour pattern, shifted, scaled, plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    g.manual_seed(seed * 1000 + (1 if split == "train" else 2))
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(t, (int(s[0]), int(s[1])), (1, 2)) for t, s in zip(templates[labels], shifts)])
    # a random contrast and brightness per image, then noise
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.3 * torch.randn(n, 1, 1, 1, generator=g)
    x = x + 0.7 * torch.randn(x.shape, generator=g)
    return torch.utils.data.TensorDataset(x.contiguous(), labels)


def build_datasets(args):
    """(train set, val set, classes): synthetic, or ImageFolder with torchvision's reference transforms."""
    spec = synthetic_spec(args.data)
    if spec:
        train = synthetic_dataset(spec[0], spec[2], args.image_size, args.seed, "train")
        return train, synthetic_dataset(spec[1], spec[2], args.image_size, args.seed, "val"), spec[2]
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
        raise BadInput(f"--data {args.data}: {one_line(e)}") from None
    if train.classes != val.classes:
        example = sorted(set(train.classes) ^ set(val.classes))[0]
        raise BadInput(f"--data {args.data}: train/ and val/ have different classes, e.g. {example}")
    return train, val, len(train.classes)


def build_loaders(args, dist, train_set, val_set):
    """Loaders (validation: each image once, rank r takes r, r+W, ...) and LSQ's calibration batch (from --seed)."""
    share = len(train_set) // dist.world
    if args.batch_size > share:
        raise BadInput(f"--batch-size {args.batch_size}: over a process's {share} training images")
    sampler = DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=args.seed, drop_last=True)
    # Workers are re-created each epoch (not persistent) and seeded from the RNG state at its start: exact resume.
    loading = {"num_workers": args.workers, "pin_memory": dist.cuda}
    if synthetic_spec(args.data):
        loading["num_workers"] = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        picked = torch.randperm(len(train_set))[: args.batch_size]
        calib = torch.stack([train_set[int(i)][0] for i in picked])
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **loading)
    val_sampler = range(dist.rank, len(val_set), dist.world)
    return train_loader, DataLoader(val_set, args.batch_size, sampler=val_sampler, **loading), calib


# The paper's settings (Table 1, supplement Table 8); targets: its reported GBOPs (ResNet-18's 32.86 as 33, our
# choice); the torchvision weights nearest its FP models. Other archs: our choice, their target 95% of uniform A4.
PAPER_SETTINGS = {
    "resnet18": dict(bits="8,4,2", lam=0.4, epochs=90, target_gbops=33.0, weights="IMAGENET1K_V1"),
    "mobilenet_v2": dict(bits="8,4,3", lam=1.0, epochs=140, target_gbops=5.12, weights="IMAGENET1K_V1"),
    "mobilenet_v3_large": dict(bits="8,4,3", lam=4.0, epochs=140, target_gbops=3.29, weights="IMAGENET1K_V2"),
}
OTHER_SETTINGS = {
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


def torchvision_weights(arch, name, flag="--pretrained"):
    """torchvision's weights by name ("paper": those nearest the paper's FP model)."""
    enum = torchvision.models.get_model_weights(arch)
    if name == "paper":
        name = PAPER_SETTINGS.get(arch, {}).get("weights", "DEFAULT")
    try:
        return enum.verify(name)
    except (KeyError, ValueError):
        names = ", ".join(w.name for w in enum)
        raise BadInput(f"{flag} {name}: no such file, nor weights of {arch} (DEFAULT, {names})") from None


def fp_model(arch, weights, classes, flag="--pretrained"):
    """A torchvision model: torchvision's weights by name, a state dict from a file, or (None) a fresh init."""
    kw = {"num_classes": classes}
    enum = None
    if weights and not os.path.exists(weights):
        enum = torchvision_weights(arch, weights, flag)
        kw = {}
        if classes != 1000:
            raise BadInput(f"{flag} {weights} needs 1000 classes, the data has {classes}")
    if arch in ("googlenet", "inception_v3"):
        # Without their auxiliary heads, the training output is a tensor.
        kw["aux_logits"] = False
        if enum is None:
            kw["init_weights"] = True
    try:
        model = torchvision.models.get_model(arch, weights=enum, **kw)
    except Exception as e:
        raise BadInput(f"cannot load {arch}'s weights ({one_line(e)}); try {flag} PATH") from None
    if weights and not enum:
        state = load_checkpoint(weights, flag)
        try:
            model.load_state_dict(state.get("model", state))
        except (RuntimeError, TypeError, AttributeError) as e:
            raise BadInput(f"{flag} {weights}: not a state dict of {arch}, {classes} classes ({one_line(e)})") from None
    return model


def build_model(args, classes, layer_type=QuantLayer):
    """The torchvision model with its FP weights, patched; refused, naming the layer, unless all is counted."""
    model = fp_model(args.arch, args.pretrained, classes)
    found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, UNSUPPORTED)]
    patch_model(model.train(), args.bits, args.w_bits, args.first_last_bits, 224, layer_type, args.plain_lsq)
    # A Conv2d or Linear still there was not called as a module in the forward pass (e.g. attention's projections).
    found += [f"{n} (not called as a module)" for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if found:
        raise BadInput(
            f"--arch {args.arch}: {', '.join(found[:3])} would stay in full precision and outside the BOPs; "
            "metamix quantizes Conv2d and Linear modules (CNNs such as resnet18, mobilenet_v2)"
        )
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, args.image_size, args.image_size))
    except RuntimeError:
        raise BadInput(f"--image-size {args.image_size} is too small for {args.arch}") from None
    return model.train()


def check_budget(model, args):
    """The feasible range; the default target: the paper's in its setting, else (our choice) 95% of uniform A4."""
    lo, hi = gbops_range(model)
    layers = searched_layers(model)
    if len(layers[0].candidates) < 2:
        raise BadInput(f"--bits {args.bits}: a search needs two candidates or more")
    paper = PAPER_SETTINGS.get(args.arch, {})
    papers_setting = (paper.get("bits"), 4, 8) == (",".join(map(str, args.bits)), args.w_bits, args.first_last_bits)
    default = ""
    if args.target_gbops is None:
        default = " (the default; set --target-gbops)"
    if default and papers_setting:
        args.target_gbops = paper["target_gbops"]
    elif default:
        # (A, W) pairs (pairs.py): uniform A4/W4
        w = args.w_bits if isinstance(args.w_bits, int) else 4
        args.target_gbops = 0.95 * config_gbops([m.macs for m in layers], [4 * w] * len(layers), c_fixed_of(model))
    if not lo - 1e-6 <= args.target_gbops <= hi + 1e-6:
        raise BadInput(
            f"--target-gbops {args.target_gbops:.4g}{default} is outside the feasible range [{lo:.3f}, {hi:.3f}] "
            f"GBOPs for {args.arch} with bits {args.bits}, W{args.w_bits}"
        )
    return lo, hi


def one_line(e):
    """An error as one line; from a DataLoader worker (which wraps it in a traceback), its last line."""
    text = str(e).strip() or type(e).__name__
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0]


def atomic_write(path, data):
    """Write a temporary file in the same folder, fsync, rename it: a kill or a full disk leaves the old file whole."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise BadInput(f"cannot write {path} ({e.strerror}); its previous version is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saved_bytes(obj):
    """torch.save into memory: a full disk then fails in atomic_write, which names the file, not in torch.save."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_checkpoint(path, flag, expect=None):
    """torch.load(weights_only=True); what it cannot read, one line naming the file. `expect`: a run's format."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{flag} {path}: torch.load cannot read it ({one_line(e)})") from None
    if not isinstance(ck, dict) or (expect and ck.get("format") != expect):
        raise BadInput(f"{flag} {path}: not a {expect or 'state dict'} file")
    return ck


CHECKPOINT_FORMAT = "metamix-checkpoint-4"
# Flags a resumed checkpoint must share; the second group may change at the phase boundary (e.g. meta_state.pth).
SAME_RUN = ("arch", "bits", "w_bits", "first_last_bits", "plain_lsq", "search_epochs", "unfixed")
SAME_SELECTION = ("epochs", "target_gbops", "lam", "lr", "optimizer", "alpha_optimizer", "alpha_lr", "bits_from")
SAME_SELECTION += ("no_budget_repair", "teacher", "act_only_epochs")
# The recipes' default rates, (from pretrained weights, from scratch). Ours for the weights, SGD: the digits study's
# (docs/digits.md); the authors', Adam: their code's. The alphas: ours SGD, Adam with the authors' betas and L2, and
# the authors' whole recipe (their rate and their random init).
LR = {"sgd": (0.01, 0.05), "adam": (5e-4, 5e-4)}
ALPHA_LR = {"sgd": (0.005, 0.05), "adam": (0.01, 0.1), "authors": (1e-4, 1e-3)}


def weights_quantized(args, epoch, selected):
    """Whether the weights are quantized after `epoch`: the bits are selected and the act-only epochs are over."""
    return selected is not None and epoch > args.search_epochs + args.act_only_epochs


class Run:
    """What a run carries from epoch to epoch; save() writes it as the checkpoint, resume() reads it back."""

    def __init__(self, args, dist, model, steps, teacher=None):
        self.args = args
        self.dist = dist
        self.model = model
        # Steps per epoch (a schedule stepped per step), and the frozen teacher if any.
        self.steps = steps
        self.teacher = teacher
        # The epochs finished, and a branch per searched layer once the bits are selected.
        self.epoch = 0
        self.selected = None
        # The rows of log.jsonl, and the FP model's top-1.
        self.history = []
        self.fp_top1 = None
        self.build_optimizers()

    @property
    def phase(self):
        return "bit_selection" if self.selected is None else "weight_training"

    def build_optimizers(self):
        """The training recipes, ours and the authors', one branch each (the paper names neither).

        A fresh optimizer and schedule for each stage: bit selection, weight training with FP weights (the act-only
        epochs, if any), weight training with quantized weights. `sched_per_step`: the schedule steps after every
        step, not after every epoch.
        """
        a = self.args
        alphas = alphas_of(self.model)
        weights = [m.weight for m in quant_layers(self.model)]
        self.sched_per_step = a.optimizer == "adam"
        if a.optimizer == "sgd":
            # Ours: SGD, momentum 0.9, decay 1e-4 on every conv and linear weight, a constant LR in bit selection,
            # then a cosine stepped per epoch.
            self.opt = torch.optim.SGD(decay_groups(self.model, weights, 1e-4), lr=a.lr, momentum=0.9)
        else:
            # The authors': Adam, L2 5e-6 on the 4-D conv weights only, LR/5 in bit selection, a cosine stepped per
            # step, and its own parameters' gradient norm clipped at 10 before each step (their code clips the
            # alphas' stale gradients too).
            convs = [w for w in weights if w.dim() == 4]
            lr = a.lr / 5 if self.selected is None else a.lr
            self.opt = torch.optim.Adam(decay_groups(self.model, convs, 5e-6), lr=lr)
            self.opt.register_step_pre_hook(clip_at_10)
        if a.alpha_optimizer == "sgd":
            # Ours: SGD with momentum, alphas from zero (every candidate equally likely).
            self.opt_alpha = torch.optim.SGD(alphas, lr=a.alpha_lr, momentum=0.9)
        else:
            # The authors' Adam: betas (0.5, 0.999), L2 1e-3; "authors" also draws the alphas at random (train).
            self.opt_alpha = torch.optim.Adam(alphas, lr=a.alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
        self.sched = None
        if self.selected is not None:
            # A cosine over the stage the next epoch belongs to.
            epochs = a.act_only_epochs
            if weights_quantized(a, self.epoch + 1, self.selected):
                epochs = a.epochs - a.search_epochs - a.act_only_epochs
            if self.sched_per_step:
                epochs *= self.steps
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(epochs, 1))

    def resume(self, path):
        """Continue from a checkpoint, refusing one of another run, or (Adam's per-step schedule) of another number of
        processes. Another world size is valid otherwise, but not bit-exact."""
        a = self.args
        ck = load_checkpoint(path, "--resume", CHECKPOINT_FORMAT)
        # At the phase boundary the optimizers are rebuilt before any step, so the selection's flags may change.
        boundary = ck["selected"] is None and ck["epoch"] >= a.search_epochs
        same = SAME_RUN
        if not boundary:
            same += SAME_SELECTION
        for key in same:
            theirs = ck["args"].get(key)
            if getattr(a, key) != theirs:
                raise BadInput(
                    f"--resume {path}: the checkpoint has --{key.replace('_', '-')} {theirs}, not {getattr(a, key)}"
                )
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise BadInput(f"--resume {path}: the model does not match ({one_line(e)})") from None
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
        if self.sched and not boundary:
            self.sched.load_state_dict(ck["sched"])
        # Rank r continues with its own RNG states (ranks beyond the saved ones with the last one's).
        rng = ck["rng"][min(self.dist.rank, processes - 1)]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if self.dist.cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])

    def save(self):
        """checkpoint.pth and log.jsonl; at the end of bit selection also meta_state.pth, kept (for --bits-from)."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.dist.cuda:
            rng["cuda"] = torch.cuda.get_rng_state()
        rngs = [rng] * self.dist.world
        if self.dist.world > 1:
            torch.distributed.all_gather_object(rngs, rng)
        if not self.dist.main:
            return
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "args": vars(self.args),
            "epoch": self.epoch,
            "phase": self.phase,
            "selected": self.selected,
            "num_classes": quant_layers(self.model)[-1].weight.shape[0],
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched and self.sched.state_dict(),
            "opt_alpha": self.opt_alpha.state_dict(),
            "history": self.history,
            "fp_top1": self.fp_top1,
            "rng": rngs,
        }
        data = saved_bytes(checkpoint)
        out = self.args.output_dir
        if self.selected is None and self.epoch == self.args.search_epochs:
            atomic_write(os.path.join(out, "meta_state.pth"), data)
        atomic_write(os.path.join(out, "checkpoint.pth"), data)
        atomic_write(os.path.join(out, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in self.history).encode())


def clip_at_10(opt, args, kwargs):
    """An optimizer's step pre-hook: its own parameters' gradient norm clipped at 10."""
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 10)


def decay_groups(model, decay, rate):
    """Two parameter groups: `decay` with weight decay `rate`, every other parameter but the alphas without."""
    others = decay + alphas_of(model)
    rest = [p for p in model.parameters() if all(p is not q for q in others)]
    return [{"params": decay, "weight_decay": rate}, {"params": rest, "weight_decay": 0.0}]


def log(dist, text):
    """Print on the main process only."""
    if dist.main:
        print(text, flush=True)


def search_report(model, last_change, steps, target_gbops):
    """How the search ended. Settled (our rule): the argmax configuration did not change in the last quarter of the
    steps, and the median top-2 margin of softmax(alpha) over the searched layers is 0.05 or more."""
    top2 = torch.stack([F.softmax(alpha.detach().float(), 0) for alpha in alphas_of(model)]).topk(2, 1).values.cpu()
    # per layer
    margin = top2[:, 0] - top2[:, 1]
    median = margin.quantile(0.5).item()
    gbops = branches_gbops(model, argmax_branches(model))
    settled = last_change <= 0.75 * steps and median >= 0.05
    report = dict(argmax_last_changed=last_change, settled=settled, steps=steps, median_margin=median)
    report.update(min_margin=margin.min().item(), argmax_gbops=gbops, vs_target=gbops / target_gbops - 1)
    return report


def train_one_epoch(run, loader, epoch, autocast):
    """One epoch of the current phase (section 6's steps). Returns (mean loss, the search's report or None)."""
    a = run.args
    model = run.model
    selecting = run.phase == "bit_selection"
    # With --bits-from the selection is given: bit selection trains the meta-state only.
    searching = selecting and epoch == a.search_epochs and not a.bits_from
    kind = "train"
    if selecting:
        kind = "meta+search" if searching else "meta"
    # Our choice: the search makes at least --search-steps steps, in passes over the data, each in an order of its
    # own (the first in the epoch's). An ImageNet epoch is longer than the default, so it keeps one pass.
    passes = 1
    if searching:
        passes = max(1, -(-a.search_steps // len(loader)))
    steps = len(loader) * passes
    argmax = argmax_branches(model)
    last_change = 0
    total = 0.0
    t0 = time.time()
    model.train()
    for step, (images, targets) in enumerate(batches(loader, epoch, passes), 1):
        images = images.to(run.dist.device, non_blocking=True)
        targets = targets.to(run.dist.device, non_blocking=True)
        # The teacher runs once per batch, for all of the step's passes.
        criterion = F.cross_entropy
        if run.teacher is not None:
            with torch.no_grad(), autocast():
                criterion = distillation_loss(run.teacher(images))
        sync = functools.partial(checked_sync, run, f"epoch {epoch} step {step}/{steps}")
        shown = ""
        if selecting:
            loss, _, gbops = bit_selection_step(
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
        else:
            loss = weight_training_step(model, images, targets, run.opt, autocast, sync, criterion)
        if run.sched_per_step and not selecting:
            run.sched.step()
        if searching and argmax_branches(model) != argmax:
            # The last step at which the argmax configuration changed.
            argmax = argmax_branches(model)
            last_change = step
        if searching:
            shown = f" search-gbops {float(gbops):.2f}"
        total += loss
        if step % min(100, max(1, steps // 2)) == 0 or step == steps:
            dt = time.time() - t0
            speed = step * len(images) * run.dist.world / max(dt, 1e-9)
            eta = datetime.timedelta(seconds=int(dt / step * (steps - step)))
            lr = run.opt.param_groups[0]["lr"]
            log(
                run.dist,
                f"{run.phase} epoch {epoch}/{a.epochs} [{kind}] step {step}/{steps} loss {loss:.4f}{shown} lr {lr:.4g} "
                f"{speed:.0f} img/s eta {eta}",
            )
    report = None
    if searching:
        report = search_report(model, last_change, steps, a.target_gbops)
        log(
            run.dist,
            f"search {'settled' if report['settled'] else 'NOT settled'}: argmax last changed at step {last_change}/"
            f"{steps}; top-2 margins of softmax(alpha) median {report['median_margin']:.3f}, min "
            f"{report['min_margin']:.3f}; argmax {report['argmax_gbops']:.3f} GBOPs ({report['vs_target']:+.1%})",
        )
    return total / max(steps, 1), report


def batches(loader, epoch, passes):
    """`passes` passes over the data, the first in the epoch's order, each next in an order of its own."""
    for p in range(passes):
        loader.sampler.set_epoch(epoch + 1000 * p)
        yield from loader


def checked_sync(run, where, params, loss):
    """A step's `sync`: one all-reduce, then the NaN and stop checks, before the update: nothing bad is ever saved."""
    loss_v, stop = sync_step(run.dist, params, loss)
    if not math.isfinite(loss_v):
        last = f"epoch {run.epoch} in checkpoint.pth" if run.epoch else "none written yet"
        raise BadInput(f"the loss is {loss_v} at {where}, stopped before this update (last good checkpoint: {last})")
    if stop:
        # On every rank at this step.
        raise KeyboardInterrupt(f"at {where}")
    return loss_v


@torch.no_grad()
def evaluate(model, loader, dist, autocast):
    """Top-1/top-5 of the validation set, each image once; BN statistics averaged over ranks first (timm's choice)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if dist.world > 1:
        for t in [t for m in bns for t in (m.running_mean, m.running_var)]:
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
        tot += torch.stack(
            [loss_sum, hit[:, 0].sum().double(), hit.any(1).sum().double(), loss_sum.new_tensor(len(targets))]
        )
    if dist.world > 1:
        torch.distributed.all_reduce(tot)
    loss, top1, top5, n = tot.tolist()
    count = max(n, 1)
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "n": int(n)}


def bits_report(model, args):
    """The content of bits.json: the selected configuration, layer by layer (the data of Fig. 7)."""
    rows = []
    for m in quant_layers(model):
        a_bits, w_bits = m.candidates[m.selected_branch]
        probs = None
        if not m.fixed:
            probs = [round(p, 6) for p in F.softmax(m.act.alpha.detach().float().cpu(), 0).tolist()]
        # the layer, its grid (signed or not, its offset), its bits
        rows.append(dict(name=m.name, type=m.kind, macs=m.macs, in_size=m.in_size, fixed=m.fixed, signed=m.act.signed))
        rows[-1].update(offset=m.act.offset, a_bits=a_bits, w_bits=w_bits, probs=probs)
    searched = [r for r in rows if not r["fixed"]]
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
        "avg_a_bits_weighted": sum(r["a_bits"] * r["in_size"] for r in searched) / sum(r["in_size"] for r in searched),
        "avg_w_bits": sum(r["w_bits"] for r in searched) / len(searched),
        "layers": rows,
    }


def layer_table(report):
    """bits.json as text (Fig. 7): a row per layer, its MOPs and a bar of its activation bits (and W with pairs)."""
    pairs = len({w for _, w in report["candidates"]}) > 1
    lines = [f"{'layer':<34} {'type':<7} {'MOPs':>8}  bits"]
    for r in report["layers"]:
        line = f"{r['name']:<34} {r['type']:<7} {r['macs'] / 1e6:8.2f}  {'#' * r['a_bits']:<8} A{r['a_bits']}"
        if pairs:
            line += f"/W{r['w_bits']}"
        if r["fixed"]:
            line += " (fixed)"
        lines.append(line)
    return "\n".join(lines)


def avg_bits_text(report):
    """The average bits of a report, as one phrase (the weights' too, with pairs)."""
    text = f"average activation bits {report['avg_a_bits']:.2f} (weighted by input size, as the authors' code: "
    text += f"{report['avg_a_bits_weighted']:.2f})"
    if len({w for _, w in report["candidates"]}) > 1:
        text += f"; weight bits {report['avg_w_bits']:.2f}"
    return text


def read_bits_from(model, args):
    """--bits-from: the branch of each searched layer from a bits.json's rows (name, a_bits, w_bits), as selected."""
    flag = f"--bits-from {args.bits_from}"
    try:
        with open(args.bits_from) as f:
            rows = {r["name"]: (r["a_bits"], r["w_bits"]) for r in json.load(f)["layers"]}
        branches = [m.candidates.index(rows[m.name]) for m in searched_layers(model)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{flag}: not a bits.json of this model's layers and candidates ({e!r})") from None
    unknown = set(rows) - {m.name for m in quant_layers(model)}
    if unknown:
        raise BadInput(f"{flag}: {args.arch} has no layer {sorted(unknown)[0]}")
    apply_selection(model, branches)
    gbops = branches_gbops(model, branches)
    if gbops > args.target_gbops + 1e-9:
        raise BadInput(
            f"{flag}: the configuration costs {gbops:.3f} GBOPs, over --target-gbops {args.target_gbops:.3f}"
        )
    return branches


def select_bits(run):
    """Between the phases (Table 1): start_weight_training (or --bits-from); prints Fig. 7 as text, writes bits.json."""
    a = run.args
    given = None
    if a.bits_from:
        given = read_bits_from(run.model, a)
    run.selected, _, repaired = start_weight_training(run.model, a.target_gbops, not a.no_budget_repair, given)
    # With --act-only-epochs the weights stay in FP first.
    set_mode(run.model, "selected", quant_weights=not a.act_only_epochs)
    run.build_optimizers()
    report = bits_report(run.model, a)
    # A --bits-from run made no search (its "selection" names the file), even when it resumed one's meta-state.
    report["search"] = next((h["search"] for h in run.history if "search" in h and not a.bits_from), None)
    note = ""
    if repaired and not a.bits_from:
        note = " (argmax lowered by budget repair)"
    log(run.dist, layer_table(report))
    log(
        run.dist, f"selected: {report['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}{note}; {avg_bits_text(report)}"
    )
    if run.dist.main:
        atomic_write(os.path.join(a.output_dir, "bits.json"), json.dumps(report, indent=1).encode())


def train(run, train_loader, val_loader, calib, autocast):
    """Both phases, from wherever the run stands (fresh or resumed)."""
    a = run.args
    model = run.model
    dist = run.dist
    if run.epoch == 0:
        init_quantizers(model, calib.to(dist.device))
        if a.alpha_optimizer == "authors":
            # The authors' alphas start from a normal draw, std 1e-3: a random argmax per layer.
            for alpha in alphas_of(model):
                nn.init.normal_(alpha, std=1e-3)
        if dist.world > 1:
            # Rank 0's steps, grids and alphas for every rank (the same batch gave them, but for float noise).
            state = [model.state_dict()]
            torch.distributed.broadcast_object_list(state, 0)
            model.load_state_dict(state[0])
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
        loss, search = train_one_epoch(run, train_loader, epoch, autocast)
        if phase == "bit_selection":
            # Evaluate the argmax configuration, weights in full precision.
            apply_selection(model, argmax_branches(model))
            set_mode(model, "selected", quant_weights=False)
        elif not run.sched_per_step:
            run.sched.step()
        metrics = evaluate(model, val_loader, dist, autocast)
        gbops = branches_gbops(model, [m.selected_branch for m in searched_layers(model)])
        row = {"epoch": epoch, "phase": phase, "loss": loss, **metrics, "lr": lr, "gbops": gbops}
        row.update(seconds=round(time.time() - t0, 3), world_size=dist.world)
        if search:
            row["search"] = search
        run.history.append(row)
        run.epoch = epoch
        run.save()
        log(
            dist,
            f"epoch {epoch}/{a.epochs} {phase}: loss {loss:.4f} top-1 {metrics['top1']:.2f}% top-5 "
            f"{metrics['top5']:.2f}% {gbops:.3f} GBOPs ({time.time() - t0:.1f}s)",
        )
    last = run.history[-1]
    took = datetime.timedelta(seconds=int(sum(h["seconds"] for h in run.history)))
    log(
        dist,
        f"summary: full-precision top-1 {run.fp_top1:.2f}% -> final top-1 {last['top1']:.2f}% (top-5 "
        f"{last['top5']:.2f}%); {last['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}; "
        f"{avg_bits_text(bits_report(model, a))}; {took} in all",
    )


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line and exit 2 like every other bad input (argparse adds its usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog.removesuffix('.py')}: error: {message}\n")


def bit_list(text):
    """argparse type of --bits: comma-separated distinct bit-widths in 2..16."""
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
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v < lo or (above and v == lo) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if above else 'at least'} {lo:g}")
        return v

    return parse


def get_args_parser():
    """metamix.py's flags; a default that depends on the arch or the data is filled in by resolve_args."""
    p = Parser(description="MetaMix mixed-precision activation quantization (AAAI 2024)")
    add = p.add_argument
    models = torchvision.models.list_models(module=torchvision.models)
    add("--arch", default="resnet18", choices=models, metavar="ARCH", help="torchvision model (default: resnet18)")
    add("--data", default="synthetic", help="a folder with train/ and val/, or synthetic[:TRAIN,VAL,CLASSES]")
    add(
        "--pretrained",
        nargs="?",
        const="paper",
        metavar="WEIGHTS|PATH",
        help="torchvision's weights (bare: the paper's)",
    )
    add("--target-gbops", type=number(float, 0, above=True), help="budget (default: the paper's, else 95%% of A4)")
    add("--bits", type=bit_list, help="candidate activation bits (default: resnet18 8,4,2; MobileNets 8,4,3)")
    add("--w-bits", type=int, choices=range(2, 17), default=4, metavar="B", help="weight bits (default: 4)")
    add("--epochs", type=number(int, 1), help="all epochs (default: resnet18 90, MobileNets 140; synthetic 8)")
    add("--search-epochs", type=number(int, 1), default=2, help="bit-selection epochs; the last also searches (2)")
    add("--search-steps", type=number(int, 0), default=180, help="search at least this many steps (180; 0: an epoch)")
    add(
        "--act-only-epochs", type=number(int, 0), default=0, help="FP weights first in weight training (0; authors' 18)"
    )
    add("--bits-from", metavar="FILE", help="take the bits of this bits.json instead of searching")
    add("--teacher", metavar="ARCH[:WEIGHTS|PATH]", help="distil from this model (authors': resnet101:IMAGENET1K_V1)")
    add("--optimizer", choices=("sgd", "adam"), default="sgd", help="weights: ours (sgd), the authors' (adam)")
    add("--lr", type=number(float, 0, above=True), help="SGD .01 pretrained, else .05; Adam 5e-4, /5 in selection")
    add(
        "--alpha-optimizer",
        choices=("sgd", "adam", "authors"),
        default="sgd",
        help="alphas: ours (sgd), Adam, the authors' (Adam, random init)",
    )
    add("--batch-size", type=number(int, 1), default=64, help="images per process per step (64)")
    add("--image-size", type=number(int, 8), help="training crop in pixels (default: 224; synthetic 32)")
    add("--workers", type=number(int, 0), default=8, help="data-loading processes per rank, image folders (8)")
    add("--amp", action="store_true", help="bf16 autocast (the quantizer math stays in fp32)")
    add("--seed", type=number(int, 0), default=0, help="seed of everything: data order, synthetic data, init (0)")
    add("--output-dir", default="runs/metamix", help="the run's files (default: runs/metamix)")
    add("--resume", metavar="PATH|auto", help="continue from a checkpoint ('auto': the output folder's, if any)")
    # Settings of the paper's ablations and of our studies, no flags here (ablations.py has them): the first and
    # last layers' bits, lambda and the alphas' LR (None: the paper's, the recipe's), Fig. 7(a), LSQ's own
    # quantizers, budget repair.
    p.set_defaults(first_last_bits=8, lam=None, alpha_lr=None, unfixed=False, plain_lsq=False, no_budget_repair=False)
    return p


def arch_defaults(args):
    """The values a flag left None takes: per arch (PAPER_SETTINGS, OTHER_SETTINGS), per recipe and per data."""
    synthetic = synthetic_spec(args.data) is not None
    # Our choice: small data (no pretrained weights) gets larger rates.
    small = synthetic or not args.pretrained
    settings = PAPER_SETTINGS.get(args.arch) or OTHER_SETTINGS.get(args.arch, OTHER_SETTINGS[None])
    defaults = {**settings, "image_size": 224}
    defaults.update(lr=LR[args.optimizer][small], alpha_lr=ALPHA_LR[args.alpha_optimizer][small])
    if synthetic:
        defaults.update(epochs=8, image_size=32)
    return defaults


def resolve_args(args):
    """Fill the per-arch and per-data defaults and refuse what cannot work, before anything heavy happens."""
    defaults = arch_defaults(args)
    for key in ("bits", "lam", "epochs", "lr", "alpha_lr", "image_size"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if isinstance(args.bits, str):
        args.bits = bit_list(args.bits)
    if args.pretrained and not os.path.exists(args.pretrained):
        # e.g. ResNet18_Weights.IMAGENET1K_V1, as args.json records it
        args.pretrained = str(torchvision_weights(args.arch, args.pretrained))
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
        if not os.path.exists(weights):
            weights = torchvision_weights(arch, weights or "DEFAULT", "--teacher")
        args.teacher = f"{arch}:{weights}"
    return args


def lock_output_dir(out):
    """Create the output folder and lock it: a second run into the same folder is refused, naming the first.

    An advisory lock (flock) is dropped by the kernel when the process ends however it ends, so a killed run never
    leaves a stale lock behind. The lock is held until this process exits (LOCKS).
    """
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")  # noqa: SIM115 (held open until the process ends)
    except OSError as e:
        raise BadInput(f"--output-dir {out}: not writable ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise BadInput(f"--output-dir {out} is in use by {lock.read().strip() or 'another process'}") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
    lock.flush()
    LOCKS.append(lock)


LOCKS = []


def run(args, layer_type=QuantLayer):
    """What `python metamix.py` does: steps 1-3 of this section's head."""
    # 1. Flags, data, model, budget: every problem refused before the output folder is made.
    args = resolve_args(args)
    train_set, val_set, classes = build_datasets(args)
    torch.manual_seed(args.seed)
    model = build_model(args, classes, layer_type)
    lo, hi = check_budget(model, args)
    if args.bits_from:
        read_bits_from(model, args)
    if args.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise BadInput(f"--batch-size {args.batch_size}: BatchNorm needs 2 or more images per process")
    teacher = None
    if args.teacher:
        teacher = fp_model(*args.teacher.split(":", 1), classes, "--teacher").eval().requires_grad_(False)
    # 2. The output folder (locked), the checkpoint to continue, the processes, the loaders.
    if int(os.environ.get("RANK", "0")) == 0:
        lock_output_dir(args.output_dir)
    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
    resume = args.resume
    if resume == "auto":
        resume = checkpoint if os.path.exists(checkpoint) else None
    elif not resume and os.path.exists(checkpoint):
        raise BadInput(f"--output-dir {args.output_dir} already holds checkpoint.pth; continue it with --resume auto")
    dist = Dist()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    use_speed_path(model.to(dist.device))
    # The model was built from the common seed; augmentation, workers and dropout get a rank's seed (the data
    # order comes from --seed and the epoch, split by rank).
    random.seed(args.seed + dist.rank)
    torch.manual_seed(args.seed + dist.rank)
    train_loader, val_loader, calib = build_loaders(args, dist, train_set, val_set)
    if teacher is not None:
        teacher = teacher.to(dist.device)
    state = Run(args, dist, model, len(train_loader), teacher)
    if resume:
        state.resume(resume)
        log(dist, f"resumed {resume} after epoch {state.epoch} ({state.phase})")
    if dist.main:
        atomic_write(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=1).encode())
    log(
        dist,
        f"metamix {args.arch}: candidates {args.bits}, W{args.w_bits}, target {args.target_gbops:.3f} GBOPs "
        f"(feasible {lo:.3f} .. {hi:.3f}), world size {dist.world} on {dist.device.type}; all flags in "
        f"{args.output_dir}/args.json",
    )
    # 3. Bit selection, then weight training.
    autocast = functools.partial(torch.autocast, dist.device.type, torch.bfloat16, enabled=args.amp)
    train(state, train_loader, val_loader, calib, autocast)
    return 0


def guarded(prog, body, *args, interrupted=lambda: ""):
    """The error contract of metamix.py and of every tool beside it: body(*args), and any failure one line on stderr,
    `prog: ...`, no traceback, and an exit status: 2 for bad input (a BadInput, or an OSError: a file or folder
    named); 128 + N for a signal (SIGINT, SIGTERM), `interrupted()` adding what survived it; 1 for anything else, a
    bug of ours, with its exception's name. METAMIX_DEBUG=1 shows the traceback instead."""
    try:
        return body(*args)
    except (Exception, KeyboardInterrupt) as e:
        # A signal that reached a DataLoader worker first arrives as some other exception: the record says.
        signum = STOP["signum"]
        if not signum and isinstance(e, KeyboardInterrupt):
            signum = signal.SIGINT
        if os.environ.get("METAMIX_DEBUG") and not signum:
            raise
        line = f"error: {type(e).__name__}: {one_line(e)} (METAMIX_DEBUG=1: the traceback)"
        code = 1
        if signum:
            # A KeyboardInterrupt raised by the step's sync names the step at which every rank stopped.
            where = f" {e}" if isinstance(e, KeyboardInterrupt) and str(e) else ""
            line = f"interrupted by {signal.Signals(signum).name}{where}{interrupted()}"
            code = 128 + signum
        elif isinstance(e, (BadInput, OSError)):
            line = f"error: {one_line(e)}"
            code = 2
        print(f"{prog}: {line}", file=sys.stderr)
        return code


def main(args=None, layer_type=QuantLayer):
    """`run` under the error contract (`guarded`); after a signal, where to continue. `layer_type` is the hook of
    extensions (pairs.py's (A, W)-pair layer)."""
    args = args or get_args_parser().parse_args()
    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")

    def what_survived():
        if os.path.exists(checkpoint):
            return f"; the last checkpoint is {checkpoint}; continue with --resume auto"
        return "; no checkpoint was written yet; run the command again to start over"

    try:
        return guarded("metamix", run, args, layer_type, interrupted=what_survived)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # The output folder is free again (the kernel would free it at exit anyway).
        while LOCKS:
            LOCKS.pop().close()


if __name__ == "__main__":
    sys.exit(main())
