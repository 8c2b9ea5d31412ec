"""Tests for metamix.py. Run: python -m pytest -q test_metamix.py

Tier 1: every piece against values computed by hand or by an independent formula.
Tier 2: the real script in a subprocess on tiny synthetic data (one process, torchrun x2).
Tier 3: save, resume, compare; bad input and faults.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import metamix as mm

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------
# Tier 1: LSQ (Esser et al. 2020)
# ---------------------------------------------------------------------------------------


def slow_lsq(x, s, bits, signed):
    """LSQ forward and d/dx, d/ds element by element in plain Python floats (independent of torch ops)."""
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    out, dx, ds = [], [], []
    for v, sv in zip(x, s):
        r = v / sv
        if r < qn:
            out.append(qn * sv), dx.append(0.0), ds.append(float(qn))
        elif r > qp:
            out.append(qp * sv), dx.append(0.0), ds.append(float(qp))
        else:
            q = float(torch.round(torch.tensor(r, dtype=torch.float64)))  # round half to even, like torch
            out.append(q * sv), dx.append(1.0), ds.append(q - r)
    return out, dx, ds


def test_lsq_by_hand_unsigned_2bit():
    # bits 2 unsigned: Qn 0, Qp 3, s = 0.5: v/s = [-2, 0.6, 2.2, 7]
    x = torch.tensor([-1.0, 0.3, 1.1, 3.5], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = mm.lsq_quantize(x, s, 2, signed=False, grad_scale=0.25)
    assert y.tolist() == [0.0, 0.5, 1.0, 1.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # ds: below -> Qn = 0; inside -> round(v/s) - v/s = 1 - 0.6 = 0.4 and 2 - 2.2 = -0.2; above -> Qp = 3
    assert s.grad.item() == pytest.approx((0 + 0.4 - 0.2 + 3) * 0.25, abs=1e-6)


def test_lsq_by_hand_signed_3bit():
    # bits 3 signed: Qn -4, Qp 3, s = 1: v = [-5.2, -1.4, 2.6, 3.2]
    x = torch.tensor([-5.2, -1.4, 2.6, 3.2], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = mm.lsq_quantize(x, s, 3, signed=True, grad_scale=1.0)
    assert y.tolist() == [-4.0, -1.0, 3.0, 3.0]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0]
    assert s.grad.item() == pytest.approx(1 * -4 + 2 * (-1 + 1.4) + 3 * (3 - 2.6) + 4 * 3, abs=1e-5)


@pytest.mark.parametrize("bits,signed,per_channel", list(itertools.product(range(2, 9), [False, True], [False, True])))
def test_lsq_matches_slow_formula(bits, signed, per_channel):
    g = torch.Generator().manual_seed(bits * 10 + signed * 2 + per_channel)
    C = 3
    qn, qp = mm.lsq_range(bits, signed)
    step = (torch.rand(C, 1, 1, generator=g, dtype=torch.float64) + 0.2) if per_channel else torch.tensor(0.7, dtype=torch.float64)
    # codes spread over [Qn - 2, Qp + 2] plus one value surely below, inside and above the range
    v = torch.cat([torch.rand(27, generator=g, dtype=torch.float64) * (qp - qn + 4) + qn - 2,
                   torch.tensor([qn - 1.5, (qn + qp) / 2 + 0.3, qp + 1.5], dtype=torch.float64)])
    x = (v.reshape(C, 2, 5) * step).requires_grad_()
    step.requires_grad_()
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gs = 0.37
    y = mm.lsq_quantize(x, step, bits, signed, gs)
    y.backward(up)
    s_full = step.detach().expand_as(x).reshape(-1).tolist()
    out, dx, ds = slow_lsq(x.detach().reshape(-1).tolist(), s_full, bits, signed)
    assert torch.allclose(y.detach().reshape(-1), torch.tensor(out, dtype=torch.float64))
    assert torch.allclose(x.grad.reshape(-1), up.reshape(-1) * torch.tensor(dx, dtype=torch.float64))
    expect_s = (up.reshape(-1) * torch.tensor(ds, dtype=torch.float64)).reshape(x.shape)
    expect_s = expect_s.sum(dim=(1, 2), keepdim=True) if per_channel else expect_s.sum()
    assert step.grad.shape == step.shape
    assert torch.allclose(step.grad, expect_s * gs)
    # the range holds values inside, below and above
    v = x.detach() / step.detach()
    assert (v < qn).any() and (v > qp).any() and ((v > qn) & (v < qp)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (8, False)])
def test_lsq_range_ends_count_as_inside(dtype, bits, signed):
    """v exactly at Qn or Qp passes the gradient; the nearest float beyond it does not."""
    qn, qp = mm.lsq_range(bits, signed)
    s = torch.tensor(2.0, dtype=dtype)  # a power of two >= 1: x / s is exact, even for the smallest float
    ends = torch.tensor([qn, qp], dtype=dtype)
    beyond = torch.nextafter(ends, torch.tensor([-math.inf, math.inf], dtype=dtype))
    x = (torch.cat([ends, beyond]) * s).requires_grad_()
    mm.lsq_quantize(x, s, bits, signed).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["branch", "search"])
def test_fused_layer_passes_gradient_at_exact_zero(mode):
    """ReLU outputs are exact zeros, v = 0 = Qn: inside, so d out/d x is the op's own gradient there."""
    q = mm.QuantLayer(nn.Linear(4, 4, bias=False), [8, 4, 2], 4, "l")
    with torch.no_grad():
        q.weight.copy_(torch.eye(4))
    q.act.mode, q.act.branch = mode, 1
    q(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))  # init: unsigned
    x = torch.tensor([[0.0, 0.0, 0.5, -3.0]], requires_grad=True)  # -3 is below Qn = 0
    q(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_lsq_saves_only_its_input():
    x = torch.randn(4, 8, requires_grad=True)
    s = torch.tensor(0.3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mm.lsq_quantize(x, s, 4, False)
    assert len(saved) == 2 and saved[0] is x  # x and the scalar step, nothing the size of x besides x


def test_lsq_quantizer_module_init_and_grad_scale():
    w = torch.randn(16, 8, 3, 3)
    q = mm.LSQQuantizer(4, signed=True)
    y = q(w.requires_grad_())
    qp = 7  # signed 4-bit
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    y.sum().backward()
    # d/ds of the sum, times 1/sqrt(N * Qp) with N = numel of the weight
    _, _, ds = slow_lsq(w.detach().reshape(-1).tolist(), [q.step.item()] * w.numel(), 4, True)
    assert q.step.grad.item() == pytest.approx(sum(ds) / math.sqrt(w.numel() * qp), rel=1e-4, abs=1e-6)
    q.enabled = False
    assert q(w) is w


def test_step_stays_positive():
    s = torch.tensor(-0.5, requires_grad=True)
    assert mm.positive(s).item() == 0.5
    assert mm.positive(torch.tensor(0.0)).item() > 0


def test_lsq_quantize_defaults_to_lsq_grad_scale():
    """Without grad_scale, the step gradient is LSQ's: the raw sum times 1/sqrt(N * Qp), N = x.numel()."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    s = torch.tensor(0.3, requires_grad=True)
    mm.lsq_quantize(x, s, 4, False).sum().backward()
    _, _, ds = slow_lsq(x.reshape(-1).tolist(), [0.3] * 32, 4, False)
    assert s.grad.item() == pytest.approx(sum(ds) / math.sqrt(32 * 15), rel=1e-5)
    assert abs(s.grad.item()) < abs(sum(ds)) / 10  # not the unscaled sum
    assert mm.lsq_grad_scale(32, 4, False) == 1 / math.sqrt(32 * 15)


def test_lsq_quantize_makes_a_negative_step_positive():
    """A step s <= 0 is used as |s| (floor 1e-8); its gradient is d|s|/ds times LSQ's."""
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    pos, neg = torch.tensor(0.4, requires_grad=True), torch.tensor(-0.4, requires_grad=True)
    y_pos, y_neg = mm.lsq_quantize(x, pos, 3, True), mm.lsq_quantize(x, neg, 3, True)
    assert torch.equal(y_pos, y_neg)
    y_pos.sum().backward(), y_neg.sum().backward()
    assert pos.grad.item() != 0 and neg.grad.item() == -pos.grad.item()
    zero = torch.tensor(0.0, requires_grad=True)
    y = mm.lsq_quantize(x, zero, 3, True)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert zero.grad.item() == 0.0


# ---------------------------------------------------------------------------------------
# Tier 1: multi-branch block (Fig. 4, Eq. 2)
# ---------------------------------------------------------------------------------------


def test_multibranch_init_signedness_and_grad_scale():
    q = mm.MultiBranchQuantizer([8, 4, 2])
    x = torch.relu(torch.randn(4, 3, 5, 5))
    q.mode, q.branch = "branch", 1
    q(x)
    assert q.signed is False and q.initialized == [False, True, False]
    assert q.step[1].item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)
    q2 = mm.MultiBranchQuantizer([8, 4, 2])
    q2.mode = "search"
    xs = torch.randn(4, 3, 5, 5)
    q2(xs)
    assert q2.signed is True and all(q2.initialized)
    for b, bits in enumerate([8, 4, 2]):
        assert q2.step[b].item() == pytest.approx(2 * xs.abs().mean().item() / math.sqrt(2 ** (bits - 1) - 1), rel=1e-6)
    # gradient scale 1/sqrt(N * Qp), N = features per sample (3*5*5)
    _, _, _, qr, gsc = q2.params_for(xs)
    assert gsc == [1 / math.sqrt(75 * qp) for _, qp in qr]


def _fixed_outputs(q, x):
    outs = []
    for b in range(len(q.bits)):
        q.mode, q.branch = "branch", b
        outs.append(q(x))
    return outs


def test_fixed_mode_is_lsq_and_search_is_softmax_weighted_sum():
    torch.manual_seed(0)
    q = mm.MultiBranchQuantizer([8, 4, 3])
    x = torch.randn(2, 4, 6, 6)
    q.mode = "search"
    q(x)  # init
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([0.2, 1.0, -0.5]))
    for b, out in enumerate(_fixed_outputs(q, x)):
        assert torch.equal(out, mm.lsq_quantize(x, q.step[b].detach(), q.bits[b], True))
    outs = _fixed_outputs(q, x)
    q.mode = "search"
    p = F.softmax(q.alpha.detach(), 0)
    assert torch.allclose(q(x), sum(p[b] * outs[b] for b in range(3)), atol=1e-6)


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])  # no-x-grad: the first layer
@pytest.mark.parametrize("kind", ["conv", "grouped", "linear"])
@pytest.mark.parametrize("mode", ["branch", "search"])
def test_fused_layer_equals_op_of_quantized_input(kind, mode, x_grad):
    """QuantLayer's fused op == conv(MultiBranchQuantizer(x)) in value and in every gradient."""
    torch.manual_seed(1)
    if kind == "linear":
        layer, x = nn.Linear(12, 5), torch.randn(3, 12, dtype=torch.float64)
    else:
        layer = nn.Conv2d(4, 6 if kind == "conv" else 4, 3, stride=2, padding=1, groups=1 if kind == "conv" else 4, bias=kind == "conv")
        x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    layer = layer.double()
    q = mm.QuantLayer(layer, [8, 4, 2], 4, "l")
    q.act.mode, q.act.branch = mode, 2
    q.weight_quant.enabled = True
    with torch.no_grad():
        q.act.alpha.copy_(torch.tensor([0.3, -0.2, 0.5]))
    q(x)  # init steps
    params = [q.act.step, q.act.alpha, q.weight, q.weight_quant.step] + ([q.bias] if q.bias is not None else [])
    x1 = x.clone().requires_grad_(x_grad)
    y1 = q(x1)
    up = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x1] * x_grad + params, up, allow_unused=True)
    x2 = x.clone().requires_grad_(x_grad)
    w = q.weight_quant(q.weight)
    xa = q.act(x2)
    y2 = F.linear(xa, w, q.bias) if kind == "linear" else F.conv2d(xa, w, q.bias, 2, 1, 1, layer.groups)
    g2 = torch.autograd.grad(y2, [x2] * x_grad + params, up, allow_unused=True)
    assert torch.allclose(y1, y2, atol=1e-10)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9), (a, b)


def test_search_mode_runs_one_convolution(monkeypatch):
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = mm.QuantLayer(nn.Conv2d(3, 4, 3), [8, 6, 5, 4, 3, 2], 4, "c")
    q.act.mode = "search"
    q(torch.randn(1, 3, 8, 8))
    assert len(calls) == 1


@pytest.mark.parametrize("mode", ["branch", "search"])
def test_fused_layer_saves_only_input_and_weight(mode):
    q = mm.QuantLayer(nn.Conv2d(8, 8, 3, padding=1, bias=False), [8, 4, 2], 4, "c")
    q.act.mode, q.weight_quant.enabled = mode, True
    x = torch.relu(torch.randn(2, 8, 16, 16)).requires_grad_()
    q(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x)
    # x and the raw weight Parameter; everything else is a step or a probability (<= 3 numbers).
    # The quantized activation and the quantized weight are recomputed in backward, not stored.
    assert any(t is x for t in saved) and any(t is q.weight for t in saved)
    assert all(t is x or t is q.weight or t.numel() <= 3 for t in saved), [tuple(t.shape) for t in saved]


def test_fused_layer_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    q = mm.QuantLayer(nn.Conv2d(4, 8, 3, padding=1), [8, 4, 2], 4, "c")
    q.act.mode = "search"
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ref = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert q.act.alpha.grad is not None and torch.isfinite(q.act.alpha.grad).all()
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)


def _codes(x, step, bits, signed):
    """Integer codes exactly as training forms them (fp32 division), as float64."""
    qn, qp = mm.lsq_range(bits, signed)
    return torch.clamp(x / step, qn, qp).round().double()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bf16_autocast_runs_the_op_on_integer_codes(bits, kind):
    """Under bf16 autocast the layer equals s_a*s_w*op(q_a, q_w) + b, computed in float64 from the
    codes, within the rounding of the op's bf16 output and of the final cast: <= 2^-8 of each."""
    torch.manual_seed(bits)
    if kind == "conv":
        layer, x = nn.Conv2d(16, 8, 3, padding=1), torch.relu(torch.randn(2, 16, 8, 8)) * 3
    else:
        layer, x = nn.Linear(64, 10), torch.relu(torch.randn(4, 64)) * 3
    q = mm.QuantLayer(layer, [bits], bits, "l", fixed=True)
    q.act.mode, q.act.branch, q.weight_quant.enabled = "branch", 0, True
    q(x)  # LSQ init
    s_a, s_w = mm.positive(q.act.step.detach()[0]), mm.positive(q.weight_quant.step.detach())
    qa, qw = _codes(x, s_a, bits, False), _codes(q.weight.detach(), s_w, bits, True)
    op = (lambda a, w: F.conv2d(a, w, None, 1, 1)) if kind == "conv" else (lambda a, w: F.linear(a, w))
    core = op(qa, qw) * (s_a.double() * s_w.double())
    b = q.bias.detach().double()
    ref = core + (b.view(-1, 1, 1) if kind == "conv" else b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    assert (err <= 2**-8 * (core.abs() + ref.abs()) + 1e-30).all(), err.max()


def test_bf16_autocast_search_mixture_error_is_bounded():
    """The Eq. 2 mixture is on no grid: bf16 rounds each mixed element once (<= 2^-8 relative),
    the weight codes are exact, then the output rounds as above."""
    torch.manual_seed(0)
    q = mm.QuantLayer(nn.Conv2d(16, 8, 3, padding=1, bias=False), [8, 4, 2], 4, "c")
    q.act.mode, q.weight_quant.enabled = "search", True
    x = torch.relu(torch.randn(2, 16, 8, 8)) * 3
    q(x)
    with torch.no_grad():
        q.act.alpha.copy_(torch.tensor([0.3, 0.1, -0.2]))
    steps, s_w = mm.positive(q.act.step.detach()), mm.positive(q.weight_quant.step.detach())
    p = F.softmax(q.act.alpha.detach(), 0)
    xm = sum(p[i].double() * steps[i].double() * _codes(x, steps[i], b, False) for i, b in enumerate((8, 4, 2)))
    w = _codes(q.weight.detach(), s_w, 4, True) * s_w.double()
    ref = F.conv2d(xm, w, None, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    bound = 2**-8 * F.conv2d(xm.abs(), w.abs(), None, 1, 1) + 2**-7 * ref.abs() + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


def test_compiled_kernels_match_eager(monkeypatch):
    """--compile swaps the elementwise helpers for torch.compile'd ones: same values and gradients."""
    torch.manual_seed(0)
    names = ("_mixture", "_mixture_grads")
    for n in names:  # restored after the test
        monkeypatch.setattr(mm, n, getattr(mm, n))
    q = mm.QuantLayer(nn.Conv2d(4, 6, 3, padding=1), [8, 4, 2], 4, "c")
    q.weight_quant.enabled = True
    x = torch.relu(torch.randn(2, 4, 9, 9))
    results = []
    for compiled in (False, True):
        if compiled:
            mm.compile_quantizer_kernels()
            assert all(hasattr(getattr(mm, n), "compiled") for n in names)
        for mode in ("branch", "search"):
            q.act.mode, q.act.branch = mode, 1
            xi = x.clone().requires_grad_()
            y = q(xi)
            grads = torch.autograd.grad(y.square().sum(), [xi, q.act.step, q.act.alpha, q.weight, q.weight_quant.step], allow_unused=True)
            results.append((y.detach(), grads))
    for (ya, ga), (yb, gb) in zip(results[:2], results[2:]):
        assert torch.allclose(ya, yb, atol=1e-6)
        for a, b in zip(ga, gb):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-4, atol=1e-5))


# ---------------------------------------------------------------------------------------
# Tier 1: straight-through softmax (Eq. 5)
# ---------------------------------------------------------------------------------------


def test_straight_through_softmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], requires_grad=True)
    y = mm.straight_through_softmax(logits)
    assert y.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    up = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
    (y * up).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    (F.softmax(ref, -1) * up).sum().backward()
    assert torch.allclose(logits.grad, ref.grad)


# ---------------------------------------------------------------------------------------
# Tier 1: BOPs (Eq. 6) and the regularizer (Eq. 4)
# ---------------------------------------------------------------------------------------

ARCH_ENDS = {"resnet18": ("conv1", "fc"), "mobilenet_v2": ("features.0.0", "classifier.1"),
             "mobilenet_v3_large": ("features.0.0", "classifier.3"), "mobilenet_v3_small": ("features.0.0", "classifier.3")}


def independent_macs(model):
    """Per-module MACs from PyTorch's own FLOP counter (FLOPs / 2) at 224x224."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    counts = fc.get_flop_counts()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            key = f"{type(model).__name__}.{name}"
            out[name] = sum(counts[key].values()) // 2
    return out


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "mobilenet_v3_large"])
def test_bops_against_independent_count(arch):
    model = torchvision.models.get_model(arch)
    macs = independent_macs(model)
    mm.patch_model(model, [8, 4, 2] if arch == "resnet18" else [8, 4, 3], 4)
    layers = mm.quant_layers(model)
    assert {m.name: m.macs for m in layers} == macs
    first, last = layers[0], layers[-1]
    fixed = (macs[first.name] + macs[last.name]) * 8 * 8 / 1e9
    searched = [n for n in macs if n not in (first.name, last.name)]
    # uniform W4A4
    uniform = sum(macs[n] for n in searched) * 4 * 4 / 1e9 + fixed
    lo, hi = mm.gbops_range(model, 4)
    assert mm.config_gbops([macs[n] for n in searched], [4] * len(searched), 4, mm.c_fixed_of(model)) == pytest.approx(uniform)
    assert hi == pytest.approx(sum(macs[n] for n in searched) * 8 * 4 / 1e9 + fixed)
    assert lo == pytest.approx(sum(macs[n] for n in searched) * min(layers[1].act.bits) * 4 / 1e9 + fixed)
    # a mixed configuration: cycle through the candidates, through the regularizer's one-hot forward
    cands = layers[1].act.bits
    idx = [i % 3 for i in range(len(searched))]
    mixed = sum(macs[n] * cands[i] for n, i in zip(searched, idx)) * 4 / 1e9 + fixed
    alphas = F.one_hot(torch.tensor(idx), 3).float() * 5
    reg, gb = mm.bops_regularizer(alphas, cands, [m.macs for m in layers[1:-1]], 4, mm.c_fixed_of(model), 0.0)
    assert gb.item() == pytest.approx(mixed, rel=1e-5)
    if arch == "resnet18":  # by hand: conv1 = 64 * 3 * 7 * 7 * 112 * 112, fc = 512 * 1000
        assert first.macs == 64 * 3 * 49 * 112 * 112 and last.macs == 512 * 1000


def test_depthwise_conv_counts_groups():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 224, 224))
    mm.patch_model(model, [8, 4], 4)
    assert model[1].macs == 8 * 1 * 9 * 224 * 224


def test_regularizer_value_and_gradient_by_hand():
    bits, macs, w_bits, fixed, target = [8, 4, 2], [1e8, 2e8], 4, 0.5, 3.0
    a = torch.tensor([[0.0, 1.0, 0.5], [0.2, -0.3, 0.9]], requires_grad=True)
    reg, gb = mm.bops_regularizer(a, bits, macs, w_bits, fixed, target)
    # argmax: layer 0 -> 4 bits, layer 1 -> 2 bits: (4*1e8 + 2*2e8) * 4 / 1e9 + 0.5 = 3.7
    assert gb.item() == pytest.approx(3.7) and reg.item() == pytest.approx(0.7)
    reg.backward()
    for l in range(2):
        e = [math.exp(v) for v in a[l].tolist()]
        p = [v / sum(e) for v in e]
        mean_b = sum(pi * b for pi, b in zip(p, bits))
        for j in range(3):  # d|.|/d alpha_lj = sign * w * macs_l / 1e9 * p_j * (b_j - sum_b p_b b)
            assert a.grad[l, j].item() == pytest.approx(+1 * w_bits * macs[l] / 1e9 * p[j] * (bits[j] - mean_b), rel=1e-5)


def test_budget_repair_lowers_least_probable_per_bop():
    bits, macs, w_bits, fixed = [8, 4, 2], [100, 100, 400], 1, 0.0
    probs = [[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1]]
    chosen = [0, 0, 0]  # 8 * 600 = 4800 bit-ops
    target = 4400 / 1e9
    out = mm.repair_to_budget(probs, chosen, bits, macs, w_bits, fixed, target)
    # candidate moves (8 -> 4): layer 0 costs 0.1/400, layer 1 0.85/400, layer 2 0.3/1600: layer 2 is cheapest
    assert out == [0, 0, 1]
    assert mm.config_gbops(macs, [bits[c] for c in out], w_bits, fixed) <= target
    out = mm.repair_to_budget(probs, chosen, bits, macs, w_bits, fixed, 1200 / 1e9)
    assert mm.config_gbops(macs, [bits[c] for c in out], w_bits, fixed) <= 1200 / 1e9


# ---------------------------------------------------------------------------------------
# Tier 1: model patching
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCH_ENDS) + ["shufflenet_v2_x0_5"])
def test_patching(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    weights = {n: p for n, p in model.named_parameters()}
    mm.patch_model(model, [8, 4, 3], 4, bops_image_size=64)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    layers = mm.quant_layers(model)
    assert len(layers) == n_layers
    assert all(p is weights[n] for n, p in model.named_parameters() if n in weights)  # same tensors
    if arch in ARCH_ENDS:
        assert (layers[0].name, layers[-1].name) == ARCH_ENDS[arch]
    assert layers[0].fixed and layers[-1].fixed and not any(m.fixed for m in layers[1:-1])
    assert torch.equal(model(x), ref)  # identity ("fp") mode leaves outputs unchanged
    mm.set_mode(model, "search")
    assert model(x).shape == ref.shape


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4, bops_image_size=32)
    mm.set_mode(a, "search", quant_weights=True)
    x = torch.randn(2, 3, 32, 32)
    a(x)
    with torch.no_grad():
        for al in mm.alphas_of(a):
            al.normal_()
    mm.apply_selection(a, [1] * len(mm.searched_layers(a)))
    torch.save(a.state_dict(), tmp_path / "m.pth")
    b = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4, bops_image_size=32)
    b.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    mm.set_mode(b, "search", quant_weights=True)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    assert [m.act.signed for m in mm.quant_layers(a)] == [m.act.signed for m in mm.quant_layers(b)]
    assert [m.selected_branch for m in mm.quant_layers(b)[1:-1]] == [1] * len(mm.searched_layers(b))
    # a full-precision checkpoint of the unpatched model loads into the patched one
    plain = torchvision.models.resnet18(num_classes=10).state_dict()
    missing, unexpected = b.load_state_dict(plain, strict=False)
    assert not unexpected and all(".act." in k or ".weight_quant." in k or k.endswith("_extra_state") for k in missing)


# ---------------------------------------------------------------------------------------
# Tier 1: the two kinds of bit-selection step
# ---------------------------------------------------------------------------------------


def _tiny_patched():
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.resnet18(num_classes=4), [8, 4, 2], 4, bops_image_size=32)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    with torch.no_grad():
        for b in range(3):
            mm.set_mode(model, "meta", b)
            model(x)
    return model, x, y


def test_bit_meta_step_trains_weights_and_steps_not_alphas():
    model, x, y = _tiny_patched()
    model.train()
    loss = mm.bit_meta_step(model, x, y)
    # Eq. 1 by hand: the mean of the three single-precision losses (BN in train mode, same batch)
    ref = []
    m2 = copy.deepcopy(model)
    for b in range(3):
        mm.set_mode(m2, "meta", b)
        ref.append(F.cross_entropy(m2(x), y).item())
    assert loss.item() == pytest.approx(sum(ref) / 3, rel=1e-4)
    layers = mm.searched_layers(model)
    assert all(m.act.alpha.grad is None for m in layers)
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)
    assert all((m.act.step.grad != 0).all() for m in layers)  # every branch's step learns


def test_bit_search_step_trains_only_alphas():
    model, x, y = _tiny_patched()
    model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and ("running" in k or "batches" in k)}
    loss, gb = mm.bit_search_step(model, x, y, 0.4, 30.0)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name.endswith("act.alpha") and not any(name.startswith(f) for f in ("conv1.", "fc.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
        assert p.requires_grad  # restored
    assert len(bn_before) == 3 * 20 and all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items())  # BN frozen
    assert model.training and all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_init_quantizers_uses_batch_statistics_and_leaves_bn_alone():
    """From scratch, eval-mode BN (running statistics 0/1) lets MobileNet-v3's deep activations vanish
    (steps of 0); the batch's statistics, as in training, give every step a sensible size."""
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.mobilenet_v3_small(num_classes=10), [8, 4, 3], 4, bops_image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(8, 3, 64, 64)
    model.eval()
    mm.init_quantizers(model, x)
    assert not model.training  # restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    steps = torch.cat([m.act.step.detach() for m in mm.quant_layers(model)])
    assert steps.min() > 1e-3 and steps.max() < 1e3, (steps.min(), steps.max())
    assert all(m.act.mode == "fp" for m in mm.quant_layers(model))


def _optimizers(model):
    return (torch.optim.SGD(mm.meta_params(model), lr=0.05, momentum=0.9),
            torch.optim.Adam(mm.alphas_of(model), lr=0.1, betas=(0.5, 0.999)))


def test_bit_selection_step_is_meta_then_search_on_the_same_batch():
    """Table 1: Eq. 1 and an SGD step, then Eq. 3 on the meta-state just updated, with the same batch."""
    model, x, y = _tiny_patched()
    model.train()
    ref = copy.deepcopy(model)
    opt, opt_alpha = _optimizers(model)
    ropt, ropt_alpha = _optimizers(ref)
    seen = []
    meta, search, gb = mm.bit_selection_step(model, x, y, opt, opt_alpha, search=True, lam=0.4, target_gbops=30.0,
                                             sync=lambda params, loss: seen.append(len(params)) or loss)
    assert seen == [len(mm.meta_params(model)), len(mm.alphas_of(model))]  # sync before each update
    ropt.zero_grad()
    ref_meta = mm.bit_meta_step(ref, x, y)
    ropt.step()
    ropt_alpha.zero_grad()
    ref_search, ref_gb = mm.bit_search_step(ref, x, y, 0.4, 30.0)
    ropt_alpha.step()
    assert torch.equal(meta, ref_meta) and torch.equal(search, ref_search) and torch.equal(gb, ref_gb)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert not torch.is_tensor(a) or torch.equal(a, b), n
    # epoch 1: bit-meta only, the alphas do not move
    before = [a.detach().clone() for a in mm.alphas_of(model)]
    meta, search, gb = mm.bit_selection_step(model, x, y, opt, opt_alpha)
    assert search is None and gb is None and torch.isfinite(meta)
    assert all(torch.equal(a, b) for a, b in zip(before, mm.alphas_of(model)))


def test_start_weight_training_selects_switches_and_inits_weight_steps():
    model, x, y = _tiny_patched()
    with torch.no_grad():
        for a in mm.alphas_of(model):
            a.copy_(torch.tensor([1.0, 0.0, 0.0]))  # argmax: A8 everywhere, over a tight target
    lo, hi = mm.gbops_range(model, 4)
    target = (lo + hi) / 2
    branches, gbops, repaired = mm.start_weight_training(model, target)
    assert repaired and gbops <= target and branches == [m.selected_branch for m in mm.searched_layers(model)]
    assert gbops == pytest.approx(mm.config_gbops([m.macs for m in mm.searched_layers(model)],
                                                  [(8, 4, 2)[i] for i in branches], 4, mm.c_fixed_of(model)))
    for m in mm.quant_layers(model):
        assert m.weight_quant.enabled and m.act.mode == "branch"
        assert m.act.branch == (0 if m.fixed else m.selected_branch)
        qp = 2 ** (m.weight_quant.bits - 1) - 1
        assert m.weight_quant.step.item() == pytest.approx(2 * m.weight.abs().mean().item() / math.sqrt(qp), rel=1e-5)
    opt = torch.optim.SGD(mm.meta_params(model), lr=0.01)
    loss = mm.weight_training_step(model, x, y, opt)
    assert torch.isfinite(loss) and all(m.weight_quant.step.grad is not None for m in mm.quant_layers(model))


def test_set_mode_refuses_unknown_modes():
    model, _, _ = _tiny_patched()
    with pytest.raises(ValueError):
        mm.set_mode(model, "branch")
    with pytest.raises(ValueError):
        mm.set_mode(model, "meta")


def test_readme_use_the_pieces_block_runs():
    """The README's "Use the pieces in your own loop" code, extracted and run as written."""
    text = (Path(__file__).parent / "README.md").read_text()
    section = text.split("## Use the pieces in your own loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {"__name__": "readme"}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), ns)
    model, target, gbops = ns["model"], ns["target"], ns["gbops"]
    assert gbops <= target and math.isfinite(float(ns["loss"]))
    assert all(m.weight_quant.enabled and m.act.mode == "branch" for m in mm.quant_layers(model))


# ---------------------------------------------------------------------------------------
# run_imagenet.sh
# ---------------------------------------------------------------------------------------


def test_run_imagenet_dry_run_prints_valid_commands():
    import os
    import shlex
    import subprocess

    env = dict(os.environ, DRY_RUN="1", DATA="/data/in1k", GPUS="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    p = subprocess.run(["bash", "run_imagenet.sh", "all"], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)), timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3
    expect = {"resnet18": (33.0, [8, 4, 2], 0.4, 90), "mobilenet_v2": (5.12, [8, 4, 3], 1.0, 140),
              "mobilenet_v3_large": (3.29, [8, 4, 3], 4.0, 140)}
    for line in lines:
        words = shlex.split(line)
        assert words[0] == "torchrun" and "--nnodes=2" in words and "--node_rank=1" in words
        assert "--master_addr=10.0.0.1" in words and "--nproc_per_node=4" in words
        ns = mm.get_args_parser().parse_args(words[words.index("metamix.py") + 1:])
        assert ns.amp and ns.resume == "auto"
        ns.amp = False  # this machine has no CUDA; --amp is refused without it
        args = mm.resolve_args(ns)
        assert (args.target_gbops, args.bits, args.lam, args.epochs) == expect[args.arch]
        assert args.data == "/data/in1k" and args.batch_size == 32 and args.w_bits == 4


# =======================================================================================
# Tier 2 and 3: the real script in a subprocess (one process, torchrun x2), resume, faults.
# Every run is tiny (resnet18 at 32 px, 64 synthetic images, batch 16); reference runs that
# several tests compare against are module-scoped fixtures, copied with shutil.copytree.
# =======================================================================================

REPO = Path(__file__).resolve().parent
SCRIPT = "metamix.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("WORLD_SIZE", None), ENV.pop("RANK", None), ENV.pop("LOCAL_RANK", None)

# 64 images / batch 16 = 4 steps per epoch; 2 bit-selection epochs, the rest weight training. The
# Figure 9 analysis (section 10) on one batch and one probe: under a second per run.
TINY = ["--arch", "resnet18", "--image-size", "32", "--synthetic-train", "64", "--synthetic-val", "32",
        "--batch-size", "16", "--search-epochs", "2", "--print-freq", "1000",
        "--proxy-batches", "1", "--hutchinson-probes", "1"]
REF = TINY + ["--epochs", "4"]  # the reference run: 2 bit selection + 2 weight training
METRICS = ("loss", "val_loss", "top1", "top5", "gbops", "lr", "phase", "epoch")


# ---- helpers -----------------------------------------------------------------------------


def run_cli(*args, check: bool = True, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python metamix.py ARGS` in the repository; with check, fail on a non-zero exit."""
    p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, env=env or ENV,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"metamix.py {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"--- stdout (tail)\n{p.stdout[-3000:]}\n--- stderr (tail)\n{p.stderr[-3000:]}")
    return p


def popen_cli(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def torchrun_cmd(*args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", SCRIPT, *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    """The one-line contract: non-zero exit, exactly one non-blank stderr line, no traceback."""
    assert p.returncode != 0, f"expected a failure, got exit 0\nstdout:\n{p.stdout[-2000:]}"
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{p.stderr[-4000:]}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in the error line: {lines[0]!r}"
    return lines[0]


def fingerprint(d: Path) -> dict:
    """name -> (sha256, size, mtime_ns) of every file in d (recursively)."""
    out = {}
    for f in sorted(Path(d).rglob("*")):
        if f.is_file():
            st = f.stat()
            out[str(f.relative_to(d))] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def load_ck(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(d: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines() if line.strip()]


def assert_same_model(a: Path, b: Path) -> None:
    ma, mb = load_ck(a)["model"], load_ck(b)["model"]
    assert ma.keys() == mb.keys()
    diff = [k for k in ma if not (torch.is_tensor(ma[k]) and torch.equal(ma[k], mb[k])) and ma[k] != mb[k]]
    assert not diff, f"{len(diff)} model tensors differ, e.g. {diff[:5]}"


def assert_same_run(a: Path, b: Path) -> None:
    """Two output dirs hold the same result: model tensors, per-epoch metrics, selected bits."""
    assert_same_model(a / "checkpoint.pth", b / "checkpoint.pth")
    la, lb = read_log(a), read_log(b)
    assert [{k: r[k] for k in METRICS} for r in la] == [{k: r[k] for k in METRICS} for r in lb]
    ba, bb = json.loads((a / "bits.json").read_text()), json.loads((b / "bits.json").read_text())
    assert [(r["name"], r["a_bits"]) for r in ba["layers"]] == [(r["name"], r["a_bits"]) for r in bb["layers"]]
    assert ba["gbops"] == bb["gbops"]


def wait_for(cond, proc: subprocess.Popen | None, timeout: float, what: str, poll: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited {proc.returncode} before {what}\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def make_image_folder(root: Path, classes: int = 3, n_train: int = 8, n_val: int = 4, size: int = 40,
                      textured: bool = False) -> Path:
    """Class k: a colour near a class colour; `textured` adds a random pattern, so that crops and flips
    change the image (augmentation of a plain colour is the identity)."""
    from PIL import Image

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            base = [(255 if c == k % 3 else 40) for c in range(3)]
            for i in range(n):
                colour = tuple(min(255, max(0, v + rng.randint(-30, 30))) for v in base)
                img = Image.new("RGB", (size, size), colour)
                if textured:
                    pattern = torch.tensor(colour).view(1, 1, 3) + 60 * torch.randn(size, size, 3, generator=g)
                    img = Image.fromarray(pattern.clamp(0, 255).to(torch.uint8).numpy())
                img.save(d / f"img_{i}.png")
    return root


# ---- shared reference runs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory) -> Path:
    """REF uninterrupted: 4 epochs (2 bit selection)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    p = run_cli(*REF, "--output-dir", out)
    assert "summary:" in p.stdout
    (out.parent / "stdout.txt").write_text(p.stdout)  # beside the run, not in it
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """REF stopped cleanly after epoch 1 (inside bit selection). Copy it before changing it."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    p = run_cli(*REF, "--output-dir", out, "--stop-after-epoch", "1")
    assert "--stop-after-epoch" in p.stdout
    assert load_ck(out / "checkpoint.pth")["epoch"] == 1
    return out


def copy_run(src: Path, tmp_path: Path, name: str = "out") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# =============================================================================================
# Issue 3: the driver
# =============================================================================================


def test_single_process_outputs(ref_run):
    out = ref_run
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == ["alphas.json", "args.json", "bits.json",
                                                                          "checkpoint.pth", "log.jsonl"]
    assert not list(out.glob("*.tmp.*")), "temporary files left behind"

    bits = json.loads((out / "bits.json").read_text())
    assert bits["arch"] == "resnet18" and bits["candidates"] == [8, 4, 2] and bits["w_bits"] == 4
    assert bits["gbops"] <= bits["target_gbops"] + 1e-6
    assert len(bits["layers"]) == 21
    searched = [r for r in bits["layers"] if not r["fixed"]]
    assert searched and len(searched) == 19
    for r in bits["layers"]:
        assert {"name", "macs", "a_bits", "w_bits", "probs"} <= r.keys()
        assert isinstance(r["name"], str) and r["macs"] > 0
    for r in searched:
        assert r["a_bits"] in (8, 4, 2) and r["w_bits"] == 4
        assert len(r["probs"]) == 3 and abs(sum(r["probs"]) - 1) < 1e-4
    for r in (bits["layers"][0], bits["layers"][-1]):
        assert r["fixed"] and r["a_bits"] == 8 and r["w_bits"] == 8

    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert [r["phase"] for r in log] == ["bit_selection", "bit_selection", "weight_training", "weight_training"]
    for r in log:
        for k in ("loss", "top1", "top5", "val_loss", "gbops"):
            assert isinstance(r[k], float) and r[k] == r[k], (k, r)
        assert r["n"] == 32
    assert log[-1]["gbops"] == pytest.approx(bits["gbops"])

    args = json.loads((out / "args.json").read_text())
    assert args["arch"] == "resnet18" and args["epochs"] == 4 and args["bits"] == [8, 4, 2]
    assert args["target_gbops"] == pytest.approx(bits["target_gbops"])

    ck = load_ck(out / "checkpoint.pth")
    assert ck["format"] == "metamix-checkpoint-1" and ck["epoch"] == 4 and ck["phase"] == "weight_training"
    assert len(ck["history"]) == 4


def test_torchrun_two_processes_gloo(tmp_path):
    """Two ranks for bit selection, stopped there; the run then finishes in one process."""
    out = tmp_path / "out"
    cmd = torchrun_cmd(*TINY, "--epochs", "3", "--output-dir", out, "--stop-after-epoch", "2")
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "world size 2" in p.stdout
    bits = json.loads((out / "bits.json").read_text())
    assert bits["gbops"] <= bits["target_gbops"] + 1e-6
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r.get("replicas_in_sync") is True for r in log), log
    assert all(r["n"] == 32 for r in log), "every validation image counted exactly once"
    ck = load_ck(out / "checkpoint.pth")
    assert ck["epoch"] == 2
    # one RNG state per rank (each rank resumes its own stream), and the streams differ
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])

    p = run_cli(*TINY, "--epochs", "3", "--output-dir", out, "--resume", "auto")
    assert "after epoch 2" in p.stdout and "world size 1" in p.stdout
    assert [r["epoch"] for r in read_log(out)] == [1, 2, 3]
    assert json.loads((out / "bits.json").read_text())["layers"] == bits["layers"]
    ck = load_ck(out / "checkpoint.pth")
    assert ck["epoch"] == 3 and len(ck["rng"]) == 1


def test_resume_inside_bit_selection_is_exact(ref_run, stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    assert [r["epoch"] for r in read_log(out)] == [1]
    p = run_cli(*REF, "--output-dir", out, "--resume", "auto")
    assert "resumed" in p.stdout and "after epoch 1" in p.stdout
    assert_same_run(ref_run, out)


def test_resume_inside_weight_training_is_exact(ref_run, tmp_path):
    out = tmp_path / "out"
    run_cli(*REF, "--output-dir", out, "--stop-after-epoch", "3")
    ck = load_ck(out / "checkpoint.pth")
    assert ck["epoch"] == 3 and ck["phase"] == "weight_training"
    p = run_cli(*REF, "--output-dir", out, "--resume", "auto")
    assert "after epoch 3" in p.stdout
    assert_same_run(ref_run, out)


def test_calibration_batch_is_the_same_on_every_rank(tmp_path):
    """LSQ's calibration batch does not depend on the rank's RNG stream, and leaves it untouched."""
    data = make_image_folder(tmp_path / "data", textured=True)
    args = mm.resolve_args(mm.get_args_parser().parse_args(["--data", str(data), "--image-size", "32"]))
    train, _, _ = mm.build_datasets(args)
    batches = []
    for rank in (0, 1):
        torch.manual_seed(args.seed + rank)  # the driver's per-rank seed, set before the loaders are built
        before = torch.get_rng_state()
        batches.append(mm.calibration_batch(train, 6, args.seed))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(batches[0], batches[1])
    assert not torch.equal(batches[0], mm.calibration_batch(train, 6, args.seed + 1))  # augmentation is random


def test_replica_fingerprint_sees_signedness_and_selection():
    model, _, _ = _tiny_patched()
    layer = mm.searched_layers(model)[3]
    ref = mm.replica_fingerprint(model)
    layer.act.signed = not layer.act.signed
    assert not torch.equal(ref, mm.replica_fingerprint(model))
    layer.act.signed = not layer.act.signed
    assert torch.equal(ref, mm.replica_fingerprint(model))
    layer.selected_branch = 2
    assert not torch.equal(ref, mm.replica_fingerprint(model))


def test_torchrun_two_processes_image_folder(tmp_path):
    """Two ranks on augmented ImageFolder data: one calibration batch, one signedness, replicas in sync."""
    data = make_image_folder(tmp_path / "data", textured=True)
    out = tmp_path / "out"
    cmd = torchrun_cmd("--arch", "resnet18", "--data", data, "--image-size", "32", "--batch-size", "4",
                       "--workers", "0", "--epochs", "3", "--search-epochs", "2", "--print-freq", "1000",
                       "--output-dir", out, "--stop-after-epoch", "1")
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1] and log[0]["replicas_in_sync"] is True
    # the steps a single process initialises from the same seed are the ones both ranks hold
    single = tmp_path / "single"
    run_cli("--arch", "resnet18", "--data", data, "--image-size", "32", "--batch-size", "4", "--workers", "0",
            "--epochs", "3", "--search-epochs", "2", "--print-freq", "1000", "--output-dir", single,
            "--stop-after-epoch", "1")
    a, b = load_ck(out / "checkpoint.pth")["model"], load_ck(single / "checkpoint.pth")["model"]
    assert [v["signed"] for k, v in a.items() if k.endswith("act._extra_state")] == \
           [v["signed"] for k, v in b.items() if k.endswith("act._extra_state")]


def test_image_folder_end_to_end(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    p = run_cli("--arch", "resnet18", "--data", data, "--image-size", "32", "--batch-size", "4", "--workers", "0",
                "--epochs", "3", "--search-epochs", "2", "--print-freq", "1000", "--output-dir", out)
    assert "summary:" in p.stdout
    bits = json.loads((out / "bits.json").read_text())
    assert bits["gbops"] <= bits["target_gbops"] + 1e-6
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3] and all(r["n"] == 12 for r in log)
    assert load_ck(out / "checkpoint.pth")["model"]["fc.weight"].shape[0] == 3


def test_dry_run_json():
    p = run_cli("--dry-run")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"arch", "layers", "macs", "gbops_min", "gbops_max"} <= info.keys()
    assert info["arch"] == "resnet18" and info["layers"] == 21 and info["macs"] > 1e9
    assert 0 < info["gbops_min"] < info["target_gbops"] < info["gbops_max"]

    p = run_cli("--arch", "mobilenet_v2", "--bits", "4", "--w-bits", "4", "--dry-run")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["arch"] == "mobilenet_v2" and info["layers"] > 0
    assert info["gbops_min"] == info["gbops_max"]
    assert info["target_gbops"] is None and "set --target-gbops" in p.stdout  # the default is reported, not fatal


@pytest.mark.parametrize("arch, flags, target", [
    ("resnet18", [], 33.0), ("mobilenet_v2", [], 5.12), ("mobilenet_v3_large", [], 3.29),
    ("resnet18", ["--w-bits", "3"], None), ("mobilenet_v3_small", [], None)])
def test_default_target_is_the_papers_or_95_percent_of_uniform_a4(arch, flags, target):
    info = json.loads(run_cli("--arch", arch, *flags, "--dry-run").stdout.strip().splitlines()[-1])
    if target is None:  # outside the paper's setting: 95% of uniform A4, computed independently here
        model = torchvision.models.get_model(arch, num_classes=1000)
        macs = [m for _, _, m in mm.trace_layers(model, 224)]
        w = info["w_bits"]
        target = 0.95 * (sum(macs[1:-1]) * 4 * w + (macs[0] + macs[-1]) * 64) / 1e9
    assert info["target_gbops"] == pytest.approx(target)


def test_average_bits_three_readings():
    """Plain mean over searched layers, MAC-weighted, and plain over every layer, by hand."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    mm.patch_model(model, [8, 4, 2], 4, bops_image_size=8)
    mm.apply_selection(model, [0, 2])  # A8, A2
    args = argparse.Namespace(arch="custom", bits=[8, 4, 2], w_bits=4, first_last_bits=8, target_gbops=1.0)
    r = mm.bits_report(model, args)
    macs = [4 * 4 * 9 * 64, 8 * 4 * 64]  # 9216, 2048
    assert [l["macs"] for l in r["layers"][1:-1]] == macs
    assert r["avg_a_bits"] == 5.0
    assert r["avg_a_bits_mac_weighted"] == pytest.approx((8 * 9216 + 2 * 2048) / (9216 + 2048))
    assert r["avg_a_bits_with_first_last"] == (8 + 8 + 2 + 8) / 4


# =============================================================================================
# Issue 4: bad input and faults
# =============================================================================================


@pytest.mark.parametrize("flags, needles", [
    (["--arch", "resnet999"], ["resnet999", "resnet18", "mobilenet_v2"]),
    (["--bits", "8,x"], ["--bits", "8,x"]),
    (["--bits", "1,4"], ["--bits", "1"]),
    (["--bits", "4,4"], ["--bits", "4,4"]),
    (["--bits", ""], ["--bits"]),
    (["--w-bits", "1"], ["--w-bits", "1"]),
    (["--first-last-bits", "17"], ["--first-last-bits", "17"]),
    (["--print-freq", "0"], ["--print-freq 0", "at least 1"]),
    (["--stop-after-epoch", "-1"], ["--stop-after-epoch -1", "at least 0"]),
    (["--pretrained", "V9"], ["--pretrained 'V9'", "IMAGENET1K_V1"]),
    (["--bits", "16,12"], ["the default target", "95% of uniform A4", "set --target-gbops", "16,12"]),
], ids=["arch", "bits-8x", "bits-1-4", "bits-4-4", "bits-empty", "w-bits-1", "first-last-17", "print-freq-0",
        "stop-after-epoch--1", "pretrained-name", "default-target-infeasible"])
def test_bad_arguments(tmp_path, flags, needles):
    out = tmp_path / "out"
    p = run_cli(*TINY, "--epochs", "3", *flags, "--output-dir", out, check=False, timeout=120)
    error_line(p, *needles)
    assert p.returncode == 2
    assert not out.exists(), "a bad argument must be refused before the output dir is touched"


def test_infeasible_budget_before_data(tmp_path):
    p = run_cli("--target-gbops", "1", "--dry-run", check=False, timeout=120)
    error_line(p, "--target-gbops 1", "feasible range")
    out = tmp_path / "out"
    p = run_cli(*TINY, "--epochs", "3", "--target-gbops", "1", "--data", tmp_path / "nonexistent",
                "--output-dir", out, check=False, timeout=120)
    line = error_line(p, "feasible range")
    assert "nonexistent" not in line, "the budget must be checked before any data is touched"
    assert not (out / "checkpoint.pth").exists() and not (out / "args.json").exists()


def _data_error(tmp_path, data, *needles, workers: int = 0) -> str:
    out = tmp_path / "out"
    p = run_cli("--arch", "resnet18", "--data", data, "--image-size", "32", "--batch-size", "4",
                "--workers", workers, "--epochs", "3", "--search-epochs", "2", "--print-freq", "1000",
                "--output-dir", out, check=False, timeout=180)
    line = error_line(p, *needles)
    assert p.returncode == 2
    assert not (out / "checkpoint.pth").exists() and not (out / "bits.json").exists()
    return line


def test_data_missing_path(tmp_path):
    _data_error(tmp_path, tmp_path / "nope", str(tmp_path / "nope"))


def test_data_without_train(tmp_path):
    data = make_image_folder(tmp_path / "data")
    shutil.rmtree(data / "train")
    _data_error(tmp_path, data, "train")


def test_data_empty_class_folder(tmp_path):
    data = make_image_folder(tmp_path / "data")
    (data / "train" / "class_3").mkdir()
    _data_error(tmp_path, data, str(data / "train" / "class_3"), "empty")


def test_data_class_folder_without_images(tmp_path):
    data = make_image_folder(tmp_path / "data")
    for f in (data / "train" / "class_1").iterdir():
        f.rename(f.with_suffix(".txt"))
    line = _data_error(tmp_path, data, str(data / "train" / "class_1"), "no image file")
    assert "img_0.txt" in line


def test_data_class_lists_differ(tmp_path):
    data = make_image_folder(tmp_path / "data")
    shutil.rmtree(data / "val" / "class_2")
    _data_error(tmp_path, data, "class_2")


@pytest.mark.parametrize("workers", [0, 2])
def test_data_corrupt_image(tmp_path, workers):
    data = make_image_folder(tmp_path / "data")
    bad = data / "train" / "class_2" / "img_5.png"
    bad.write_bytes(b"this is not a PNG file \x00\x01\x02" * 10)
    line = _data_error(tmp_path, data, str(bad), workers=workers)
    assert "worker" not in line.lower(), line


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "sub"
    # --data that does not exist: the output dir is refused first, at start
    p = run_cli(*TINY, "--epochs", "3", "--output-dir", out, "--data", tmp_path / "nodata", check=False, timeout=120)
    error_line(p, "--output-dir", str(out))
    assert blocker.read_text() == "not a directory"
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            p = run_cli(*TINY, "--epochs", "3", "--output-dir", ro, check=False, timeout=120)
            error_line(p, "--output-dir", str(ro))
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o700)


class Evil:
    """Unpickling this runs a shell command: a loader with weights_only=True must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_bad_checkpoints(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    real = out / "checkpoint.pth"
    before = fingerprint(out)

    truncated = tmp_path / "truncated.pth"
    data = real.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("hello, I am not a checkpoint\n")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, foreign)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil(str(marker))}, evil)

    cases = [
        (["--resume", tmp_path / "missing.pth"], [str(tmp_path / "missing.pth")]),
        (["--resume", truncated], [str(truncated)]),
        (["--resume", text], [str(text)]),
        (["--resume", foreign], [str(foreign), "not a metamix checkpoint"]),
        (["--resume", evil], [str(evil), "weights_only"]),
        # a target feasible for both (the default for 8,4, 95% of uniform A4, is not)
        (["--resume", "auto", "--bits", "8,4", "--target-gbops", "40"], [str(real), "bits"]),
        (["--resume", "auto", "--arch", "mobilenet_v3_small"], [str(real), "arch"]),
        (["--resume", "auto", "--target-gbops", "30"], [str(real), "target-gbops"]),
        ([], ["already holds checkpoint.pth", "--resume auto"]),  # no --resume: refuse to overwrite
    ]
    for extra, needles in cases:
        args = list(REF)
        if "--arch" in extra:  # replace resnet18
            i = args.index("--arch")
            del args[i: i + 2]
        p = run_cli(*args, "--output-dir", out, *extra, check=False, timeout=180)
        error_line(p, *needles)
        assert fingerprint(out) == before, f"{extra}: the output dir changed"
        assert load_ck(real)["epoch"] == 1
    assert not marker.exists(), "a pickled object was executed on load"


def test_nan_loss_fresh_run(tmp_path):
    out = tmp_path / "out"
    p = run_cli(*REF, "--output-dir", out, "--lr", "1e30", check=False, timeout=180)
    line = error_line(p, "epoch 1 step", "nan")
    assert "none yet" in line, line
    assert not (out / "checkpoint.pth").exists()


@pytest.fixture(scope="module")
def nan_resume(stopped_run, tmp_path_factory):
    """The epoch-1 run resumed with an absurd --lr; (output dir, process, fingerprint before minus args.json)."""
    out = copy_run(stopped_run, tmp_path_factory.mktemp("nan_resume"))
    kept = {k: v for k, v in fingerprint(out).items() if k != "args.json"}
    p = run_cli(*REF, "--output-dir", out, "--resume", "auto", "--lr", "1e30", check=False, timeout=180)
    return out, p, kept


def test_nan_loss_after_resume_keeps_last_good_checkpoint(nan_resume):
    """Whenever the loss goes non-finite, the checkpoint named in the message is the last good one."""
    out, p, _ = nan_resume
    line = error_line(p, "step", "nan", str(out / "checkpoint.pth"))
    m = re.search(r"at epoch (\d+) step .*checkpoint\.pth \(epoch (\d+)\)", line)
    assert m, line
    failed, good = int(m.group(1)), int(m.group(2))
    assert good == failed - 1
    state = load_ck(out / "checkpoint.pth")
    assert state["epoch"] == good and len(state["history"]) == good
    assert [r["epoch"] for r in read_log(out)] == list(range(1, good + 1))
    assert not list(out.glob("*.tmp.*"))


def test_resume_with_new_lr_applies_it_or_refuses_it(nan_resume):
    """--resume auto --lr X: X must be used from the first resumed step (or be refused in one line).

    Here X is absurd, so the first resumed epoch (2) must fail, and the epoch-1 checkpoint,
    log and bits must stay byte-for-byte as they were. The NaN message itself advises "try a
    lower --lr", which only helps if a resumed run honours --lr.
    """
    out, p, kept = nan_resume
    line = error_line(p)
    refused = "loss is" not in line and "lr" in line
    assert refused or "at epoch 2 step" in line, f"--lr 1e30 was not used in the first resumed epoch: {line}"
    assert {k: v for k, v in fingerprint(out).items() if k != "args.json"} == kept
    assert load_ck(out / "checkpoint.pth")["epoch"] == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_resumes_exactly(ref_run, tmp_path, sig, code):
    out = tmp_path / "out"
    ck = out / "checkpoint.pth"
    proc = popen_cli(*REF, "--output-dir", out, "--print-freq", "1")
    try:
        wait_for(ck.exists, proc, 180, "the first checkpoint")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == code, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert "interrupted" in lines[0] and "--resume auto" in lines[0], lines[0]
    assert load_ck(ck)["epoch"] >= 1
    assert not list(out.glob("*.tmp.*")), "temporary files left behind"
    if sig == signal.SIGTERM:  # resuming after one signal is enough to show the run goes on exactly
        run_cli(*REF, "--output-dir", out, "--resume", "auto")
        assert_same_run(ref_run, out)


def test_sigkill_never_leaves_a_broken_checkpoint(ref_run, tmp_path):
    """kill -9 while checkpoint.pth is being rewritten, then at a random moment; then finish the run exactly."""
    out = tmp_path / "out"
    ck = out / "checkpoint.pth"
    rng = random.Random(1)
    epochs_seen, mid_write = [], 0
    for attempt in range(2):
        proc = popen_cli(*REF, "--output-dir", out, "--resume", "auto")
        try:
            tmp = None
            if attempt == 1:  # at a random moment
                wait_for(lambda: out.exists(), proc, 120, "the output dir")
                time.sleep(rng.uniform(3.0, 8.0))
            else:  # while a checkpoint write is in flight (after a first one exists)
                if not ck.exists():
                    wait_for(ck.exists, proc, 180, "the first checkpoint", poll=0.005)
                tmp = out / f"checkpoint.pth.tmp.{proc.pid}"  # this process's write (killed ones leave theirs)
                wait_for(tmp.exists, proc, 180, "a checkpoint write", poll=0.002)
                time.sleep(rng.uniform(0.0, 0.01))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            mid_write += bool(tmp is not None and tmp.exists())  # the kill left this write unfinished
        finally:
            kill_group(proc)
        if ck.exists():
            state = load_ck(ck)  # weights_only=True
            assert state["format"] == "metamix-checkpoint-1"
            epochs_seen.append(state["epoch"])
            assert [r["epoch"] for r in state["history"]] == list(range(1, state["epoch"] + 1))
    assert epochs_seen, "no checkpoint was ever written"
    assert mid_write >= 1, "no kill landed while checkpoint.pth was being written"
    run_cli(*REF, "--output-dir", out, "--resume", "auto")
    assert_same_run(ref_run, out)
    assert not list(out.glob("*.tmp.*")), "a killed writer's temporary file was not cleaned up"


def test_torchrun_rank_death_does_not_hang(tmp_path):
    out = tmp_path / "out"
    cmd = torchrun_cmd(*TINY, "--epochs", "200", "--output-dir", out, "--dist-timeout", "10")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for((out / "checkpoint.pth").exists, proc, 180, "the first checkpoint")
        workers = [pid for pid in descendants(proc.pid) if SCRIPT in cmdline(pid) and "torch.distributed.run" not in cmdline(pid)]
        assert len(workers) >= 2, [(w, cmdline(w)) for w in workers]
        os.kill(workers[-1], signal.SIGKILL)
        t0 = time.time()
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still running 90 s after a rank was killed")
        assert proc.returncode != 0
        assert time.time() - t0 < 90
        time.sleep(1)
        left = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
        assert not left, f"workers still alive: {left}"
    finally:
        kill_group(proc)
    assert load_ck(out / "checkpoint.pth")["format"] == "metamix-checkpoint-1"


def test_batch_larger_than_share(tmp_path):
    out = tmp_path / "out"
    p = run_cli(*TINY, "--epochs", "3", "--batch-size", "100000", "--output-dir", out, check=False, timeout=120)
    error_line(p, "--batch-size 100000")
    assert not (out / "checkpoint.pth").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_amp_without_cuda(tmp_path):
    out = tmp_path / "out"
    p = run_cli(*TINY, "--epochs", "3", "--amp", "--output-dir", out, check=False, timeout=120)
    error_line(p, "--amp")
    assert not out.exists()


# =============================================================================================
# Issue 12: integer export (section 8)
# =============================================================================================


def test_pack_codes_by_hand():
    # 2-bit unsigned, four per byte, first code in the low bits: 1 | 2<<2 | 3<<4 | 0<<6 = 57, then 1
    assert mm.pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2, signed=False).tolist() == [57, 1]
    # 4-bit signed, stored as code - Qn = code + 8: [-8, 7, -1] -> [0, 15, 7] -> 0 | 15<<4 = 240, then 7
    assert mm.pack_codes(torch.tensor([-8.0, 7.0, -1.0]), 4, signed=True).tolist() == [240, 7]
    # 3-bit signed, two per byte: [-4, 3] -> [0, 7] -> 0 | 7<<4 = 112
    assert mm.pack_codes(torch.tensor([-4, 3]), 3, signed=True).tolist() == [112]
    # 8-bit signed, one per byte: -128 -> 0, 127 -> 255
    assert mm.pack_codes(torch.tensor([-128, 127, 0]), 8, signed=True).tolist() == [0, 255, 128]
    with pytest.raises(ValueError, match="outside"):
        mm.pack_codes(torch.tensor([4]), 3, signed=True)
    with pytest.raises(ValueError, match="integers"):
        mm.pack_codes(torch.tensor([0.5]), 4, signed=False)


@pytest.mark.parametrize("bits,signed", list(itertools.product([2, 3, 4, 5, 6, 7, 8, 12, 16], [False, True])))
def test_pack_codes_round_trip(bits, signed):
    qn, qp = mm.lsq_range(bits, signed)
    per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
    g = torch.Generator().manual_seed(bits)
    for n in (1, 2, 3, 5, 7, 8, 9, 1001):
        codes = torch.randint(qn, qp + 1, (n,), generator=g)
        codes[0] = qn
        codes[-1] = qp if n > 1 else codes[-1]
        packed = mm.pack_codes(codes.float(), bits, signed)
        assert packed.dtype == torch.uint8
        assert packed.numel() == (2 * n if bits > 8 else -(-n // per_byte)) == mm.packed_size(n, bits)
        assert torch.equal(mm.unpack_codes(packed, bits, signed, n), codes)
    with pytest.raises(ValueError, match="packed bytes"):
        mm.unpack_codes(packed[:-1], bits, signed, n)


def _exported_layer(layer: nn.Module, a_bits: int, w_bits: int, x: torch.Tensor) -> tuple:
    """A QuantLayer in weight training at (a_bits, w_bits), its steps set by LSQ's init on x, exported
    and loaded back through torch.save / torch.load(weights_only=True)."""
    q = mm.QuantLayer(layer, [8, a_bits], w_bits, name="layer")
    q.selected_branch = 1
    q.act.mode, q.act.branch = "branch", 1
    q.weight_quant.enabled = True
    with torch.no_grad():
        q(x)  # LSQ init of the activation and weight steps
    buf = io.BytesIO()
    torch.save(mm.export_layer(q), buf)
    buf.seek(0)
    return q, mm.IntegerLayer(torch.load(buf, weights_only=True))


def _int64_accumulator(q_a: torch.Tensor, w_codes: torch.Tensor, op) -> torch.Tensor:
    """op(q_a, q_w) in int64, independently of the float64 convolution: unfold + integer matmul per group."""
    qa, qw = q_a.round().long(), w_codes.round().long()
    if op.kind == "linear":
        return qa @ qw.t()
    n, (cout, cin_g, kh, kw) = qa.shape[0], qw.shape
    cols = F.unfold(q_a.double(), (kh, kw), op.dilation, op.padding, op.stride).round().long()  # (N, Cin*kh*kw, L)
    groups = op.groups
    cols = cols.reshape(n, groups, cin_g * kh * kw, -1)
    w = qw.reshape(groups, cout // groups, cin_g * kh * kw)
    out = torch.einsum("gok,ngkl->ngol", w, cols).reshape(n, cout, -1)
    h = (q_a.shape[2] + 2 * op.padding[0] - op.dilation[0] * (kh - 1) - 1) // op.stride[0] + 1
    return out.reshape(n, cout, h, -1)


INT_LAYER_CASES = {  # layer, activation bits, weight bits, input (signed or not)
    "conv3x3_a2u_w3": (lambda: nn.Conv2d(6, 5, 3, padding=1), 2, 3, "relu"),
    "depthwise_stride2_a3s_w8": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False), 3, 8,
                                 "signed"),
    "grouped_strided_dilated_a8u_w2": (lambda: nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2), 8, 2,
                                       "relu"),
    "conv1x1_stride2_a2s_w4": (lambda: nn.Conv2d(6, 7, 1, stride=2, bias=False), 2, 4, "signed"),
    "linear_a8s_w8": (lambda: nn.Linear(24, 10), 8, 8, "signed"),
    "linear_a3u_w2": (lambda: nn.Linear(24, 10, bias=False), 3, 2, "relu"),
}


@pytest.mark.parametrize("case", list(INT_LAYER_CASES))
def test_integer_layer_matches_quant_layer(case):
    make, a_bits, w_bits, kind = INT_LAYER_CASES[case]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(4, 24) if isinstance(layer, nn.Linear) else torch.randn(3, 6, 9, 9)
    x = x.relu() if kind == "relu" else x
    q, il = _exported_layer(layer, a_bits, w_bits, x)
    assert il.a_signed == (kind == "signed") and (il.a_bits, il.w_bits) == (a_bits, w_bits)
    x2 = x * 1.3 + 0.05 * (kind == "relu")  # another input, partly outside the calibrated range (clamped)
    for inp in (x, x2):
        with torch.no_grad():
            ref = q(inp)  # the fake-quantized forward (float32)
            out = il(inp)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        # the codes: LSQ's own fake quantization divided by its step, and the exact accumulator
        s_a = mm.positive(q.act.step.detach()[1])
        codes = mm.lsq_quantize(inp, s_a, a_bits, il.a_signed) / s_a
        assert torch.equal(il.codes(inp), codes.round()) and (codes - codes.round()).abs().max() < 1e-4
        acc = il.accumulate(il.codes(inp))
        assert acc.dtype == torch.float64
        assert torch.equal(acc, _int64_accumulator(il.codes(inp), il.w_codes, il.op).double())
        # y = s_a * s_w * acc + bias, in float64 by hand
        s_w = mm.positive(q.weight_quant.step.detach()).item()
        by_hand = acc * (s_a.item() * s_w)
        if layer.bias is not None:
            by_hand = by_hand + (layer.bias.double() if q.op.kind == "linear" else layer.bias.double()[:, None, None])
        assert torch.equal(out, by_hand.float())
    # the weight codes are LSQ's, at w_bits
    s_w = mm.positive(q.weight_quant.step.detach())
    assert torch.equal(il.w_codes.float(), mm.lsq_quantize(layer.weight.detach(), s_w, w_bits, True) / s_w)


def test_integer_layer_refuses_an_inexact_accumulator():
    entry = {"name": "big", "kind": "linear", "weight_shape": [1, 2**40], "a_bits": 8, "a_signed": False,
             "a_step": 1.0, "w_bits": 8, "w_signed": True, "w_step": 1.0, "bias": None,
             "w_packed": torch.zeros(0, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="2\\^53"):
        mm.IntegerLayer(entry)


def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


def test_export_of_any_model_and_the_disagreement_check(tmp_path):
    """integer_model on a model that is not torchvision's; compare_logits finds a wrong scale."""
    torch.manual_seed(0)
    model = mm.patch_model(_tiny_net(), [8, 4, 2], 4, bops_image_size=16)
    x = torch.randn(16, 3, 16, 16)
    mm.init_quantizers(model, x)
    mm.start_weight_training(model, mm.gbops_range(model, 4)[1])
    model.eval()
    with pytest.raises(ValueError, match="not in weight training"):
        mm.export_layer(mm.QuantLayer(nn.Linear(3, 3), [4], 4))
    ex = mm.integer_export(model, "tiny", 5)
    path = tmp_path / "model_int.pth"
    torch.save(ex, path)
    int_model = mm.load_integer_model(str(path), _tiny_net())
    assert sum(isinstance(m, mm.IntegerLayer) for m in int_model.modules()) == 4
    loader = [(x[:8], torch.arange(8) % 5), (x[8:], torch.arange(8) % 5)]
    p = mm.compare_logits(model, int_model, loader, mm.Dist())
    assert p["n"] == 16 and p["argmax_differs"] == 0 and p["top1_integer"] == p["top1_fake_quant"]
    assert p["layer_rel_diff"] < 1e-5 and p["max_logit_diff"] <= 1e-5 * p["max_abs_logit"] and mm.export_agrees(p)
    diff64, scale64 = mm.float64_logit_diff(model, int_model, x)
    assert diff64 <= 1e-12 * scale64 and mm.export_agrees({**p, "float64_diff": diff64, "float64_scale": scale64})
    assert next(model.parameters()).dtype == torch.float32  # the copies were made float64, not the models
    int_model[3].scale *= 1.001  # a wrong scale in the depthwise layer
    p = mm.compare_logits(model, int_model, loader, mm.Dist())
    assert p["layer_rel_diff"] > 5e-4 and not mm.export_agrees(p)
    int_model[3].scale /= 1.001
    int_model[4].running_mean += 0.5  # wrong float state: layer by layer cannot see it, float64 does
    p = mm.compare_logits(model, int_model, loader, mm.Dist())
    diff64, scale64 = mm.float64_logit_diff(model, int_model, x)
    assert p["layer_rel_diff"] < 1e-5 and not mm.export_agrees({**p, "float64_diff": diff64, "float64_scale": scale64})
    assert not mm.export_agrees({"layer_rel_diff": 0.0, "argmax_differs": 3, "n": 100})
    assert mm.export_agrees({"layer_rel_diff": 1e-6, "argmax_differs": 2, "n": 100})
    with pytest.raises(ValueError, match="not a metamix integer export"):
        mm.integer_model({"format": "other"})


def _fake_quant_from_checkpoint(out: Path) -> tuple:
    """The trained fake-quantized model, rebuilt in-process from checkpoint.pth, and the validation images."""
    ck = load_ck(out / "checkpoint.pth")
    a = ck["args"]
    model = torchvision.models.get_model(a["arch"], weights=None, num_classes=a["synthetic_classes"])
    model = mm.patch_model(model, a["bits"], a["w_bits"], a["first_last_bits"], a["bops_image_size"])
    model.load_state_dict(ck["model"])
    mm.set_mode(model, "selected", quant_weights=True)
    val = mm.synthetic_dataset(a["synthetic_val"], a["synthetic_classes"], a["image_size"], a["seed"], "val")
    return model.eval(), torch.stack([val[i][0] for i in range(len(val))])


def check_export(out: Path, stdout: str, arch: str, n_layers: int) -> None:
    """model_int.pth: plain types, every layer packed at its width; the integer model's logits equal
    the fake-quantized model's within float tolerance (float64), with the same argmax (float32 too)."""
    assert not list(out.glob("*.tmp.*"))
    ex = torch.load(out / "model_int.pth", map_location="cpu", weights_only=True)
    assert ex["format"] == "metamix-int-1" and ex["arch"] == arch and ex["num_classes"] == 10
    assert ex["bits_report"]["arch"] == arch and len(ex["layers"]) == n_layers
    bits = json.loads((out / "bits.json").read_text())
    assert [(e["name"], e["a_bits"], e["a_signed"]) for e in ex["layers"]] == \
        [(r["name"], r["a_bits"], r["signed"]) for r in bits["layers"]]
    for e in ex["layers"]:
        numel = math.prod(e["weight_shape"])
        assert e["w_packed"].numel() == -(-numel // {2: 4, 3: 2, 4: 2}.get(e["w_bits"], 1))
        assert e["a_step"] > 0 and e["w_step"] > 0 and isinstance(e["a_step"], float)
    assert ex["layers"][0]["w_bits"] == 8 and ex["layers"][1]["w_bits"] == 4
    assert not any(k.startswith(ex["layers"][0]["name"] + ".") for k in ex["float_state"])

    lines = [line for line in stdout.splitlines() if line.startswith("export:")]
    assert len(lines) == 2, stdout[-3000:]  # no WARNING line
    assert f"{arch}, W4 with A8/W8 first/last" in lines[0] and "MiB FP32" in lines[0]
    mib, fp32_mib = map(float, re.findall(r"([\d.]+) MiB", lines[0]))
    assert mib == pytest.approx((out / "model_int.pth").stat().st_size / 2**20, abs=0.051) and fp32_mib > 5 * mib
    top1_int, top1_fq = map(float, re.search(r"top-1 ([\d.]+)% vs fake-quantized ([\d.]+)%", lines[1]).groups())
    assert top1_int == top1_fq and "on 32 images" in lines[1]
    assert float(re.search(r"float64 on one batch: largest logit difference (\S+)", lines[1]).group(1)) < 1e-9

    model, x = _fake_quant_from_checkpoint(out)
    int_model = mm.load_integer_model(str(out / "model_int.pth"))
    with torch.no_grad():
        a32, b32 = model(x), int_model(x)
        assert torch.equal(a32.argmax(1), b32.argmax(1))
        a64, b64 = model.double()(x.double()), int_model.double()(x.double())
    scale = a64.abs().max().item()
    assert (a64 - a64.mean(0)).abs().max() > 0.1 * scale, "logits that do not depend on the image prove nothing"
    assert (a64 - b64).abs().max() <= 1e-9 * scale
    assert torch.equal(a64.argmax(1), b64.argmax(1))


def test_export_resnet18_from_a_finished_checkpoint(ref_run, tmp_path):
    out = copy_run(ref_run, tmp_path)
    before = fingerprint(out)
    p = run_cli(*REF, "--output-dir", out, "--resume", out / "checkpoint.pth", "--export", timeout=180)
    assert "export: not written" not in p.stdout
    after = fingerprint(out)
    assert {k: v for k, v in after.items() if k != "model_int.pth"} == before, "export changed the run's files"
    check_export(out, p.stdout, "resnet18", 21)


def test_export_mobilenet_v3_large_at_the_end_of_a_run(tmp_path):
    # Our choice for this test: start from BN statistics of the synthetic images (--init). From
    # torchvision's init, MobileNet-v3's eval-mode logits do not depend on the image (about 1e-10).
    torch.manual_seed(0)
    fp = torchvision.models.mobilenet_v3_large(num_classes=10)
    for m in fp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over one pass
    ds = mm.synthetic_dataset(64, 10, 32, 0, "train")
    with torch.no_grad():
        fp.train()(torch.stack([ds[i][0] for i in range(64)]))
    for m in fp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.01
    torch.save(fp.state_dict(), tmp_path / "init.pth")
    out = tmp_path / "out"
    tiny = [a if a != "resnet18" else "mobilenet_v3_large" for a in TINY]
    p = run_cli(*tiny, "--epochs", "3", "--init", tmp_path / "init.pth", "--output-dir", out, "--export")
    assert "summary:" in p.stdout
    check_export(out, p.stdout, "mobilenet_v3_large", 64)
    # Figure 9 (section 10) through hardswish and hardsigmoid, which autograd cannot differentiate twice as is
    f9 = json.loads((out / "bits.json").read_text())["figure9"]
    assert "error" not in f9 and f9["layers"] == 62 and f9["spearman"]["a_bits"].keys() == {
        "hessian_trace", "macs", "trace_per_op"}


def test_export_bad_input(stopped_run, tmp_path):
    """Still in bit selection, a missing or a foreign checkpoint: one line, exit 2, no file written."""
    out = copy_run(stopped_run, tmp_path)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, foreign)
    cases = [(out / "checkpoint.pth", ["still in bit selection", "epoch 1 of 2"]),
             (tmp_path / "missing.pth", [str(tmp_path / "missing.pth"), "no such file"]),
             (foreign, [str(foreign), "not a metamix checkpoint"])]
    for ck, needles in cases:
        before = fingerprint(out)
        p = run_cli(*REF, "--output-dir", out, "--resume", ck, "--export", check=False, timeout=180)
        error_line(p, *needles)
        assert p.returncode == 2
        assert fingerprint(out) == before and not (out / "model_int.pth").exists()
    fresh = tmp_path / "fresh"
    p = run_cli(*REF, "--output-dir", fresh, "--export", "--evaluate", check=False)
    error_line(p, "--export and --evaluate")
    assert not fresh.exists() or not any(fresh.iterdir())


# =============================================================================================
# Issue 11: other selections through the same pipeline (section 9)
# =============================================================================================


def _brute_force_mckp(scores, costs, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[i] for c, i in zip(costs, choice)) <= budget:
            v = sum(s[i] for s, i in zip(scores, choice))
            best = v if best is None or v < best else best
    return best


def test_knapsack_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for trial in range(300):
        n_layers, n_choices = rng.randint(1, 6), rng.randint(1, 4)
        costs = [[rng.randint(0, 12) for _ in range(n_choices)] for _ in range(n_layers)]
        scores = [[rng.choice([rng.uniform(-1, 2), float(rng.randint(0, 3))]) for _ in range(n_choices)]
                  for _ in range(n_layers)]  # integer scores make ties
        budget = rng.randint(0, 12 * n_layers)
        got = mm.mckp_exact(scores, costs, budget)
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
    costs, fixed = mm.bops_costs(model)
    assert fixed == round(mm.c_fixed_of(model) * 1e9)
    g = math.gcd(*[c for row in costs for c in row])
    rng = random.Random(1)
    for target in (22.0, 27.0, 33.0):
        budget = mm.budget_bops(target, fixed)
        scores = [[0.0, rng.uniform(0, 1), rng.uniform(0.5, 3)] for _ in costs]  # A8 free, A2 dear
        cap = budget // g
        inf = float("inf")
        dp = [0.0] * (cap + 1)  # dp[c]: best score with total reduced cost <= c
        for sc, co in zip(scores, costs):
            dp = [min((dp[c - k // g] + s for s, k in zip(sc, co) if k // g <= c), default=inf) for c in range(cap + 1)]
        got = mm.mckp_exact(scores, costs, budget)
        assert sum(c[i] for c, i in zip(costs, got)) <= budget
        assert mm.config_gbops([m.macs for m in mm.searched_layers(model)], [[8, 4, 2][i] for i in got], 4,
                               mm.c_fixed_of(model)) <= target + 1e-9
        assert sum(s[i] for s, i in zip(scores, got)) == pytest.approx(dp[cap], abs=1e-9)


def _tiny_mlp():
    """Flatten -> Linear(3,4) [fixed] -> Tanh -> Linear(4,3) -> Tanh -> Linear(3,3) -> Tanh -> Linear(3,2) [fixed],
    float64; patched at a 1x1 'image' so the searched layers' inputs have 4 and 3 features per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3),
                          nn.Tanh(), nn.Linear(3, 2))
    mm.patch_model(model, [8, 4, 2], 4, bops_image_size=1)
    model.double()
    mm.set_mode(model, "fp")
    return model


def test_hutchinson_equals_exact_hessian_trace_in_float64():
    """Every Rademacher vector enumerated once (E[v v^T] = I exactly): the estimate must be the exact trace of
    d^2 L / d x_l^2 (torch.autograd.functional.hessian), for each searched layer's input."""
    model = _tiny_mlp()
    x, y = torch.randn(2, 3, 1, 1, dtype=torch.float64), torch.tensor([0, 1])
    layers = mm.searched_layers(model)
    exact = []
    for m in layers:
        rec = {}
        h = m.register_forward_pre_hook(lambda mod, inp: rec.update(x=inp[0].detach().clone()))
        model(x)
        h.remove()

        def loss_of(z, m=m):
            hook = m.register_forward_pre_hook(lambda mod, inp: (z,))
            try:
                return F.cross_entropy(model(x), y)
            finally:
                hook.remove()

        H = torch.autograd.functional.hessian(loss_of, rec["x"])
        exact.append(H.reshape(rec["x"].numel(), -1).diagonal().sum().item())
    assert all(abs(t) > 1e-4 for t in exact)  # a test that can fail: the traces are not zero

    # all 2^n sign vectors of each input's shape, handed out in order, cycling (n = 8 and 6 elements)
    counters = {}

    def enumerate_signs(shape, dtype, device, generator):
        n = math.prod(shape)
        k = counters.get(n, 0)
        counters[n] = k + 1
        bits = [(k >> j) & 1 for j in range(n)]
        return (torch.tensor(bits, dtype=dtype) * 2 - 1).reshape(shape)

    got = mm.hutchinson_traces(model, x, y, probes=256, probe_fn=enumerate_signs)
    assert got.tolist() == pytest.approx(exact, rel=1e-10, abs=1e-12)
    # and the default Rademacher estimate converges to it
    est = mm.hutchinson_traces(model, x, y, probes=3000, generator=torch.Generator().manual_seed(0))
    assert est.tolist() == pytest.approx(exact, rel=0.1)


def test_proxy_scores_by_hand():
    model, _, _ = _tiny_patched()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 4  # small: the Hessian costs a double backward per layer
    layers = mm.searched_layers(model)
    sens = mm.proxy_scores(model, [(x, y)], "sensitivity")
    assert sens.shape == (19, 3) and (sens[:, 0] == 0).all()  # the largest candidate is the reference
    ref = copy.deepcopy(model).eval()
    mm.set_mode(ref, "meta", 0)
    with torch.no_grad():
        base = F.cross_entropy(ref(x), y).item()
        mm.searched_layers(ref)[5].act.branch = 2
        rise = F.cross_entropy(ref(x), y).item() - base
    assert sens[5, 2].item() == pytest.approx(rise, rel=1e-5, abs=1e-7)
    assert model.training  # restored

    hess = mm.proxy_scores(model, [(x, y)], "hessian", probes=2)
    assert (hess >= 0).all() and (hess[:, 0] < hess[:, 1]).all() and (hess[:, 1] < hess[:, 2]).all()
    # 1/2 Tr(H) * MSE: the ratio between candidates is the ratio of the quantization errors
    m = layers[3]
    xs = {}
    hs = mm._layer_inputs(model, layers, xs)
    model.eval()
    mm.set_mode(model, "fp")
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    mse = [(xs[m] - mm._lsq_forward(xs[m], mm.positive(m.act.step.detach()[i]), *mm.lsq_range(b, m.act.signed)))
           .pow(2).mean().item() for i, b in enumerate(m.act.bits)]
    assert (hess[3, 2] / hess[3, 1]).item() == pytest.approx(mse[2] / mse[1], rel=1e-5)


def test_uniform_and_random_selections():
    model = mm.patch_model(torchvision.models.resnet18(), [8, 4, 2], 4)
    layers = mm.searched_layers(model)
    macs, c_fixed = [m.macs for m in layers], mm.c_fixed_of(model)
    budgets = mm.uniform_budgets(model)
    assert budgets[4] == pytest.approx(34.714, abs=1e-3)  # the README's dry-run table
    assert mm.uniform_selection(model, budgets[4]) == [1] * 19
    assert mm.uniform_selection(model, budgets[4] - 0.01) == [2] * 19
    with pytest.raises(mm.BadInput, match=r"A2 21\.150, A4 34\.714, A8 61\.843"):
        mm.uniform_selection(model, 21.0)
    costs, fixed = mm.bops_costs(model)
    seen = set()
    for seed in range(20):
        target = 22 + seed
        sel = mm.random_selection(model, target, seed)
        assert sel == mm.random_selection(model, target, seed)  # seeded
        gb = mm.config_gbops(macs, [[8, 4, 2][i] for i in sel], 4, c_fixed)
        assert gb <= target + 1e-9
        total = sum(c[i] for c, i in zip(costs, sel))
        budget = mm.budget_bops(target, fixed)
        for l, i in enumerate(sel):  # filled: no layer can go one candidate up without going over
            if i > 0:
                assert total - costs[l][i] + costs[l][i - 1] > budget
        seen.add(tuple(sel))
    assert len(seen) == 20


def test_scratch_defaults_for_a_folder(tmp_path):
    data = make_image_folder(tmp_path / "data")
    p = mm.get_args_parser()
    a = mm.resolve_args(p.parse_args(["--data", str(data)]))
    assert a.alpha_optimizer == "sgd"  # the default, from the digits study
    assert a.lr == mm.SCRATCH_DEFAULTS["lr"] and a.alpha_lr == mm.ALPHA_LR["sgd"][1] == 0.05
    assert a.scratch_defaults == [f"--lr {a.lr}", f"--alpha-lr {a.alpha_lr}"]
    a = mm.resolve_args(p.parse_args(["--data", str(data), "--lr", "0.2", "--alpha-optimizer", "adam"]))
    assert a.lr == 0.2 and a.alpha_lr == mm.ALPHA_LR["adam"][1] and a.scratch_defaults == [f"--alpha-lr {a.alpha_lr}"]
    a = mm.resolve_args(p.parse_args(["--data", str(data), "--init", "x.pth"]))  # fine-tuning: ImageNet defaults
    assert a.lr == 0.01 and a.alpha_lr == mm.ALPHA_LR["sgd"][0] == 0.005 and a.scratch_defaults == []
    a = mm.resolve_args(p.parse_args(["--alpha-optimizer", "adam"]))
    assert a.alpha_lr == mm.ALPHA_LR["adam"][1] and a.scratch_defaults == []


METHOD_RUN = TINY + ["--epochs", "3", "--target-gbops", "28", "--proxy-batches", "2", "--hutchinson-probes", "1"]


@pytest.mark.parametrize("method, extra", [("metamix", ["--alpha-optimizer", "adam"]), ("metamix-unfixed", []),
                                           ("uniform", []), ("random", []), ("hessian", []), ("sensitivity", [])])
def test_each_method_end_to_end(tmp_path, method, extra):
    out = tmp_path / "out"
    p = run_cli(*METHOD_RUN, "--search", method, *extra, "--output-dir", out)
    assert "summary:" in p.stdout
    bits = json.loads((out / "bits.json").read_text())
    assert bits["search"] == method and bits["gbops"] <= bits["target_gbops"] + 1e-9 == 28 + 1e-9
    assert read_log(out)[-1]["gbops"] == pytest.approx(bits["gbops"])
    searched = [r for r in bits["layers"] if not r["fixed"]]
    assert len(searched) == 19 and all(r["a_bits"] in (8, 4, 2) for r in searched)
    if method in ("hessian", "sensitivity"):
        assert bits["proxy"]["batches"] == 2
        assert all(len(r["scores"]) == 3 and all(math.isfinite(v) for v in r["scores"]) for r in searched)
        # the selection is the knapsack's optimum of those scores
        model = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4)
        costs, fixed = mm.bops_costs(model)
        best = mm.mckp_exact([r["scores"] for r in searched], costs, mm.budget_bops(28, fixed))
        assert sum(r["scores"][i] for r, i in zip(searched, best)) == pytest.approx(
            sum(r["scores"][[8, 4, 2].index(r["a_bits"])] for r in searched), abs=1e-6)
    else:
        assert all("scores" not in r for r in searched) and "proxy" not in bits
    if method.startswith("metamix"):
        trace = json.loads((out / "alphas.json").read_text())
        assert len(trace["steps"]) == 4 and len(trace["steps"][0]["probs"]) == 19
        assert trace["alpha_optimizer"] == ("adam" if extra else "sgd")
        assert trace["alpha_lr"] == (mm.ALPHA_LR["adam"][1] if extra else 0.05)
        assert [r["probs"] for r in searched] == [[pytest.approx(p, abs=1e-4) for p in q]
                                                  for q in trace["steps"][-1]["probs"]]
    else:
        assert not (out / "alphas.json").exists()
        assert all(r["probs"] == [pytest.approx(1 / 3)] * 3 for r in searched)  # the alphas never moved
    if method == "uniform":
        assert {r["a_bits"] for r in searched} == {2}  # A4 is 34.7 GBOPs, over 28


def test_methods_without_search_reach_the_same_meta_state(tmp_path):
    """Skipping the bit-search steps leaves the meta-state bit for bit as MetaMix's (they change only alphas)."""
    outs = {}
    for method in ("metamix", "uniform"):
        outs[method] = tmp_path / method
        run_cli(*TINY, "--epochs", "3", "--stop-after-epoch", "2", "--search", method, "--output-dir", outs[method])
    a, b = load_ck(outs["metamix"] / "checkpoint.pth")["model"], load_ck(outs["uniform"] / "checkpoint.pth")["model"]
    differ = [k for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])]
    assert differ and all(k.endswith("act.alpha") for k in differ), differ


def test_bits_from_reproduces_a_selection(ref_run, tmp_path):
    out = tmp_path / "out"
    run_cli(*TINY, "--epochs", "3", "--bits-from", ref_run / "bits.json", "--output-dir", out)
    ref, got = json.loads((ref_run / "bits.json").read_text()), json.loads((out / "bits.json").read_text())
    assert got["search"] == "bits-from" and got["bits_from"] == str(ref_run / "bits.json")
    assert [r["a_bits"] for r in got["layers"]] == [r["a_bits"] for r in ref["layers"]]
    assert not (out / "alphas.json").exists()  # the selection is given: no bit-search steps are taken


def _layer_map(a_bits=4):
    model = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4, bops_image_size=224)
    return {m.name: a_bits for m in mm.searched_layers(model)}


def _pair_rows(w_bits=4, **special):
    """A bits.json's "layers", single-W shaped (every searched layer A4/W4, first and last A8/W8), with
    `special` {layer name (dots as __): w_bits} overriding a layer's W."""
    rows = [{"name": "conv1", "a_bits": 8, "w_bits": 8}, {"name": "fc", "a_bits": 8, "w_bits": 8}]
    rows += [{"name": k, "a_bits": 4, "w_bits": special.get(k.replace(".", "__"), w_bits)} for k in _layer_map()]
    return {"layers": rows}


@pytest.mark.parametrize("content, flags, needles", [
    ({**_layer_map(), "layer9.conv": 4}, [], ["unknown layer 'layer9.conv'"]),
    ({k: v for k, v in _layer_map().items() if k != "layer3.1.conv2"}, [], ["no bits for layer layer3.1.conv2"]),
    ({**_layer_map(), "layer2.0.conv1": 3}, [], ["layer2.0.conv1", "bits 3", "8,4,2"]),
    ({**_layer_map(), "fc": 4}, [], ["layer fc", "fixed at 8"]),
    (_layer_map(8), [], ["61.811 GBOPs", "over --target-gbops 33.000"]),  # the default target; 10 classes
    ("not json", [], ["not JSON"]),
    ([1, 2], [], ["expected a bits.json"]),
    (_layer_map(), ["--search", "random"], ["--bits-from and --search random"]),
    # pair mode (--w-bits list) and per-layer W
    (_layer_map(), ["--w-bits", "8,4,2"], ["layer layer1.0.conv1 has 4, not an (A, W) pair", "[a_bits, w_bits]",
                                           "A among 8,4,2, W among 8,4,2"]),
    ({**{k: [4, 4] for k in _layer_map()}, "layer2.0.conv1": [4, 3]}, ["--w-bits", "8,4,2"],
     ["layer layer2.0.conv1 has the pair [4, 3], not among its candidates: A among 8,4,2, W among 8,4,2"]),
    ({**{k: [4, 4] for k in _layer_map()}, "layer2.0.conv1": [4, 2]}, ["--w-bits", "8,4"],
     ["layer2.0.conv1", "[4, 2]", "W among 8,4"]),
    ({**_layer_map(), "layer3.0.conv2": [4, 8]}, [], ["layer layer3.0.conv2 has W 8, not --w-bits 4"]),
    (_pair_rows(layer4__1__conv1=2), [], ["layer layer4.1.conv1 has W 2, not --w-bits 4"]),
    ({**_layer_map(), "fc": [8, 4]}, [], ["layer fc has W 4, not fixed at W8"]),
    ({k: [8, 8] for k in _layer_map()}, ["--w-bits", "8,4,2"], ["116.068 GBOPs", "over --target-gbops 32.948"]),
], ids=["unknown-name", "missing-layer", "bits-not-candidate", "fixed-layer", "over-target", "not-json", "list",
        "with-search", "int-in-pair-mode", "pair-not-candidate", "w-not-in-list", "w-not-single", "bits-json-w",
        "fixed-w", "pair-over-target"])
def test_bits_from_bad_input(tmp_path, content, flags, needles):
    f = tmp_path / "bits.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "out"
    p = run_cli(*TINY, "--epochs", "3", "--bits-from", f, *flags, "--output-dir", out, check=False, timeout=120)
    error_line(p, "--bits-from", *needles)
    assert not out.exists(), "refused before the output dir is touched"


@pytest.mark.parametrize("flags, needles", [
    (["--search", "uniform", "--target-gbops", "21"], ["no uniform configuration fits", "A2 21.118, A4 34.682"]),
    (["--search", "greedy"], ["--search 'greedy'", "sensitivity"]),
    (["--alpha-optimizer", "rmsprop"], ["--alpha-optimizer 'rmsprop'"]),
    (["--proxy-batches", "0"], ["--proxy-batches 0"]),
], ids=["uniform-infeasible", "search", "alpha-optimizer", "proxy-batches"])
def test_search_bad_arguments(tmp_path, flags, needles):
    out = tmp_path / "out"
    p = run_cli(*TINY, "--epochs", "3", "--bops-image-size", "224", *flags, "--output-dir", out, check=False,
                timeout=120)
    error_line(p, *needles)
    assert not out.exists()


def test_resume_refuses_another_search(stopped_run, tmp_path):
    out = copy_run(stopped_run, tmp_path)
    before = fingerprint(out)
    p = run_cli(*REF, "--output-dir", out, "--resume", "auto", "--search", "random", check=False, timeout=120)
    error_line(p, "search=metamix", "this run random")
    assert fingerprint(out) == before


def test_study_table_pairs_methods_by_seed():
    import study_digits as sd

    runs = [dict(arch="resnet18", target=23.0, method=m, seed=s, top1=t, gbops=g, avg_bits=3.0, avg_bits_mac=2.5)
            for m, s, t, g in [("random", 0, 90.0, 22.9), ("random", 1, 80.0, 22.8), ("metamix", 0, 91.0, 22.5),
                               ("metamix", 1, 83.0, 22.7)]]
    rows = {r.split("|")[3].strip(): [c.strip() for c in r.split("|")] for r in sd.table(runs, {"resnet18": 98.0})
            .splitlines()[2:]}
    # paired: +1 (seed 0) and +3 (seed 1): mean +2, sd sqrt(2); unpaired the spread would be 5.7
    assert rows[sd.label("metamix")][6] == f"+2.00 ± {math.sqrt(2):.2f}" and rows[sd.label("metamix")][7] == "+1.00 +3.00"
    assert rows[sd.label("metamix")][5] == f"87.00 ± {math.sqrt(32):.2f}" and rows[sd.label("random")][6] == "-"
    assert rows[sd.label("metamix")][8] == "22.60" and "FP 98.00" in rows[sd.label("metamix")][1]


def test_study_table_pairs_against_the_w4_run_of_each_seed():
    import study_digits as sd

    # two layers with 1 and 3 MMACs; the pair runs pick W (8, 4) and (2, 2): MAC-weighted W 20/4 = 5 and 2
    runs = [dict(arch="resnet18", target=30.0, method=m, seed=s, top1=t, gbops=29.0, avg_bits=3.0, avg_bits_mac=3.0,
                 w_bits=w, avg_w_bits=sum(w) / 2, macs=[1, 3])
            for m, s, t, w in [("metamix", 0, 90.0, [4, 4]), ("metamix", 1, 92.0, [4, 4]),
                               ("metamix-pairs", 0, 91.0, [8, 4]), ("metamix-pairs", 1, 95.0, [2, 2])]]
    rows = {r.split("|")[3].strip(): [c.strip() for c in r.split("|")] for r in
            sd.table_pairs(runs, {"resnet18": 98.0}).splitlines()[2:]}
    assert rows[sd.label("metamix-pairs")][6] == f"+2.00 ± {math.sqrt(2):.2f}" and rows[sd.label("metamix-pairs")][7] == "+1.00 +3.00"
    assert rows[sd.label("metamix")][6] == "-" and rows[sd.label("metamix")][10] == "4.00 (4.00)"
    assert rows[sd.label("metamix-pairs")][10] == "4.00 (3.50)"  # plain (6 + 2) / 2; MAC-weighted (5 + 2) / 2
    # Figure 9 over seeds: rho(A bits, trace) 0.2 and 0.4 -> +0.30 ± 0.14; a run without the field is left out
    for r, rho in zip(runs[2:], (0.2, 0.4)):
        r["figure9"] = {"spearman": {"a_bits": {"hessian_trace": rho, "macs": -0.5, "trace_per_op": None},
                                     "w_bits": {"hessian_trace": 0.0, "macs": 0.0, "trace_per_op": 0.0}}}
    f9 = {(c[1].strip(), c[2].strip()): [x.strip() for x in c] for c in
          (r.split("|") for r in sd.figure9_summary(runs).splitlines()[2:])}
    assert f9[(sd.label("metamix-pairs"), "a_bits")][4:7] == [f"+0.30 ± {math.sqrt(0.02):.2f}", "-0.50 ± 0.00", "n/a"]
    assert (sd.label("metamix-pairs"), "w_bits") in f9 and len(f9) == 2
    assert sd.label("metamix-sgd-pairs") == "metamix SGD 0.05 (default), 9 (A, W) pairs"
    assert sd.method_flags("metamix-sgd-pairs") == [*sd.method_flags("metamix-sgd"), "--w-bits", "8,4,2"]


# Issue 13: (A, W) pair search, the supplement's extension (Supplement, Table 7)
# =============================================================================================

A_BITS, W_LIST = [8, 4, 2], [8, 4, 2]


def _pair_layer(kind: str, w_bits=W_LIST, dtype=torch.float64):
    torch.manual_seed(3)
    if kind == "linear":
        layer, x = nn.Linear(12, 5), torch.randn(3, 12, dtype=dtype)
    else:
        layer = nn.Conv2d(4, 6 if kind == "conv" else 4, 3, stride=2, padding=1, groups=1 if kind == "conv" else 4,
                          bias=kind == "conv")
        x = torch.randn(2, 4, 7, 7, dtype=dtype)
    return mm.QuantLayer(layer.to(dtype), A_BITS, w_bits, "l"), layer, x


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("kind", ["conv", "grouped", "linear"])
@pytest.mark.parametrize("mode", ["branch", "search"])
def test_pair_layer_equals_composed_autograd(kind, mode, x_grad):
    """Pair mode, value and every gradient in float64, against composed autograd written from the formula:
    search: sum over (a, w) of p_aw * op(lsq_quantize(x, s_a), lsq_quantize(W, s_w)) + b, p = softmax over the
    9 pairs; branch (bit-meta, weight training): the one pair (A4, W2), candidate index 1 * 3 + 2 = 5."""
    q, layer, x = _pair_layer(kind)
    assert q.candidates == [(a, w) for a in A_BITS for w in W_LIST] and q.act.alpha.shape == (9,)
    q.act.mode = mode
    q.act.branch, q.w_branch = q.split(5)
    assert (q.act.branch, q.w_branch) == (1, 2) and q.weight_quant is q.weight_quants[2]
    for wq in q.weight_quants:
        wq.enabled = True
    with torch.no_grad():
        q.act.alpha.copy_(torch.linspace(-1, 1, 9) ** 2 * torch.tensor([1, -1.0] * 4 + [1]))
    q(x)  # LSQ init of every step
    with torch.no_grad():  # distinct steps, so that a mixed-up step cannot go unnoticed
        for j, wq in enumerate(q.weight_quants):
            wq.step.mul_(1 + 0.1 * j)
    params = [q.act.step, q.act.alpha, q.weight] + [wq.step for wq in q.weight_quants] + \
             ([q.bias] if q.bias is not None else [])
    x1 = x.clone().requires_grad_(x_grad)
    y1 = q(x1)
    up = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x1] * x_grad + params, up, allow_unused=True)

    x2 = x.clone().requires_grad_(x_grad)
    per_sample = x2[0].numel()
    signed = bool(x.min() < 0)

    def op(xa, w):
        if kind == "linear":
            return F.linear(xa, w)
        return F.conv2d(xa, w, None, 2, 1, 1, layer.groups)

    def qa(i):
        return mm.lsq_quantize(x2, q.act.step[i], A_BITS[i], signed, mm.lsq_grad_scale(per_sample, A_BITS[i], signed))

    def qw(j):
        return mm.lsq_quantize(q.weight, q.weight_quants[j].step, W_LIST[j], True)  # grad scale 1/sqrt(numel Qp)

    if mode == "search":
        p = F.softmax(q.act.alpha, 0)
        y2 = sum(p[i * 3 + j] * op(qa(i), qw(j)) for i in range(3) for j in range(3))
    else:
        y2 = op(qa(1), qw(2))
    if q.bias is not None:
        y2 = y2 + (q.bias if kind == "linear" else q.bias.view(-1, 1, 1))
    g2 = torch.autograd.grad(y2, [x2] * x_grad + params, up, allow_unused=True)
    assert torch.allclose(y1, y2, atol=1e-10)
    for a, b in zip(g1, g2):
        if b is None or (mode == "branch" and not b.any()):  # branch mode: other steps get no (or zero) gradient
            assert a is None or not a.any()
        else:
            assert a is not None and torch.allclose(a, b, atol=1e-9), (a, b)
    if mode == "search":
        assert all(g is not None and g.abs().sum() > 0 for g in g1[x_grad:])  # every step, alpha, W, bias learns


class _CountConvs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("w_bits, convs", [(W_LIST, 3), ([4, 2], 2), (4, 1)])
def test_pair_search_runs_one_convolution_per_weight_width(w_bits, convs):
    """By linearity, 9 pairs cost one convolution per W (3), forward and backward, not one per pair (9)."""
    q = mm.QuantLayer(nn.Conv2d(3, 4, 3), A_BITS, w_bits, "c")
    q.act.mode = "search"
    for wq in (q.weight_quants if q.pairs else [q.weight_quant]):
        wq.enabled = True
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    q(x)  # init
    with _CountConvs() as c:
        y = q(x)
    assert c.calls.get("convolution") == convs
    with _CountConvs() as c:
        y.square().sum().backward()
    assert c.calls.get("convolution_backward") == convs and "convolution" not in c.calls


def _two_layer_model(w_bits):
    """conv (fixed) -> conv A -> conv B -> linear (fixed): two searched layers with MACs counted by hand."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return mm.patch_model(model, [4, 2], w_bits, first_last_bits=8, bops_image_size=8)


def test_pair_bops_and_regularizer_by_hand_two_layers():
    """Eq. 4 and Eq. 6 with a * w * OPs per pair, on a model with two searched layers, against hand values."""
    model = _two_layer_model([4, 2])  # candidates (4,4) (4,2) (2,4) (2,2): 16, 8, 8, 4 bit-ops per MAC
    layers = mm.searched_layers(model)
    macs = [4 * 4 * 9 * 64, 8 * 4 * 64]  # 9216, 2048
    c_fixed = (3 * 4 * 9 * 64 + 8 * 2) * 64 / 1e9  # first conv and the linear at A8/W8
    assert [m.macs for m in layers] == macs and mm.c_fixed_of(model) == pytest.approx(c_fixed)
    assert [m.candidates for m in layers] == [[(4, 4), (4, 2), (2, 4), (2, 2)]] * 2
    lo, hi = mm.gbops_range(model)
    assert lo == pytest.approx((9216 + 2048) * 4 / 1e9 + c_fixed) and hi == pytest.approx((9216 + 2048) * 16 / 1e9
                                                                                          + c_fixed)
    # argmax: layer 0 -> (2,4), layer 1 -> (4,2): 9216*8 + 2048*8
    a = torch.tensor([[0.1, 0.2, 0.9, -0.4], [0.0, 1.2, 0.3, 0.5]], requires_grad=True)
    target = 0.05
    reg, gb = mm.bops_regularizer(a, [4, 4, 2, 2], macs, [4, 2, 4, 2], c_fixed, target)
    expect = (9216 * 8 + 2048 * 8) / 1e9 + c_fixed
    assert gb.item() == pytest.approx(expect) and reg.item() == pytest.approx(abs(expect - target))
    reg.backward()
    cost = [16, 8, 8, 4]
    sign = 1.0 if expect > target else -1.0
    for l in range(2):
        e = [math.exp(v) for v in a[l].tolist()]
        p = [v / sum(e) for v in e]
        mean_c = sum(pi * c for pi, c in zip(p, cost))
        for j in range(4):  # d|.|/d alpha_lj = sign * macs_l / 1e9 * p_j * (c_j - sum_k p_k c_k)
            assert a.grad[l, j].item() == pytest.approx(sign * macs[l] / 1e9 * p[j] * (cost[j] - mean_c), rel=1e-5)
    # bit_search_step on the model reports the same argmax GBOPs; selection and current_gbops agree
    with torch.no_grad():
        for al, row in zip(mm.alphas_of(model), a.detach()):
            al.copy_(row)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    mm.init_quantizers(model, x)
    model.train()
    loss, gb2 = mm.bit_search_step(model, x, y, 0.0, target)
    assert gb2.item() == pytest.approx(expect)
    branches, gb3, repaired = mm.select_branches(model, 1.0)
    assert branches == [2, 1] and not repaired and gb3 == pytest.approx(expect)
    assert mm.selected_pairs(model) == [(2, 4), (4, 2)] and mm.current_gbops(model) == pytest.approx(expect)
    assert mm.config_gbops(macs, [2, 4], [4, 2], c_fixed) == pytest.approx(expect)


def test_pair_budget_repair_moves_to_the_next_cost_level():
    """Pair mode: one level down in a * w at a time; among pairs tied at that level, the most probable."""
    a_bits, w_bits = [4, 4, 2, 2], [4, 2, 4, 2]  # cost 16, 8, 8, 4
    macs, c_fixed = [100, 300], 0.0
    probs = [[0.4, 0.1, 0.3, 0.2], [0.7, 0.25, 0.02, 0.03]]
    # 16 * 400 = 6400. Layer 0 (16 -> 8): the more probable of (4,2) 0.1 and (2,4) 0.3 is (2,4):
    # cost (0.4 - 0.3) / (8 * 100) = 1.25e-4. Layer 1 (16 -> 8) via (4,2): (0.7 - 0.25) / (8 * 300) = 1.9e-4.
    out = mm.repair_to_budget(probs, [0, 0], a_bits, macs, w_bits, c_fixed, 6000 / 1e9)
    assert out == [2, 0]
    # 4000 needs both moved: after layer 0, layer 0 (8 -> 4) costs (0.3 - 0.2) / 400 = 2.5e-4 > 1.9e-4
    out = mm.repair_to_budget(probs, [0, 0], a_bits, macs, w_bits, c_fixed, 4000 / 1e9)
    assert out == [2, 1] and 8 * 100 + 8 * 300 <= 4000
    # single W: the per-candidate list [w] * N gives the same as the int (today's rule)
    p3 = [[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1]]
    for t in (4400, 3000, 1200):
        assert mm.repair_to_budget(p3, [0, 0, 0], [8, 4, 2], [100, 100, 400], 1, 0.0, t / 1e9) == \
            mm.repair_to_budget(p3, [0, 0, 0], [8, 4, 2], [100, 100, 400], [1, 1, 1], 0.0, t / 1e9)


def test_single_w_layer_is_the_papers():
    """A single --w-bits builds today's layer: the same state-dict keys and the very same fused-op call."""
    q, _, x = _pair_layer("conv", w_bits=4, dtype=torch.float32)
    assert not q.pairs and "weight_quants" not in q._modules and q.weight_quant is q._modules["weight_quant"]
    assert list(q.state_dict()) == ["weight", "bias", "_extra_state", "act.step", "act.alpha", "act._extra_state",
                                    "weight_quant.step", "weight_quant._extra_state"]
    assert q.act.alpha.shape == (3,) and q.candidates == [(8, 4), (4, 4), (2, 4)]
    q.weight_quant.enabled = True
    for mode in ("branch", "search"):
        q.act.mode, q.act.branch = mode, 1
        y = q(x)
        _, steps, probs, qr, gs = q.act.params_for(x)
        ref = mm._MixedQuantOp.apply(x, steps, probs, q.weight, mm.positive(q.weight_quant.step), q.bias, qr, gs,
                                     q.weight_quant.qparams(q.weight), q.op)
        assert torch.equal(y, ref)
    model = _two_layer_model(4)
    x = torch.randn(2, 3, 8, 8)
    mm.init_quantizers(model, x)
    mm.set_mode(model, "meta", 2)  # bit-meta: FP weights in single-W mode, as in the paper
    assert all(not m.weight_quant.enabled for m in mm.quant_layers(model))
    mm.set_mode(model, "search")
    assert all(not m.weight_quant.enabled for m in mm.quant_layers(model))


def test_pair_mode_set_mode_and_weight_training():
    """Pair mode quantizes a pair's weights at its W in bit-meta and search; selection keeps the W step."""
    model = _two_layer_model([4, 2])
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    mm.init_quantizers(model, x)
    layers = mm.searched_layers(model)
    assert all(wq.initialized for m in layers for wq in m.weight_quants)  # every W step from init_quantizers
    mm.set_mode(model, "meta", 1)  # (4, 2)
    for m in layers:
        assert (m.act.branch, m.w_branch, m.weight_quant.bits) == (0, 1, 2)
        assert all(wq.enabled for wq in m.weight_quants)
    assert not any(m.weight_quant.enabled for m in mm.quant_layers(model) if m.fixed)
    model.train()
    mm.bit_meta_step(model, x, y)  # 4 pairs in turn: every activation and weight step learns
    for m in layers:
        assert (m.act.step.grad != 0).all() and all(wq.step.grad is not None and wq.step.grad != 0
                                                    for wq in m.weight_quants)
        assert m.act.alpha.grad is None
    steps = [[wq.step.item() for wq in m.weight_quants] for m in layers]
    with torch.no_grad():
        for al in mm.alphas_of(model):
            al.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0]))  # (2, 4)
    mm.start_weight_training(model, mm.gbops_range(model)[1])
    for m, s in zip(layers, steps):
        assert m.selected_branch == 2 and (m.act.branch, m.w_branch) == (1, 0) and m.weight_quant.bits == 4
        assert [wq.step.item() for wq in m.weight_quants] == s  # the meta-state's W steps are kept
    for m in mm.quant_layers(model):
        assert m.weight_quant.enabled and m.act.mode == "branch"
    mm.set_mode(model, "fp")
    assert not any(wq.enabled for m in layers for wq in m.weight_quants)


# ---- the driver in pair mode ------------------------------------------------------------------

PAIR = TINY + ["--epochs", "3", "--w-bits", "8,4,2"]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory) -> tuple[Path, str]:
    """PAIR uninterrupted, with --export: 2 bit-selection epochs over 9 pairs, 1 weight-training epoch."""
    out = tmp_path_factory.mktemp("pair") / "out"
    p = run_cli(*PAIR, "--output-dir", out, "--export")
    assert "summary:" in p.stdout
    return out, p.stdout


def test_pair_run_outputs_and_export(pair_run):
    out, stdout = pair_run
    assert "9 (A, W) pairs per layer" in stdout and "/W" in stdout
    bits = json.loads((out / "bits.json").read_text())
    assert bits["w_bits"] == [8, 4, 2] and bits["pairs"] == [[a, w] for a in (8, 4, 2) for w in (8, 4, 2)]
    assert bits["gbops"] <= bits["target_gbops"] + 1e-6
    searched = [r for r in bits["layers"] if not r["fixed"]]
    assert len(searched) == 19 and all(len(r["probs"]) == 9 and abs(sum(r["probs"]) - 1) < 1e-4 for r in searched)
    assert all(r["w_bits"] in (8, 4, 2) and r["a_bits"] in (8, 4, 2) for r in searched)
    assert len({r["w_bits"] for r in searched}) > 1, "a search that never picks another W proves little here"
    macs = [r["macs"] for r in searched]
    c_fixed = sum(r["macs"] * 64 for r in bits["layers"] if r["fixed"]) / 1e9
    assert bits["gbops"] == pytest.approx(sum(r["a_bits"] * r["w_bits"] * m for r, m in zip(searched, macs)) / 1e9
                                          + c_fixed)
    assert bits["avg_w_bits"] == pytest.approx(sum(r["w_bits"] for r in searched) / 19)
    assert read_log(out)[-1]["gbops"] == pytest.approx(bits["gbops"])
    try:
        import matplotlib  # noqa: F401  (optional: bits.png with A and W side by side)
        assert (out / "bits.png").stat().st_size > 0
    except ImportError:
        pass
    # the default target in pair mode: 95% of uniform A4/W4 (the paper's 33 applies to its single-W setting only)
    assert bits["target_gbops"] == pytest.approx(0.95 * (sum(macs) * 16 / 1e9 + c_fixed))
    # export: each layer packed at its own W, and the integer model agrees with the fake-quantized one
    ex = torch.load(out / "model_int.pth", map_location="cpu", weights_only=True)
    assert [(e["name"], e["a_bits"], e["w_bits"]) for e in ex["layers"]] == \
        [(r["name"], r["a_bits"], r["w_bits"]) for r in bits["layers"]]
    for e in ex["layers"]:
        numel = math.prod(e["weight_shape"])
        assert e["w_packed"].numel() == -(-numel // {2: 4, 3: 2, 4: 2}.get(e["w_bits"], 1))
    lines = [line for line in stdout.splitlines() if line.startswith("export:")]
    assert len(lines) == 2 and "per-layer W (average" in lines[0], stdout[-3000:]
    model, x = _fake_quant_from_checkpoint(out)
    assert all(m.pairs for m in mm.searched_layers(model))
    int_model = mm.load_integer_model(str(out / "model_int.pth"))
    with torch.no_grad():
        a64, b64 = model.double()(x.double()), int_model.double()(x.double())
    assert (a64 - b64).abs().max() <= 1e-9 * a64.abs().max()
    for m, e in zip(mm.quant_layers(model), ex["layers"]):  # the exported steps are the selected W's
        assert e["w_step"] == mm.positive(m.weight_quant.step.detach()).item()


def test_pair_resume_inside_bit_selection_is_exact(pair_run, tmp_path):
    ref, _ = pair_run
    out = tmp_path / "out"
    run_cli(*PAIR, "--output-dir", out, "--stop-after-epoch", "1")
    assert load_ck(out / "checkpoint.pth")["epoch"] == 1
    p = run_cli(*PAIR, "--output-dir", out, "--resume", "auto")
    assert "after epoch 1" in p.stdout
    assert_same_run(ref, out)
    ba, bb = json.loads((ref / "bits.json").read_text()), json.loads((out / "bits.json").read_text())
    assert ba == bb  # the per-layer W and every probability too
    # a single-W run cannot resume a pair-mode checkpoint, and the other way round
    p = run_cli(*TINY, "--epochs", "3", "--output-dir", out, "--resume", "auto", check=False)
    error_line(p, "w-bits=[8, 4, 2]", "this run 4")


@pytest.mark.parametrize("w_bits, needles", [
    ("8,4,20", ["--w-bits 20", "between 2 and 16"]),
    ("8,1", ["--w-bits 1", "between 2 and 16"]),
    ("4,4", ["--w-bits '4,4'", "duplicate"]),
    ("4,x", ["--w-bits '4,x'", "integers"]),
], ids=["w-20", "w-1", "duplicate", "not-int"])
def test_pair_bad_w_bits(tmp_path, w_bits, needles):
    out = tmp_path / "out"
    p = run_cli(*PAIR[:-1], w_bits, "--output-dir", out, check=False, timeout=120)
    error_line(p, *needles)
    assert p.returncode == 2 and not out.exists()


def test_pair_dry_run():
    p = run_cli("--w-bits", "8,4,2", "--dry-run")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["w_bits"] == [8, 4, 2] and "A{8,4,2}/W{8,4,2}" in p.stdout
    model = torchvision.models.resnet18()
    macs = [m for _, _, m in mm.trace_layers(model, 224)]
    c_fixed = (macs[0] + macs[-1]) * 64 / 1e9
    assert info["gbops_min"] == pytest.approx(sum(macs[1:-1]) * 4 / 1e9 + c_fixed)
    assert info["gbops_max"] == pytest.approx(sum(macs[1:-1]) * 64 / 1e9 + c_fixed)
    assert info["target_gbops"] == pytest.approx(0.95 * (sum(macs[1:-1]) * 16 / 1e9 + c_fixed))


def test_pair_mode_in_the_baselines_section():
    """Section 9 with (A, W) pairs: exact BOPs per candidate a * w * MACs; the Figure 7(a) search step
    uses them too; the selections that do not search (and --bits-from) are refused in pair mode."""
    model = _two_layer_model([4, 2])
    costs, fixed = mm.bops_costs(model)
    assert costs == [[9216 * c for c in (16, 8, 8, 4)], [2048 * c for c in (16, 8, 8, 4)]]
    assert fixed == (3 * 4 * 9 * 64 + 8 * 2) * 64
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    mm.init_quantizers(model, x)
    with torch.no_grad():
        for al, row in zip(mm.alphas_of(model), [[0.1, 0.2, 0.9, -0.4], [0.0, 1.2, 0.3, 0.5]]):
            al.copy_(torch.tensor(row))
    model.train()
    opt, opt_alpha = _optimizers(model)
    _, gb = mm.unfixed_bit_search_step(model, x, y, opt, opt_alpha, 0.1, 0.05)
    assert gb.item() == pytest.approx((9216 * 8 + 2048 * 8 + fixed) / 1e9)


@pytest.mark.parametrize("method", ["uniform", "random", "hessian", "sensitivity"])
def test_pair_mode_refuses_selections_not_yet_paired(tmp_path, method):
    """--bits-from takes pairs now (test_bits_from_reproduces_a_pair_selection); these still do not."""
    out = tmp_path / "out"
    p = run_cli(*PAIR, "--search", method, "--output-dir", out, check=False, timeout=120)
    error_line(p, f"--search {method} with a --w-bits list", "8,4,2", "not implemented yet", "--bits-from")
    assert p.returncode == 2 and not out.exists()


def test_read_bits_from_pairs_in_process(tmp_path):
    """{name: [a, w]} maps to the candidate index a_idx * len(W) + w_idx; a single-W bits.json (rows at W4)
    seeds a pair run; in single-W mode [a, w] at the run's W is the same as a."""
    model = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], [8, 4, 2])
    names = [m.name for m in mm.searched_layers(model)]
    pairs = [[8, 2], [4, 4], [2, 8], [2, 2]] * 4 + [[4, 8], [8, 4], [2, 4]]
    f = tmp_path / "map.json"
    f.write_text(json.dumps(dict(zip(names, pairs))))
    got = mm.read_bits_from(model, str(f), 60.0)
    assert got == [[8, 4, 2].index(a) * 3 + [8, 4, 2].index(w) for a, w in pairs]
    assert [mm.searched_layers(model)[0].candidates[i] for i in got] == [tuple(p) for p in pairs]
    f.write_text(json.dumps(_pair_rows()))
    assert mm.read_bits_from(model, str(f), 60.0) == [1 * 3 + 1] * 19  # (4, 4)
    with pytest.raises(mm.BadInput, match=r"costs 116\.068 GBOPs, over --target-gbops 100\.000"):
        f.write_text(json.dumps({k: [8, 8] for k in names}))
        mm.read_bits_from(model, str(f), 100.0)
    single = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4)
    f.write_text(json.dumps({**{k: 2 for k in names}, names[3]: [8, 4], "fc": [8, 8], "conv1": 8}))
    assert mm.read_bits_from(single, str(f), 60.0) == [2, 2, 2, 0] + [2] * 15


def test_bits_from_reproduces_a_pair_selection(pair_run, tmp_path):
    """A pair run's bits.json fed back selects the same (A, W) per layer (one bit-selection epoch suffices:
    --bits-from is the selection)."""
    ref, _ = pair_run
    out = tmp_path / "out"
    p = run_cli(*PAIR, "--search-epochs", "1", "--epochs", "1", "--bits-from", ref / "bits.json", "--output-dir", out)
    assert "selection: --bits-from" in p.stdout
    want, got = json.loads((ref / "bits.json").read_text()), json.loads((out / "bits.json").read_text())
    assert got["search"] == "bits-from" and got["w_bits"] == [8, 4, 2]
    assert [(r["name"], r["a_bits"], r["w_bits"]) for r in got["layers"]] == \
        [(r["name"], r["a_bits"], r["w_bits"]) for r in want["layers"]]
    assert len({r["w_bits"] for r in got["layers"] if not r["fixed"]}) > 1
    assert got["gbops"] == want["gbops"] and read_log(out)[-1]["gbops"] == pytest.approx(want["gbops"])


# =============================================================================================
# Issue 13: the supplement's Figure 9 (section 10) and --bits-from in pair mode
# =============================================================================================


def test_spearman_by_hand_with_ties():
    assert mm.average_ranks([8, 4, 4, 2]) == [4, 2.5, 2.5, 1]
    assert mm.average_ranks([2, 2, 2, 8, 2]) == [2.5, 2.5, 2.5, 5, 2.5]
    # ranks (4, 2.5, 2.5, 1) against (1, 2, 3, 4): deviations (1.5, 0, 0, -1.5) and (-1.5, -.5, .5, 1.5),
    # covariance sum -4.5, squares 4.5 and 5: -4.5 / sqrt(22.5) = -3 / sqrt(10)
    assert mm.spearman([8, 4, 4, 2], [1, 2, 3, 4]) == pytest.approx(-3 / math.sqrt(10), rel=1e-12)
    # ties on both sides: ranks (1.5, 1.5, 3, 4) and (1, 2.5, 2.5, 4), deviations (-1, -1, .5, 1.5) and
    # (-1.5, 0, 0, 1.5): 3.75 / sqrt(4.5 * 4.5)
    assert mm.spearman([2, 2, 4, 8], [0.1, 0.5, 0.5, 3.0]) == pytest.approx(3.75 / 4.5, rel=1e-12)
    assert mm.spearman([1, 2, 3], [10, 20, 300]) == 1.0 and mm.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    # undefined: a constant series (every layer at one width), too few values, a NaN
    assert mm.spearman([4, 4, 4], [1, 2, 3]) is None and mm.spearman([1, 2, 3], [5, 5, 5]) is None
    assert mm.spearman([4], [1]) is None and mm.spearman([1, 2, float("nan")], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        mm.spearman([1, 2], [1, 2, 3])


def test_spearman_equals_an_independent_formula():
    """Ranks by counting (#smaller + (#equal + 1) / 2), then Pearson by torch.corrcoef; without ties,
    also the textbook 1 - 6 sum d^2 / (n (n^2 - 1))."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = 3 + trial % 17
        x = [[8, 4, 2][int(i)] for i in torch.randint(0, 3, (n,), generator=g)]  # bits: many ties
        y = torch.randn(n, generator=g, dtype=torch.float64).tolist()
        if trial % 3 == 0:
            y = [round(v) for v in y]  # ties in the other series too
        if len(set(x)) == 1 or len(set(y)) == 1:
            assert mm.spearman(x, y) is None
            continue

        def ranks(v):
            return torch.tensor([sum(u < w for u in v) + (sum(u == w for u in v) + 1) / 2 for w in v],
                                dtype=torch.float64)

        ref = torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1].item()
        assert mm.spearman(x, y) == pytest.approx(ref, abs=1e-12)
        distinct = torch.randperm(n, generator=g).tolist()
        d2 = sum((a - b) ** 2 for a, b in zip(ranks(distinct).tolist(), ranks(y).tolist()))
        if len(set(y)) == n:
            assert mm.spearman(distinct, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)), abs=1e-12)


def test_figure9_traces_are_the_hessian_proxys_and_change_nothing():
    """mean_hessian_traces gives --search hessian's own traces (so reusing them is exact), and leaves the
    model, every mode, every train/eval flag, the .grad fields and the global RNG as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # double backward on 2 busy cores: 0.7 s with one thread, up to 20 s with two
    try:
        _figure9_traces_check()
    finally:
        torch.set_num_threads(threads)


def _figure9_traces_check():
    model, x, y = _tiny_patched()
    x, y = x[:4, :, :16, :16], y[:4]
    batches = [(x, y), (x.flip(0), y.flip(0))]
    mm.apply_selection(model, [0, 1, 2] * 6 + [1])
    mm.switch_to_weight_training(model)
    model.train()
    model.layer2[0].bn1.eval()  # a module whose flag differs from the model's: restored as it was
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    modes = [(m.act.mode, m.act.branch, m.w_branch, m.weight_quant.enabled) for m in mm.quant_layers(model)]
    flags = [mod.training for mod in model.modules()]
    rng = torch.get_rng_state()
    got = mm.mean_hessian_traces(model, batches, probes=1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [(m.act.mode, m.act.branch, m.w_branch, m.weight_quant.enabled) for m in mm.quant_layers(model)] == modes
    assert [mod.training for mod in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert got.shape == (19,) and got.abs().sum() > 0
    traces: list = []
    mm.proxy_scores(model, batches, "hessian", probes=1, seed=3, traces_out=traces)
    assert len(traces) == 2 and torch.equal(torch.stack(traces).mean(0), got)


def _check_figure9(bits: dict, stdout: str, pairs: bool) -> None:
    rows = [r for r in bits["layers"] if not r["fixed"]]
    assert all("hessian_trace" not in r for r in bits["layers"] if r["fixed"])
    for r in rows:
        assert math.isfinite(r["hessian_trace"]) and r["trace_per_op"] == pytest.approx(r["hessian_trace"] / r["macs"])
    f9 = bits["figure9"]
    assert (f9["layers"], f9["batches"], f9["probes"]) == (19, 1, 1)
    series = {"a_bits": [r["a_bits"] for r in rows]}
    if pairs:
        series.update(w_bits=[r["w_bits"] for r in rows], a_times_w=[r["a_bits"] * r["w_bits"] for r in rows])
    assert f9["spearman"].keys() == series.keys()
    for k, sel in series.items():
        for key in ("hessian_trace", "macs", "trace_per_op"):
            want = mm.spearman(sel, [r[key] for r in rows])
            assert f9["spearman"][k][key] == (None if want is None else pytest.approx(want, abs=1e-12))
    lines = [line for line in stdout.splitlines() if line.startswith("Figure 9: rank correlation of selected A bits")]
    assert len(lines) == 1 and "(19 layers; traces on 1 batch(es) x 1 probe(s)" in lines[0], stdout[-3000:]
    c = f9["spearman"]["a_bits"]
    assert f"Hessian trace {c['hessian_trace']:+.2f}, OPs {c['macs']:+.2f}, trace/OPs {c['trace_per_op']:+.2f}" \
        in lines[0]
    assert ("selected W bits with" in lines[0] and "selected a*w with" in lines[0]) == pairs
    assert stdout.index("Figure 9:") > stdout.index("selected: ")  # printed after the layer table


def test_figure9_fields_single_w_and_pairs(ref_run, pair_run):
    _check_figure9(json.loads((ref_run / "bits.json").read_text()), (ref_run.parent / "stdout.txt").read_text(),
                   pairs=False)
    out, stdout = pair_run
    _check_figure9(json.loads((out / "bits.json").read_text()), stdout, pairs=True)
    try:
        import matplotlib  # noqa: F401  (optional: figure9.png)
        assert (ref_run / "figure9.png").stat().st_size > 0 and (out / "figure9.png").stat().st_size > 0
    except ImportError:
        pass


def test_figure9_text_says_n_a_for_a_constant_series():
    report = {"layers": [{"name": "conv1", "fixed": True, "macs": 5, "a_bits": 8, "w_bits": 8},
                         {"name": "a", "fixed": False, "macs": 10, "a_bits": 4, "w_bits": 4},
                         {"name": "b", "fixed": False, "macs": 30, "a_bits": 4, "w_bits": 2},
                         {"name": "c", "fixed": False, "macs": 20, "a_bits": 4, "w_bits": 8}], "pairs": [[4, 2]]}
    f9 = mm.figure9_fields(report, [3.0, 1.0, 2.0], batches=2, probes=4)
    assert [r.get("trace_per_op") for r in report["layers"]] == [None, 0.3, 1 / 30, 0.1]
    assert f9["spearman"]["a_bits"] == {"hessian_trace": None, "macs": None, "trace_per_op": None}
    # W (4, 2, 8) ranks (2, 1, 3); traces (3, 1, 2) and trace/OPs (.3, .033, .1) rank (3, 1, 2), OPs (1, 3, 2)
    assert f9["spearman"]["w_bits"] == {"hessian_trace": 0.5, "macs": -0.5, "trace_per_op": 0.5}
    assert json.loads(json.dumps(f9))["spearman"]["a_bits"]["macs"] is None  # null in bits.json
    text = mm.figure9_text(f9)
    assert "selected A bits with Hessian trace n/a, OPs n/a, trace/OPs n/a" in text
    assert "selected W bits with Hessian trace +0.50, OPs -0.50, trace/OPs +0.50" in text


def test_figure9_changes_nothing_and_can_be_skipped(ref_run, stopped_run, tmp_path):
    """ref_run computed Figure 9; the same run (resumed from epoch 1, exact) with --no-figure9 ends with the
    same tensors, optimizer states, RNG states, losses and selection, and without the fields."""
    out = copy_run(stopped_run, tmp_path)
    p = run_cli(*REF, "--output-dir", out, "--resume", "auto", "--no-figure9")
    assert "Figure 9" not in p.stdout and "Figure 9" in (ref_run.parent / "stdout.txt").read_text()
    assert_same_run(ref_run, out)
    a, b = load_ck(ref_run / "checkpoint.pth"), load_ck(out / "checkpoint.pth")
    for key in ("opt", "opt_alpha", "sched", "rng", "selected_branches"):
        assert _same_tree(a[key], b[key]), key
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    bits = json.loads((out / "bits.json").read_text())
    assert "figure9" not in bits and all("hessian_trace" not in r for r in bits["layers"])
    assert not (out / "figure9.png").exists()


def _same_tree(a, b) -> bool:
    """Exactly equal nested dicts/lists/tuples of tensors and plain values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(u, v) for u, v in zip(a, b))
    return a == b


def test_twice_differentiable_hard_activations():
    """hardsigmoid/hardswish: the same values and first derivatives in their clamp form, and a second
    derivative where PyTorch's own kernels have none; the modules' forward is restored."""
    x = torch.linspace(-5, 5, 41, dtype=torch.float64, requires_grad=True)  # includes the kinks -3 and 3
    model = nn.Sequential(nn.Hardswish(), nn.Hardsigmoid())
    want = model(x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    with mm.twice_differentiable(model):
        got = model(x)
        (g,) = torch.autograd.grad(got.sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.allclose(got, want, atol=1e-15) and torch.allclose(g, g_want, atol=1e-15)
    assert h.abs().sum() > 0
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
