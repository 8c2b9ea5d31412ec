"""Other bit selections to compare MetaMix with, beside metamix.py. Not MetaMix: not the paper's method.

To tell whether MetaMix's search picks *good* bits, each method here selects from the same meta-state as the
search did (RUN/meta_state.pth, which metamix.py keeps at the end of bit selection: bits not yet selected,
weights in full precision), and weight training then runs from that meta-state exactly as MetaMix's does; only
the selection differs. One bit-meta run serves every selection:

    python metamix.py --output-dir runs/m                  # MetaMix: bit selection, then weight training
    python baselines.py runs/m --method random             # writes runs/m/bits_random.json, prints the next command
    python metamix.py --resume runs/m/meta_state.pth --bits-from runs/m/bits_random.json --output-dir runs/m-random \\
        --target-gbops 33.0 ...                            # weight training of those bits, from the meta-state
    python baselines.py runs/m --method hessian --target-gbops 28 --batches 4 --probes 4 --out /tmp/h.json

The command baselines.py prints is the third above in full: the run's own flags, rebuilt from its checkpoint,
and the selection's --target-gbops (ablations.py in place of metamix.py for a run with an ablation's setting).
Under torchrun, run it with torchrun in place of python. Runs of (A, W) pairs (pairs.py) are refused: these
methods select activation bits at one W.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import operator
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import ablations
import metamix as mm
import runs

# The methods, each a selection under the target in GBOPs (Eq. 6) on the meta-state:
#   uniform      the largest uniform candidate that fits the target
#   random       a random configuration, seeded by --seed, filled toward the target
#   hessian      HAWQ-v2-style: 1/2 Tr(H_l) * mean (x_l - Q_b(x_l))^2, H_l the loss Hessian with respect to
#                layer l's input activation, taken by its Gauss-Newton part (never negative; Hutchinson's
#                estimate of the full trace, as PyHessian takes it, is reported beside), then the exact knapsack
#   sensitivity  MQBench-style: loss(only layer l at b, the rest at the largest candidate) - loss(all at the
#                largest), then the exact knapsack
# The two proxies are training-free (EMQ's family): computed once on the meta-state, on a few training batches.
# Not here: MetaMix itself and the paper's Figure 7(a) ablation (metamix.py, ablations.py --unfixed), and a
# configuration of your own (metamix.py --bits-from takes its bits.json rows directly).
METHODS = ("uniform", "random", "hessian", "sensitivity")
PROXIES = ("hessian", "sensitivity")

# ---- the exact knapsack ------------------------------------------------------------------


def bops_costs(model: nn.Module) -> tuple[list[list[int]], int]:
    """Exact integer BOPs: per searched layer and candidate OPs_l * a * w, and the fixed layers' (C_fixed)."""
    costs = [[m.macs * a * w for a, w in m.candidates] for m in mm.searched_layers(model)]
    fixed = [m for m in mm.quant_layers(model) if m.fixed]
    fixed_bops = sum(m.macs * a * w for m in fixed for a, w in m.candidates)
    return costs, fixed_bops


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
    # (cost, score), cost ascending, score strictly descending
    frontier = [(0, 0.0)]
    # per layer, per state: (index in the previous frontier, choice)
    back: list[list[tuple[int, int]]] = []
    for sc, co in zip(scores, costs):
        # (cost, score, index in the frontier, choice) of every state under the budget, by cost then score
        reachable = (
            (c + co[i], s + float(sc[i]), k, i)
            for k, (c, s) in enumerate(frontier)
            for i in range(len(co))
            if c + co[i] <= budget
        )
        cand = sorted(reachable, key=operator.itemgetter(0, 1))
        if not cand:
            return None
        new = []
        links = []
        best = math.inf
        for c, s, k, i in cand:
            # cheaper states come first: keep it only if it scores strictly better
            if s < best:
                best = s
                new.append((c, s))
                links.append((k, i))
        frontier = new
        back.append(links)
    # the best score; of equal scores, the lower cost
    k = min(range(len(frontier)), key=lambda j: (frontier[j][1], frontier[j][0]))
    choice = []
    for links in reversed(back):
        k, i = links[k]
        choice.append(i)
    return choice[::-1]


# ---- uniform and random --------------------------------------------------------------------


def uniform_budgets(model: nn.Module) -> dict[int, float]:
    """Activation bits -> GBOPs (Eq. 6) of every searched layer at that candidate."""
    layers = mm.searched_layers(model)
    budgets = {}
    for i, (a, _) in enumerate(layers[0].candidates):
        budgets[a] = mm.branches_gbops(model, [i] * len(layers))
    return budgets


def uniform_selection(model: nn.Module, target_gbops: float) -> list[int]:
    """Branch indices of the largest candidate that fits the target on every searched layer."""
    budgets = uniform_budgets(model)
    fits = [b for b, g in budgets.items() if g <= target_gbops + 1e-9]
    if not fits:
        listed = ", ".join(f"A{b} {g:.3f}" for b, g in sorted(budgets.items()))
        raise mm.BadInput(
            f"--method uniform: no uniform configuration fits --target-gbops {target_gbops:g} "
            f"(uniform budgets in GBOPs: {listed})"
        )
    bits = [a for a, _ in mm.searched_layers(model)[0].candidates]
    return [bits.index(max(fits))] * len(mm.searched_layers(model))


def random_selection(model: nn.Module, target_gbops: float, seed: int) -> list[int]:
    """A random configuration under the target, filled toward it (our choice of procedure).

    Each layer draws a candidate uniformly; while over the target, a random layer not at its
    smallest candidate goes one candidate down; then, in random order, layers go one candidate up
    while the result still fits, until none can. Its own generator: no global random stream is drawn from.
    """
    rng = random.Random(seed)
    costs, fixed = bops_costs(model)
    budget = budget_bops(target_gbops, fixed)
    bits = [a for a, _ in mm.searched_layers(model)[0].candidates]
    # branch indices, smallest bits first
    order = sorted(range(len(bits)), key=lambda i: bits[i])
    # position in `order`, per layer
    rank = [rng.randrange(len(bits)) for _ in costs]

    def total():
        return sum(c[order[r]] for c, r in zip(costs, rank))

    def fits_one_up(layer: int) -> bool:
        r = rank[layer]
        if r + 1 >= len(bits):
            return False
        raised = total() - costs[layer][order[r]] + costs[layer][order[r + 1]]
        return raised <= budget

    while total() > budget:
        layer = rng.choice([j for j, r in enumerate(rank) if r > 0])
        rank[layer] -= 1
    while True:
        up = [j for j in range(len(rank)) if fits_one_up(j)]
        if not up:
            break
        rank[rng.choice(up)] += 1
    return [order[r] for r in rank]


# ---- training-free proxies (EMQ's family), on the meta-state --------------------------------


@contextlib.contextmanager
def kept_modes(model: nn.Module):
    """Restore, on exit, every quantized layer's mode (activation mode and branch, the weight width of a pair
    layer, which weight quantizers are on) and every module's train/eval flag."""
    flags = [(mod, mod.training) for mod in model.modules()]
    layers = []
    for m in mm.quant_layers(model):
        enabled = [wq.enabled for wq in weight_quantizers(m)]
        layers.append((m, m.act.mode, m.act.branch, getattr(m, "w_branch", None), enabled))
    try:
        yield
    finally:
        for mod, training in flags:
            mod.training = training
        for m, mode, branch, w_branch, enabled in layers:
            m.act.mode = mode
            m.act.branch = branch
            if w_branch is not None:
                m.w_branch = w_branch
            for wq, e in zip(weight_quantizers(m), enabled):
                wq.enabled = e


def weight_quantizers(m: mm.QuantLayer) -> list:
    """A layer's weight quantizers: one per W for a layer of (A, W) pairs, else its one."""
    return list(getattr(m, "weight_quants", [m.weight_quant]))


def layer_inputs(model: nn.Module, layers: Sequence[mm.QuantLayer], store: dict, replace: dict | None = None):
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
    """Forward pre-hooks that clamp each quantized layer's input to the range its largest candidate reaches,
    [Qn * s - o, Qp * s - o] (o the offset grid's 3/8, else 0): the meta-state at its largest bits with rounding
    taken as the identity (LSQ's straight-through estimator), a network that autograd can differentiate twice.
    Use in "fp" mode. Registered after `layer_inputs`' hooks, they clamp the copy that those record."""
    handles = []
    for m in mm.quant_layers(model):
        i = max(range(len(m.act.bits)), key=lambda j: m.act.bits[j])
        handles.append(m.register_forward_pre_hook(clamp_hook(*reachable_range(m.act, i))))
    return handles


@torch.no_grad()
def reachable_range(act: mm.MultiBranchQuantizer, i: int) -> tuple[float, float]:
    """The lowest and highest values branch i of an activation quantizer outputs: the quantizer itself applied to
    -inf and +inf (its step, sign, range and offset). Its step must be initialised (a meta-state's are)."""
    if not act.initialized[i]:
        raise ValueError(f"branch {i} of the activation quantizer has no step yet")
    ends = torch.tensor([-math.inf, math.inf], device=act.step.device)
    lo, hi = act.quantize(ends, i).tolist()
    return lo, hi


def clamp_hook(lo: float, hi: float):
    """A forward pre-hook that clamps a layer's input to [lo, hi]."""

    def hook(mod, inp):
        return (inp[0].clamp(lo, hi),) + tuple(inp[1:])

    return hook


# PyTorch has no double backward for hardsigmoid and hardswish (MobileNet-v3): while Hessians are taken,
# those modules compute the same functions from clamps, which it can differentiate twice.
def hardsigmoid_by_clamp(x: torch.Tensor) -> torch.Tensor:
    return (x + 3).clamp(0, 6) / 6


def hardswish_by_clamp(x: torch.Tensor) -> torch.Tensor:
    return x * (x + 3).clamp(0, 6) / 6


_TWICE_DIFFERENTIABLE = {nn.Hardsigmoid: hardsigmoid_by_clamp, nn.Hardswish: hardswish_by_clamp}


@contextlib.contextmanager
def twice_differentiable(model: nn.Module):
    """Swap the forward of every module in _TWICE_DIFFERENTIABLE for its clamp form; restored on exit."""
    swapped = [m for m in model.modules() if type(m) in _TWICE_DIFFERENTIABLE]
    for m in swapped:
        # an instance attribute shadows the class's forward
        m.forward = _TWICE_DIFFERENTIABLE[type(m)]
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


@contextlib.contextmanager
def recorded_inputs(model: nn.Module, clamp: bool):
    """While inside: layer_inputs' hooks on every searched layer, recording into the yielded dict, and with `clamp`
    clamp_to_top_branch's. Yields (the searched layers, {layer: its input}), the dict filled by a forward pass."""
    layers = mm.searched_layers(model)
    xs: dict = {}
    handles = layer_inputs(model, layers, xs)
    if clamp:
        handles += clamp_to_top_branch(model)
    try:
        yield layers, xs
    finally:
        for h in handles:
            h.remove()


def hutchinson_traces(
    model: nn.Module, images, targets, probes: int, generator=None, probe_fn=None, clamp: bool = False
) -> torch.Tensor:
    """Hutchinson's estimate of Tr(H_l), H_l = d^2 L / d x_l^2, for each searched layer l: the mean of
    v^T H_l v over `probes` Rademacher vectors v (E[v v^T] = I, so E[v^T H v] = Tr H), as PyHessian takes it.

    L is the batch's mean cross-entropy in the model's current mode; `clamp` adds clamp_to_top_branch's
    hooks (the proxy's choice, in "fp" mode: unclipped full-precision activations can be far outside what
    the meta-state's BN statistics saw). x_l is layer l's whole input tensor (B, C, H, W), before the
    clamp. H_l v by double backward: g_l = dL/dx_l with create_graph, then d<g_l, v>/dx_l.
    `probe_fn(shape, dtype, device, generator)` replaces the Rademacher draw (tests).
    Returns (L,) traces, summed over the tensor's elements (not averaged).
    """
    probe_fn = probe_fn or rademacher
    with recorded_inputs(model, clamp) as (layers, xs), torch.enable_grad(), twice_differentiable(model):
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
    return torch.tensor(out, dtype=torch.float64)


def gauss_newton_traces(model: nn.Module, images, probes: int, generator=None, clamp: bool = False) -> torch.Tensor:
    """The Gauss-Newton estimate of Tr(H_l) for each searched layer l: Tr(G_l), G_l = sum_i J_i^T (diag p_i -
    p_i p_i^T) J_i / B, where J_i = dz_i / dx_l, z_i is image i's logits and p_i = softmax(z_i). G_l is H_l less
    the terms of the network's own curvature (hardswish, a squeeze-excitation's product): positive
    semi-definite, so its trace is never negative. On a piecewise-linear network (ReLU, BN in eval mode) the
    two are equal.

    For the cross-entropy G_l is the Fisher, E_{y ~ p_i}[g g^T] with g = d ce(z_i, y) / dx_l. In eval mode the
    images do not interact, so image i's gradient lies in its own slice of x_l. Each probe draws one label per
    image from the model's own softmax and takes B * ||dL_y / dx_l||^2, where L_y is the batch's mean
    cross-entropy against the drawn labels: that is the mean of the images' squared gradient norms.
    The model, `clamp` and the returned (L,) traces are as in hutchinson_traces, on the same scale; one backward
    pass per probe. Its BN layers must be in eval mode (a ValueError otherwise): in train mode they mix the images.
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise ValueError("gauss_newton_traces needs every BN layer in eval mode")
    with recorded_inputs(model, clamp) as (layers, xs), torch.enable_grad():
        logits = model(images)
        inputs = [xs[m] for m in layers]
        probs = F.softmax(logits.detach().float(), 1)
        total = torch.zeros(len(inputs), dtype=torch.float64)
        for _ in range(probes):
            drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            grads = torch.autograd.grad(F.cross_entropy(logits, drawn), inputs, retain_graph=True)
            total += len(images) * torch.stack([g.double().pow(2).sum() for g in grads]).cpu()
    return total / probes


def meta_state_traces(
    model: nn.Module, images, targets, probes: int, seed: int, gauss_newton: bool = False
) -> torch.Tensor:
    """(L,) traces of one batch as the hessian proxy takes them: the meta-state in eval and "fp" mode, inputs
    clamped to their largest candidate's range (clamp_to_top_branch), a generator seeded by `seed` (the proxy
    passes its seed plus the batch's index: each batch draws its own probes and labels). Hutchinson's estimate of
    Tr(H_l), or with `gauss_newton` the Gauss-Newton trace that the scores take. figure9.py takes its traces here
    too (Hutchinson's). Leaves every mode and flag as it was."""
    with kept_modes(model):
        model.eval()
        mm.set_mode(model, "fp")
        g = torch.Generator(device=images.device).manual_seed(seed)
        if gauss_newton:
            return gauss_newton_traces(model, images, probes, g, clamp=True)
        return hutchinson_traces(model, images, targets, probes, g, clamp=True)


@torch.no_grad()
def quantization_errors(model: nn.Module, images) -> torch.Tensor:
    """(L, N) mean((x_l - Q_i(x_l))^2) per searched layer l and candidate i, where Q_i is the layer's own
    quantizer at branch i (MultiBranchQuantizer.quantize: its step, sign, range and offset) and x_l is the layer's
    input in the network meta_state_traces takes the traces on (eval and "fp" mode, every input clamped to its
    largest candidate's range), before its own clamp, as the traces' x_l. Leaves every mode and flag as it was."""
    with kept_modes(model):
        model.eval()
        mm.set_mode(model, "fp")
        with recorded_inputs(model, clamp=True) as (layers, xs):
            model(images)
    errors = torch.zeros(len(layers), len(layers[0].act.bits), dtype=torch.float64)
    for j, m in enumerate(layers):
        for i in range(len(m.act.bits)):
            errors[j, i] = (xs[m] - m.act.quantize(xs[m], i)).double().pow(2).mean()
    return errors


def proxy_scores(
    model: nn.Module, batches, method: str, probes: int = 4, seed: int = 0, traces_out: list | None = None
) -> torch.Tensor:
    """(L, N) scores, an estimate of the rise in loss when layer l's input is at candidate bits[i].

    hessian:     1/2 Tr(G_l) * mean((x_l - Q_i(x_l; s_{l,i}))^2), averaged over the batches: the
                 second-order Taylor term with the Hessian taken as isotropic (HAWQ-v2's Tr(H)/n times
                 the squared error, n the number of elements), at each branch's meta-state step.
                 G_l is the Gauss-Newton part of H_l (gauss_newton_traces): never negative, so no
                 layer's score says that quantization noise lowers the loss, as an indefinite H_l's
                 can. It is taken on the meta-state at its largest candidate with straight-through
                 rounding (meta_state_traces): our choice, the network the search starts from; the
                 errors are taken on that network too, through each layer's own quantizer
                 (quantization_errors). Batch k's traces draw from seed + k.
    sensitivity: mean over the batches of loss(layer l at bits[i], every other searched layer at
                 the largest candidate) - loss(every searched layer at the largest candidate), MQBench's
                 "naive" sensitivity relative to the largest candidate rather than to full precision.
    Both run on the meta-state in eval mode (BN running statistics, no dropout, no update), weights in full
    precision as in bit-meta, and leave its parameters, buffers, modes and flags as they were.
    `traces_out` (hessian): each batch's (L,) Hutchinson estimates of Tr(H_l) are appended to it (the raw
    traces that the bits file counts and figure9.py plots; the scores do not use them).
    """
    layers = mm.searched_layers(model)
    bits = [a for a, _ in layers[0].candidates]
    top = max(range(len(bits)), key=lambda i: bits[i])
    scores = torch.zeros(len(layers), len(bits), dtype=torch.float64)
    with kept_modes(model):
        model.eval()
        for k, (images, targets) in enumerate(batches):
            if method == "hessian":
                if traces_out is not None:
                    traces_out.append(meta_state_traces(model, images, targets, probes, seed + k))
                traces = meta_state_traces(model, images, targets, probes, seed + k, gauss_newton=True)
                scores += 0.5 * traces[:, None] * quantization_errors(model, images)
            else:
                mm.set_mode(model, "meta", top, quant_weights=False)
                with torch.no_grad():
                    base = F.cross_entropy(model(images), targets).item()
                    for j, m in enumerate(layers):
                        for i in range(len(bits)):
                            if i == top:
                                continue
                            m.act.branch = i
                            scores[j, i] += F.cross_entropy(model(images), targets).item() - base
                        m.act.branch = top
    return scores / max(len(batches), 1)


def proxy_batches(args, n: int, seed: int, device="cpu") -> list:
    """The first n batches of the run's own training loader (its DistributedSampler for one process, its
    --batch-size and --workers) in a fixed permutation, the sampler's epoch 10**6 + seed, not one that
    training uses; augmentation included, drawn in a forked RNG seeded by `seed`: they depend on nothing
    else, and nothing else is drawn from any global random stream."""
    train_set = mm.build_datasets(args)[0]
    workers = args.workers
    if mm.synthetic_spec(args.data):
        workers = 0
    sampler = torch.utils.data.DistributedSampler(train_set, 1, 0, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        train_set, args.batch_size, sampler=sampler, drop_last=True, num_workers=workers
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = random.getstate()
        try:
            sampler.set_epoch(10**6 + seed)
            batches = [(x.to(device), y.to(device)) for x, y in itertools.islice(loader, n)]
        finally:
            random.setstate(state)
    if not batches:
        raise mm.BadInput(f"the run's training set ({len(train_set)} images) holds no batch of {args.batch_size}")
    return batches


# ---- the selection, its file and its training command --------------------------------------


def load_meta_state(path: str) -> tuple[argparse.Namespace, nn.Module, dict]:
    """(args, model, checkpoint) of a meta-state of a run of one W, loaded once; every problem a BadInput."""
    ck = mm.load_checkpoint(path, "checkpoint", mm.CHECKPOINT_FORMAT)
    run_dir = os.path.dirname(path) or "."
    w_bits = ck["args"].get("w_bits")
    if isinstance(w_bits, list):
        listed = ",".join(map(str, w_bits))
        raise mm.BadInput(
            f"{run_dir} is a run of (A, W) pairs (--w-bits {listed}); these methods "
            "select activation bits at one W and are not implemented for pairs: use its own selection, "
            "or pairs.py --bits-from with a bits.json's rows (name, a_bits, w_bits)"
        )
    runs.check_meta_state(ck, path)
    args, model = runs.run_model(ck)
    return args, model, ck


def check_target(model: nn.Module, method: str, target: float) -> None:
    """Refuse a target no configuration of `method` fits: under every uniform budget (uniform, naming them; the
    range's lower end is the smallest of them) or outside the feasible range."""
    if method == "uniform":
        uniform_selection(model, target)
    lo, hi = mm.gbops_range(model)
    if not lo - 1e-6 <= target <= hi + 1e-6:
        raise mm.BadInput(
            f"--target-gbops {target:g} is outside the feasible range [{lo:.3f}, {hi:.3f}] GBOPs of this run"
        )


def select(
    model: nn.Module, args, method: str, target: float, seed: int = 0, batches: int = 4, probes: int = 4, device="cpu"
) -> tuple[list[int], dict]:
    """The selection of `method` under `target` GBOPs on a loaded meta-state: (branch indices per searched layer,
    what its bits file adds: the seed; for a proxy its settings and (L, N) scores)."""
    if method == "uniform":
        return uniform_selection(model, target), {}
    if method == "random":
        return random_selection(model, target, seed), {"seed": seed}
    if method not in PROXIES:
        raise mm.BadInput(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    data = proxy_batches(args, batches, seed, device)
    raw: list = []
    scores = proxy_scores(model, data, method, probes, seed, traces_out=raw)
    costs, fixed = bops_costs(model)
    branches = mckp_exact(scores.tolist(), costs, budget_bops(target, fixed))
    # check_target makes this impossible; kept as a clear failure
    if branches is None:
        raise mm.BadInput(f"--target-gbops {target:g}: no configuration fits")
    proxy = {"batches": len(data), "probes": None, "seed": seed}
    extra = {"proxy": proxy, "scores": scores.tolist()}
    if method == "hessian":
        proxy["probes"] = probes
        # the raw Hutchinson estimates, one per layer and batch: how many say the loss is concave there
        raw = torch.stack(raw)
        proxy["negative_hutchinson_traces"] = int((raw < 0).sum())
        proxy["hutchinson_traces"] = raw.numel()
        extra["hutchinson_trace"] = raw.mean(0).tolist()
    return branches, extra


def baseline_report(model: nn.Module, args, method: str, target: float, branches: Sequence[int], extra: dict) -> dict:
    """The bits file: metamix's bits.json layout (rows with name, a_bits, w_bits; GBOPs, averages) for this
    selection, "selection" the method, its target, and for a proxy each row's scores in the order of "candidates"
    (hessian: also each row's mean Hutchinson trace, and in "proxy" how many of the raw estimates were negative)."""
    mm.apply_selection(model, branches)
    report = mm.bits_report(model, argparse.Namespace(**{**vars(args), "target_gbops": target, "bits_from": None}))
    per_layer = ("scores", "hutchinson_trace")
    settings = {k: v for k, v in extra.items() if k not in per_layer}
    report.update(selection=method, **settings)
    searched = [r for r in report["layers"] if not r["fixed"]]
    for i, r in enumerate(searched):
        # the alphas are MetaMix's search, which this selection does not follow
        r["probs"] = None
        for k in per_layer:
            if k in extra:
                r[k] = extra[k][i]
    return report


# Flags of the meta-state's run that the training command does not repeat: it has its own output dir, resume,
# selection and target; --pretrained only chose the weights it started from, which the meta-state replaces (the
# --lr and --alpha-lr it implied are repeated as numbers).
NOT_REPEATED = ("output_dir", "resume", "bits_from", "target_gbops", "pretrained")


# metamix.py and ablations.py (metamix.py with the ablations' settings as flags), as the printed command names them:
# relative to the current folder
METAMIX_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metamix.py")
ABLATIONS_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablations.py")


def train_command(run_dir: str, run_args: dict, bits_file: str, method: str, target: float) -> str:
    """`python metamix.py --resume RUN/meta_state.pth --bits-from FILE --output-dir RUN-METHOD` with every flag of
    the run whose value differs from its default (lists comma-joined, store_true flags bare; --lam and --alpha-lr: the
    ones resolve_args fills in) and
    the selection's --target-gbops (exact: the shortest text that reads back as the same float). A run with an
    ablation's setting that metamix.py has no flag for (ablations.py's: --unfixed, --plain-lsq, ...) gets
    ablations.py in place of metamix.py."""
    metamix_flags = {s for action in mm.get_args_parser()._actions for s in action.option_strings}
    # ablations.py's lambda and alphas' LR: repeated where they differ from what resolve_args fills in (they pick
    # the script)
    defaults = mm.arch_defaults(argparse.Namespace(**run_args))
    resolved = {key: defaults[key] for key in ("lam", "alpha_lr")}
    flags = []
    script = METAMIX_PY
    for action in ablations.get_args_parser()._actions:
        if action.dest in NOT_REPEATED or action.dest not in run_args or not action.option_strings:
            continue
        v = run_args[action.dest]
        flag = action.option_strings[0]
        default = resolved.get(action.dest, action.default)
        store_true = action.nargs == 0
        if store_true and v:
            flags.append(flag)
        elif not store_true and v is not None and str(runs.flag_text(v)) != str(runs.flag_text(default)):
            flags += [flag, str(runs.flag_text(v))]
        else:
            continue
        if flag not in metamix_flags:
            script = ABLATIONS_PY
    cmd = ["python", os.path.relpath(script), "--resume", os.path.join(run_dir, "meta_state.pth")]
    cmd += ["--bits-from", bits_file, "--output-dir", f"{run_dir}-{method}", *flags]
    cmd += ["--target-gbops", repr(float(target))]
    return shlex.join(cmd)


# a selection that leaves more of the target unused than this says so
UNUSED = 0.03


def selection_notes(report: dict, target: float) -> list[str]:
    """One line each for what a user should know about a selection: the share of the target it leaves unused
    (over UNUSED), and the hessian proxy's negative Hutchinson estimates (where the full Hessian is indefinite)."""
    notes = []
    unused = 1 - report["gbops"] / target
    if unused > UNUSED:
        notes.append(f"note: {report['selection']} leaves {unused:.1%} of the {target:g} GBOPs target unused")
    negative = report.get("proxy", {}).get("negative_hutchinson_traces")
    if negative:
        notes.append(
            f"note: {negative} of {report['proxy']['hutchinson_traces']} Hutchinson estimates of Tr(H_l) were "
            "negative (an indefinite Hessian); the scores take the Gauss-Newton trace, which is never negative"
        )
    return notes


# ---- the command line ---------------------------------------------------------------------


def run_baseline(a: argparse.Namespace) -> int:
    run_dir = os.path.normpath(a.run)
    # RUN-METHOD needs a folder name
    if run_dir in (".", ".."):
        run_dir = os.path.abspath(run_dir)
    meta = runs.run_file(run_dir, "meta_state.pth")
    out = a.out or os.path.join(run_dir, f"bits_{a.method}.json")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise mm.BadInput(f"--out {out}: its folder does not exist")
    args, model, ck = load_meta_state(meta)
    target = a.target_gbops
    if target is None:
        target = args.target_gbops
    check_target(model, a.method, target)
    seed = a.seed
    if seed is None:
        seed = args.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    branches, extra = select(model.to(device), args, a.method, target, seed, a.batches, a.probes, device)
    report = baseline_report(model, args, a.method, target, branches, extra)
    report["meta_state"] = meta
    mm.atomic_write(out, json.dumps(report, indent=1).encode())
    cost = ""
    if "proxy" in extra:
        cost = f"; {a.method} proxy on {extra['proxy']['batches']} batch(es): {time.time() - t0:.1f}s"
    command = train_command(run_dir, ck["args"], out, a.method, target)
    print(
        f"{mm.layer_table(report)}\n{a.method}: {report['gbops']:.3f} GBOPs vs target {target:.3f}{cost}; wrote {out}",
        *selection_notes(report, target),
        f"train it from the meta-state:\n{command}",
        sep="\n",
        flush=True,
    )
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = mm.Parser(
        prog="baselines.py",
        description="Other bit selections from a MetaMix run's meta-state (not MetaMix): "
        "writes the bits file and prints the command that trains it",
    )
    add = p.add_argument
    add("run", metavar="RUN", help="a metamix run's --output-dir, holding meta_state.pth")
    add("--method", required=True, choices=METHODS, help="the selection")
    add("--target-gbops", metavar="T", type=mm.number(float, 0, above=True), help="budget (default: the run's)")
    add(
        "--seed",
        metavar="S",
        type=mm.number(int, 0),
        help="seed of random and of the proxies' batches (default: the run's)",
    )
    add(
        "--batches",
        metavar="N",
        type=mm.number(int, 1),
        default=4,
        help="training batches the proxies average over (default: 4)",
    )
    add(
        "--probes",
        metavar="K",
        type=mm.number(int, 1),
        default=4,
        help="hessian: probes per batch, for the Gauss-Newton trace (labels drawn) and Hutchinson's (default: 4)",
    )
    add("--out", metavar="FILE", help="the bits file (default: RUN/bits_METHOD.json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    return mm.guarded("baselines", run_baseline, a)


if __name__ == "__main__":
    sys.exit(main())
