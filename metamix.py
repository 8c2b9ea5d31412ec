"""MetaMix: Meta-state Precision Searcher for Mixed-precision Activation Quantization.

Kim, Lee, Yoo, Kim, AAAI 2024, arXiv:2311.06798. The method and its driver, in one file that stands alone.

MetaMix picks one activation bit-width per layer under a BOPs budget. Bit selection (2 epochs) trains the FP weights
and every branch's LSQ step at each candidate bit-width in turn (*bit-meta*, Eq. 1); in epoch 2, step by step, a
*bit-search* step freezes that "meta-state" and learns per-layer logits alpha through a softmax-weighted
multi-branch quantizer (Eq. 2), an L1 BOPs regularizer and a straight-through softmax (Eq. 3-5). Weight training
then fine-tunes the network at argmax(alpha) bits, weights now quantized, from the meta-state.

Run it: `python metamix.py` (built-in synthetic data), `python metamix.py --arch mobilenet_v2 --dry-run` (the
feasible GBOPs range), `torchrun --nproc_per_node=8 metamix.py --data /imagenet --pretrained --target-gbops 33`.

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
Beside it: baselines.py, pairs.py, figure9.py, export.py. "Our choice" marks what the paper leaves open.
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


def lsq_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """[Qn, Qp] of b bits: unsigned [0, 2^b-1], signed [-2^(b-1), 2^(b-1)-1], narrow signed [1-2^(b-1), 2^(b-1)-1]."""
    return (-(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq_grad_scale(n: int, bits: int, signed: bool) -> float:
    """LSQ's step-gradient scale g = 1/sqrt(N * Qp); N = the values of one step: its output channel's weights, or
    features per sample (our choice: LSQ's balance of step and weight gradients, kept per step)."""
    return 1.0 / math.sqrt(n * lsq_range(bits, signed)[1])


def positive(step: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The step actually used: |s|, at least eps. Our choice: s > 0 whatever the optimizer does."""
    return step.abs().clamp_min(eps)


def lsq_quantize(
    x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, grad_scale: float | None = None, narrow: bool = False
) -> torch.Tensor:
    """LSQ fake quantization q(x; s) = round(clamp(x/s, Qn, Qp)) * s; s: positive(step), per tensor or row. v = x/s:
    d q / d x = 1 if Qn <= v <= Qp else 0                  (straight-through round)
    d q / d s = round(v) - v inside, Qn below, Qp above    (times `grad_scale`, 1/sqrt(N Qp))"""
    qn, qp = lsq_range(bits, signed, narrow)
    grad_scale = lsq_grad_scale(x.numel() // step.numel(), bits, signed) if grad_scale is None else grad_scale
    s = positive(step).view(-1, *[1] * (x.dim() - 1)) if step.dim() else positive(step)
    s = s.detach() + (s * grad_scale - (s * grad_scale).detach())  # the value s, the gradient times g
    v = x / s
    v = torch.where((v >= qn) & (v <= qp), v, v.clamp(qn, qp).detach())  # clamp; its gradient passes at the ends
    return (v.round().detach() + (v - v.detach())) * s  # round with a straight-through gradient


class Stateful(nn.Module):
    """A module whose plain attributes named in `saved` are part of its state dict (its "extra state")."""

    saved: tuple[str, ...] = ()

    def get_extra_state(self):
        return {k: copy.copy(getattr(self, k)) for k in self.saved}

    def set_extra_state(self, state):
        self.__dict__.update((k, state[k]) for k in self.saved)


class LSQQuantizer(Stateful):
    """A weight's signed LSQ, one step per output channel on the narrow range (the authors'; `channels` 1 and not
    narrow: LSQ's own, one step per tensor); s_c = 2 * mean|W_c| / sqrt(Qp) at first use; disabled: identity."""

    saved = ("initialized",)

    def __init__(self, bits: int, channels: int = 1, narrow: bool = False, enabled: bool = True):
        super().__init__()
        self.bits, self.narrow, self.enabled, self.initialized = bits, narrow, enabled, False
        self.step = nn.Parameter(torch.ones(channels))

    def init_step(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            m = w.detach().abs().reshape(len(self.step), -1).mean(1)  # per channel, or of all weights
            self.step.copy_(2 * m / math.sqrt(lsq_range(self.bits, True, self.narrow)[1]))
        self.initialized = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if not self.initialized:
            self.init_step(w)
        return lsq_quantize(w, self.step, self.bits, True, narrow=self.narrow)


# ==== 2. Multi-branch block (paper Fig. 4, Eq. 2) ===================================================================


class MultiBranchQuantizer(Stateful):
    """Activation quantizer with one LSQ branch per candidate bit-width and one logit alpha per branch (Fig. 4).
    Modes: "fp" (identity), "branch" (LSQ at bits[branch]: bit-meta, weight training), "search" (Eq. 2). N =
    features per sample. The grid, from the first batch: in [-3/8, 0), as hardswish's outputs (the authors' offset):
    unsigned, Q(x + 3/8) - 3/8; else signed if it has negatives. `offset` 0 given: no offset grid (LSQ's own)."""

    saved = ("signed", "offset", "initialized")

    def __init__(self, bits: Sequence[int], offset: float | None = None):
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        self.step, self.alpha = nn.Parameter(torch.ones(len(self.bits))), nn.Parameter(torch.zeros(len(self.bits)))
        self.signed, self.offset = None, offset  # unknown until the first batch (unless given)
        self.initialized, self.mode, self.branch = [False] * len(self.bits), "fp", 0

    def init_steps(self, x: torch.Tensor, branches: Sequence[int]) -> None:
        """LSQ's init from the data, s_i = 2 * mean|x| / sqrt(Qp_i), for the branches not initialised yet."""
        if todo := [i for i in branches if not self.initialized[i]]:
            with torch.no_grad():
                if self.signed is None:
                    lo = float(x.min())
                    self.offset = (0.375 if -0.375 <= lo < 0 else 0.0) if self.offset is None else self.offset
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
        return sum(p * self.quantize(x, i) for i, p in enumerate(F.softmax(self.alpha, dim=0)))  # Eq. 2


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
    """A Conv2d or Linear whose input activation and weight are quantized (Fig. 4): op(act(x), weight_quant(W)) + b,
    on the original layer's own tensors. The weight's LSQ (per output channel, narrow; `plain`: per tensor) is off in
    bit selection. `candidates[i]`: branch i's (activation bits, weight bits); a `fixed` layer (the first conv, the
    last Linear) has one. `macs`: OPs_l. `selected_branch`: bit selection's choice. `fused`: section 7's speed path."""

    fused, saved = False, ("selected_branch",)

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
        self.op = (
            LayerOp("linear")
            if isinstance(layer, nn.Linear)
            else LayerOp("conv2d", tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
        )
        self.weight, self.bias = layer.weight, layer.bias  # the very same Parameters
        self.act = MultiBranchQuantizer(bits, 0.0 if plain else None)
        self.weight_quant = LSQQuantizer(w_bits, 1 if plain else len(self.weight), not plain, enabled=False)
        self.candidates = [(a, int(w_bits)) for a in self.act.bits]
        self.name, self.kind, self.macs, self.fixed = name, type(layer).__name__, int(macs), fixed
        self.order, self.selected_branch = 0, 0  # position in forward order (patch_model sets it); the selection

    def set_state(self, mode: str, branch: int = 0, quant_weights: bool | None = None) -> None:
        """The activation quantizer's mode and branch; weight LSQ on or off (None: as it is; off in "fp")."""
        self.act.mode, self.act.branch = mode, branch
        if mode == "fp" or quant_weights is not None:
            self.weight_quant.enabled = mode != "fp" and bool(quant_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.act.mode != "fp":
            return fused_forward(self, x)  # section 7: the same values and gradients, less time and memory
        return self.op(self.act(x), self.weight_quant(self.weight), self.bias)


# ==== 3. Straight-through softmax (Eq. 5) ===========================================================================


def straight_through_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """hs(alpha): one-hot of argmax softmax(alpha) forward, softmax's gradient backward (Eq. 5)."""
    y_soft = F.softmax(logits, dim=dim)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, y_soft.argmax(dim, keepdim=True), 1.0)
    return y_hard - y_soft.detach() + y_soft


# ==== 4. BOPs (Eq. 6) and the L1 BOPs regularizer (Eq. 4) ===========================================================
# OPs_l = MACs of layer l at the deployment resolution (224): conv Cout*(Cin/groups)*kh*kw*Hout*Wout, linear in*out.
# BOPs = sum_l a_l * w_l * OPs_l (paper: w_l = w_bits), GBOPs = BOPs / 1e9; fixed first/last layers: Eq. 4's C_fixed.


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """Quantized layers in forward order (the order patch_model recorded)."""
    return sorted((m for m in model.modules() if isinstance(m, QuantLayer)), key=lambda m: m.order)


def searched_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in quant_layers(model) if not m.fixed]


def candidate_costs(model: nn.Module) -> list[int]:
    """a * w of each candidate of the searched layers (they share their candidates): the paper's b * w_bits."""
    return [a * w for a, w in searched_layers(model)[0].candidates]


def c_fixed_of(model: nn.Module) -> float:
    """C_fixed: BOPs of the first and last layers, in GBOPs."""
    return sum(m.macs * a * w for m in quant_layers(model) if m.fixed for a, w in m.candidates) / 1e9


def config_gbops(macs: Sequence[int], costs: Sequence[int], c_fixed: float) -> float:
    """Eq. 6 for the searched layers plus C_fixed: sum_l a_l * w_l * OPs_l / 1e9 + C_fixed; costs[l] = a_l * w_l."""
    return sum(m * c for m, c in zip(macs, costs)) / 1e9 + c_fixed


def branches_gbops(model: nn.Module, branches: Sequence[int]) -> float:
    """Eq. 6 of a configuration given as one branch index per searched layer."""
    costs = candidate_costs(model)
    return config_gbops([m.macs for m in searched_layers(model)], [costs[i] for i in branches], c_fixed_of(model))


def gbops_range(model: nn.Module) -> tuple[float, float]:
    """Feasible budgets: every searched layer at its cheapest candidate, and at its dearest."""
    macs, costs = [m.macs for m in searched_layers(model)], candidate_costs(model)
    return tuple(config_gbops(macs, [pick(costs)] * len(macs), c_fixed_of(model)) for pick in (min, max))


def bops_regularizer(
    alphas: torch.Tensor, costs: Sequence[int], macs: Sequence[int], c_fixed: float, target_gbops: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: L_reg = | sum_l sum_i hs(alpha_l)_i * bits_i * w_bits * OPs_l / 1e9 + C_fixed - t_bops |, alphas (L, N),
    costs (N,) bits_i * w_bits, macs (L,) OPs_l. Our choices: GBOPs, which make the paper's lambdas sensible; Eq. 4
    literally, the distance of the *argmax* configuration. Returns (L_reg, its GBOPs), differentiable in alphas."""
    hs = straight_through_softmax(alphas, dim=-1)  # (L, N), one-hot forward
    c, m = (torch.as_tensor(v, dtype=hs.dtype, device=hs.device) for v in (costs, macs))
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
    """Our choice (the paper has none): lower bits until within the target, each time the layer whose move to its next
    lower cost (the most probable candidate there) gives up least softmax probability per BOP saved."""
    branches, levels = list(branches), sorted(set(costs))
    while config_gbops(macs, [costs[i] for i in branches], c_fixed) > target_gbops + 1e-9:
        best = None
        for l, i in enumerate(branches):
            k = levels.index(costs[i])
            if k == 0:
                continue
            tied = [j for j in range(len(costs)) if costs[j] == levels[k - 1]]
            lower = max(tied, key=lambda j: (probs[l][j], -j))  # the most probable; ties: the first
            c = (probs[l][i] - probs[l][lower]) / ((costs[i] - costs[lower]) * macs[l])
            if best is None or c < best[0]:
                best = (c, l, lower)
        if best is None:
            break
        branches[best[1]] = best[2]
    return branches


# ==== 5. Model patching =============================================================================================


def trace_layers(model: nn.Module, image_size: int) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, MACs, input values per image) of every Conv2d/Linear in forward order, from one forward pass."""
    seen, names = [], {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = out.shape[1] * (mod.in_channels // mod.groups) * kh * kw * out.shape[2] * out.shape[3]
        else:
            macs = mod.in_features * mod.out_features * (out.numel() // out.shape[-1] // out.shape[0])
        if all(m is not mod for _, m, *_ in seen):  # our choice: a layer called twice counts once (its first call)
            seen.append((names[mod], mod, int(macs), inp[0][0].numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    model.train(was_training)
    return seen


def patch_model(
    model: nn.Module,
    bits: Sequence[int],
    w_bits=4,
    first_last_bits: int = 8,
    bops_image_size: int = 224,
    layer_type: type = QuantLayer,
    plain: bool = False,
) -> nn.Module:
    """Every Conv2d and Linear replaced by a QuantLayer in "fp" mode, the first and last in forward order fixed at
    first_last_bits; `layer_type` builds the searched layers (pairs.py's). plain: LSQ's quantizers, not the authors'."""
    traced = trace_layers(model, bops_image_size)
    if len(traced) < 3:
        raise ValueError("need at least three Conv2d/Linear layers (a first, a searched one, a last)")
    for i, (name, mod, macs, in_size) in enumerate(traced):
        q = (
            QuantLayer(mod, [first_last_bits], first_last_bits, name, macs, fixed=True, plain=plain)
            if i in (0, len(traced) - 1)
            else layer_type(mod, bits, w_bits, name, macs, plain=plain)
        )
        q.order, q.in_size = i, in_size
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def set_mode(model: nn.Module, mode: str, branch: int | None = None, quant_weights: bool | None = None) -> None:
    """Every layer in a phase's mode: "fp" (weights too), "meta" (searched layers at `branch`), "search" (Eq. 2),
    "selected"; fixed layers quantized but in "fp" (our choice). `quant_weights`: weight LSQ on/off (None: as is)."""
    for m in quant_layers(model):
        if mode == "fp":
            m.set_state("fp")
        elif m.fixed or mode == "search":
            m.set_state("branch" if m.fixed else "search", 0, quant_weights)
        else:
            m.set_state("branch", branch if mode == "meta" else m.selected_branch, quant_weights)


def alphas_of(model: nn.Module) -> list[nn.Parameter]:
    return [m.act.alpha for m in searched_layers(model)]  # the architecture logits alpha_l


def meta_params(model: nn.Module) -> list[nn.Parameter]:
    """What bit-meta and weight training update: every parameter but the alphas (weights, BN, steps)."""
    alphas = {id(a) for a in alphas_of(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


def argmax_branches(model: nn.Module) -> list[int]:
    return torch.stack(alphas_of(model)).detach().argmax(1).tolist()  # ties: the first


def apply_selection(model: nn.Module, branches: Sequence[int]) -> None:
    for m, i in zip(searched_layers(model), branches):  # the selection, one branch per searched layer
        m.selected_branch = int(i)


# ==== 6. The two phases (paper Table 1) =============================================================================
# Table 1 as code. S = bit-selection epochs (2 in the paper), E = all epochs.
#
#   init_quantizers(model, calib)                  # every branch's LSQ step, from one batch
#   for epoch in 1 .. S:                           # bit selection
#       for images, targets in loader:             #   Eq. 1; in epoch S also Eq. 3, same batch
#           bit_selection_step(model, images, targets, opt, opt_alpha, search=epoch == S, lam=lam, target_gbops=t_bops)
#   start_weight_training(model, t_bops)           # bits = argmax alpha; weight LSQ from the meta-state
#   for epoch in S+1 .. E:                         # weight training (a fresh optimizer)
#       for images, targets in loader:
#           weight_training_step(model, images, targets, opt)
# Each step takes `autocast` (a context factory, e.g. bf16), `sync(params, loss)`, called between backward and
# optimizer step (the driver all-reduces there), and `criterion(logits, targets)` (e.g. distillation_loss(teacher's
# logits)). Nothing here knows about processes, files or printing.


@contextlib.contextmanager
def batch_stats_bn(model: nn.Module):
    """BN normalises with the batch's statistics and leaves its running buffers alone; dropout off."""
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False  # train-mode BN then uses batch statistics and leaves the buffers alone
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
    """LSQ's data-dependent init on one batch: every branch's step, each layer's grid (sign, offset); then "fp". Our
    choice: BN uses the batch's statistics (a model from scratch has running statistics 0 and 1: steps of 0)."""
    with torch.no_grad(), batch_stats_bn(model):
        for branch in range(len(searched_layers(model)[0].candidates)):
            set_mode(model, "meta", branch)
            model(calib)
    set_mode(model, "fp")


def distillation_loss(teacher_logits: torch.Tensor):
    """The authors' loss (their code; the paper names none): the batch mean of -sum_c softmax(teacher)_c *
    log_softmax(student)_c, a frozen teacher at temperature 1, no label term. A criterion(logits, targets)."""
    probs = F.softmax(teacher_logits.detach().float(), 1)
    return lambda logits, targets: F.cross_entropy(logits.float(), probs)


def bit_meta_step(model: nn.Module, images, targets, autocast=contextlib.nullcontext, criterion=F.cross_entropy):
    """Eq. 1: L_meta = (1/N) sum_b L_task(net with every searched layer at b), returned detached; one backward per
    candidate, gradients accumulating in .grad. Our choice: BN layers shared by all candidates."""
    n, total = len(searched_layers(model)[0].candidates), torch.zeros((), device=images.device)
    for branch in range(n):
        set_mode(model, "meta", branch)
        with autocast():
            loss = criterion(model(images), targets) / n
        loss.backward()
        total += loss.detach()
    return total


def bit_search_step(
    model: nn.Module,
    images,
    targets,
    lam: float,
    target_gbops: float,
    autocast=contextlib.nullcontext,
    fixed: bool = True,
    criterion=F.cross_entropy,
):
    """Eq. 3: L = L_task + lambda * L_reg (Eq. 4) on the frozen meta-state (only the alphas learn). Our choice: BN
    uses the batch's statistics and leaves its buffers alone; dropout is off. `fixed=False`: the paper's Figure 7(a)
    ablation, "weights trained during bit-search", nothing frozen, BN and dropout as in training (the caller steps
    the meta optimizer too). Returns (L, GBOPs of the argmax configuration), detached."""
    frozen = [p for p in meta_params(model) if p.requires_grad] if fixed else []
    set_mode(model, "search")
    for p in frozen:
        p.requires_grad_(False)
    try:
        with batch_stats_bn(model) if fixed else contextlib.nullcontext(), autocast():
            task = criterion(model(images), targets)
        reg, gbops = bops_regularizer(
            torch.stack(alphas_of(model)),
            candidate_costs(model),
            [m.macs for m in searched_layers(model)],
            c_fixed_of(model),
            target_gbops,
        )
        loss = task.float() + lam * reg
        loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return loss.detach(), gbops.detach()


def bit_selection_step(
    model: nn.Module,
    images,
    targets,
    opt,
    opt_alpha=None,
    *,
    search: bool = False,
    lam: float = 0.0,
    target_gbops: float | None = None,
    autocast=contextlib.nullcontext,
    sync=lambda params, loss: loss,
    fixed: bool = True,
    criterion=F.cross_entropy,
):
    """One iteration of bit selection (Table 1): a bit-meta step (Eq. 1) and, in the search epoch, a bit-search step
    (Eq. 3-5) on the meta-state just updated, "given the same mini-batch". Returns (meta loss, search loss, GBOPs)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.zero_grad(set_to_none=True)
    meta_loss = sync(params, bit_meta_step(model, images, targets, autocast, criterion))
    opt.step()
    if not search:
        return meta_loss, None, None
    opt_alpha.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    loss, gbops = bit_search_step(model, images, targets, lam, target_gbops, autocast, fixed, criterion)
    search_loss = sync(alphas_of(model) + ([] if fixed else params), loss)
    opt_alpha.step()
    if not fixed:
        opt.step()
    return meta_loss, search_loss, gbops


def start_weight_training(
    model: nn.Module, target_gbops: float, repair: bool = True, branches: Sequence[int] | None = None
):
    """Between the phases: bits = argmax alpha (lowered to fit the target if `repair`; or `branches`), weight LSQ on
    from the meta-state (the paper's "mixed-precision-aware" init). Returns (branches, GBOPs, whether repaired)."""
    layers, argmax = searched_layers(model), argmax_branches(model)
    if branches is None and repair:
        probs = [F.softmax(m.act.alpha.detach().float(), 0).tolist() for m in layers]
        branches = repair_to_budget(
            probs, argmax, candidate_costs(model), [m.macs for m in layers], c_fixed_of(model), target_gbops
        )
    branches = argmax if branches is None else list(branches)
    apply_selection(model, branches)
    set_mode(model, "selected", quant_weights=True)  # each weight step initialised at its first use: the meta-state's
    return branches, branches_gbops(model, branches), branches != argmax


def weight_training_step(
    model: nn.Module,
    images,
    targets,
    opt,
    autocast=contextlib.nullcontext,
    sync=lambda params, loss: loss,
    criterion=F.cross_entropy,
):
    """One step of weight training: ordinary training of weights and steps at the selected bits."""
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = criterion(model(images), targets)
    loss.backward()
    loss = sync([p for g in opt.param_groups for p in g["params"]], loss.detach())
    opt.step()
    return loss


# ==== 7. The speed path: a fused layer op (what the driver runs) ====================================================
# A `fused` QuantLayer runs one autograd function for activation (a branch, or Eq. 2's mixture), weight and op: it
# saves only x and the raw weight, recomputes the codes in backward and masks with hardtanh's backward. The same
# values and gradients as sections 1-2 (tests), in less time and memory (docs/speed.md).


def fused_forward(
    layer: QuantLayer,
    x: torch.Tensor,
    probs: torch.Tensor | None = None,
    wq: LSQQuantizer | None = None,
    bias: bool = True,
) -> torch.Tensor:
    """layer(x) through FusedQuantOp (pairs.py's search passes its mixture `probs`, weight quantizer, bias)."""
    act, wq = layer.act, wq or layer.weight_quant
    branches = [act.branch] if act.mode == "branch" else list(range(len(act.bits)))
    act.init_steps(x, branches)
    a_q = [quant_params(act.bits[i], act.signed, x.numel() // x.shape[0]) for i in branches]
    probs = F.softmax(act.alpha, dim=0) if act.mode != "branch" and probs is None else probs
    w_step = w_q = None
    if wq.enabled:
        if not wq.initialized:
            wq.init_step(layer.weight)
        w_step = positive(wq.step).view(-1, *[1] * (layer.weight.dim() - 1))  # (C_out, 1, ...)
        w_q = quant_params(wq.bits, True, layer.weight.numel() // len(wq.step), wq.narrow)
    return FusedQuantOp.apply(
        x,
        positive(act.step[branches]),
        probs,
        layer.weight,
        w_step,
        layer.bias if bias else None,
        a_q,
        w_q,
        layer.op,
        act.offset,
    )


def quant_params(bits: int, signed: bool, n: int, narrow: bool = False) -> tuple[int, int, float]:
    return (*lsq_range(bits, signed, narrow), lsq_grad_scale(n, bits, signed))  # (Qn, Qp, LSQ's gradient scale)


def lsq_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return (x / step).clamp_(qn, qp).round_()  # the integer codes round(clamp(x/s, Qn, Qp)), in one new buffer


@functools.lru_cache(maxsize=None)
def _open_bounds(qn: int, qp: int, dtype: torch.dtype) -> list[float]:  # lo < v < hi exactly when Qn <= v <= Qp
    ends, out = torch.tensor([qn, qp], dtype=dtype), torch.tensor([-math.inf, math.inf], dtype=dtype)
    return torch.nextafter(ends, out).tolist()


def pass_inside(g: torch.Tensor, v: torch.Tensor, qn: int, qp: int, out=None) -> torch.Tensor:
    """g where Qn <= v <= Qp, else 0: the straight-through mask as hardtanh's backward, one pass, into `out`."""
    if out is None:
        return torch.ops.aten.hardtanh_backward(g, v, *_open_bounds(qn, qp, v.dtype))
    return torch.ops.aten.hardtanh_backward.grad_input(g, v, *_open_bounds(qn, qp, v.dtype), grad_input=out)


def sum_product(a: torch.Tensor, b: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
    """sum(a * b): in one pass for a step per tensor; per row (output channel) in step's shape for one per row."""
    if step is None or step.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(() if step is None else step.shape)
    return torch.bmm(a.reshape(len(a), 1, -1), b.reshape(len(a), -1, 1)).view_as(step)


def _lsq_grads(g, x, q, qn: int, qp: int, step, need_s: bool, grad_scale: float):
    """LSQ's backward for out = q * s given the codes q: d out/d s = q - v * inside, so sum(g * d out/d s) =
    <g, q> - <g * inside, v>. Returns (grad x, in g's buffer; grad s or None); v is computed in q's buffer."""
    gq = sum_product(g, q, step) if need_s else None
    v = torch.div(x, step, out=q)
    gx = pass_inside(g, v, qn, qp, out=g)
    return gx, (gq - sum_product(gx, v, step)) * grad_scale if need_s else None


def _mixture(x, steps, probs, a_q):
    """x_hat of Eq. 2, sum_i p_i * s_i * round(clamp(x/s_i, Qn_i, Qp_i)): 4 passes per branch, one scratch buffer."""
    out = tmp = None
    for i, (qn, qp, _) in enumerate(a_q):
        tmp = torch.div(x, steps[i], out=tmp).clamp_(qn, qp).round_()
        out = tmp * (steps[i] * probs[i]) if out is None else out.addcmul_(tmp, steps[i] * probs[i])
    return out


def _mixture_grads(g, x, steps, probs, a_q, need_s: bool, need_p: bool):
    """Gradients of sum_i p_i * s_i * q_i(x) given g = dL/d(mixed activation): d/dx = sum_i p_i * (g *
    inside_i); d/dp_i = s_i <g, q_i>; d/ds_i = p_i * (<g, q_i> - <g * inside_i, v_i>) * grad scale."""
    gs, gp = (torch.zeros_like(steps) if need_s else None), (torch.zeros_like(probs) if need_p else None)
    gx = v = q = gi = None  # buffers reused across branches
    for i, (qn, qp, grad_scale) in enumerate(a_q):
        v = torch.div(x, steps[i], out=v)
        q = torch.clamp(v, qn, qp, out=q).round_()
        gi = pass_inside(g, v, qn, qp, out=gi)  # g * inside_i
        gx = gi * probs[i] if gx is None else gx.addcmul_(gi, probs[i])
        gq = sum_product(g, q) if need_p or need_s else None
        if need_p:
            gp[i] = steps[i] * gq
        if need_s:
            gs[i] = probs[i] * grad_scale * (gq - sum_product(gi, v))
    return gx, gs, gp


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def op_backward(g, inp, weight, op: LayerOp, need_in, need_w, need_b):
    inp, w = inp.to(g.dtype), weight.to(g.dtype)  # under autocast the forward ran in g's dtype
    if op.kind == "linear":  # out = inp @ W^T + b over the last dim
        g2 = g.reshape(-1, g.shape[-1])
        g_in = (g @ w) if need_in else None
        g_w = (g2.t() @ inp.reshape(-1, inp.shape[-1])).to(weight.dtype) if need_w else None
        return g_in, g_w, g2.sum(0).to(weight.dtype) if need_b else None
    g_in, g_w, g_b = torch.ops.aten.convolution_backward(
        g,
        inp,
        w,
        [w.shape[0]] if need_b else None,
        op.stride,
        op.padding,
        op.dilation,
        False,
        [0, 0],
        op.groups,
        [need_in, need_w, need_b],
    )
    return g_in, *(t.to(weight.dtype) if t is not None else None for t in (g_w, g_b))


class FusedQuantOp(torch.autograd.Function):
    """out = op(sum_i p_i Q_i(x; s_i), Q_w(W; s_w)) + b; steps, a_q: the K active branches' steps and (Qn, Qp, grad
    scale); probs: None for one branch; w_step (C_out, 1, ...), w_q: None for an FP weight; offset: the inputs' o. The
    op runs on integer codes, scaled after (s_a s_w[c] op(q_a, q_w) + b; with o, minus o s_w[c] op(1, q_w), the
    border map of zero padding): exact in bf16 up to 256, so bf16 autocast rounds only the op's output (and mixture)."""

    @staticmethod
    def forward(ctx, x, steps, probs, weight, w_step, bias, a_q, w_q, op, offset=0.0):
        xf = upcast(x) + offset if offset else upcast(x)  # quantizer math in fp32 (also under autocast), on x + o
        w, w_scale = weight, None
        if w_q is not None:
            w = lsq_codes(weight, w_step, *w_q[:2])
            w_scale = w_step.reshape(-1, 1, 1) if op.kind == "conv2d" else w_step.reshape(-1)  # along output channels
        if probs is None:
            x_in, scale = lsq_codes(xf, steps[0], *a_q[0][:2]), steps[0]
        else:  # the mixture, sum_i p_i (s_i q_i - o)
            x_in, scale = _mixture(xf, steps, probs, a_q), None
            x_in = x_in.sub_(offset * probs.sum()) if offset else x_in
        scale = w_scale if scale is None else scale if w_scale is None else scale * w_scale
        ctx.save_for_backward(x, steps, probs, weight, w_step)
        ctx.a_q, ctx.w_q, ctx.op, ctx.has_bias, ctx.offset = a_q, w_q, op, bias is not None, offset
        out = op(x_in, w)
        if scale is None and bias is None:
            return out
        y = upcast(out) if scale is None else upcast(out).mul_(scale)  # in fp32, one rounding to out's dtype
        if offset and probs is None:  # s op(q - o/s, W) = s op(q, W) - o op(1, W), in fp32
            with torch.autocast(x.device.type, enabled=False):
                y.sub_(op(xf.new_ones(1, *x.shape[1:]), w) * (offset if w_scale is None else offset * w_scale))
        if bias is not None:
            y.add_(bias.view(-1, 1, 1) if op.kind == "conv2d" else bias)
        return y.to(out.dtype)

    @staticmethod
    def backward(ctx, g):
        x, steps, probs, weight, w_step = ctx.saved_tensors
        need_x, need_s, need_p, need_w, need_ws, need_b = ctx.needs_input_grad[:6]
        need_in, need_wgrad, need_b = need_x or need_s or need_p, need_w or need_ws, need_b and ctx.has_bias
        a_q, w_q, op, o = ctx.a_q, ctx.w_q, ctx.op, ctx.offset
        w_codes = None if w_q is None else lsq_codes(weight, w_step, *w_q[:2])
        w = weight if w_codes is None else w_codes * w_step
        xf = upcast(x) + o if o else upcast(x)
        gx = gs = gp = g_ws = None
        if probs is None:  # one branch: bit-meta and weight training (the hot path)
            q = lsq_codes(xf, steps[0], *a_q[0][:2])
            # The op is linear in its input: grad_W(s * q) = s * grad_W(q), so the codes serve as input.
            only_s = need_s and not need_x  # e.g. the image's quantizer in the first layer
            q_in = q - o / steps[0] if o else q  # s * q_in: the quantized input
            g_in, g_w, g_b = op_backward(g, q_in, w, op, need_in and not only_s, need_wgrad, need_b)
            if g_w is not None:
                g_w.mul_(steps[0])
            if only_s:  # <g_in, r> = <g, op(r, W)> (adjoint): one forward op instead of an input gradient
                v = xf / steps[0]  # d(s q)/ds = q - v * inside, built in q's buffer
                r = q.sub_(pass_inside(v, v, *a_q[0][:2], out=v))
                gs = (sum_product(upcast(g), op(r, w)) * a_q[0][2]).reshape(1)
            elif g_in is not None:
                gx, gs = _lsq_grads(upcast(g_in), xf, q, *a_q[0][:2], steps[0], need_s, a_q[0][2])
                gs = None if gs is None else gs.reshape(1)
        else:  # search (Eq. 2); with --unfixed the weights learn too, on the mixture
            xm = _mixture(xf, steps, probs, a_q).sub_(o * probs.sum()) if need_wgrad else xf
            g_in, g_w, g_b = op_backward(g, xm, w, op, need_in, need_wgrad, need_b)
            del xm
            if g_in is not None:
                gx, gs, gp = _mixture_grads(upcast(g_in), xf, steps, probs, a_q, need_s, need_p)
                gp = gp.sub_(o * upcast(g_in).sum()) if o and gp is not None else gp  # d/dp_i of -p_i o
        gx = gx.to(x.dtype) if gx is not None and need_x else None
        if g_w is not None and w_q is not None:  # through the weight quantizer (LSQ)
            g_w, g_ws = _lsq_grads(g_w, weight, w_codes, *w_q[:2], w_step, need_ws, w_q[2])
        return gx, gs, gp, (g_w if need_w else None), g_ws, g_b, None, None, None, None


def use_speed_path(model: nn.Module, on: bool = True) -> nn.Module:  # the fused op, or sections 1-2's readable form
    for m in quant_layers(model):
        m.fused = on
    return model


# ==== 8. The driver: torchrun, data, model, checkpoints, the run, the command line ==================================


class BadInput(Exception):
    """A problem the user can fix: one line on stderr, exit status 2, no traceback."""


_STOP = {"signum": 0}


def _on_signal(signum, frame):  # the first signal stops at the next step boundary; a second one at once
    _STOP["signum"] = signum
    signal.signal(signum, signal.SIG_DFL)


class Dist:
    """torchrun's process group (nccl on GPUs, gloo on CPU); one process without torchrun."""

    def __init__(self):
        env = os.environ.get
        self.world, self.rank, local = int(env("WORLD_SIZE", "1")), int(env("RANK", "0")), int(env("LOCAL_RANK", "0"))
        self.main, self.cuda = self.rank == 0, torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.cuda else "gloo")


def sync_step(dist: Dist, params: Sequence[nn.Parameter], loss: torch.Tensor) -> tuple[float, bool]:
    """ONE all-reduce per step: the gradients, the loss and the stop flag (our choice instead of DDP, which handles
    bit-meta's unused branches only with find_unused_parameters). Returns (mean loss, whether a rank was signalled)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.stack([loss.float().reshape(()), torch.tensor(float(_STOP["signum"] > 0), device=loss.device)])
    if dist.world > 1:
        flat = torch.cat([flat] + [g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= dist.world
        for g, mean in zip(grads, flat[2:].split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))
    loss_v, stop = flat[:2].tolist()
    return loss_v, stop > 0


def synthetic_spec(data: str) -> tuple[int, int, int] | None:
    """(train images, val images, classes) of --data synthetic[:TRAIN,VAL,CLASSES]; None for a folder."""
    name, _, given = data.partition(":")
    if name != "synthetic":
        return None
    spec = [int(v) if v.isdigit() else -1 for v in given.split(",")] if given else [2560, 1000, 10]
    if len(spec) != 3 or min(spec[:2]) < 1 or spec[2] < 2:
        raise BadInput(f"--data {data}: expected synthetic:TRAIN,VAL,CLASSES, 1 validation image and 2 classes or more")
    return tuple(spec)


def synthetic_dataset(n: int, num_classes: int, image_size: int, seed: int, split: str):
    """A learnable set from the seed: its class's smooth random colour pattern, shifted, scaled, plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=image_size, mode="bilinear")
    g.manual_seed(seed * 1000 + (1 if split == "train" else 2))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    shifts = torch.randint(-image_size // 8, image_size // 8 + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(t, (int(s[0]), int(s[1])), (1, 2)) for t, s in zip(templates[labels], shifts)])
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.3 * torch.randn(n, 1, 1, 1, generator=g)
    return torch.utils.data.TensorDataset((x + 0.7 * torch.randn(x.shape, generator=g)).contiguous(), labels)


def build_datasets(args):
    """(train set, val set, classes): synthetic, or ImageFolder with torchvision's reference transforms."""
    if spec := synthetic_spec(args.data):
        return (
            *(synthetic_dataset(n, spec[2], args.image_size, args.seed, s) for n, s in zip(spec, ("train", "val"))),
            spec[2],
        )
    if not os.path.isdir(args.data):
        raise BadInput(f"--data {args.data}: no such folder (expected train/ and val/ in it)")
    norm, size = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), args.image_size  # ImageNet's mean, std
    tf = {
        "train": T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]),
        "val": T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), norm]),
    }
    try:  # ImageFolder names a missing folder, a folder without classes, a class without images
        train, val = (ImageFolder(os.path.join(args.data, s), tf[s]) for s in ("train", "val"))
    except OSError as e:
        raise BadInput(f"--data {args.data}: {e.strerror + ': ' + e.filename if e.filename else e}") from None
    if train.classes != val.classes:
        raise BadInput(
            f"--data {args.data}: train/ and val/ have different classes, e.g. "
            f"{sorted(set(train.classes) ^ set(val.classes))[0]}"
        )
    return train, val, len(train.classes)


def build_loaders(args, dist: Dist, train_set, val_set):
    """Loaders (validation: each image once, rank r takes r, r+W, ...) and LSQ's calibration batch (from --seed)."""
    if args.batch_size > (share := len(train_set) // dist.world):
        raise BadInput(f"--batch-size {args.batch_size}: over a process's {share} training images; use {share} or less")
    sampler = DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=args.seed, drop_last=True)
    # workers are re-created each epoch (not persistent), seeded from the RNG state at its start: exact resume
    kw = dict(num_workers=0 if synthetic_spec(args.data) else args.workers, pin_memory=dist.cuda)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        calib = torch.stack([train_set[int(i)][0] for i in torch.randperm(len(train_set))[: args.batch_size]])
    return (
        DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **kw),
        DataLoader(val_set, args.batch_size, sampler=range(dist.rank, len(val_set), dist.world), **kw),
        calib,
    )


# The paper's settings (Table 1, supplement Table 8, headline targets); the torchvision weights nearest its FP models.
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
# LRs (from pretrained weights, from scratch): ours (SGD: the digits study's, docs/digits.md), the authors' (Adam).
LR = {"sgd": (0.01, 0.05), "adam": (5e-4, 5e-4)}
ALPHA_LR = {"sgd": (0.005, 0.05), "adam": (0.01, 0.1), "authors": (1e-4, 1e-3)}
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


def resolve_weights(arch: str, name: str, flag: str = "--pretrained"):
    """torchvision's weights enum for --pretrained NAME ("paper": those closest to the paper's FP baseline)."""
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum.verify(PAPER_SETTINGS.get(arch, {}).get("weights", "DEFAULT") if name == "paper" else name)
    except (KeyError, ValueError):
        raise BadInput(
            f"{flag} {name!r}: no such file and no such weights for {arch}; give a state dict's path "
            f"or one of: {', '.join(['DEFAULT'] + [w.name for w in enum])}"
        ) from None


def local_weights(name: str | None) -> bool:
    """A full-precision state dict on disk (a PATH), rather than torchvision's weights by name."""
    return bool(name) and (os.sep in name or os.path.exists(name))


def fp_model(arch: str, name: str | None, num_classes: int, flag: str = "--pretrained") -> nn.Module:
    """A torchvision model: torchvision's weights by name, a local state dict, or (no name) a fresh init."""
    weights = resolve_weights(arch, name, flag) if name and not local_weights(name) else None
    if weights is not None and num_classes != 1000:
        raise BadInput(f"{flag} {name} needs 1000 classes, the data has {num_classes}")
    kw = {} if weights else {"num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):  # without their auxiliary heads, the training output is a tensor
        kw.update(aux_logits=False, **({} if weights else {"init_weights": True}))
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kw)
    except Exception as e:
        raise BadInput(f"cannot load {arch}'s weights ({type(e).__name__}: {e}); try {flag} PATH") from None
    if local_weights(name):
        sd = load_checkpoint(name, flag, "a state dict")
        try:
            model.load_state_dict(sd.get("model", sd))
        except (RuntimeError, TypeError, AttributeError) as e:
            raise BadInput(
                f"{flag} {name} is not a state dict of {arch} with {num_classes} classes ({str(e).splitlines()[0]})"
            ) from None
    return model


def build_model(args, num_classes: int, layer_type: type = QuantLayer) -> nn.Module:
    """The torchvision model with its FP weights, patched; refused, naming the layer, unless all is counted."""
    model = fp_model(args.arch, args.pretrained, num_classes)
    found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, UNSUPPORTED)]
    patch_model(model.train(), args.bits, args.w_bits, args.first_last_bits, 224, layer_type, args.plain_lsq)
    found += [f"{n} (not called as a module)" for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if found:
        raise BadInput(
            f"--arch {args.arch}: {', '.join(found[:3])} would stay in full precision and outside the BOPs; "
            "metamix quantizes Conv2d and Linear modules (CNNs such as resnet18, mobilenet_v2)"
        )
    for size in [args.image_size] + list(range(16, 225, 16)):  # is the crop too small for the model's pooling?
        with contextlib.suppress(RuntimeError), torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
            break
    if size != args.image_size:
        raise BadInput(f"--image-size {args.image_size} is too small for {args.arch}; use --image-size {size} or more")
    return model.train()


def atomic_write(path: str, data: bytes) -> None:
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


def saved_bytes(obj) -> bytes:  # a full disk then fails in atomic_write, naming the path, not in torch.save
    torch.save(obj, buf := io.BytesIO())
    return buf.getvalue()


def load_checkpoint(path: str, flag: str, what: str = "a metamix checkpoint") -> dict:
    """torch.load(weights_only=True); every failure a whole sentence that says what the file is."""
    if not os.path.isfile(path):
        hint = "give a file in it" + (", or --resume auto" if flag == "--resume" else "")
        raise BadInput(
            f"{flag} {path} is a folder, not {what}; {hint}" if os.path.isdir(path) else f"{flag} {path}: no such file"
        )
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip format, or a legacy pickle
        text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
        kind = ("a JSON file" if head.lstrip()[:1] in b"{[" else "a text file") if text else "a file of another kind"
        raise BadInput(f"{flag} {path} is {kind if head else 'empty'}, not {what} (a file written by torch.save)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        pickled = "weights_only" in str(e) or "Unsupported global" in str(e)
        raise BadInput(
            f"{flag} {path} "
            + (
                "holds pickled Python objects, which metamix does not load (weights_only)"
                if pickled
                else f"is truncated or corrupt (torch.load fails with {type(e).__name__})"
            )
        ) from None
    if not isinstance(ck, dict):
        raise BadInput(f"{flag} {path} holds a {type(ck).__name__}, not {what}")
    return ck


CHECKPOINT_FORMAT = "metamix-checkpoint-4"
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


def weights_quantized(args, epoch: int, selected) -> bool:  # after `epoch`: bits selected and act-only epochs over
    return selected is not None and epoch > args.search_epochs + args.act_only_epochs


class Run:
    """Everything a run carries from epoch to epoch; save() writes it as the checkpoint."""

    def __init__(self, args, dist: Dist, model: nn.Module, steps: int = 1, teacher: nn.Module | None = None):
        self.args, self.dist, self.model, self.steps, self.teacher = args, dist, model, steps, teacher  # steps/epoch
        self.epoch, self.selected = 0, None  # epochs finished; a branch per searched layer, once bits are selected
        self.history, self.fp_top1, self.search = [], None, None  # rows of log.jsonl; FP top-1; how the search ended
        self.build_optimizers()

    phase = property(lambda self: "bit_selection" if self.selected is None else "weight_training")

    def build_optimizers(self):
        """The paper is silent. Ours: SGD, decay 1e-4 on conv/linear weights, constant LR in bit selection, then a
        per-epoch cosine. The authors' (--optimizer adam): Adam, L2 5e-6 on conv weights, LR/5 in bit selection, a
        per-step cosine, clipping at norm 10. A fresh one for each weight-training stage (act-only, then W)."""
        a, alphas, adam = self.args, alphas_of(self.model), self.args.optimizer == "adam"
        decay = [m.weight for m in quant_layers(self.model) if m.weight.dim() == 4 or not adam]
        rest = [p for p in self.model.parameters() if all(p is not q for q in alphas + decay)]
        groups = [{"params": decay, "weight_decay": 5e-6 if adam else 1e-4}, {"params": rest, "weight_decay": 0.0}]
        lr = a.lr / 5 if adam and self.selected is None else a.lr
        self.opt = torch.optim.Adam(groups, lr=lr) if adam else torch.optim.SGD(groups, lr=lr, momentum=0.9)
        if adam:  # before each step, this optimizer's gradients only (their code: the alphas' stale ones too)
            self.opt.register_step_pre_hook(lambda opt, *_: (nn.utils.clip_grad_norm_(decay + rest, 10), None)[1])
        self.opt_alpha = (
            torch.optim.SGD(alphas, lr=a.alpha_lr, momentum=0.9)
            if a.alpha_optimizer == "sgd"
            else torch.optim.Adam(alphas, lr=a.alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
        )
        w_next = weights_quantized(a, self.epoch + 1, self.selected)  # the stage of the next epoch
        epochs = a.epochs - a.search_epochs - a.act_only_epochs if w_next else a.act_only_epochs
        self.sched = (
            None
            if self.selected is None
            else torch.optim.lr_scheduler.CosineAnnealingLR(
                self.opt, T_max=max(epochs * (self.steps if adam else 1), 1)
            )
        )

    def load_state_dict(self, ck: dict, path: str) -> None:
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise BadInput(f"--resume {path} is not a checkpoint of this metamix (format {ck.get('format')!r})")
        old, a = ck["args"], self.args
        boundary = ck["selected"] is None and ck["epoch"] >= a.search_epochs  # optimizers rebuilt before any step
        for key in SAME_RUN + (() if boundary else SAME_SELECTION):
            mine, theirs = (",".join(map(str, v)) if isinstance(v, list) else v for v in (getattr(a, key), old[key]))
            if mine != theirs:
                raise BadInput(f"--resume {path}: the checkpoint has --{key.replace('_', '-')} {theirs}, not {mine}")
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise BadInput(f"--resume {path}: the model does not match ({str(e).splitlines()[0]})") from None
        self.epoch, self.selected, self.history, self.fp_top1 = map(ck.get, ("epoch", "selected", "history", "fp_top1"))
        set_mode(self.model, "selected", quant_weights=weights_quantized(a, self.epoch, self.selected))  # as evaluated
        self.build_optimizers()
        if a.optimizer == "adam" and self.selected is not None and len(ck["rng"]) != self.dist.world:
            raise BadInput(f"--resume {path}: Adam's per-step schedule needs its {len(ck['rng'])} processes again")
        for obj, key in ((self.opt, "opt"), (self.opt_alpha, "opt_alpha"), (self.sched, "sched")):
            if obj is not None and not boundary:
                obj.load_state_dict(ck[key])
        rng = ck["rng"][min(self.dist.rank, len(ck["rng"]) - 1)]  # another world size: valid, but not bit-exact
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if self.dist.cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])

    def save(self):
        """checkpoint.pth and log.jsonl; at the phase boundary also meta_state.pth, kept (for --bits-from)."""
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state()} if self.dist.cuda else {}),
        }
        rng = [state] * self.dist.world  # every rank's RNG state: rank r resumes with its own
        if self.dist.world > 1:
            torch.distributed.all_gather_object(rng, state)
        if self.dist.main:
            data = saved_bytes(
                {
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
                    "rng": rng,
                }
            )
            boundary = self.selected is None and self.epoch == self.args.search_epochs
            for name in ["meta_state.pth"] * boundary + ["checkpoint.pth"]:
                atomic_write(os.path.join(self.args.output_dir, name), data)
            atomic_write(
                os.path.join(self.args.output_dir, "log.jsonl"),
                "".join(json.dumps(r) + "\n" for r in self.history).encode(),
            )


def log(dist: Dist, *msg) -> None:
    if dist.main:
        print(*msg, flush=True)


def train_one_epoch(run: Run, loader, epoch: int, autocast) -> float:
    """One epoch of the current phase (section 6's steps); returns the mean loss."""
    a, model, dist, selecting = run.args, run.model, run.dist, run.phase == "bit_selection"
    searching = selecting and epoch == a.search_epochs and not a.bits_from  # --bits-from: the selection is given
    model.train()
    passes = max(1, -(-a.search_steps // len(loader))) if searching else 1  # the search: --search-steps or more

    def batches():  # each pass over the data in an order of its own (the first: the epoch's, as without passes)
        for p in range(passes):
            loader.sampler.set_epoch(epoch + 1000 * p)
            yield from loader

    steps, t0, total = len(loader) * passes, time.time(), 0.0
    argmax, run.search = (argmax_branches(model), 0) if searching else (None, None)
    for step, (images, targets) in enumerate(batches(), 1):
        images, targets = images.to(dist.device, non_blocking=True), targets.to(dist.device, non_blocking=True)

        def sync(params, loss):  # one all-reduce, then the NaN and stop checks, before the update
            loss_v, stop = sync_step(dist, params, loss)
            if not math.isfinite(loss_v):
                last = f"epoch {run.epoch} in checkpoint.pth" if run.epoch else "none written yet"
                raise BadInput(
                    f"the loss is {loss_v} at epoch {epoch} step {step}/{steps}, stopped before this update "
                    f"(last good checkpoint: {last}); try a lower --lr"
                )
            if stop:
                raise KeyboardInterrupt(f"at epoch {epoch} step {step}/{steps}")  # on every rank at this step
            return loss_v

        with torch.no_grad(), autocast():  # the teacher once per batch, for all of the step's passes
            criterion = F.cross_entropy if run.teacher is None else distillation_loss(run.teacher(images))
        if selecting:
            loss_v, _, gb = bit_selection_step(
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
            if searching and (now := argmax_branches(model)) != argmax:
                argmax, run.search = now, step  # the last step at which the argmax configuration changed
        else:
            loss_v = weight_training_step(model, images, targets, run.opt, autocast, sync, criterion)
            if a.optimizer == "adam":
                run.sched.step()  # per step (the authors'); SGD's cosine steps per epoch
        total += loss_v
        if dist.main and (step % min(100, max(1, steps // 2)) == 0 or step == steps):
            dt, kind = time.time() - t0, ("meta+search" if searching else "meta") if selecting else "train"
            print(
                f"{run.phase} epoch {epoch}/{a.epochs} [{kind}] step {step}/{steps} loss {loss_v:.4f}"
                f"{f' search-gbops {float(gb):.2f}' if searching else ''} lr {run.opt.param_groups[0]['lr']:.4g} "
                f"{step * len(images) * dist.world / max(dt, 1e-9):.0f} img/s eta "
                f"{datetime.timedelta(seconds=int(dt / step * (steps - step)))}",
                flush=True,
            )
    if searching:  # how it ended; settled (our rule): no argmax change in the last quarter, median margin >= 0.05
        top2 = torch.stack([F.softmax(al.detach().float(), 0) for al in alphas_of(model)]).topk(2, 1).values.cpu()
        margin, gb = top2[:, 0] - top2[:, 1], branches_gbops(model, argmax_branches(model))  # per layer; GBOPs
        med, lo, last, rel = margin.quantile(0.5).item(), margin.min().item(), run.search, gb / a.target_gbops - 1
        c = run.search = {
            "argmax_last_changed": last,
            "settled": last <= 0.75 * steps and med >= 0.05,
            "steps": steps,
            "median_margin": med,
            "min_margin": lo,
            "argmax_gbops": gb,
            "vs_target": rel,
        }
        log(
            dist,
            f"search {'settled' if c['settled'] else 'NOT settled'}: argmax last changed at step {last}/{steps}; "
            f"top-2 margins of softmax(alpha) median {med:.3f}, min {lo:.3f}; argmax {gb:.3f} GBOPs ({rel:+.1%})",
        )
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: Dist, autocast) -> dict:
    """Top-1/top-5 of the validation set, each image once; BN statistics averaged over ranks first (timm's choice)."""
    for m in model.modules() if dist.world > 1 else []:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(t)
                t.div_(dist.world)
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss sum, top-1 hits, top-5 hits, images
    for images, targets in loader:
        images, targets = images.to(dist.device, non_blocking=True), targets.to(dist.device, non_blocking=True)
        with autocast():
            logits = model(images).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        tot += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hit[:, 0].sum().double(),
                hit.any(1).sum().double(),
                torch.tensor(len(targets), device=dist.device).double(),
            ]
        )
    if dist.world > 1:
        torch.distributed.all_reduce(tot)
    loss, top1, top5, n = tot.tolist()
    return {"val_loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "n": int(n)}


def bits_report(model: nn.Module, args) -> dict:
    """The content of bits.json: the selected configuration, layer by layer (the data of Fig. 7)."""
    rows = [
        {
            "name": m.name,
            "type": m.kind,
            "macs": m.macs,
            "in_size": m.in_size,
            "fixed": m.fixed,
            "signed": m.act.signed,
            "offset": m.act.offset,
            **dict(zip(("a_bits", "w_bits"), m.candidates[0 if m.fixed else m.selected_branch])),
            "probs": None
            if m.fixed
            else [round(p, 6) for p in F.softmax(m.act.alpha.detach().float().cpu(), 0).tolist()],
        }
        for m in quant_layers(model)
    ]
    searched = [r for r in rows if not r["fixed"]]
    size = sum(r["in_size"] for r in searched)
    return {
        "arch": args.arch,
        "candidates": [list(c) for c in searched_layers(model)[0].candidates],
        "first_last_bits": args.first_last_bits,
        "target_gbops": args.target_gbops,
        "gbops": branches_gbops(model, [m.selected_branch for m in searched_layers(model)]),
        "selection": f"bits-from {args.bits_from}" if args.bits_from else "metamix",
        "avg_a_bits": sum(r["a_bits"] for r in searched) / len(searched),  # plain mean, searched layers
        # the authors' code (likely the paper's "3.85/4"): weighted by each input's values per image at 224 px
        "avg_a_bits_weighted": sum(r["a_bits"] * r["in_size"] for r in searched) / size,
        "avg_w_bits": sum(r["w_bits"] for r in searched) / len(searched),
        "layers": rows,
    }


def layer_table(report: dict) -> str:
    """bits.json as text (Fig. 7): a row per layer, its MOPs and a bar of its activation bits."""
    pairs = len({w for _, w in report["candidates"]}) > 1  # the supplement's (A, W) pairs: each layer's own W
    return "\n".join(
        [f"{'layer':<34} {'type':<7} {'MOPs':>8}  bits"]
        + [
            f"{r['name']:<34} {r['type']:<7} {r['macs'] / 1e6:8.2f}  {'#' * r['a_bits']:<8} A{r['a_bits']}"
            + (f"/W{r['w_bits']}" if pairs else "")
            + (" (fixed)" if r["fixed"] else "")
            for r in report["layers"]
        ]
    )


def avg_bits_text(report: dict) -> str:
    w = f"; weight bits {report['avg_w_bits']:.2f}" if len({w for _, w in report["candidates"]}) > 1 else ""
    return (
        f"average activation bits {report['avg_a_bits']:.2f} (weighted by input size, as the authors' code: "
        f"{report['avg_a_bits_weighted']:.2f}){w}"
    )


def read_bits_from(model: nn.Module, path: str, target_gbops: float) -> list[int]:
    """Branch indices from a bits.json or {layer name: a_bits} (pairs: [a_bits, w_bits]), set as the selection."""
    flag = f"--bits-from {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"{flag}: {'not JSON' if isinstance(e, ValueError) else 'cannot read it'} ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), list):
        data = {r.get("name"): [r.get("a_bits"), r.get("w_bits")] for r in data["layers"] if isinstance(r, dict)}
    if not isinstance(data, dict):
        raise BadInput(f"{flag}: expected a bits.json or {{layer name: activation bits}}")
    layers, searched = {m.name: m for m in quant_layers(model)}, searched_layers(model)
    unknown, missing = [n for n in data if n not in layers], [m.name for m in searched if m.name not in data]
    if unknown or missing:
        raise BadInput(
            f"{flag}: "
            + (
                f"unknown layer {unknown[0]!r}"
                if unknown
                else f"no bits for layer {missing[0]} ({len(missing)} of {len(searched)} missing)"
            )
        )
    for name, b in data.items():
        m, widths = layers[name], {w for _, w in layers[name].candidates}
        pair = tuple(b) if isinstance(b, list) else (b, *widths) if len(widths) == 1 else b
        if pair not in m.candidates or any(isinstance(v, bool) for v in pair):
            raise BadInput(
                f"{flag}: layer {name} has {json.dumps(b)}, not one of its candidates: "
                + ", ".join(f"[{a}, {w}]" for a, w in m.candidates)
            )
        m.selected_branch = m.candidates.index(pair)
    branches = [m.selected_branch for m in searched]
    if (gb := branches_gbops(model, branches)) > target_gbops + 1e-9:
        raise BadInput(f"{flag}: the configuration costs {gb:.3f} GBOPs, over --target-gbops {target_gbops:.3f}")
    return branches


def select_bits(run: Run) -> None:
    """Between the phases (Table 1): start_weight_training (or --bits-from); prints Fig. 7 as text, writes bits.json."""
    a, model = run.args, run.model
    given = read_bits_from(model, a.bits_from, a.target_gbops) if a.bits_from else None
    run.selected, _, repaired = start_weight_training(model, a.target_gbops, not a.no_budget_repair, given)
    set_mode(model, "selected", quant_weights=not a.act_only_epochs)  # --act-only-epochs: weights in FP first
    run.build_optimizers()
    r = {**bits_report(model, a), "search": next((h["search"] for h in run.history if "search" in h), None)}
    if run.dist.main:
        print(
            layer_table(r),
            f"selected: {r['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}"
            + (" (argmax lowered by budget repair)" if repaired and not a.bits_from else "")
            + f"; {avg_bits_text(r)}",
            sep="\n",
            flush=True,
        )
        atomic_write(os.path.join(a.output_dir, "bits.json"), json.dumps(r, indent=1).encode())


def train(run: Run, train_loader, val_loader, calib, autocast) -> None:
    """Both phases, from wherever the run stands (fresh or resumed)."""
    a, model, dist = run.args, run.model, run.dist
    if run.epoch == 0:
        init_quantizers(model, calib.to(dist.device))  # on every rank from the same batch, then rank 0's for all
        if a.alpha_optimizer == "authors":  # their init: a normal draw, std 1e-3 (ours: zeros)
            for alpha in alphas_of(model):
                nn.init.normal_(alpha, std=1e-3)
        if dist.world > 1:  # the ranks agree but for float noise: rank 0's steps, grids and signs for all
            for t in filter(torch.is_tensor, model.state_dict().values()):
                torch.distributed.broadcast(t, 0)
            extra = [{k: v for k, v in model.state_dict().items() if not torch.is_tensor(v)}]
            torch.distributed.broadcast_object_list(extra, 0)
            model.load_state_dict(extra[0], strict=False)
        run.fp_top1 = evaluate(model, val_loader, dist, autocast)["top1"]
        log(dist, f"full-precision top-1 before quantization: {run.fp_top1:.2f}%")
    for epoch in range(run.epoch + 1, a.epochs + 1):
        if run.selected is None and epoch > a.search_epochs:
            select_bits(run)
        elif a.act_only_epochs and epoch == a.search_epochs + a.act_only_epochs + 1:  # weights quantized from here,
            set_mode(model, "selected", quant_weights=True)  # their steps from these weights; a fresh optimizer
            run.build_optimizers()
        phase, t0, lr = run.phase, time.time(), run.opt.param_groups[0]["lr"]  # the rate this epoch starts with
        loss = train_one_epoch(run, train_loader, epoch, autocast)
        if phase == "bit_selection":  # evaluate the argmax configuration, weights in full precision
            apply_selection(model, argmax_branches(model))
            set_mode(model, "selected", quant_weights=False)
        elif a.optimizer == "sgd":
            run.sched.step()
        metrics = evaluate(model, val_loader, dist, autocast)
        run.history.append(
            {
                "epoch": epoch,
                "phase": phase,
                "loss": loss,
                **metrics,
                "lr": lr,
                "gbops": branches_gbops(model, [m.selected_branch for m in searched_layers(model)]),
                "seconds": round(time.time() - t0, 3),
                "world_size": dist.world,
                **({"search": run.search} if run.search else {}),
            }
        )
        run.epoch = epoch
        run.save()
        log(
            dist,
            f"epoch {epoch}/{a.epochs} {phase}: loss {loss:.4f} top-1 {metrics['top1']:.2f}% top-5 "
            f"{metrics['top5']:.2f}% {run.history[-1]['gbops']:.3f} GBOPs ({time.time() - t0:.1f}s)",
        )
        if a.stop_after_epoch and a.stop_after_epoch <= epoch < a.epochs:
            return log(dist, f"stopping after epoch {epoch} as asked (--stop-after-epoch); continue with --resume auto")
    if dist.main and run.selected is not None and run.history:
        last, took = run.history[-1], datetime.timedelta(seconds=int(sum(h["seconds"] for h in run.history)))
        print(
            f"summary: full-precision top-1 {run.fp_top1:.2f}% -> final top-1 {last['top1']:.2f}% (top-5 "
            f"{last['top5']:.2f}%); {last['gbops']:.3f} GBOPs vs target {a.target_gbops:.3f}; "
            f"{avg_bits_text(bits_report(model, a))}; {took} in all",
            flush=True,
        )


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input (argparse adds its usage)
        self.exit(2, f"{self.prog.removesuffix('.py')}: error: {message}\n")


def bit_list(text: str) -> list[int]:
    """argparse type of --bits and --w-bits: comma-separated distinct bit-widths in 2..16."""
    bits = [int(t) if t.strip().isdigit() else 0 for t in text.split(",")]
    if not all(2 <= b <= 16 for b in bits) or len(set(bits)) != len(bits):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct bit-widths between 2 and 16, such as 8,4,2")
    return bits


def number(kind: type, lo: float, above: bool = False):
    """argparse type of a numeric flag: a finite `kind` from lo on (above: lo itself excluded)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (lo < v if above else lo <= v) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if above else 'at least'} {lo:g}")
        return v

    return parse


def get_args_parser() -> argparse.ArgumentParser:
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
    add("--unfixed", action="store_true", help="the paper's Figure 7(a) ablation: weights trained in bit-search")
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


def resolve_args(args, layer_type: type = QuantLayer) -> argparse.Namespace:
    """Fill the per-arch and per-data defaults and refuse what cannot work, before anything heavy happens."""
    if len(args.w_bits) > 1 and layer_type is QuantLayer:
        raise BadInput(f"--w-bits {','.join(map(str, args.w_bits))}: a list searches (A, W) pairs; run pairs.py")
    d = PAPER_SETTINGS.get(args.arch) or OTHER_DEFAULTS.get(args.arch) or OTHER_DEFAULTS[None]
    synthetic = synthetic_spec(args.data) is not None
    small = synthetic or not args.pretrained  # our choice: small data (no pretrained weights) gets larger rates
    args.bits, args.lam = args.bits or bit_list(d["bits"]), d["lam"] if args.lam is None else args.lam
    args.w_bits = args.w_bits[0] if len(args.w_bits) == 1 else args.w_bits
    args.epochs = (8 if synthetic else d["epochs"]) if args.epochs is None else args.epochs
    args.lr = LR[args.optimizer][small] if args.lr is None else args.lr
    args.alpha_lr = ALPHA_LR[args.alpha_optimizer][small] if args.alpha_lr is None else args.alpha_lr
    args.image_size = (32 if synthetic else 224) if args.image_size is None else args.image_size
    if args.pretrained and not local_weights(args.pretrained):
        args.pretrained = str(resolve_weights(args.arch, args.pretrained))  # e.g. ResNet18_Weights.IMAGENET1K_V1
    if args.epochs < args.search_epochs:
        raise BadInput(f"--epochs {args.epochs} is fewer than --search-epochs {args.search_epochs}")
    if args.act_only_epochs and args.act_only_epochs >= args.epochs - args.search_epochs:
        raise BadInput(
            f"--act-only-epochs {args.act_only_epochs} leaves no epoch with quantized weights (--epochs "
            f"{args.epochs}, --search-epochs {args.search_epochs})"
        )
    if args.teacher:  # its weights by name resolved now (e.g. ResNet101_Weights.IMAGENET1K_V1); loaded at the start
        arch, _, w = args.teacher.partition(":")
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise BadInput(f"--teacher {args.teacher}: {arch!r} is not a torchvision classification model")
        args.teacher = f"{arch}:{w if local_weights(w) else resolve_weights(arch, w or 'DEFAULT', '--teacher')}"
    return args


def check_budget(model: nn.Module, args) -> tuple[float, float]:
    """The feasible range; the default target: the paper's in its setting, else (our choice) 95% of uniform A4."""
    lo, hi = gbops_range(model)
    given, paper = args.target_gbops is not None, PAPER_SETTINGS.get(args.arch, {})
    if not given and (paper.get("bits"), 4, 8) == (",".join(map(str, args.bits)), args.w_bits, args.first_last_bits):
        args.target_gbops = paper["target_gbops"]
    elif not given:
        layers, w = searched_layers(model), args.w_bits if isinstance(args.w_bits, int) else 4
        args.target_gbops = 0.95 * config_gbops([m.macs for m in layers], [4 * w] * len(layers), c_fixed_of(model))
    if not lo - 1e-6 <= args.target_gbops <= hi + 1e-6:
        what = f"--target-gbops {args.target_gbops:.4g}" + ("" if given else " (the default; set --target-gbops)")
        raise BadInput(
            f"{what} is outside the feasible range [{lo:.3f}, {hi:.3f}] GBOPs for {args.arch} with bits "
            f"{','.join(map(str, args.bits))}, w-bits {args.w_bits}, first/last at {args.first_last_bits}"
        )
    return lo, hi


_LOCKS: list = []  # this process's lock on its output dir, held until it exits (the kernel drops it even on kill -9)


def prepare_output_dir(args, rank: int) -> str | None:
    """Create and lock the output folder (rank 0; a second run is refused); return the checkpoint to resume."""
    out, ck = args.output_dir, os.path.join(args.output_dir, "checkpoint.pth")
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            lock = open(os.path.join(out, ".lock"), "a+")
        except OSError as e:
            raise BadInput(f"--output-dir {out}: not writable ({e.strerror or e})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise BadInput(f"--output-dir {out} is in use by {lock.read().strip() or 'another process'}") from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        lock.flush()
        _LOCKS.append(lock)
    if args.resume == "auto":
        return ck if os.path.exists(ck) else None
    if not args.resume and os.path.exists(ck):
        raise BadInput(f"--output-dir {out} already holds checkpoint.pth; continue it with --resume auto")
    return args.resume


def run_main(args, layer_type: type = QuantLayer) -> int:
    args = resolve_args(args, layer_type)
    torch.manual_seed(args.seed)
    spec, train_dir = synthetic_spec(args.data), os.path.join(args.data, "train")  # classes before reading the data
    classes = (
        (1000 if args.dry_run else spec[2])
        if spec
        else (sum(e.is_dir() for e in os.scandir(train_dir)) if os.path.isdir(train_dir) else 0) or 1000
    )
    model = build_model(args, classes, layer_type)
    lo, hi = check_budget(model, args)  # before any folder is made or data is read
    if args.bits_from:
        read_bits_from(model, args.bits_from, args.target_gbops)
    if args.dry_run:
        layers = quant_layers(model)
        print(
            f"{len(layers)} quantized layers, {sum(m.macs for m in layers) / 1e6:.2f} MMACs at 224 px, candidates "
            f"{' '.join(f'A{a}/W{w}' for a, w in layers[1].candidates)}; feasible range {lo:.3f} .. {hi:.3f} "
            f"GBOPs; target {args.target_gbops:.3f}"
        )
        return 0
    if args.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise BadInput(f"--batch-size {args.batch_size}: BatchNorm needs 2 or more images per process")
    teacher = args.teacher and fp_model(*args.teacher.split(":", 1), classes, "--teacher")  # before any folder
    resume = prepare_output_dir(args, int(os.environ.get("RANK", "0")))
    dist = Dist()
    try:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _on_signal)
        use_speed_path(model.to(dist.device))
        # the model was built from the common seed; data order, augmentation, workers and dropout get a rank's seed
        random.seed(args.seed + dist.rank)
        torch.manual_seed(args.seed + dist.rank)
        train_set, val_set, _ = build_datasets(args)  # as many classes as `classes` (train/'s folders)
        train_loader, val_loader, calib = build_loaders(args, dist, train_set, val_set)
        teacher = teacher and teacher.eval().requires_grad_(False).to(dist.device)
        run = Run(args, dist, model, len(train_loader), teacher)
        if resume:
            run.load_state_dict(load_checkpoint(resume, "--resume"), resume)
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


def one_line(e: BaseException) -> str:
    """An error as one line; from a DataLoader worker (which wraps it in a traceback), its last line."""
    text = str(e).strip() or type(e).__name__
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0]


def guarded(prog: str, body, *args, interrupted=lambda: "") -> int:
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


def main(args, layer_type: type = QuantLayer) -> int:
    """Run, under the error contract (`guarded`); the output folder's lock is released whatever happens."""

    def what_survived() -> str:
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
