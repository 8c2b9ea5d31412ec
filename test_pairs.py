"""Tests for pairs.py, the supplement's (A, W) pairs beside metamix.py. Run: python -m pytest -q test_pairs.py"""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import metamix as mm
import runs
import pairs
from conftest import (
    TINY,
    error_line,
    load_ck,
    main_in_process,
    read_log,
    run_cli,
    two_layer_model,
)

A_BITS = [8, 4, 2]
W_LIST = [8, 4, 2]


def _pair_layer(kind: str, w_bits=W_LIST, dtype=torch.float64):
    """(PairQuantLayer over A_BITS x w_bits, the layer it wraps, an input) for a conv, grouped conv or linear layer."""
    torch.manual_seed(3)
    if kind == "linear":
        layer = nn.Linear(12, 5)
        x = torch.randn(3, 12, dtype=dtype)
    else:
        layer = nn.Conv2d(
            4,
            6 if kind == "conv" else 4,
            3,
            stride=2,
            padding=1,
            groups=1 if kind == "conv" else 4,
            bias=kind == "conv",
        )
        x = torch.randn(2, 4, 7, 7, dtype=dtype)
    q = pairs.PairQuantLayer(layer.to(dtype), A_BITS, w_bits, "l").to(dtype)
    return q, layer, x


@pytest.mark.parametrize("fused", [False, True], ids=["readable", "fused"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("kind", ["conv", "grouped", "linear"])
@pytest.mark.parametrize("mode", ["branch", "search"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("offset", [0.0, 0.375], ids=["", "offset"])
def test_pair_layer_equals_composed_autograd(kind, mode, x_grad, fused, frozen, offset):
    """Value and every gradient in float64, both forms, against composed autograd written from the formula:
    search: sum over (a, w) of p_aw * op(lsq_quantize(x + o, s_a) - o, lsq_quantize(W, s_w)) + b, p = softmax
    over the 9 pairs, W's steps per output channel on the narrow range; branch (bit-meta, weight training): the
    one pair (A4, W2), candidate index 1 * 3 + 2 = 5. `frozen`: the weights, their steps and the bias do not
    learn, as in the search step (the fused search then quantizes each A once)."""
    q, layer, x = _pair_layer(kind)
    q.fused = fused
    q.act.offset = offset
    assert q.candidates == [(a, w) for a in A_BITS for w in W_LIST]
    assert q.act.alpha.shape == (9,)
    q.set_state(mode, 5)
    assert (q.act.branch, q.w_branch) == (1, 2)
    assert q.weight_quant is q.weight_quants[2]
    assert all(wq.enabled for wq in q.weight_quants)
    with torch.no_grad():
        signs = torch.tensor([1, -1.0] * 4 + [1])
        q.act.alpha.copy_(torch.linspace(-1, 1, 9) ** 2 * signs)
    q.set_state("search", 5)
    q(x)  # LSQ init of every step
    q.set_state(mode, 5)
    # distinct steps, so that a mixed-up step cannot go unnoticed
    with torch.no_grad():
        for j, wq in enumerate(q.weight_quants):
            wq.step.mul_(1 + 0.1 * j)
    params = (
        [q.act.step, q.act.alpha, q.weight]
        + [wq.step for wq in q.weight_quants]
        + ([q.bias] if q.bias is not None else [])
    )
    if frozen:
        for p in params[2:]:
            p.requires_grad_(False)
        params = params[:2]
    x1 = x.clone().requires_grad_(x_grad)
    y1 = q(x1)
    up = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x1] * x_grad + params, up, allow_unused=True)

    x2 = x.clone().requires_grad_(x_grad)
    per_sample = x2[0].numel()
    signed = bool(x.min() < 0) and not offset

    def op(xa, w):
        if kind == "linear":
            return F.linear(xa, w)
        return F.conv2d(xa, w, None, 2, 1, 1, layer.groups)

    def qa(i):
        g = mm.lsq_grad_scale(per_sample, A_BITS[i], signed)
        return mm.lsq_quantize(x2 + offset, q.act.step[i], A_BITS[i], signed, g) - offset

    # grad scale 1/sqrt(N Qp), N = weights per output channel
    def qw(j):
        return mm.lsq_quantize(q.weight, q.weight_quants[j].step, W_LIST[j], True, narrow=True)

    if mode == "search":
        p = F.softmax(q.act.alpha, 0)
        # Supplement, Table 7: every (A, W) pair weighted by its own probability
        y2 = 0
        for i in range(3):
            for j in range(3):
                y2 = y2 + p[i * 3 + j] * op(qa(i), qw(j))
    else:
        y2 = op(qa(1), qw(2))
    if q.bias is not None:
        bias = q.bias
        if kind != "linear":
            bias = bias.view(-1, 1, 1)
        y2 = y2 + bias
    g2 = torch.autograd.grad(y2, [x2] * x_grad + params, up, allow_unused=True)
    assert torch.allclose(y1, y2, atol=1e-10)
    for a, b in zip(g1, g2):
        # branch mode: other steps get no (or zero) gradient
        if b is None or (mode == "branch" and not b.any()):
            assert a is None or not a.any()
        else:
            assert a is not None, (a, b)
            assert torch.allclose(a, b, atol=1e-9), (a, b)
    if mode == "search":
        # every step, alpha, W, bias learns
        assert all(g is not None for g in g1[x_grad:])
        assert all(g.abs().sum() > 0 for g in g1[x_grad:])


class _CountConvs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("w_bits, convs", [(W_LIST, 3), ([4, 2], 2), ([4], 1)])
def test_pair_search_runs_one_convolution_per_weight_width(w_bits, convs, frozen):
    """By linearity, 9 pairs cost one convolution per W (3), forward and backward, not one per pair (9). With
    the weights frozen (the search step), each activation is quantized once: 3 divisions, not 3 per W."""
    q = pairs.PairQuantLayer(nn.Conv2d(3, 4, 3), A_BITS, w_bits, "c")
    q.fused = True
    q.set_state("search")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    q(x)  # init
    if frozen:
        for p in [q.weight, q.bias, *(wq.step for wq in q.weight_quants)]:
            p.requires_grad_(False)
    with _CountConvs() as c:
        y = q(x)
    assert c.calls.get("convolution") == convs
    # x / s_a; the weight's codes divide too (one per W)
    divs = c.calls.get("div", 0)
    if frozen:
        assert divs == len(A_BITS) + len(w_bits)
    else:
        assert divs == len(A_BITS) * len(w_bits) + len(w_bits)
    with _CountConvs() as c:
        y.square().sum().backward()
    assert c.calls.get("convolution_backward") == convs
    assert "convolution" not in c.calls


def test_pair_bops_and_regularizer_by_hand_two_layers():
    """Eq. 4 and Eq. 6 with a * w * OPs per pair, on a model with two searched layers, against hand values."""
    # candidates (4,4) (4,2) (2,4) (2,2): 16, 8, 8, 4 bit-ops per MAC
    model = two_layer_model([4, 2], pairs.PairQuantLayer)
    layers = mm.searched_layers(model)
    macs = [4 * 4 * 9 * 64, 8 * 4 * 64]  # 9216, 2048
    # first conv and the linear at A8/W8
    c_fixed = (3 * 4 * 9 * 64 + 8 * 2) * 64 / 1e9
    assert [m.macs for m in layers] == macs
    assert mm.c_fixed_of(model) == pytest.approx(c_fixed)
    product = [(4, 4), (4, 2), (2, 4), (2, 2)]
    assert [m.candidates for m in layers] == [product, product]
    cost = [16, 8, 8, 4]
    assert mm.candidate_costs(model) == cost
    lo, hi = mm.gbops_range(model)
    assert lo == pytest.approx((9216 + 2048) * 4 / 1e9 + c_fixed)
    assert hi == pytest.approx((9216 + 2048) * 16 / 1e9 + c_fixed)
    # argmax: layer 0 -> (2,4), layer 1 -> (4,2): 9216*8 + 2048*8
    alphas = [[0.1, 0.2, 0.9, -0.4], [0.0, 1.2, 0.3, 0.5]]
    a = torch.tensor(alphas, requires_grad=True)
    target = 0.05
    reg, gb = mm.bops_regularizer(a, cost, macs, c_fixed, target)
    expect = (9216 * 8 + 2048 * 8) / 1e9 + c_fixed
    assert gb.item() == pytest.approx(expect)
    assert reg.item() == pytest.approx(abs(expect - target))
    reg.backward()
    sign = 1.0 if expect > target else -1.0
    for layer in range(2):
        e = [math.exp(v) for v in a[layer].tolist()]
        p = [v / sum(e) for v in e]
        mean_c = sum(pi * c for pi, c in zip(p, cost))
        # d|.|/d alpha_lj = sign * macs_l / 1e9 * p_j * (c_j - sum_k p_k c_k)
        for j in range(4):
            want = sign * macs[layer] / 1e9 * p[j] * (cost[j] - mean_c)
            assert a.grad[layer, j].item() == pytest.approx(want, rel=1e-5)
    # bit_search_step on the model reports the same argmax GBOPs; the selection agrees
    with torch.no_grad():
        for al, row in zip(mm.alphas_of(model), a.detach()):
            al.copy_(row)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 0, 1])
    mm.init_quantizers(model, x)
    model.train()
    loss, gb2 = mm.bit_search_step(model, x, y, 0.0, target)
    assert gb2.item() == pytest.approx(expect)
    branches, gb3, repaired = mm.start_weight_training(model, 1.0)
    assert branches == [2, 1]
    assert not repaired
    assert gb3 == pytest.approx(expect)
    selected = [m.candidates[m.selected_branch] for m in layers]
    assert selected == [(2, 4), (4, 2)]
    assert mm.config_gbops(macs, [8, 8], c_fixed) == pytest.approx(expect)


def test_pair_budget_repair_moves_to_the_next_cost_level():
    """One level down in a * w at a time; among pairs tied at that level, the most probable."""
    cost = [16, 8, 8, 4]  # (4,4) (4,2) (2,4) (2,2)
    macs = [100, 300]
    c_fixed = 0.0
    probs = [[0.4, 0.1, 0.3, 0.2], [0.7, 0.25, 0.02, 0.03]]
    # 16 * 400 = 6400. Layer 0 (16 -> 8): the more probable of (4,2) 0.1 and (2,4) 0.3 is (2,4):
    # cost (0.4 - 0.3) / (8 * 100) = 1.25e-4. Layer 1 (16 -> 8) via (4,2): (0.7 - 0.25) / (8 * 300) = 1.9e-4.
    budget = 6000 / 1e9
    assert mm.repair_to_budget(probs, [0, 0], cost, macs, c_fixed, budget) == [2, 0]
    # 4000 needs both moved: after layer 0, layer 0 (8 -> 4) costs (0.3 - 0.2) / 400 = 2.5e-4 > 1.9e-4
    out = mm.repair_to_budget(probs, [0, 0], cost, macs, c_fixed, 4000 / 1e9)
    assert out == [2, 1]
    assert 8 * 100 + 8 * 300 <= 4000


def test_one_weight_width_is_the_papers_layer_bit_for_bit(monkeypatch):
    """PairQuantLayer with one W computes exactly as the paper's QuantLayer. They differ in one choice only:
    a pair's weights are quantized from the start of bit selection; with the paper's layer's on as well, LSQ
    init and two bit-selection steps (meta and search) end with the same tensors, bit for bit."""
    orig = mm.set_mode

    def weights_quantized_but_in_fp(model, mode, branch=None, quant_weights=None):
        return orig(model, mode, branch, mode != "fp")

    monkeypatch.setattr(mm, "set_mode", weights_quantized_but_in_fp)
    results = []
    for layer_type in (mm.QuantLayer, pairs.PairQuantLayer):
        torch.manual_seed(0)
        model = mm.patch_model(
            torchvision.models.resnet18(num_classes=4), [8, 4, 2], 4, bops_image_size=32, layer_type=layer_type
        )
        mm.use_speed_path(model)
        x = torch.randn(8, 3, 32, 32)
        y = torch.arange(8) % 4
        mm.init_quantizers(model, x)
        opt = torch.optim.SGD(mm.meta_params(model), lr=0.05, momentum=0.9)
        opt_alpha = torch.optim.SGD(mm.alphas_of(model), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(2):
            mm.bit_selection_step(model, x, y, opt, opt_alpha, search=True, lam=0.4, target_gbops=30.0)
        state = model.state_dict()
        # the one W's quantizer under the paper's layer's name
        renamed = {k.replace("weight_quants.0", "weight_quant"): v for k, v in state.items()}
        results.append(renamed)
    a, b = results
    assert a.keys() == b.keys()
    assert all(same_entry(a[k], b[k]) for k in a)


def test_pair_mode_set_mode_and_weight_training():
    """A pair's weights are quantized at its W in bit-meta and search; weight training keeps the W step."""
    model = two_layer_model([4, 2], pairs.PairQuantLayer)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 0, 1])
    mm.init_quantizers(model, x)
    layers = mm.searched_layers(model)
    # every W step from init_quantizers
    assert all(wq.initialized for m in layers for wq in m.weight_quants)
    mm.set_mode(model, "meta", 1)  # (4, 2)
    for m in layers:
        assert (m.act.branch, m.w_branch, m.weight_quant.bits) == (0, 1, 2)
        assert all(wq.enabled for wq in m.weight_quants)
    assert not any(m.weight_quant.enabled for m in mm.quant_layers(model) if m.fixed)
    model.train()
    # 4 pairs in turn: every activation and weight step learns
    mm.bit_meta_step(model, x, y)
    for m in layers:
        assert (m.act.step.grad != 0).all()
        assert all(wq.step.grad is not None for wq in m.weight_quants)
        assert all(wq.step.grad.any() for wq in m.weight_quants)
        assert m.act.alpha.grad is None
    steps = [[wq.step.tolist() for wq in m.weight_quants] for m in layers]
    with torch.no_grad():
        for al in mm.alphas_of(model):
            al.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0]))  # (2, 4)
    mm.start_weight_training(model, mm.gbops_range(model)[1])
    for m, s in zip(layers, steps):
        assert m.selected_branch == 2
        assert (m.act.branch, m.w_branch) == (1, 0)
        assert m.weight_quant.bits == 4
        # the meta-state's W steps are kept
        assert [wq.step.tolist() for wq in m.weight_quants] == s
    for m in mm.quant_layers(model):
        assert m.weight_quant.enabled
        assert m.act.mode == "branch"
    mm.set_mode(model, "fp")
    assert not any(wq.enabled for m in layers for wq in m.weight_quants)


# ---- the driver with pairs ------------------------------------------------------------------------

# half the reference run's data (2 steps an epoch): 9 candidates make each step 3 times as dear
PAIR = [*TINY, "--epochs", "3", "--data", "synthetic:32,16,10"]


def same_entry(u, v) -> bool:
    """Two entries of a state dict are equal: tensors exactly, anything else by ==."""
    if torch.is_tensor(u):
        return torch.equal(u, v)
    return u == v


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """pairs.py over the 9 pairs: 2 bit-selection epochs, 1 weight-training epoch."""
    out = tmp_path_factory.mktemp("pair") / "out"
    p = run_cli(*PAIR, "--output-dir", out, script="pairs.py")
    assert "summary:" in p.stdout
    return out, p.stdout


def test_pair_run_outputs(pair_run):
    """pairs.py's bits.json: the 9 (A, W) candidates, each layer at its own selected pair, under the target."""
    out, stdout = pair_run
    assert "W[8, 4, 2]" in stdout
    assert "/W" in stdout
    bits = json.loads((out / "bits.json").read_text())
    nine_pairs = [[a, w] for a in (8, 4, 2) for w in (8, 4, 2)]
    assert bits["candidates"] == nine_pairs
    assert bits["gbops"] <= bits["target_gbops"] + 1e-6
    searched = [r for r in bits["layers"] if not r["fixed"]]
    assert len(searched) == 19
    assert all(len(r["probs"]) == 9 for r in searched)
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 for r in searched)
    assert all(r["w_bits"] in (8, 4, 2) for r in searched)
    assert all(r["a_bits"] in (8, 4, 2) for r in searched)
    assert len({r["w_bits"] for r in searched}) > 1, "a search that never picks another W proves little here"
    macs = [r["macs"] for r in searched]
    c_fixed = sum(r["macs"] * 64 for r in bits["layers"] if r["fixed"]) / 1e9
    # Eq. 6 with pairs: each layer's OPs times its own a * w
    bops = sum(r["a_bits"] * r["w_bits"] * m for r, m in zip(searched, macs))
    assert bits["gbops"] == pytest.approx(bops / 1e9 + c_fixed)
    assert bits["avg_w_bits"] == pytest.approx(sum(r["w_bits"] for r in searched) / 19)
    assert read_log(out)[-1]["gbops"] == pytest.approx(bits["gbops"])
    # the default target with pairs: 95% of uniform A4/W4 (the paper's 33 applies to its single-W setting only)
    uniform_a4_w4 = sum(macs) * 16 / 1e9 + c_fixed
    assert bits["target_gbops"] == pytest.approx(0.95 * uniform_a4_w4)
    # each layer at its own selected pair
    args, model, ck = runs.load_run(out / "checkpoint.pth")
    assert [m.candidates[m.selected_branch] for m in mm.searched_layers(model)] == [
        (r["a_bits"], r["w_bits"]) for r in searched
    ]


def test_pair_resume_inside_bit_selection_is_exact(pair_run, tmp_path):
    """--resume auto inside bit selection reproduces the uninterrupted run of pairs exactly."""
    ref, _ = pair_run
    out = tmp_path / "out"
    assert main_in_process(*PAIR, "--output-dir", out, main=pairs.main, stop_after_epoch=1) == 0
    assert load_ck(out / "checkpoint.pth")["epoch"] == 1
    assert main_in_process(*PAIR, "--output-dir", out, "--resume", "auto", main=pairs.main) == 0
    a = load_ck(ref / "checkpoint.pth")["model"]
    b = load_ck(out / "checkpoint.pth")["model"]
    assert all(same_entry(a[k], b[k]) for k in a)
    ref_bits = json.loads((ref / "bits.json").read_text())
    assert json.loads((out / "bits.json").read_text()) == ref_bits
    # metamix.py cannot resume a checkpoint of pairs
    p = run_cli(*TINY, "--epochs", "3", "--output-dir", out, "--resume", "auto", check=False)
    error_line(p, "the checkpoint has --w-bits [8, 4, 2], not 4")


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--w-bits", "8,4,20"], ["--w-bits", "8,4,20", "between 2 and 16"]),
        (["--w-bits", "4,4"], ["--w-bits", "'4,4'", "distinct"]),
        (["--w-bits", "4,x"], ["--w-bits", "'4,x'"]),
        (["--act-only-epochs", "1"], ["error: --act-only-epochs", "pairs quantize the weights in every phase"]),
    ],
    ids=["w-20", "duplicate", "not-int", "act-only"],
)
def test_pair_bad_flags(call, tmp_path, flags, needles):
    """A bad --w-bits, or --act-only-epochs with pairs: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    p = call(pairs.main, *PAIR, *flags, "--output-dir", out)
    error_line(p, *needles)
    assert p.returncode == 2
    assert not out.exists()


def test_pair_candidates_feasible_range_and_default_target():
    """pairs.py's defaults: the 9 candidates, and the feasible range and default target of Eq. 6 with pairs."""
    args = mm.resolve_args(pairs.get_args_parser().parse_args([]))
    model = mm.build_model(args, 1000, pairs.PairQuantLayer)
    lo, hi = mm.check_budget(model, args)
    assert args.w_bits == [8, 4, 2]
    pairs_ = [(a, w) for a in (8, 4, 2) for w in (8, 4, 2)]
    assert all(m.candidates == pairs_ for m in mm.searched_layers(model))
    traced = mm.trace_layers(torchvision.models.resnet18(), 224)
    macs = [m for _, _, m, _ in traced]
    c_fixed = (macs[0] + macs[-1]) * 64 / 1e9
    assert lo == pytest.approx(sum(macs[1:-1]) * 4 / 1e9 + c_fixed)
    assert hi == pytest.approx(sum(macs[1:-1]) * 64 / 1e9 + c_fixed)
    uniform_a4_w4 = sum(macs[1:-1]) * 16 / 1e9 + c_fixed
    assert args.target_gbops == pytest.approx(0.95 * uniform_a4_w4)


def test_bits_from_with_pairs_in_process(tmp_path):
    """--bits-from with pairs: bits.json rows map to the pair's index, set as the selection; a map of layers, a row
    without its W, a pair that is no candidate, or a configuration over the target is refused in a sentence."""
    model = two_layer_model([4, 2], pairs.PairQuantLayer)
    names = [m.name for m in mm.searched_layers(model)]
    f = tmp_path / "b.json"

    def rows(*pairs_):
        return {"layers": [{"name": n, "a_bits": a, "w_bits": w} for n, (a, w) in zip(names, pairs_)]}

    f.write_text(json.dumps(rows((2, 4), (4, 2))))
    assert mm.read_bits_from(model, argparse.Namespace(bits_from=str(f), target_gbops=1.0)) == [2, 1]
    assert [m.selected_branch for m in mm.searched_layers(model)] == [2, 1]
    no_w = {"layers": [{"name": names[0], "a_bits": 4}, *rows((2, 4), (4, 2))["layers"][1:]]}
    not_ours = "not a bits.json of this model's layers and candidates"
    for content, needle in [
        # the {layer: [a_bits, w_bits]} map is no bits.json
        ({names[0]: [2, 4], names[1]: [4, 2]}, f"{not_ours} (KeyError('layers'))"),
        (no_w, f"{not_ours} (KeyError('w_bits'))"),
        (rows((8, 4), (4, 2)), f"{not_ours} (ValueError('(8, 4) is not in list'))"),
        (rows((4, 4), (4, 4)), "GBOPs, over --target-gbops"),
    ]:
        f.write_text(json.dumps(content))
        with pytest.raises(mm.BadInput, match=re.escape(f"--bits-from {f}: ") + ".*" + re.escape(needle)):
            mm.read_bits_from(model, argparse.Namespace(bits_from=str(f), target_gbops=1e-4))
