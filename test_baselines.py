"""Tests for baselines.py, the other selections (not MetaMix) made from a run's meta-state.
Run: python -m pytest -q test_baselines.py

The pieces against brute force, exact Hessians and hand values; each method on the reference run's meta-state
(in this process); the workflow end to end: metamix.py --resume RUN/meta_state.pth --bits-from FILE reproduces
the run from its own bits, and trains a baseline's bits with the command baselines.py prints.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import math
import os
import random
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ablations
import baselines as bl
import metamix as mm
import runs
import pairs
from conftest import (
    METRICS,
    REF,
    REPO,
    error_line,
    files_of,
    load_ck,
    main_in_process,
    read_log,
    run_cli,
    two_layer_model,
)


def linked_run(ref_run: Path, d: Path) -> Path:
    """A run folder whose meta_state.pth is the reference run's (a link: ref_run itself is never written)."""
    d.mkdir(parents=True)
    (d / "meta_state.pth").symlink_to(ref_run / "meta_state.pth")
    return d


# ---------------------------------------------------------------------------------------
# The exact knapsack
# ---------------------------------------------------------------------------------------


def _brute_force_mckp(scores, costs, budget):
    """The least total score of a choice per layer within budget, by trying every choice."""
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[i] for c, i in zip(costs, choice)) <= budget:
            v = sum(s[i] for s, i in zip(scores, choice))
            best = v if best is None or v < best else best
    return best


def test_knapsack_matches_brute_force_on_random_instances():
    """mckp_exact, the exact multiple-choice knapsack, against enumeration of every choice on small instances."""
    rng = random.Random(0)
    for trial in range(300):
        n_layers, n_choices = rng.randint(1, 6), rng.randint(1, 4)
        costs = [[rng.randint(0, 12) for _ in range(n_choices)] for _ in range(n_layers)]
        scores = [
            [rng.choice([rng.uniform(-1, 2), float(rng.randint(0, 3))]) for _ in range(n_choices)]
            for _ in range(n_layers)
        ]  # integer scores make ties
        budget = rng.randint(0, 12 * n_layers)
        got = bl.mckp_exact(scores, costs, budget)
        want = _brute_force_mckp(scores, costs, budget)
        if want is None:
            assert got is None, (trial, costs, budget)
            continue
        assert got is not None and len(got) == n_layers
        assert sum(c[i] for c, i in zip(costs, got)) <= budget
        assert sum(s[i] for s, i in zip(scores, got)) == pytest.approx(want, abs=1e-12), trial


def test_knapsack_on_resnet18_equals_a_dense_dp_over_the_gcd_grid():
    """At ImageNet scale (19 layers, 3^19 configurations): against an independent dense DP whose grid is
    the gcd of all integer BOPs costs (exact, because every cost is a multiple of it)."""
    model = mm.patch_model(torchvision.models.resnet18(), [8, 4, 2], 4)
    costs, fixed = bl.bops_costs(model)
    assert fixed == round(mm.c_fixed_of(model) * 1e9)
    g = math.gcd(*[c for row in costs for c in row])
    rng = random.Random(1)
    for target in (22.0, 27.0, 33.0):
        budget = bl.budget_bops(target, fixed)
        scores = [[0.0, rng.uniform(0, 1), rng.uniform(0.5, 3)] for _ in costs]  # A8 free, A2 dear
        cap = budget // g
        inf = float("inf")
        # dp[c]: best score with total reduced cost <= c
        dp = [0.0] * (cap + 1)
        for sc, co in zip(scores, costs):
            dp = [min((dp[c - k // g] + s for s, k in zip(sc, co) if k // g <= c), default=inf) for c in range(cap + 1)]
        got = bl.mckp_exact(scores, costs, budget)
        assert sum(c[i] for c, i in zip(costs, got)) <= budget
        assert (
            mm.config_gbops(
                [m.macs for m in mm.searched_layers(model)], [[32, 16, 8][i] for i in got], mm.c_fixed_of(model)
            )
            <= target + 1e-9
        )
        assert sum(s[i] for s, i in zip(scores, got)) == pytest.approx(dp[cap], abs=1e-9)


def test_bops_costs_by_hand_one_w_and_pairs():
    """Exact BOPs per candidate, a * w * MACs: conv A 4*4*9*64 = 9216 MACs, conv B 8*4*64 = 2048; the fixed
    layers (3*4*9*64 + 8*2 MACs) at 8 x 8 bits. With (A, W) pairs each pair costs its own a * w."""
    costs, fixed = bl.bops_costs(two_layer_model(4, mm.QuantLayer))
    assert costs == [[9216 * c for c in (16, 8)], [2048 * c for c in (16, 8)]]
    assert fixed == (3 * 4 * 9 * 64 + 8 * 2) * 64
    costs, fixed = bl.bops_costs(two_layer_model([4, 2], pairs.PairQuantLayer))
    assert costs == [[9216 * c for c in (16, 8, 8, 4)], [2048 * c for c in (16, 8, 8, 4)]]
    assert fixed == (3 * 4 * 9 * 64 + 8 * 2) * 64


# ---------------------------------------------------------------------------------------
# Uniform and random
# ---------------------------------------------------------------------------------------


def test_uniform_and_random_selections():
    """uniform: the largest candidate under the target; random: seeded, under the target, filled toward it."""
    model = mm.patch_model(torchvision.models.resnet18(), [8, 4, 2], 4)
    budgets = bl.uniform_budgets(model)
    assert budgets[4] == pytest.approx(34.714, abs=1e-3)  # the README's dry-run table
    assert bl.uniform_selection(model, budgets[4]) == [1] * 19
    assert bl.uniform_selection(model, budgets[4] - 0.01) == [2] * 19
    with pytest.raises(
        mm.BadInput,
        match=r"--method uniform: no uniform .* \(uniform budgets in GBOPs: "
        r"A2 21\.150, A4 34\.714, A8 61\.843\)",
    ):
        bl.uniform_selection(model, 21.0)
    costs, fixed = bl.bops_costs(model)
    seen = set()
    for seed in range(20):
        target = 22 + seed
        sel = bl.random_selection(model, target, seed)
        assert sel == bl.random_selection(model, target, seed)  # seeded
        assert mm.branches_gbops(model, sel) <= target + 1e-9
        total = sum(c[i] for c, i in zip(costs, sel))
        budget = bl.budget_bops(target, fixed)
        # filled: no layer can go one candidate up without going over
        for j, i in enumerate(sel):
            if i > 0:
                assert total - costs[j][i] + costs[j][i - 1] > budget
        seen.add(tuple(sel))
    assert len(seen) == 20
    state = random.getstate()
    bl.random_selection(model, 30, 0)
    assert random.getstate() == state  # its own generator


# ---------------------------------------------------------------------------------------
# Hutchinson and the proxies
# ---------------------------------------------------------------------------------------


def _tiny_mlp():
    """Flatten -> Linear(3,4) [fixed] -> Tanh -> Linear(4,3) -> Tanh -> Linear(3,3) -> Tanh -> Linear(3,2) [fixed],
    float64; patched at a 1x1 'image' so the searched layers' inputs have 4 and 3 features per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(3, 4),
        nn.Tanh(),
        nn.Linear(4, 3),
        nn.Tanh(),
        nn.Linear(3, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
    )
    mm.patch_model(model, [8, 4, 2], 4, bops_image_size=1)
    model.double()
    mm.set_mode(model, "fp")
    return model


def _exact_traces(model, x, y) -> tuple[list[float], list[float]]:
    """Per searched layer of a float64 model: the exact Tr(d^2 L / d x_l^2) (torch.autograd.functional.hessian)
    and the exact Gauss-Newton trace Tr(J^T H_z J) from the full Jacobian J = dz / dx_l of the logits z and the
    cross-entropy's Hessian in z, H_z = (diag p_i - p_i p_i^T) / B per image (block-diagonal)."""
    hessian, gauss_newton = [], []
    for m in mm.searched_layers(model):
        rec = {}

        def record(mod, inp, rec=rec):
            rec["x"] = inp[0].detach().clone()

        h = m.register_forward_pre_hook(record)
        model(x)
        h.remove()

        def logits_of(z, m=m):
            hook = m.register_forward_pre_hook(lambda mod, inp: (z,))
            try:
                return model(x)
            finally:
                hook.remove()

        H = torch.autograd.functional.hessian(lambda z: F.cross_entropy(logits_of(z), y), rec["x"])
        hessian.append(H.reshape(rec["x"].numel(), -1).diagonal().sum().item())
        J = torch.autograd.functional.jacobian(logits_of, rec["x"]).reshape(len(x), -1, rec["x"].numel())
        p = F.softmax(model(x), 1)
        Hz = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(x)
        gauss_newton.append(torch.einsum("bcn,bcd,bdn->", J, Hz, J).item())
    return hessian, gauss_newton


def test_hutchinson_equals_exact_hessian_trace_in_float64():
    """Every Rademacher vector enumerated once (E[v v^T] = I exactly): the estimate must be the exact trace of
    d^2 L / d x_l^2 (torch.autograd.functional.hessian), for each searched layer's input."""
    model = _tiny_mlp()
    x, y = torch.randn(2, 3, 1, 1, dtype=torch.float64), torch.tensor([0, 1])
    exact = _exact_traces(model, x, y)[0]
    # a test that can fail: the traces are not zero
    assert all(abs(t) > 1e-4 for t in exact)

    # all 2^n sign vectors of each input's shape, handed out in order, cycling (n = 8 and 6 elements)
    counters = {}

    def enumerate_signs(shape, dtype, device, generator):
        n = math.prod(shape)
        k = counters.get(n, 0)
        counters[n] = k + 1
        bits = [(k >> j) & 1 for j in range(n)]
        return (torch.tensor(bits, dtype=dtype) * 2 - 1).reshape(shape)

    got = bl.hutchinson_traces(model, x, y, probes=256, probe_fn=enumerate_signs)
    assert got.tolist() == pytest.approx(exact, rel=1e-10, abs=1e-12)
    # and the default Rademacher estimate converges to it
    est = bl.hutchinson_traces(model, x, y, probes=3000, generator=torch.Generator().manual_seed(0))
    assert est.tolist() == pytest.approx(exact, rel=0.1)


def _concave_mlp():
    """The tiny MLP at inputs where the loss is locally concave along the first searched layer's input (its
    Hessian trace is negative), on signed grids that span [-1, 1] at 8, 4 and 2 bits (tanh's range: the largest
    candidate's clamp cuts nothing)."""
    model = _tiny_mlp()
    for m in mm.quant_layers(model):
        m.act.signed = True
        m.act.initialized = [True] * len(m.act.bits)
        # the first layer's input, 3 randn: a step of 0.1 spans [-12.8, 12.7]
        m.act.step.data = torch.tensor([1 / 127, 1 / 7, 1.0] if not m.fixed else [0.1], dtype=torch.float64)
    x = 3 * torch.randn(2, 3, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, x, torch.tensor([0, 1])


def test_gauss_newton_trace_against_the_jacobian_formula():
    """The label-sampling estimate converges to Tr(J^T H_z J) from the full Jacobian, and is never negative, also
    where the full Hessian's trace is."""
    model, x, y = _concave_mlp()
    hessian, exact = _exact_traces(model, x, y)
    # a test that can fail: the two traces differ, and the first layer's Hessian trace is negative
    assert hessian[0] < 0 < exact[0] and exact[1] > 0
    est = bl.gauss_newton_traces(model, x, probes=4000, generator=torch.Generator().manual_seed(0))
    assert est.tolist() == pytest.approx(exact, rel=0.05)
    few = torch.stack([bl.gauss_newton_traces(model, x, 1, torch.Generator().manual_seed(s)) for s in range(20)])
    assert (few >= 0).all()


def test_a_locally_concave_layer_gets_no_negative_hessian_score():
    """Where the loss is concave along a layer's input, Hutchinson's estimate of its trace is negative and would
    say that quantization noise lowers the loss; the proxy's scores stay positive, rising as bits fall."""
    model, x, y = _concave_mlp()
    raw: list = []
    scores = bl.proxy_scores(model, [(x, y)], "hessian", probes=256, traces_out=raw)
    assert raw[0][0] < 0 < raw[0][1]
    assert (scores > 0).all()
    assert (scores[:, 0] < scores[:, 1]).all() and (scores[:, 1] < scores[:, 2]).all()


def test_the_bits_file_counts_negative_hutchinson_estimates(monkeypatch):
    """select's proxy entry counts the negative raw estimates (layers x batches), the rows keep their mean, and
    selection_notes names the count; a selection under its target by more than UNUSED says so."""
    model, x, y = _concave_mlp()
    monkeypatch.setattr(bl, "proxy_batches", lambda args, n, seed, device="cpu": [(x, y)] * n)
    target = mm.gbops_range(model)[1]
    branches, extra = bl.select(model, None, "hessian", target, batches=2, probes=256)
    assert extra["proxy"]["negative_hutchinson_traces"] == 2 and extra["proxy"]["hutchinson_traces"] == 4
    assert extra["hutchinson_trace"][0] < 0
    # the bits file: the count in "proxy", each row's mean raw trace
    args = argparse.Namespace(arch="mlp", first_last_bits=8)
    written = bl.baseline_report(model, args, "hessian", target, branches, extra)
    assert written["proxy"]["negative_hutchinson_traces"] == 2 and written["proxy"]["hutchinson_traces"] == 4
    assert [r["hutchinson_trace"] for r in written["layers"] if not r["fixed"]] == extra["hutchinson_trace"]
    report = {"selection": "hessian", "gbops": 0.95 * target, "proxy": extra["proxy"]}
    notes = bl.selection_notes(report, target)
    assert notes[0] == f"note: hessian leaves 5.0% of the {target:g} GBOPs target unused"
    assert notes[1].startswith("note: 2 of 4 Hutchinson estimates of Tr(H_l) were negative")
    assert bl.selection_notes({**report, "gbops": 0.98 * target, "proxy": {}}, target) == []


def _trace_network(model: nn.Module, images) -> tuple[nn.Module, dict]:
    """The network the hessian proxy takes its traces on, built here by hand on a copy of the model: eval and "fp"
    mode, every quantized layer's input clamped to its largest candidate's grid, [Qn s - o, Qp s - o] (o: the
    offset grid's 3/8). Returns (the copy, name -> each layer's input before its clamp) after one forward."""
    model = copy.deepcopy(model).eval()
    mm.set_mode(model, "fp")
    xs = {}

    def clamp(m, inp):
        top = m.act.bits.index(max(m.act.bits))
        qn, qp = mm.lsq_range(m.act.bits[top], m.act.signed)
        s = mm.positive(m.act.step.detach()[top]).item()
        xs[m.name] = inp[0]
        return (inp[0].clamp(qn * s - m.act.offset, qp * s - m.act.offset),)

    for m in mm.quant_layers(model):
        m.register_forward_pre_hook(clamp)
    with torch.no_grad():
        model(images)
    return model, xs


def _errors_by_hand(model: nn.Module, images) -> torch.Tensor:
    """(L, N) mean((x - act(x))^2) of each searched layer's own quantizer module in "branch" mode at each
    candidate, x the layer's input in _trace_network."""
    model, xs = _trace_network(model, images)
    errors = []
    for m in mm.searched_layers(model):
        row = []
        for i in range(len(m.act.bits)):
            m.act.mode, m.act.branch = "branch", i
            with torch.no_grad():
                row.append((xs[m.name] - m.act(xs[m.name])).double().pow(2).mean().item())
        errors.append(row)
    return torch.tensor(errors, dtype=torch.float64)


def _quantizer_inputs_under_the_clamp(model: nn.Module) -> dict:
    """name -> (lowest, highest) value that each quantized layer's quantizer receives under clamp_to_top_branch's
    hooks when the layer is fed a ramp from -1e4 to 1e4."""
    seen = {}
    handles = bl.clamp_to_top_branch(model)
    mm.set_mode(model, "fp")
    for m in mm.quant_layers(model):
        channels = m.weight.shape[1] * m.op.groups
        shape = (1, channels) if m.op.kind == "linear" else (1, channels, 5, 5)
        ramp = torch.linspace(-1e4, 1e4, math.prod(shape)).reshape(shape)

        def record(mod, inp, name=m.name):
            seen[name] = (inp[0].min().item(), inp[0].max().item())

        h = m.act.register_forward_pre_hook(record)
        with torch.no_grad():
            m(ramp)
        h.remove()
    for h in handles:
        h.remove()
    return seen


def _grid_ends(m: mm.QuantLayer) -> tuple[float, float]:
    """[Qn s - o, Qp s - o] of a layer's largest candidate, by formula."""
    top = m.act.bits.index(max(m.act.bits))
    qn, qp = mm.lsq_range(m.act.bits[top], m.act.signed)
    s = mm.positive(m.act.step.detach()[top]).item()
    return qn * s - m.act.offset, qp * s - m.act.offset


def _hardswish_net():
    """conv [fixed] -> hardswish -> conv -> hardswish -> conv -> ReLU -> pool -> linear [fixed], patched at
    A8/4/3 and initialised: the two searched convs take hardswish's outputs, on the offset grid. Their A8 steps are
    cut 20-fold, so that the largest candidate's clamp cuts the first one's input, and so the second one's."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    mm.patch_model(model, [8, 4, 3], 4, bops_image_size=8)
    mm.init_quantizers(model, 2 * torch.randn(8, 3, 8, 8))
    for m in mm.searched_layers(model):
        m.act.step.data[0] /= 20
    return model


def test_hessian_errors_and_clamps_are_the_quantizers_own_on_the_offset_grid():
    """On hardswish-fed layers (the offset grid, Q(x + 3/8) - 3/8): the proxy's error at each candidate equals the
    error of the layer's own MultiBranchQuantizer module, on the layer's input in the network the traces are taken
    on (by hand: every input clamped to its largest candidate's grid, [-3/8, Qp s - 3/8] here); the scores are
    1/2 Tr(G_l) times those errors, batch k's traces drawn from seed + k; the trace network's clamp lets through
    exactly that range."""
    model = _hardswish_net()
    layers = mm.searched_layers(model)
    assert [m.act.offset for m in layers] == [0.375, 0.375] and not any(m.act.signed for m in layers)
    x = 2 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    # a test that can fail: the clamp cuts the first searched layer's input, and hardswish's negatives reach it
    _, xs = _trace_network(model, x)
    lo, hi = _grid_ends(layers[0])
    assert lo == -0.375 and (xs[layers[0].name] > hi).any() and (xs[layers[0].name] < 0).any()
    want = _errors_by_hand(model, x)
    torch.testing.assert_close(bl.quantization_errors(model, x), want, rtol=1e-5, atol=0)
    gn = bl.meta_state_traces(model, x, y, 2, 0, gauss_newton=True)
    assert (gn > 0).all()
    scores = bl.proxy_scores(model, [(x, y)], "hessian", probes=2)
    torch.testing.assert_close(scores, 0.5 * gn[:, None] * want, rtol=1e-5, atol=0)
    # two batches: batch k draws its labels from seed + k, so the second's Gauss-Newton estimate is its own
    gn2 = [bl.meta_state_traces(model, x, y, 2, seed, gauss_newton=True) for seed in (5, 6)]
    assert not torch.equal(*gn2)
    scores = bl.proxy_scores(model, [(x, y), (x, y)], "hessian", probes=2, seed=5)
    torch.testing.assert_close(scores, 0.25 * (gn2[0] + gn2[1])[:, None] * want, rtol=1e-5, atol=0)
    ranges = _quantizer_inputs_under_the_clamp(model)
    for m in mm.quant_layers(model):
        assert ranges[m.name] == pytest.approx(_grid_ends(m), rel=1e-6, abs=1e-7), m.name


def test_hessian_errors_are_the_quantizers_own_on_mobilenet_v3_large():
    """MobileNet-v3-large with the default (the authors') quantizers: on every one of the 25 searched layers on the
    offset grid, and every other, the error baselines.py scores with is the quantizer module's own, on the
    trace network's input; every layer's clamp there is its largest candidate's grid."""
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.mobilenet_v3_large(num_classes=10), [8, 4, 3], 4, bops_image_size=64)
    mm.init_quantizers(model, torch.randn(4, 3, 64, 64))
    layers = mm.searched_layers(model)
    offset = [j for j, m in enumerate(layers) if m.act.offset == 0.375]
    assert len(offset) == 25
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = bl.quantization_errors(model, x)
    want = _errors_by_hand(model, x)
    assert (want[offset] > 0).all()
    torch.testing.assert_close(got[offset], want[offset], rtol=1e-5, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    ranges = _quantizer_inputs_under_the_clamp(model)
    for m in mm.quant_layers(model):
        assert ranges[m.name] == pytest.approx(_grid_ends(m), rel=1e-6, abs=1e-7), m.name


def test_gauss_newton_traces_refuse_train_mode_bn():
    """The Gauss-Newton estimate takes each image's gradient apart, which train-mode BN would mix: refused."""
    model = two_layer_model(4, mm.QuantLayer)
    model.insert(1, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="BN layer in eval mode"):
        bl.gauss_newton_traces(model.train(), torch.randn(2, 3, 8, 8), 1)
    assert bl.gauss_newton_traces(model.eval(), torch.randn(2, 3, 8, 8), 1).shape == (2,)


def test_proxy_scores_by_hand(meta):
    """On the meta-state: sensitivity is the rise in loss with one layer lowered (by hand on a copy);
    hessian is 1/2 Tr(H_l) * MSE_l,i, so within a layer its ratios are those of the quantization errors."""
    args, model, _ = meta
    model = copy.deepcopy(model)
    x, y = bl.proxy_batches(args, 1, 0)[0]
    # small: the Hessian costs a double backward per layer
    x, y = x[:4], y[:4]
    layers = mm.searched_layers(model)
    modes = [(m.act.mode, m.act.branch, m.weight_quant.enabled) for m in layers]
    sens = bl.proxy_scores(model, [(x, y)], "sensitivity")
    assert sens.shape == (19, 3) and (sens[:, 0] == 0).all() and sens.abs().sum() > 0  # A8 is the reference
    ref = copy.deepcopy(model).eval()
    mm.set_mode(ref, "meta", 0, quant_weights=False)
    with torch.no_grad():
        base = F.cross_entropy(ref(x), y).item()
        mm.searched_layers(ref)[5].act.branch = 2
        rise = F.cross_entropy(ref(x), y).item() - base
    assert sens[5, 2].item() == pytest.approx(rise, rel=1e-5, abs=1e-7)
    assert model.training and [(m.act.mode, m.act.branch, m.weight_quant.enabled) for m in layers] == modes

    traces: list = []
    hess = bl.proxy_scores(model, [(x, y)], "hessian", probes=1, traces_out=traces)
    # traces_out: the raw Hutchinson estimates, those of meta_state_traces
    assert len(traces) == 1 and torch.equal(traces[0], bl.meta_state_traces(model, x, y, 1, 0))
    gn = bl.meta_state_traces(model, x, y, 1, 0, gauss_newton=True)
    assert (gn > 0).all()
    # 1/2 Tr(G) times a mean square: never negative
    assert (hess > 0).all()
    assert (hess[:, 0] < hess[:, 1]).all() and (hess[:, 1] < hess[:, 2]).all()  # A8, A4, A2
    # the errors: each layer's own quantizer module on its input in the trace network, both built by hand
    mse = _errors_by_hand(model, x)
    assert (mse[:, 0] < mse[:, 1]).all() and (mse[:, 1] < mse[:, 2]).all()
    torch.testing.assert_close(hess, 0.5 * gn[:, None] * mse, rtol=1e-5, atol=0)
    # two batches: batch k draws its probes and labels from seed + k, so the second's estimates are its own
    traces = []
    hess2 = bl.proxy_scores(model, [(x, y), (x, y)], "hessian", probes=1, seed=5, traces_out=traces)
    assert torch.equal(traces[1], bl.meta_state_traces(model, x, y, 1, 6)) and not torch.equal(*traces)
    gn2 = [bl.meta_state_traces(model, x, y, 1, seed, gauss_newton=True) for seed in (5, 6)]
    torch.testing.assert_close(hess2, 0.25 * (gn2[0] + gn2[1])[:, None] * mse, rtol=1e-5, atol=0)


def test_twice_differentiable_hard_activations():
    """hardsigmoid/hardswish: the same values and first derivatives in their clamp form, and a second
    derivative where PyTorch's own kernels have none; the modules' forward is restored."""
    x = torch.linspace(-5, 5, 41, dtype=torch.float64, requires_grad=True)  # includes the kinks -3 and 3
    model = nn.Sequential(nn.Hardswish(), nn.Hardsigmoid())
    want = model(x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    with bl.twice_differentiable(model):
        got = model(x)
        (g,) = torch.autograd.grad(got.sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.allclose(got, want, atol=1e-15) and torch.allclose(g, g_want, atol=1e-15)
    assert h.abs().sum() > 0
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)


def test_proxy_batches_are_fixed_and_disturb_nothing(meta):
    """proxy_batches: the same batches for the same seed, another permutation for another, no global RNG drawn."""
    args = meta[0]
    rng, py = torch.get_rng_state(), random.getstate()
    a, b = bl.proxy_batches(args, 2, 0), bl.proxy_batches(args, 2, 0)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    assert len(a) == 2 and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    assert a[0][0].shape == (16, 3, 32, 32)
    # another seed, another permutation
    assert not torch.equal(bl.proxy_batches(args, 1, 1)[0][0], a[0][0])
    assert len(bl.proxy_batches(args, 99, 0)) == 4  # 64 images in batches of 16


# ---------------------------------------------------------------------------------------
# Each method on the reference run's meta-state, and its bits file
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", bl.METHODS)
def test_each_method_on_the_meta_state(meta, tmp_path, method):
    """Each method's selection fits the target (Eq. 6) and its bits file has metamix's bits.json layout."""
    args, model, _ = meta
    model = copy.deepcopy(model)
    branches, extra = bl.select(model, args, method, 28.0, seed=3, batches=1, probes=1)
    report = bl.baseline_report(model, args, method, 28.0, branches, extra)
    assert report["selection"] == method and report["target_gbops"] == 28.0
    assert report["gbops"] == pytest.approx(mm.branches_gbops(model, branches)) and report["gbops"] <= 28 + 1e-9
    searched = [r for r in report["layers"] if not r["fixed"]]
    assert len(searched) == 19 and [r["name"] for r in searched] == [m.name for m in mm.searched_layers(model)]
    assert [(r["a_bits"], r["w_bits"]) for r in searched] == [[(8, 4), (4, 4), (2, 4)][i] for i in branches]
    # the alphas are not this selection's
    assert all(r["probs"] is None for r in report["layers"])
    if method in bl.PROXIES:
        proxy = {"batches": 1, "probes": None, "seed": 3}
        if method == "hessian":
            # the raw Hutchinson estimates, one per layer and batch, counted where negative; their mean per row
            raw = torch.stack([bl.meta_state_traces(model, *b, 1, 3) for b in bl.proxy_batches(args, 1, 3)])
            proxy.update(probes=1, negative_hutchinson_traces=int((raw < 0).sum()), hutchinson_traces=19)
            assert [r["hutchinson_trace"] for r in searched] == raw.mean(0).tolist()
            assert all(min(r["scores"]) > 0 for r in searched)
        assert report["proxy"] == proxy
        assert all(len(r["scores"]) == 3 and all(math.isfinite(v) for v in r["scores"]) for r in searched)
        # the selection is the knapsack's optimum of those scores, under the exact BOPs
        costs, fixed = bl.bops_costs(model)
        best = bl.mckp_exact([r["scores"] for r in searched], costs, bl.budget_bops(28, fixed))
        assert sum(r["scores"][i] for r, i in zip(searched, best)) == sum(
            r["scores"][i] for r, i in zip(searched, branches)
        )
        if method == "sensitivity":
            assert all(r["scores"][0] == 0 for r in searched)
    else:
        assert all("scores" not in r for r in searched) and "proxy" not in report
    if method == "uniform":
        assert {r["a_bits"] for r in searched} == {2}  # A4 is 34.7 GBOPs, over 28
    if method == "random":
        assert report["seed"] == 3 and branches == bl.random_selection(model, 28.0, 3)
    # the file metamix.py --bits-from reads back as the same selection
    f = tmp_path / "bits.json"
    f.write_text(json.dumps(report, indent=1))
    assert mm.read_bits_from(copy.deepcopy(model), argparse.Namespace(bits_from=str(f), target_gbops=28.0)) == branches


def test_train_command_repeats_the_runs_own_flags():
    """Every flag that differs from its default (--lam: the arch's), lists comma-joined, store_true bare; not where
    that run wrote or started from; the target exactly; ablations.py for a run with an ablation's setting. Read
    back, it gives that run's values."""
    a = mm.resolve_args(
        ablations.get_args_parser().parse_args(
            [
                "--arch",
                "mobilenet_v2",
                "--search-steps",
                "0",
                "--data",
                "synthetic:64,32,10",
                "--bits",
                "8,4,3",
                "--unfixed",
                "--amp",
                "--epochs",
                "5",
                "--lr",
                "0.02",
                "--seed",
                "3",
                "--alpha-optimizer",
                "adam",
                "--output-dir",
                "runs/m",
                "--optimizer",
                "sgd",
            ]
        )
    )
    run_args = {**vars(a), "target_gbops": 5.12, "pretrained": "/weights/mbv2.pth"}
    cmd = shlex.split(bl.train_command("runs/m", run_args, "runs/m/bits_random.json", "random", 4.123456789012345))
    # --unfixed is an ablation's setting: ablations.py
    assert cmd[:2] == ["python", os.path.relpath(inspect.getfile(ablations))]
    assert cmd[2:8] == [
        "--resume",
        "runs/m/meta_state.pth",
        "--bits-from",
        "runs/m/bits_random.json",
        "--output-dir",
        "runs/m-random",
    ]
    assert cmd[-2:] == ["--target-gbops", "4.123456789012345"]
    text = " ".join(cmd)
    assert "--unfixed" in cmd and "--amp" in cmd and "--bits 8,4,3" in text and "--arch mobilenet_v2" in text
    for flag in (
        "--pretrained",
        "--optimizer",
        "--w-bits",
        "--no-budget-repair",
        "--search-epochs",
        # mobilenet_v2's own lambda, 1
        "--lam",
        "--first-last-bits",
        "--plain-lsq",
    ):
        # not repeated, or at its default
        assert flag not in cmd, flag
    back = vars(mm.resolve_args(ablations.get_args_parser().parse_args(cmd[2:])))
    for key, v in run_args.items():
        if key not in bl.NOT_REPEATED:
            assert json.dumps(back[key]) == json.dumps(v), key
    assert back["target_gbops"] == 4.123456789012345
    # metamix.py for a run without an ablation's setting; a lambda not the arch's is one (resnet18's is 0.4)
    plain = vars(mm.resolve_args(mm.get_args_parser().parse_args(["--lr", "0.02"])))
    cmd = shlex.split(bl.train_command("runs/p", plain, "b.json", "random", 33.0))
    assert cmd[1] == os.path.relpath(inspect.getfile(mm)) and "--lam" not in cmd and "--lr" in cmd
    cmd = shlex.split(bl.train_command("runs/p", {**plain, "lam": 0.7}, "b.json", "random", 33.0))
    assert cmd[1] == os.path.relpath(inspect.getfile(ablations)) and " --lam 0.7 " in shlex.join(cmd)


# ---------------------------------------------------------------------------------------
# The workflow: one meta-state, every selection
# ---------------------------------------------------------------------------------------


def test_meta_state_with_its_own_bits_reproduces_the_run(ref_run, tmp_path):
    """metamix.py --resume RUN/meta_state.pth --bits-from RUN/bits.json (the run's flags) retraces the run's weight
    training bit for bit: the same model tensors and the same metrics in epochs 3 and 4; its bits.json names the file
    its bits came from and reports no search."""
    out = tmp_path / "again"
    assert (
        main_in_process(
            *REF, "--resume", ref_run / "meta_state.pth", "--bits-from", ref_run / "bits.json", "--output-dir", out
        )
        == 0
    )
    a, b = load_ck(ref_run / "checkpoint.pth")["model"], load_ck(out / "checkpoint.pth")["model"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
    assert not differ, f"{len(differ)} model tensors differ, e.g. {differ[:5]}"
    want, got = read_log(ref_run), read_log(out)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    assert [{k: r[k] for k in METRICS} for r in got[2:]] == [{k: r[k] for k in METRICS} for r in want[2:]]
    ref_bits, bits = json.loads((ref_run / "bits.json").read_text()), json.loads((out / "bits.json").read_text())
    assert [(r["name"], r["a_bits"]) for r in bits["layers"]] == [(r["name"], r["a_bits"]) for r in ref_bits["layers"]]
    # its own provenance: the file its bits came from, and no search (the meta-state's run made one)
    assert bits["selection"] == f"bits-from {ref_run / 'bits.json'}"
    assert ref_bits["search"]["steps"] > 0 and bits["search"] is None


def test_random_baseline_end_to_end_through_the_printed_command(ref_run, tmp_path, call):
    """baselines.py writes RUN/bits_random.json and prints the training command; run as printed, it trains those
    bits from the meta-state (epochs 1-2 are the meta-state's, 3-4 weight training)."""
    run = linked_run(ref_run, tmp_path / "run")
    p = call(bl.main, run, "--method", "random", "--seed", "5")
    assert p.returncode == 0, p.stderr
    bits_file = run / "bits_random.json"
    want = json.loads(bits_file.read_text())
    assert want["selection"] == "random" and want["seed"] == 5 and want["target_gbops"] == 33.0
    assert want["meta_state"] == str(run / "meta_state.pth")
    assert f"random: {want['gbops']:.3f} GBOPs vs target 33.000; wrote {bits_file}" in p.stdout
    cmd = shlex.split(p.stdout.strip().splitlines()[-1])
    assert cmd[0] == "python" and (Path.cwd() / cmd[1]).resolve() == REPO / "metamix.py"
    assert cmd[2:8] == [
        "--resume",
        str(run / "meta_state.pth"),
        "--bits-from",
        str(bits_file),
        "--output-dir",
        f"{run}-random",
    ]
    # the run's seed is metamix's default; --seed 5 was the selection's
    assert "--seed" not in cmd
    run_cli(*cmd[2:])
    new = Path(f"{run}-random")
    got = json.loads((new / "bits.json").read_text())
    assert [(r["name"], r["a_bits"], r["w_bits"]) for r in got["layers"]] == [
        (r["name"], r["a_bits"], r["w_bits"]) for r in want["layers"]
    ]
    assert got["gbops"] == want["gbops"] and got["selection"] == f"bits-from {bits_file}"
    log = read_log(new)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and log[:2] == read_log(ref_run)[:2]
    assert log[-1]["gbops"] == pytest.approx(want["gbops"]) and log[-1]["phase"] == "weight_training"
    # the run's folder gained the selection
    assert sorted(os.listdir(run)) == ["bits_random.json", "meta_state.pth"]


# resnet18's searched layers: its Conv2d and Linear modules but the first and the last (module order is forward order)
SEARCHED = [n for n, m in torchvision.models.resnet18().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]


def _rows(a_bits=4, **pairs_):
    """A bits.json: every searched layer at A`a_bits`/W4, the first and last A8/W8; `pairs_` {name (dots as __):
    [a_bits, w_bits]} or None (no row)."""
    rows = [{"name": "conv1", "a_bits": 8, "w_bits": 8}, {"name": "fc", "a_bits": 8, "w_bits": 8}]
    for name in SEARCHED:
        a, w = pairs_.get(name.replace(".", "__"), (a_bits, 4)) or (None, None)
        if a is not None:
            rows.append({"name": name, "a_bits": a, "w_bits": w})
    return {"layers": rows}


# what every problem but the budget's is: the file is not a bits.json of this model
NOT_OURS = "not a bits.json of this model's layers and candidates"


@pytest.mark.parametrize(
    "content, needles",
    [
        (_rows(layer3__1__conv2=None), [NOT_OURS, "(KeyError('layer3.1.conv2'))"]),
        (_rows(layer2__0__conv1=(3, 4)), [NOT_OURS, "(ValueError('(3, 4) is not in list'))"]),
        (_rows(8), ["the configuration costs 61.811 GBOPs", "over --target-gbops 33.000"]),
        ("not json", [NOT_OURS, "(JSONDecodeError("]),
        ([1, 2], [NOT_OURS, "(TypeError("]),
        ({name: 4 for name in SEARCHED}, [NOT_OURS, "(KeyError('layers'))"]),
        (_rows(layer3__0__conv2=(4, 8)), [NOT_OURS, "(ValueError('(4, 8) is not in list'))"]),
        (_rows(layer4__1__conv1=(4, 2)), [NOT_OURS, "(ValueError('(4, 2) is not in list'))"]),
        ({"layers": [{"name": n, "a_bits": 4} for n in SEARCHED]}, [NOT_OURS, "(KeyError('w_bits'))"]),
        (_rows(layer1__0__conv1=(True, 4)), [NOT_OURS, "(ValueError('(True, 4) is not in list'))"]),
    ],
    ids=[
        "missing-layer",
        "bits-not-candidate",
        "over-target",
        "not-json",
        "list",
        "layer-map",
        "w-not-the-runs",
        "bits-json-w",
        "no-w-bits",
        "bool",
    ],
)
def test_bits_from_refuses_a_bad_bits_file(meta, tmp_path, content, needles):
    """The files metamix.py --bits-from takes (read_bits_from): each problem refused in one line, at the run's
    target."""
    f = tmp_path / "bits.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(mm.BadInput) as e:
        mm.read_bits_from(copy.deepcopy(meta[1]), argparse.Namespace(bits_from=str(f), target_gbops=33.0))
    assert str(e.value).startswith(f"--bits-from {f}: ") and all(n in str(e.value) for n in needles), str(e.value)


def test_bits_from_takes_rows_and_refuses_before_the_output_dir(meta, ref_run, tmp_path, capsys):
    """A bits.json's rows at the run's W, set as the selection; a bad file is refused before anything is written."""
    names = [m.name for m in mm.searched_layers(meta[1])]
    assert names == SEARCHED
    f = tmp_path / "bits.json"
    f.write_text(json.dumps(_rows(2, **{names[3].replace(".", "__"): (8, 4)})))
    model = copy.deepcopy(meta[1])
    want = [2, 2, 2, 0] + [2] * 15
    assert mm.read_bits_from(model, argparse.Namespace(bits_from=str(f), target_gbops=33.0)) == want
    assert [m.selected_branch for m in mm.searched_layers(model)] == want
    f.write_text(json.dumps(_rows(8)))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main_in_process(*REF, "--resume", ref_run / "meta_state.pth", "--bits-from", f, "--output-dir", out) == 2
    p = subprocess.CompletedProcess([], 2, *capsys.readouterr())
    error_line(p, f"metamix: error: --bits-from {f}: the configuration costs 61.811 GBOPs")
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------


def test_check_target(meta):
    """A target outside the feasible range, or under every uniform budget for uniform, is a BadInput naming them."""
    model = meta[1]
    with pytest.raises(
        mm.BadInput,
        match=r"--method uniform: no uniform configuration fits --target-gbops 21 "
        r"\(uniform budgets in GBOPs: A2 21\.118, A4 34\.682, A8 61\.811\)",
    ):
        bl.check_target(model, "uniform", 21.0)
    for method in ("random", "hessian"):
        with pytest.raises(mm.BadInput, match=r"--target-gbops 21 is outside the feasible range \[21\.118, 61\.811\]"):
            bl.check_target(model, method, 21.0)
    with pytest.raises(mm.BadInput, match=r"--target-gbops 70 is outside the feasible range \[21\.118, 61\.811\]"):
        bl.check_target(model, "uniform", 70.0)
    bl.check_target(model, "uniform", 21.118)


def test_check_meta_state_refuses_a_checkpoint_after_bit_selection():
    """runs.check_meta_state, which baselines.py and figure9.py use: a meta-state is at the phase boundary."""
    later = {"selected": [0] * 19, "epoch": 4, "args": {"search_epochs": 2}}
    with pytest.raises(mm.BadInput, match="is not a meta-state .* at epoch 4, bits selected"):
        runs.check_meta_state(later, "x/checkpoint.pth")
    runs.check_meta_state({"selected": None, "epoch": 2, "args": {"search_epochs": 2}}, "x/meta_state.pth")
    with pytest.raises(
        mm.BadInput, match=r"is not a meta-state \(the end of bit selection, epoch 2\): it is at epoch 1$"
    ):
        runs.check_meta_state({"selected": None, "epoch": 1, "args": {"search_epochs": 2}}, "x/checkpoint.pth")


def test_bad_input(ref_run, tmp_path, call):
    """Bad input (no run, no meta-state, a run of pairs, a later checkpoint, a bad target): one line, exit 2."""
    run = linked_run(ref_run, tmp_path / "run")
    ck = load_ck(ref_run / "meta_state.pth")
    pair = tmp_path / "pair"
    pair.mkdir()
    torch.save(
        {"format": mm.CHECKPOINT_FORMAT, "args": {**ck["args"], "w_bits": [8, 4, 2]}, "selected": None, "epoch": 2},
        pair / "meta_state.pth",
    )
    later = tmp_path / "later"
    later.mkdir()
    # a checkpoint after bits were selected
    (later / "meta_state.pth").symlink_to(ref_run / "checkpoint.pth")
    cases = [
        ([tmp_path / "nowhere", "--method", "random"], ["nowhere: no such folder"]),
        ([tmp_path, "--method", "random"], [f"{tmp_path} has no meta_state.pth"]),
        ([run, "--method", "greedy"], ["argument --method: invalid choice: 'greedy'", "sensitivity"]),
        ([run, "--method", "hessian", "--batches", "0"], ["--batches", "0 must be at least 1"]),
        ([run, "--method", "random", "--out", tmp_path / "no" / "b.json"], ["--out", "its folder does not exist"]),
        (
            [pair, "--method", "uniform"],
            ["a run of (A, W) pairs (--w-bits 8,4,2)", "not implemented for pairs", "--bits-from"],
        ),
        ([later, "--method", "random"], ["is not a meta-state", "at epoch 4, bits selected"]),
        (
            [run, "--method", "uniform", "--target-gbops", "21"],
            ["no uniform configuration fits", "A2 21.118, A4 34.682, A8 61.811"],
        ),
    ]
    for argv, needles in cases:
        before = {d: files_of(d) for d in (run, pair, later)}
        p = call(bl.main, *argv)
        assert error_line(p, *needles).startswith("baselines: error: ") and p.returncode == 2, argv
        assert {d: files_of(d) for d in (run, pair, later)} == before and not (tmp_path / "no").exists()


def test_bad_input_from_the_command_line(tmp_path, capsys, monkeypatch):
    """`python baselines.py ...` (the script as __main__, run here: no interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", ["baselines.py", str(tmp_path), "--method", "random"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "baselines.py"), run_name="__main__")
    p = subprocess.CompletedProcess(sys.argv, e.value.code, *capsys.readouterr())
    assert error_line(p, f"baselines: error: {tmp_path} has no meta_state.pth") and p.returncode == 2
    assert not any(tmp_path.iterdir())
