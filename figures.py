"""The paper's figures of its thesis for a run, beside metamix.py: does bit-meta make the activations consistent
across bit-widths? An analysis of a run's result, off the training path; not part of MetaMix's method.

The paper's thesis ("activation instability due to bit selection"): a searched layer's input distribution moves
when the bits of the layers before it change (Figure 1), which makes the batch-norm statistics jump while bits
change during weight training (Figure 2, top and middle); bit-meta training gives a meta-state whose inputs look
alike at every candidate bit-width (Figure 6) and whose BN statistics stay steady (Figure 2, bottom). Figure 8
(supplement): a Gaussian quantized at fewer bits has a larger variance. For a metamix.py run:

    python figures.py runs/m                       # runs/m/figures/: figures.json, figures.md, fig*.png
    python figures.py runs/m --batches 4 --fig2-epochs 3 --switch-every 10 --out /tmp/figs
    python figures.py runs/m --bn batch --fig2-epochs 0 --out runs/m/figures_batch   # BN on batch statistics

It reads RUN/meta_state.pth (the meta-state) and the FP model the run started from (its --pretrained state dict,
or --pretrained PATH here), and writes
    Figures 1 / 6   per searched layer, the mean and variance of its input (before its quantizer) on --batches
                    validation batches in eval mode (--bn batch: BN on each batch's statistics, as in
                    training), with the whole network at each candidate bit-width
                    (set_mode "meta"), with FP and with W weights, for the FP start and for the meta-state;
                    spread_var  = (max_b var_b - min_b var_b) / mean_b var_b
                    spread_mean = (max_b mean_b - min_b mean_b) / std of the input with the network in FP
                    In eval mode this compares two kinds of running statistics (the FP start's are FP's, the
                    meta-state's a mixture of the candidates'), so the next two are the direct measurement:
    BN statistics   per BN, its input's per-channel mean and variance at each candidate with batch statistics (no
                    buffer update), FP and W weights, both networks; their mismatch: the KL divergence from N(0, 1)
                    of BN's output when one candidate's input is normalised with another's statistics
    Mismatch cost   top-1 at each uniform candidate with the network's shared running statistics against the same
                    network with BN recalibrated at that candidate on --recal-batches training batches
    Figure 8        a standard Gaussian quantized by signed LSQ at 8, 4, 3, 2 bits, with LSQ's init step and with
                    the step of least squared error: the variance of the result and of the error
    Figure 2        --fig2-epochs of training: every searched layer at the middle candidate but one depthwise conv
                    whose bits are drawn at random every --switch-every steps, from the FP start (a) with FP
                    weights, (b) with W weights, and from the meta-state likewise (the paper's bottom panel, like
                    for like); (c) MetaMix's bit-meta steps from the FP start. The trace: the running variance
                    (mean over channels) of the BN after that conv, after every step; over its last half, rel_std
                    (std / mean), rel_jump (mean step-to-step change / mean) and the mean per bits.
matplotlib (optional) draws fig1_6.png, fig2.png, fig8.png and bn_stats.png. Nothing in RUN but RUN/figures (or
--out) changes.
A run from scratch has no FP model: the meta-state's rows only, no Figure 2. Runs of (A, W) pairs are refused.
docs/thesis.md has the answer on the digits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import sys
import time
import types
from collections.abc import Sequence

import torch
import torch.nn as nn

import metamix as mm
import runs
from figure9 import pyplot

# Figure 8's bit-widths (the supplement's (b)-(e)).
FIG8_BITS = (8, 4, 3, 2)
# Values kept per layer and case for the histograms.
HIST_SAMPLES = 4000

# ---- the models: the meta-state and the FP model the run started from ---------------------------------------------


def one_process() -> types.SimpleNamespace:
    """What metamix.build_loaders needs of a process group: one process on the CPU."""
    return types.SimpleNamespace(world=1, rank=0, cuda=False)


def fp_start(args: argparse.Namespace, pretrained: str | None, classes: int, calib: torch.Tensor):
    """The FP model the run started from, patched like the run's and its activation steps set from the run's
    calibration batch (metamix.init_quantizers): the state before bit-meta (Figure 1's network). (None, why)
    when there is no FP model to load: a run from scratch, or torchvision's weights that cannot be loaded."""
    if not pretrained:
        return None, "the run trained from scratch: no FP model to start from (Figure 1's rows and Figure 2 skipped)"
    try:
        model = mm.fp_model(args.arch, pretrained, classes)
    except mm.BadInput as e:
        why = f"the FP model {pretrained} cannot be loaded ({e}); its rows and Figure 2 skipped"
        return None, why + " (give it with --pretrained PATH)"
    mm.patch_model(model, args.bits, args.w_bits, args.first_last_bits, 224, mm.QuantLayer, args.plain_lsq)
    mm.init_quantizers(model, calib)
    return model, f"the FP model: {pretrained}"


def read_run(run_dir: str):
    """(args, meta-state model, the run's --pretrained) of a run folder; one-line BadInputs for a missing
    folder or file, a broken checkpoint, a checkpoint that is not a meta-state, a run of (A, W) pairs."""
    path = runs.run_file(run_dir, "meta_state.pth")
    ck = mm.load_checkpoint(path, "meta-state", mm.CHECKPOINT_FORMAT)
    runs.check_meta_state(ck, path)
    if isinstance(ck["args"]["w_bits"], list):
        raise mm.BadInput(f"{path} is a run of (A, W) pairs (pairs.py), which figures.py does not take")
    args, model = runs.run_model(ck)
    return args, model, ck["args"].get("pretrained")


# ---- Figures 1 and 6: each searched layer's input at each candidate bit-width -------------------------------------


def is_depthwise(m: mm.QuantLayer) -> bool:
    """A depthwise conv: one group per input channel (MobileNets' 3x3 convs in an inverted residual block)."""
    return m.op.kind == "conv2d" and m.op.groups > 1 and m.weight.shape[1] == 1


@torch.no_grad()
def input_stats(model: nn.Module, batches: Sequence[torch.Tensor], keep: Sequence[str], bn: str) -> dict:
    """{layer name: {"mean", "var", "values"}}: the mean and variance of every searched layer's input, before its
    quantizer (a forward pre-hook), over `batches`, as Figures 1 and 6 show it; "values": a sample of the input of
    the layers in `keep`, for the histograms. `bn` "running": eval mode, BN with its running statistics (the
    network as evaluated and deployed); "batch": BN with each batch's statistics (as in training and in
    bit-search), its buffers untouched. The quantizers' modes are the caller's."""
    sums = {}
    values = {}

    def hook(mod, inp):
        x = inp[0].detach().double().flatten()
        s = sums.setdefault(mod.name, torch.zeros(3, dtype=torch.float64))
        s += torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])
        if mod.name in keep:
            stride = max(1, x.numel() // HIST_SAMPLES)
            values.setdefault(mod.name, []).append(x[::stride].float())

    layers = mm.searched_layers(model)
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    try:
        with bn_context(model, bn):
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (total, squares, n) in sums.items():
        mean = float(total / n)
        out[name] = {"mean": mean, "var": float(squares / n) - mean * mean}
        if name in values:
            out[name]["values"] = torch.cat(values[name]).tolist()
    return out


def bn_context(model: nn.Module, bn: str):
    """`bn` "running": the model in eval mode (BN's running statistics); "batch": metamix.batch_stats_bn (each
    batch's statistics, the buffers untouched, dropout off)."""
    if bn == "batch":
        return mm.batch_stats_bn(model)
    model.eval()
    return contextlib.nullcontext()


def spreads(fp: dict, per_bits: Sequence[dict]) -> dict:
    """One layer's spread across bit-widths (Figure 1 against Figure 6): spread_var, the range of the variances over
    their mean; spread_mean, the range of the means over the FP input's standard deviation."""
    var = [r["var"] for r in per_bits]
    mean = [r["mean"] for r in per_bits]
    mean_var = sum(var) / len(var)
    fp_std = math.sqrt(max(fp["var"], 0.0))
    return {
        "spread_var": (max(var) - min(var)) / max(mean_var, 1e-12),
        "spread_mean": (max(mean) - min(mean)) / max(fp_std, 1e-12),
    }


def model_cases(model: nn.Module, batches, keep: Sequence[str], w_bits: int, bn: str) -> dict:
    """{"fp": the network in FP, "W-FP" and "W<w_bits>": per candidate, the whole network's searched layers at it,
    weights in FP or quantized (LSQ's init from the weights at first use)}: input_stats of each. Ends in "fp"."""
    branches = range(len(mm.searched_layers(model)[0].candidates))
    bits = [a for a, _ in mm.searched_layers(model)[0].candidates]
    mm.set_mode(model, "fp")
    cases = {"fp": input_stats(model, batches, keep, bn)}
    for weights, quantized in (("W-FP", False), (f"W{w_bits}", True)):
        per_bits = []
        for branch in branches:
            mm.set_mode(model, "meta", branch, quant_weights=quantized)
            per_bits.append({"bits": bits[branch], "layers": input_stats(model, batches, keep, bn)})
        cases[weights] = per_bits
    mm.set_mode(model, "fp")
    return cases


def layer_rows(models: dict, layers: Sequence[mm.QuantLayer]) -> list[dict]:
    """Figure 1 / 6's numbers, one row per searched layer: per model and weights, the input's mean and variance at
    each bit-width and their spreads (the sample values stay out)."""
    rows = []
    for m in layers:
        row = {"name": m.name, "kind": m.kind, "depthwise": is_depthwise(m), "models": {}}
        for model_name, cases in models.items():
            fp = cases["fp"][m.name]
            entry = {"fp": {"mean": fp["mean"], "var": fp["var"]}}
            for weights, per_bits in cases.items():
                if weights == "fp":
                    continue
                stats = [{"bits": r["bits"], **strip(r["layers"][m.name])} for r in per_bits]
                entry[weights] = {"bits": stats, **spreads(fp, stats)}
            row["models"][model_name] = entry
        rows.append(row)
    return rows


def strip(stats: dict) -> dict:
    """A layer's mean and variance without its sample values."""
    return {"mean": stats["mean"], "var": stats["var"]}


def summary(rows: Sequence[dict]) -> dict:
    """Per model and weights: the mean and median over layers of each spread, and (two models) in how many layers
    the meta-state's spread_var is the smaller: the paper's claim, Figure 6 against Figure 1."""
    out = {}
    for model_name in rows[0]["models"]:
        out[model_name] = {}
        for weights in rows[0]["models"][model_name]:
            if weights == "fp":
                continue
            out[model_name][weights] = {}
            for key in ("spread_var", "spread_mean"):
                vals = sorted(r["models"][model_name][weights][key] for r in rows)
                out[model_name][weights][key] = {"mean": sum(vals) / len(vals), "median": vals[len(vals) // 2]}
    if set(out) == {"fp_start", "meta_state"}:
        for weights in out["meta_state"]:
            fp = [r["models"]["fp_start"][weights]["spread_var"] for r in rows]
            meta = [r["models"]["meta_state"][weights]["spread_var"] for r in rows]
            smaller = sum(b < a for a, b in zip(fp, meta))
            out["meta_state"][weights]["layers_smaller_than_fp_start"] = smaller
    return out


def plotted_layers(layers: Sequence[mm.QuantLayer], n: int) -> list[str]:
    """n searched layers evenly spaced in forward order, the first skipped (its input comes from the fixed 8-bit
    first layer, the same at every candidate)."""
    pool = list(layers[1:]) or list(layers)
    picks = sorted({round(i * (len(pool) - 1) / max(n - 1, 1)) for i in range(n)})
    return [pool[i].name for i in picks]


# ---- BN statistics per candidate, and what a mismatch costs (the thesis, measured directly) -----------------------


def batch_norms(model: nn.Module) -> dict:
    """{module: name} of every BN that keeps running statistics."""
    return {
        m: n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@torch.no_grad()
def bn_input_stats(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict:
    """{BN name: (mean, var)}, per channel, of every BN's input over `batches`, the network in train mode with each
    batch's statistics (metamix.batch_stats_bn: no buffer update, dropout off): pooled over images and positions,
    the population statistics a running estimate converges to. The quantizers' modes are the caller's."""
    names = batch_norms(model)
    sums = {}

    def hook(mod, inp):
        # (channels, values)
        x = inp[0].detach().double().transpose(0, 1).flatten(1)
        s = sums.setdefault(names[mod], torch.zeros(3, x.shape[0], dtype=torch.float64))
        s[0] += x.sum(1)
        s[1] += (x * x).sum(1)
        s[2] += x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        with mm.batch_stats_bn(model):
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (total, squares, n) in sums.items():
        mean = total / n
        out[name] = (mean, squares / n - mean * mean)
    return out


def bn_mismatch(per_bits: Sequence[tuple[torch.Tensor, torch.Tensor]], eps: float) -> float:
    """How far one BN's per-channel input statistics at the candidates are from each other, as BN sees it: the input
    at candidate b normalised with candidate c's statistics, (x - m_c) / sqrt(v_c + eps), should be a unit normal;
    it is N((m_b - m_c) / sqrt(v_c + eps), (v_b + eps) / (v_c + eps)). Its KL divergence from N(0, 1),
    0.5 (r + d^2 - 1 - ln r), r the variance ratio and d the mean offset in units of c's std (0 when the statistics
    agree; d^2 / 2 for a pure offset of d standard deviations), averaged over the channels and over every ordered
    pair b != c: what using one candidate's running statistics for another costs this BN."""
    kls = []
    for b, (mean_b, var_b) in enumerate(per_bits):
        for c, (mean_c, var_c) in enumerate(per_bits):
            if b == c:
                continue
            ratio = (var_b + eps) / (var_c + eps)
            offset_sq = (mean_b - mean_c) ** 2 / (var_c + eps)
            kls.append((0.5 * (ratio + offset_sq - 1 - ratio.log())).mean())
    return float(torch.stack(kls).mean())


def bn_cases(model: nn.Module, batches, w_bits: int) -> dict:
    """{"W-FP" and "W<w_bits>": {BN name: its mismatch across the candidates}}: bn_input_stats with the whole
    network's searched layers at each candidate (set_mode "meta"), weights in FP or quantized."""
    branches = range(len(mm.searched_layers(model)[0].candidates))
    eps = {n: m.eps for m, n in batch_norms(model).items()}
    out = {}
    for weights, quantized in (("W-FP", False), (f"W{w_bits}", True)):
        per_bits = []
        for branch in branches:
            mm.set_mode(model, "meta", branch, quant_weights=quantized)
            per_bits.append(bn_input_stats(model, batches))
        out[weights] = {name: bn_mismatch([stats[name] for stats in per_bits], eps[name]) for name in per_bits[0]}
    mm.set_mode(model, "fp")
    return out


def bn_summary(cases: dict) -> dict:
    """Per model and weights: the mean and median over the BNs of their mismatch, and (two models) in how many BNs
    the meta-state's is the smaller."""
    out = {}
    for model_name, by_w in cases.items():
        out[model_name] = {}
        for weights, per_bn in by_w.items():
            vals = sorted(per_bn.values())
            out[model_name][weights] = {"mean": sum(vals) / len(vals), "median": vals[len(vals) // 2], "bns": len(vals)}
    if set(out) == {"fp_start", "meta_state"}:
        for weights, per_bn in cases["meta_state"].items():
            fp = cases["fp_start"][weights]
            out["meta_state"][weights]["bns_smaller_than_fp_start"] = sum(v < fp[n] for n, v in per_bn.items())
    return out


@torch.no_grad()
def top1(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 (%) of `model` in eval mode, BN on its running statistics, over (images, labels) batches."""
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return 100 * hits / sum(len(y) for _, y in batches)


@torch.no_grad()
def recalibrated(model: nn.Module, images: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of `model`, in its quantizers' current mode, whose BN running statistics are estimated afresh on
    `images` (reset, then the cumulative average over the batches: momentum None; train mode, dropout off): no
    weight, step or other parameter changes."""
    model = copy.deepcopy(model)
    bns = list(batch_norms(model))
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    for x in images:
        model(x)
    return model.eval()


def mismatch_costs(model: nn.Module, val: Sequence, calib_images: Sequence[torch.Tensor], w_bits: int) -> dict:
    """{"W-FP", "W<w_bits>": [per candidate: {"bits", "shared", "recalibrated", "gain"}]}: top-1 at each uniform
    candidate with the network's own running statistics (shared by every candidate) and with its BN statistics
    recalibrated at that candidate on `calib_images`. The thesis predicts a large gain at low bits for the FP start
    (its statistics are FP's) and a small one at every candidate for the meta-state."""
    bits = [a for a, _ in mm.searched_layers(model)[0].candidates]
    out = {}
    for weights, quantized in (("W-FP", False), (f"W{w_bits}", True)):
        rows = []
        for branch, b in enumerate(bits):
            mm.set_mode(model, "meta", branch, quant_weights=quantized)
            shared = top1(model, val)
            recal = top1(recalibrated(model, calib_images), val)
            rows.append({"bits": b, "shared": shared, "recalibrated": recal, "gain": recal - shared})
        out[weights] = rows
    mm.set_mode(model, "fp")
    return out


# ---- Figure 8: a Gaussian quantized at 8, 4, 3, 2 bits ------------------------------------------------------------


def figure8(samples: int, seed: int) -> dict:
    """The supplement's Figure 8: a standard Gaussian (`samples` values from `seed`) quantized by signed LSQ at each
    of FIG8_BITS, with two steps, since the direction depends on it: LSQ's init step, s = 2 mean|x| / sqrt(Qp)
    ("step", "var", "error_var"), and the step of least mean squared error ("mse_step", "mse_var", "mse_error_var")."""
    x = torch.randn(samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = []
    for b in FIG8_BITS:
        qp = mm.lsq_range(b, True)[1]
        step = 2 * x.abs().mean() / math.sqrt(qp)
        best = mse_step(x, b, float(step))
        with torch.no_grad():
            q = mm.lsq_quantize(x, step.reshape(()), b, True)
            q_mse = mm.lsq_quantize(x, torch.tensor(best, dtype=torch.float64), b, True)
        row = {"bits": b, "step": float(step), "var": float(q.var()), "error_var": float((q - x).var())}
        row.update(mse_step=best, mse_var=float(q_mse.var()), mse_error_var=float((q_mse - x).var()))
        rows.append(row)
    return {"samples": samples, "seed": seed, "input_var": float(x.var()), "rows": rows}


@torch.no_grad()
def mse_step(x: torch.Tensor, bits: int, init: float, points: int = 41, rounds: int = 4) -> float:
    """The step of least mean squared error of signed LSQ at `bits` on `x`: a grid of `points` steps over
    (0, 3 init], then `rounds - 1` finer grids around the best so far."""
    lo, hi = 0.0, 3 * init
    best = init
    for _ in range(rounds):
        grid = torch.linspace(lo, hi, points, dtype=torch.float64)[1:]
        errors = torch.stack([(mm.lsq_quantize(x, s, bits, True) - x).square().mean() for s in grid])
        best = float(grid[int(errors.argmin())])
        width = float(grid[1] - grid[0])
        lo, hi = max(best - width, 0.0), best + width
    return best


# ---- Figure 2: the running variance of one BN while one layer's bits change ---------------------------------------


def following_bn(model: nn.Module, layer: nn.Module, image_size: int) -> tuple[str, nn.BatchNorm2d]:
    """(name, module) of the first BatchNorm2d called after `layer` in one forward pass: the BN that normalises the
    chosen depthwise conv's output in Figure 2."""
    names = {m: n for n, m in model.named_modules()}
    calls = []
    watched = [m for m in model.modules() if m is layer or isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(lambda mod, i, o: calls.append(mod)) for m in watched]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    model.train(was_training)
    after = calls[calls.index(layer) + 1 :]
    if not after:
        raise mm.BadInput(f"no BatchNorm2d follows {names[layer]}: Figure 2 needs one")
    return names[after[0]], after[0]


def figure2_layer(model: nn.Module) -> mm.QuantLayer:
    """Figure 2's layer: the searched depthwise conv in the middle of the network (MobileNets: inside an inverted
    residual block); without depthwise convs, the middle searched layer."""
    layers = mm.searched_layers(model)
    pool = [m for m in layers if is_depthwise(m)] or layers
    return pool[len(pool) // 2]


def figure2_case(model, layer, bn, loader, args, case: str, epochs: int, switch_every: int) -> dict:
    """One of Figure 2's traces, training `model` in place: "random-FP" and "random-W" (every searched layer at the
    middle candidate but `layer`, whose bits are drawn at random every `switch_every` steps; weights FP or
    quantized; weight_training_step) or "metamix" (bit_meta_step: every candidate per step), with SGD at the run's
    LR, momentum 0.9 (our choice). After each step: the mean over channels of `bn`'s running variance, and the
    bits `layer` ran at ("metamix": all, None)."""
    opt = torch.optim.SGD(mm.meta_params(model), lr=args.lr, momentum=0.9)
    bits = [a for a, _ in layer.candidates]
    middle = len(bits) // 2
    draws = torch.Generator().manual_seed(args.seed)
    trace = []
    chosen = []
    branch = middle
    step = 0
    model.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, targets in loader:
            if case == "metamix":
                opt.zero_grad(set_to_none=True)
                mm.bit_meta_step(model, images, targets)
                opt.step()
                chosen.append(None)
            else:
                if step % switch_every == 0:
                    branch = int(torch.randint(len(bits), (1,), generator=draws))
                mm.set_mode(model, "meta", middle, quant_weights=case == "random-W")
                layer.set_state("branch", branch)
                mm.weight_training_step(model, images, targets, opt)
                chosen.append(bits[branch])
            trace.append(float(bn.running_var.mean()))
            step += 1
    return {"trace": trace, "bits": chosen, "variability": variability(trace), "by_bits": by_bits(trace, chosen)}


def by_bits(trace: Sequence[float], bits: Sequence[int | None]) -> dict:
    """Figure 2's first trend, "activation statistics has strong correlation with bit-width": the mean of the
    trace's last half over the steps at each bit-width of the random layer, and their range over their mean
    ("gap"). Empty for MetaMix's trace (every step runs every candidate)."""
    tail = list(zip(trace, bits))[len(trace) // 2 :]
    groups = {}
    for v, b in tail:
        if b is not None:
            groups.setdefault(b, []).append(v)
    if not groups:
        return {}
    means = {str(b): sum(vs) / len(vs) for b, vs in sorted(groups.items(), reverse=True)}
    overall = sum(means.values()) / len(means)
    return {"mean": means, "gap": (max(means.values()) - min(means.values())) / overall}


def variability(trace: Sequence[float]) -> dict:
    """How much a trace moves over its last half (Figure 2's "stable batch norm statistics"): rel_std, its
    standard deviation over its mean; rel_jump, the mean step-to-step change over its mean."""
    tail = list(trace[len(trace) // 2 :])
    mean = sum(tail) / len(tail)
    sd = math.sqrt(sum((v - mean) ** 2 for v in tail) / len(tail))
    jumps = [abs(b - a) for a, b in zip(tail, tail[1:])] or [0.0]
    return {"rel_std": sd / mean, "rel_jump": sum(jumps) / len(jumps) / mean, "steps": len(tail)}


# Figure 2's cases: (its name, the network it starts from, what figure2_case runs). The paper's bottom panel,
# like for like: the meta-state under the same random switching as the FP start's top and middle panels.
FIG2_CASES = (
    ("random-FP", "fp_start", "random-FP"),
    ("random-W", "fp_start", "random-W"),
    ("metamix", "fp_start", "metamix"),
    ("meta-random-FP", "meta_state", "random-FP"),
    ("meta-random-W", "meta_state", "random-W"),
)


def figure2(starts: dict, args, train_set, epochs: int, switch_every: int) -> dict:
    """Figure 2's cases (FIG2_CASES), each from a copy of its network ({"fp_start", "meta_state"}), on the run's
    training data (metamix's own pipeline and data order, the run's batch size; SGD at the run's LR, momentum 0.9:
    our choice); the same layer, BN, draws of bits and dropout masks in every case."""
    layer = figure2_layer(starts["fp_start"])
    bn_name, _ = following_bn(starts["fp_start"], layer, args.image_size)
    cases = {}
    for case, source, kind in FIG2_CASES:
        # the same dropout masks in every case, and the same on every rerun
        torch.manual_seed(args.seed)
        model = copy.deepcopy(starts[source])
        mm.use_speed_path(model)
        loader, _, _ = mm.build_loaders(args, one_process(), train_set, train_set)
        case_layer = model.get_submodule(layer.name)
        bn = model.get_submodule(bn_name)
        cases[case] = figure2_case(model, case_layer, bn, loader, args, kind, epochs, switch_every)
    return {
        "layer": layer.name,
        "bn": bn_name,
        "candidates": [a for a, _ in layer.candidates],
        "epochs": epochs,
        "switch_every": switch_every,
        "lr": args.lr,
        "cases": cases,
    }


# ---- the tables and the plots (matplotlib, optional) --------------------------------------------------------------


def plot_fig1_6(models: dict, keep: Sequence[str], title: str, path: str) -> bool:
    """fig1_6.png as the paper's Figures 1 and 6: one row per model and weights, one column per layer in `keep`,
    the input's histogram at each candidate bit-width overlaid. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    rows = [(m, w) for m, cases in models.items() for w in cases if w != "fp"]
    fig, axes = plt.subplots(len(rows), len(keep), figsize=(2.6 * len(keep), 1.9 * len(rows)), squeeze=False)
    for (model_name, weights), ax_row in zip(rows, axes):
        for name, ax in zip(keep, ax_row):
            per_bits = models[model_name][weights]
            # the central 99% of the values, so that a few outliers do not squeeze the histograms
            pooled = torch.tensor(sum((r["layers"][name]["values"] for r in per_bits), []))
            span = torch.quantile(pooled, torch.tensor([0.005, 0.995])).tolist()
            for r in per_bits:
                values = r["layers"][name]["values"]
                ax.hist(values, bins=60, range=span, histtype="step", density=True, label=f"A{r['bits']}")
            ax.tick_params(labelsize=6)
            ax.set_title(f"{model_name}, {weights}: {name}", fontsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_fig2(fig2: dict, title: str, path: str) -> bool:
    """fig2.png as the paper's Figure 2: the BN's running variance after every step, one panel per case, the
    random layer's bits on a second axis. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    cases = fig2["cases"]
    fig, axes = plt.subplots(len(cases), 1, sharex=True, figsize=(7, 1.8 * len(cases)))
    for ax, (case, c) in zip(axes, fig2["cases"].items()):
        ax.plot(c["trace"], color="tab:blue", lw=1)
        ax.set_ylabel("running var", fontsize=7)
        v = c["variability"]
        ax.set_title(f"{case}: rel_std {v['rel_std']:.3f}, rel_jump {v['rel_jump']:.4f} (last half)", fontsize=8)
        if c["bits"][0] is not None:
            ax.twinx().step(range(len(c["bits"])), c["bits"], color="tab:orange", lw=0.8, where="post")
    axes[-1].set_xlabel("training step")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_bn(report: dict, title: str, path: str) -> bool:
    """bn_stats.png: left, each BN's mismatch across the candidates in forward order (log scale), per network and
    weights; right, the top-1 gained by recalibrating BN at each candidate. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2))
    for m, by_w in report["bn_stats"]["per_bn"].items():
        for w, per_bn in by_w.items():
            left.plot([max(v, 1e-8) for v in per_bn.values()], lw=1, label=f"{m} {w}")
    left.set_yscale("log")
    left.set_xlabel("BN (forward order)")
    left.set_ylabel("KL mismatch across candidates")
    left.legend(fontsize=6)
    for m, by_w in report["mismatch_cost"]["models"].items():
        for w, rows in by_w.items():
            right.plot([f"A{r['bits']}" for r in rows], [r["gain"] for r in rows], marker="o", label=f"{m} {w}")
    right.axhline(0, color="grey", lw=0.5)
    right.set_ylabel("top-1 gain of recalibration (points)")
    right.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_fig8(fig8: dict, path: str) -> bool:
    """fig8.png as the supplement's Figure 8: the Gaussian's and each quantized tensor's histogram. False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    x = torch.randn(fig8["samples"], generator=torch.Generator().manual_seed(fig8["seed"]), dtype=torch.float64)
    fig, axes = plt.subplots(1, 1 + len(fig8["rows"]), figsize=(12, 2.2))
    axes[0].hist(x.numpy(), bins=100)
    axes[0].set_title(f"(a) N(0,1): var {fig8['input_var']:.3f}", fontsize=8)
    for ax, r in zip(axes[1:], fig8["rows"]):
        q = mm.lsq_quantize(x, torch.tensor(r["step"], dtype=torch.float64), r["bits"], True).detach()
        ax.hist(q.numpy(), bins=100)
        ax.set_title(f"{r['bits']}-bit (init step): var {r['var']:.3f}; MSE step: {r['mse_var']:.3f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def tables(report: dict) -> str:
    """figures.md: the per-layer spreads (Figures 1 / 6), their summary, Figure 2's variability, Figure 8."""
    f16 = report["figure1_6"]
    lines = [f"# Figures 1, 2, 6 and 8 of {report['run']} ({report['arch']})", "", report["fp_note"], ""]
    lines += ["## Figures 1 / 6: spread of each searched layer's input across bit-widths", ""]
    lines += [f"BN with its {f16['bn']} statistics, {f16['images']} validation images.", ""]
    if f16["bn"] == "running":
        lines += ["Eval mode compares two kinds of running statistics: the FP start's are FP's, the meta-state's a"]
        lines += ["mixture of its candidates' passes; these spreads measure the buffers as much as the inputs (the BN"]
        lines += ["statistics below are the direct measurement).", ""]
    cols = [(m, w) for m, cases in f16["layers"][0]["models"].items() for w in cases if w != "fp"]
    head = " | ".join(f"{m} {w} var / mean" for m, w in cols)
    lines += [f"| layer | kind | {head} |", "|---|---|" + "---|" * len(cols)]
    for r in f16["layers"]:
        cells = [r["models"][m][w] for m, w in cols]
        vals = " | ".join(f"{c['spread_var']:.3f} / {c['spread_mean']:.3f}" for c in cells)
        kind = r["kind"] + " (dw)" * r["depthwise"]
        lines.append(f"| {r['name']} | {kind} | {vals} |")
    lines += ["", "| model | weights | spread_var mean / median | spread_mean mean / median | layers below FP start |"]
    lines.append("|---|---|---|---|---|")
    for m, by_w in f16["summary"].items():
        for w, s in by_w.items():
            sv = s["spread_var"]
            sm = s["spread_mean"]
            below = s.get("layers_smaller_than_fp_start", "-")
            mean_median = f"{sv['mean']:.3f} / {sv['median']:.3f} | {sm['mean']:.3f} / {sm['median']:.3f}"
            lines.append(f"| {m} | {w} | {mean_median} | {below} |")
    lines += bn_tables(report)
    fig2 = report.get("figure2")
    if fig2:
        lines += ["", f"## Figure 2: running variance of {fig2['bn']} (after {fig2['layer']})", ""]
        lines += ["| case | steps | rel_std (last half) | rel_jump (last half) | mean by bits | gap |"]
        lines.append("|---|---|---|---|---|---|")
        for case, c in fig2["cases"].items():
            v = c["variability"]
            means = ", ".join(f"A{b} {m:.4g}" for b, m in c["by_bits"].get("mean", {}).items()) or "-"
            gap = c["by_bits"].get("gap")
            gap_text = "-"
            if gap is not None:
                gap_text = f"{gap:.4f}"
            cells = f"{len(c['trace'])} | {v['rel_std']:.4f} | {v['rel_jump']:.5f} | {means} | {gap_text}"
            lines.append(f"| {case} | {cells} |")
    lines += ["", "## Figure 8: a Gaussian quantized by LSQ, with LSQ's init step and with the MSE-optimal step", ""]
    lines += ["| bits | init step | variance | error variance | MSE step | variance | error variance |"]
    lines.append("|---|---|---|---|---|---|---|")
    lines.append(
        f"| FP | - | {report['figure8']['input_var']:.4f} | 0 | - | {report['figure8']['input_var']:.4f} | 0 |"
    )
    for r in report["figure8"]["rows"]:
        init = f"{r['step']:.4f} | {r['var']:.4f} | {r['error_var']:.4f}"
        mse = f"{r['mse_step']:.4f} | {r['mse_var']:.4f} | {r['mse_error_var']:.4f}"
        lines.append(f"| {r['bits']} | {init} | {mse} |")
    return "\n".join(lines) + "\n"


def bn_tables(report: dict) -> list[str]:
    """figures.md's part on the BN statistics: each BN's mismatch across the candidates (batch statistics), their
    summary, and top-1 with shared against recalibrated statistics."""
    bn = report["bn_stats"]
    lines = ["", "## BN statistics per candidate (batch statistics, no buffer update)", ""]
    lines += [f"{bn['images']} validation images. Per BN: the KL divergence of its output from N(0, 1) when one"]
    lines += ["candidate's input is normalised with another's statistics, mean over channels and ordered pairs.", ""]
    cols = [(m, w) for m, by_w in bn["per_bn"].items() for w in by_w]
    lines += ["| BN | " + " | ".join(f"{m} {w}" for m, w in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in bn["per_bn"]["meta_state"]["W-FP"]:
        lines.append(f"| {name} | " + " | ".join(f"{bn['per_bn'][m][w][name]:.5f}" for m, w in cols) + " |")
    lines += ["", "| model | weights | mismatch mean / median | BNs below FP start |", "|---|---|---|---|"]
    for m, by_w in bn["summary"].items():
        for w, s in by_w.items():
            below = s.get("bns_smaller_than_fp_start", "-")
            lines.append(f"| {m} | {w} | {s['mean']:.5f} / {s['median']:.5f} | {below} of {s['bns']} |")
    cost = report["mismatch_cost"]
    lines += ["", "## What a mismatch costs: top-1 (%) with shared against recalibrated BN statistics", ""]
    lines += [f"Each uniform candidate; BN recalibrated on {cost['calibration_images']} training images.", ""]
    lines += ["| model | weights | bits | shared | recalibrated | gain |", "|---|---|---|---|---|---|"]
    for m, by_w in cost["models"].items():
        for w, rows in by_w.items():
            for r in rows:
                cells = f"A{r['bits']} | {r['shared']:.2f} | {r['recalibrated']:.2f} | {r['gain']:+.2f}"
                lines.append(f"| {m} | {w} | {cells} |")
    return lines


# ---- the command line ---------------------------------------------------------------------------------------------


def run_figures(a: argparse.Namespace) -> int:
    run_dir = os.path.normpath(a.run)
    args, meta, pretrained = read_run(run_dir)
    if a.pretrained and not os.path.isfile(a.pretrained):
        raise mm.BadInput(f"--pretrained {a.pretrained}: no such file")
    pretrained = a.pretrained or pretrained
    out = a.out or os.path.join(run_dir, "figures")
    t0 = time.time()
    train_set, val_set, classes = mm.build_datasets(args)
    train_loader, val_loader, calib = mm.build_loaders(args, one_process(), train_set, val_set)
    val = list(itertools.islice(val_loader, a.batches))
    batches = [x for x, _ in val]
    # the training images BN is recalibrated on, the same on every rerun
    torch.manual_seed(args.seed)
    recal_images = [x for x, _ in itertools.islice(train_loader, a.recal_batches)]
    start, fp_note = fp_start(args, pretrained, classes, calib)
    networks = {"fp_start": start, "meta_state": meta}
    if start is None:
        networks.pop("fp_start")
    fig2_starts = copy.deepcopy(networks)
    keep = plotted_layers(mm.searched_layers(meta), a.layers)
    models = {name: model_cases(net, batches, keep, args.w_bits, a.bn) for name, net in networks.items()}
    rows = layer_rows(models, mm.searched_layers(meta))
    bn = {name: bn_cases(net, batches, args.w_bits) for name, net in networks.items()}
    costs = {name: mismatch_costs(net, val, recal_images, args.w_bits) for name, net in networks.items()}
    report = {
        "run": run_dir,
        "arch": args.arch,
        "candidates": list(args.bits),
        "w_bits": args.w_bits,
        "fp_model": pretrained,
        "fp_note": fp_note,
        "figure1_6": {"bn": a.bn, "batches": len(batches), "images": sum(len(x) for x in batches), "plotted": keep},
        "figure8": figure8(a.fig8_samples, 0),
    }
    report["figure1_6"]["layers"] = rows
    report["figure1_6"]["summary"] = summary(rows)
    report["bn_stats"] = {"images": report["figure1_6"]["images"], "per_bn": bn, "summary": bn_summary(bn)}
    report["mismatch_cost"] = {"calibration_images": sum(len(x) for x in recal_images), "models": costs}
    if "fp_start" in fig2_starts and a.fig2_epochs:
        report["figure2"] = figure2(fig2_starts, args, train_set, a.fig2_epochs, a.switch_every)
    report["seconds"] = round(time.time() - t0, 1)
    os.makedirs(out, exist_ok=True)
    mm.atomic_write(os.path.join(out, "figures.json"), json.dumps(report, indent=1).encode())
    mm.atomic_write(os.path.join(out, "figures.md"), tables(report).encode())
    title = f"{args.arch}: {run_dir}"
    plotted = plot_fig1_6(models, keep, title, os.path.join(out, "fig1_6.png"))
    plotted = plot_fig8(report["figure8"], os.path.join(out, "fig8.png")) and plotted
    plotted = plot_bn(report, title, os.path.join(out, "bn_stats.png")) and plotted
    if "figure2" in report:
        plotted = plot_fig2(report["figure2"], title, os.path.join(out, "fig2.png")) and plotted
    pictures = ", fig*.png"
    if not plotted:
        pictures = " (the plots need matplotlib, which is not installed: skipped)"
    print(f"{summary_line(report)}\nwrote {out}/figures.json, figures.md{pictures}", flush=True)
    return 0


def summary_line(report: dict) -> str:
    """The line figures.py prints: each model's mean spread_var with FP weights, Figure 2's rel_std per case."""
    s = report["figure1_6"]["summary"]
    parts = [f"{m} {by_w['W-FP']['spread_var']['mean']:.3f}" for m, by_w in s.items()]
    line = f"Figures 1/6: mean spread of the input variance across bit-widths (FP weights): {', '.join(parts)}"
    bn = [f"{m} {by_w['W-FP']['mean']:.5f}" for m, by_w in report["bn_stats"]["summary"].items()]
    line += f"; BN mismatch across candidates (FP weights): {', '.join(bn)}"
    if "figure2" in report:
        cases = report["figure2"]["cases"].items()
        line += "; Figure 2 rel_std: " + ", ".join(f"{k} {c['variability']['rel_std']:.4f}" for k, c in cases)
    return line + f" ({report['seconds']:.0f}s)"


def get_args_parser() -> argparse.ArgumentParser:
    p = mm.Parser(
        prog="figures.py",
        description="The paper's Figures 1, 2, 6 and 8 for a MetaMix run: activation instability across "
        "bit-widths, for the FP start and the meta-state",
    )
    add = p.add_argument
    add("run", metavar="RUN", help="a metamix.py run's --output-dir, holding meta_state.pth")
    add("--out", metavar="DIR", help="where the figures go (default: RUN/figures)")
    add("--batches", metavar="N", type=mm.number(int, 1), default=4, help="validation batches (default: 4)")
    add("--layers", metavar="N", type=mm.number(int, 1), default=4, help="layers in fig1_6.png (default: 4)")
    add("--fig2-epochs", metavar="E", type=mm.number(int, 0), default=2, help="Figure 2's epochs, 0: none (2)")
    add("--switch-every", metavar="K", type=mm.number(int, 1), default=10, help="Figure 2: steps per draw (10)")
    add("--fig8-samples", metavar="N", type=mm.number(int, 2), default=1_000_000, help="Figure 8's Gaussian")
    add("--bn", choices=("running", "batch"), default="running", help="Figures 1/6: BN's statistics (running)")
    add(
        "--recal-batches",
        metavar="N",
        type=mm.number(int, 1),
        default=10,
        help="training batches BN is recalibrated on (default: 10)",
    )
    add("--pretrained", metavar="PATH", help="the FP model the run started from (default: the run's --pretrained)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    return mm.guarded("figures", run_figures, a)


if __name__ == "__main__":
    sys.exit(main())
