"""Tests for metamix.py. Run: python -m pytest -q (every test file), or python -m pytest -q test_metamix.py

The tests follow metamix.py's sections (1 LSQ, 2 multi-branch block, 3 straight-through softmax, 4 BOPs,
5 patching, 6 the two phases and the authors' recipe, 7 the fused op, 8 the driver); each test's name or first
docstring line names the equation, figure, table or behaviour it holds (`-k eq4`, `-k table1`, `-k lsq`).
Tier 1: every piece against values computed by hand or by an independent formula; the speed path held
equal to the readable form, value and every gradient.
Tier 2: the real script on tiny synthetic data (in this process, in a subprocess, torchrun with two ranks).
Tier 3: save, resume, compare; bad input and faults, with real processes for signals, locks and a full disk.
The helpers other test files may share (runs in processes, the independent references) are in conftest.py.
"""

from __future__ import annotations

import argparse
import copy
import errno
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ablations
import metamix as mm
from conftest import (
    ENV,
    METAMIX,
    REF,
    REPO,
    Stopped,
    TINY,
    Evil,
    assert_same_model,
    assert_same_run,
    cmdline,
    copy_run,
    descendants,
    error_in_process,
    error_line,
    fingerprint,
    hardswish_fed,
    independent_macs,
    kill_group,
    load_ck,
    main_in_process,
    make_image_folder,
    popen_cli,
    popen_group,
    read_log,
    run_cli,
    slow_lsq,
    tiny_teacher,
    torchrun_cmd,
    wait_for,
)


# ---------------------------------------------------------------------------------------
# 1. LSQ quantizer (Esser et al. 2020): metamix.py section 1
# ---------------------------------------------------------------------------------------


def test_lsq_by_hand_unsigned_2bit():
    """LSQ by hand, unsigned 2-bit: value, d/dx and d/ds (times the gradient scale)."""
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
    """LSQ by hand, signed 3-bit, with an upstream gradient per element."""
    # bits 3 signed: Qn -4, Qp 3, s = 1: v = [-5.2, -1.4, 2.6, 3.2]
    x = torch.tensor([-5.2, -1.4, 2.6, 3.2], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = mm.lsq_quantize(x, s, 3, signed=True, grad_scale=1.0)
    assert y.tolist() == [-4.0, -1.0, 3.0, 3.0]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0]
    # upstream 1, 2, 3, 4 times: Qn below; round(v) - v inside (twice); Qp above
    by_hand = 1 * -4 + 2 * (-1 + 1.4) + 3 * (3 - 2.6) + 4 * 3
    assert s.grad.item() == pytest.approx(by_hand, abs=1e-5)


@pytest.mark.parametrize("bits,signed,per_channel", list(itertools.product(range(2, 9), [False, True], [False, True])))
def test_lsq_matches_slow_formula(bits, signed, per_channel):
    """LSQ against slow_lsq, element by element: 2..8 bits, signed or not, one step or a step per channel."""
    g = torch.Generator().manual_seed(bits * 10 + signed * 2 + per_channel)
    C = 3
    qn, qp = mm.lsq_range(bits, signed)
    if per_channel:
        step = torch.rand(C, 1, 1, generator=g, dtype=torch.float64) + 0.2
    else:
        step = torch.tensor(0.7, dtype=torch.float64)
    # codes spread over [Qn - 2, Qp + 2] plus one value surely below, inside and above the range
    spread = torch.rand(27, generator=g, dtype=torch.float64) * (qp - qn + 4) + qn - 2
    sure = torch.tensor([qn - 1.5, (qn + qp) / 2 + 0.3, qp + 1.5], dtype=torch.float64)
    v = torch.cat([spread, sure])
    x = (v.reshape(C, 2, 5) * step).requires_grad_()
    step.requires_grad_()
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gs = 0.37
    y = mm.lsq_quantize(x, step, bits, signed, gs)
    y.backward(up)
    s_full = step.detach().expand_as(x).reshape(-1).tolist()
    out, dx, ds = slow_lsq(x.detach().reshape(-1).tolist(), s_full, bits, signed)
    assert torch.allclose(y.detach().reshape(-1), torch.tensor(out, dtype=torch.float64))
    expect_x = up.reshape(-1) * torch.tensor(dx, dtype=torch.float64)
    assert torch.allclose(x.grad.reshape(-1), expect_x)
    expect_s = (up.reshape(-1) * torch.tensor(ds, dtype=torch.float64)).reshape(x.shape)
    if per_channel:
        expect_s = expect_s.sum(dim=(1, 2), keepdim=True)
    else:
        expect_s = expect_s.sum()
    assert step.grad.shape == step.shape
    assert torch.allclose(step.grad, expect_s * gs)
    # the range holds values inside, below and above
    v = x.detach() / step.detach()
    assert (v < qn).any()
    assert (v > qp).any()
    assert ((v > qn) & (v < qp)).any()


def test_lsq_value_is_exactly_codes_times_step():
    """The straight-through tricks change gradients only: the value is round(clamp(x/s)) * s to the bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3
    s = torch.tensor(0.137)
    codes = (x / s).clamp(-8, 7).round()
    assert torch.equal(mm.lsq_quantize(x, s, 4, True), codes * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (8, False)])
@pytest.mark.parametrize("fused", [False, True], ids=["readable", "fused"])
def test_lsq_range_ends_count_as_inside(dtype, bits, signed, fused):
    """v exactly at Qn or Qp passes the gradient; the nearest float beyond it does not (both forms)."""
    qn, qp = mm.lsq_range(bits, signed)
    # a power of two >= 1: x / s is exact, even for the smallest float
    s = torch.tensor(2.0, dtype=dtype)
    ends = torch.tensor([qn, qp], dtype=dtype)
    beyond = torch.nextafter(ends, torch.tensor([-math.inf, math.inf], dtype=dtype))
    x = (torch.cat([ends, beyond]) * s).requires_grad_()
    if fused:
        # the op upcasts bf16 input
        op_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        eye = torch.eye(4, dtype=op_dtype)
        quant = [(qn, qp, 1.0)]
        y = mm.FusedQuantOp.apply(
            x.view(1, 4), s.view(1).to(op_dtype), None, eye, None, None, quant, None, mm.LayerOp("linear")
        )
        y.sum().backward()
    else:
        mm.lsq_quantize(x, s, bits, signed).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["branch", "search"])
@pytest.mark.parametrize("fused", [False, True], ids=["readable", "fused"])
def test_lsq_passes_the_gradient_at_an_exact_zero(mode, fused):
    """ReLU outputs are exact zeros, v = 0 = Qn: inside, so d out/d x is the op's own gradient there."""
    q = mm.QuantLayer(nn.Linear(4, 4, bias=False), [8, 4, 2], 4, "l")
    q.fused = fused
    with torch.no_grad():
        q.weight.copy_(torch.eye(4))
    q.act.mode = mode
    q.act.branch = 1
    # init: unsigned
    q(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    # -3 is below Qn = 0
    x = torch.tensor([[0.0, 0.0, 0.5, -3.0]], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_lsq_step_stays_positive():
    """A negative step is used as its magnitude; a zero step as a small positive one."""
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
    # not the unscaled sum
    assert abs(s.grad.item()) < abs(sum(ds)) / 10
    assert mm.lsq_grad_scale(32, 4, False) == 1 / math.sqrt(32 * 15)


def test_lsq_quantize_makes_a_negative_step_positive():
    """A step s <= 0 is used as |s| (floor 1e-8); its gradient is d|s|/ds times LSQ's."""
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    pos = torch.tensor(0.4, requires_grad=True)
    neg = torch.tensor(-0.4, requires_grad=True)
    y_pos = mm.lsq_quantize(x, pos, 3, True)
    y_neg = mm.lsq_quantize(x, neg, 3, True)
    assert torch.equal(y_pos, y_neg)
    y_pos.sum().backward()
    y_neg.sum().backward()
    assert pos.grad.item() != 0
    assert neg.grad.item() == -pos.grad.item()
    zero = torch.tensor(0.0, requires_grad=True)
    y = mm.lsq_quantize(x, zero, 3, True)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert zero.grad.item() == 0.0


def test_lsq_quantizer_module_init_and_grad_scale():
    """LSQQuantizer, plain: LSQ's own, one step per tensor on -8..7 (4 bits), N = every weight."""
    w = torch.randn(16, 8, 3, 3)
    q = mm.LSQQuantizer(4)
    y = q(w.requires_grad_())
    # signed 4-bit
    qp = 7
    assert q.step.shape == (1,)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    y.sum().backward()
    # d/ds of the sum, times 1/sqrt(N * Qp) with N = numel of the weight
    _, _, ds = slow_lsq(w.detach().reshape(-1).tolist(), [q.step.item()] * w.numel(), 4, True)
    assert q.step.grad.item() == pytest.approx(sum(ds) / math.sqrt(w.numel() * qp), rel=1e-4, abs=1e-6)
    q.enabled = False
    assert q(w) is w


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (6, 1, 3, 3), (6, 10)], ids=["conv", "depthwise", "linear"])
def test_lsq_weight_per_output_channel_on_the_narrow_range(shape):
    """The authors' weight quantizer: s_c = 2 mean|W_c| / sqrt(7) per output channel; codes round(clamp(W/s_c,
    -7, 7)), -8 never used; each s_c's gradient: its channel's sum of (round(v) - v inside, -7 below, 7 above),
    times 1/sqrt(N_c * 7), N_c = the channel's weights (by hand, in float64)."""
    g = torch.Generator().manual_seed(len(shape))
    # one step per output channel, broadcast over the rest
    per_channel = (-1, *[1] * (len(shape) - 1))
    scales = torch.tensor([0.01, 0.1, 1, 3, 10, 0.5], dtype=torch.float64).view(per_channel)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * scales
    # a view: one weight per channel far beyond the range, on either side by turns
    flat = w.reshape(6, -1)
    sides = torch.tensor([-1.0, 1.0] * 3, dtype=torch.float64)
    flat[:, 0] = 1000 * flat.abs().mean(1) * sides
    q = mm.LSQQuantizer(4, channels=6, narrow=True).double()
    y = q(w.requires_grad_())
    s = q.step.detach().clone()
    for c in range(6):
        assert s[c].item() == pytest.approx(2 * w[c].abs().mean().item() / math.sqrt(7), rel=1e-12)
    v = w.detach() / s.view(per_channel)
    codes = v.clamp(-7, 7).round()
    assert torch.equal(y.detach(), codes * s.view(per_channel))
    assert codes.min() == -7
    assert codes.max() == 7
    assert (v < -7.5).any()
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    y.backward(up)
    ds = torch.where(v < -7, -7.0, torch.where(v > 7, 7.0, v.round() - v))
    n_c = w[0].numel()
    assert torch.allclose(q.step.grad, (up * ds).reshape(6, -1).sum(1) / math.sqrt(n_c * 7))
    inside = (v >= -7) & (v <= 7)
    assert torch.allclose(w.grad, up * inside, rtol=1e-12, atol=0)


def test_lsq_per_channel_steps_lose_no_depthwise_channel():
    """A 4-bit depthwise filter bank, 240 channels of 3x3 whose scales are log-normal (sigma 1): one step per
    tensor rounds whole channels to zero; one step per channel keeps every channel."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(240, 1, 3, 3, generator=g) * torch.exp(torch.randn(240, 1, 1, 1, generator=g))
    with torch.no_grad():
        per_tensor = mm.LSQQuantizer(4)(w)
        per_channel = mm.LSQQuantizer(4, 240, narrow=True)(w)
    zeroed = [int((y.flatten(1) == 0).all(1).sum()) for y in (per_tensor, per_channel)]
    norms = w.flatten(1).norm(dim=1)
    err = [(y - w).flatten(1).norm(dim=1) / norms for y in (per_tensor, per_channel)]
    assert zeroed[0] >= 10
    assert zeroed[1] == 0
    assert err[1].max() < 0.3
    assert err[0].median() > err[1].median()


@pytest.mark.parametrize("arch, searched, fed", [("mobilenet_v3_large", 62, 25), ("mobilenet_v3_small", 52, 26)])
@pytest.mark.parametrize("scale", [1.0, 0.01, 100.0])
def test_lsq_offset_grid_for_hardswish_fed_inputs(arch, searched, fed, scale):
    """MobileNet-v3: the offset grid goes to the inputs the graph says a Hardswish feeds (directly, through pooling
    or dropout, or times the SE gate), read by patch_model from the model's structure, whatever the calibration
    batch's scale: 25 of the large model's 62 searched layers, and the last. They quantize on [0, 2^b - 1] as
    s round(clamp((x + 3/8)/s, 0, Qp)) - 3/8 (by hand). ReLU-fed inputs stay unsigned, the residual stream and
    the image signed; --plain-lsq: no offset anywhere."""
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.get_model(arch, num_classes=10), [8, 4, 3], 4, bops_image_size=64)
    layers = {m.name: m for m in mm.quant_layers(model)}
    # decided by the structure, before any data
    graph = hardswish_fed(arch)
    assert {n for n, m in layers.items() if m.act.offset == 0.375} == graph
    mm.init_quantizers(model, torch.randn(8, 3, 64, 64) * scale)
    assert {n for n, m in layers.items() if m.act.offset == 0.375} == graph
    assert len(mm.searched_layers(model)) == searched
    assert sum(n in graph for n in list(layers)[1:-1]) == fed
    assert all(m.act.offset == 0.0 for n, m in layers.items() if n not in graph)
    signed = {n: m.act.signed for n, m in layers.items()}
    assert not any(signed[n] for n in graph)
    # the image
    assert signed["features.0.0"]
    if scale != 1.0:
        return
    if arch == "mobilenet_v3_large":
        # after the stem; a depthwise; after SE; pooled; dropout
        examples = {
            "features.1.block.0.0",
            "features.7.block.1.0",
            "features.12.block.3.0",
            "classifier.0",
            "classifier.3",
        }
        assert examples <= graph
        # the residual stream
        assert signed["features.2.block.0.0"]
        assert signed["features.5.block.0.0"]
        # ReLU-fed
        assert not signed["features.1.block.1.0"]
        assert not signed["features.2.block.1.0"]
    m = layers["features.7.block.1.0"]
    x = F.hardswish(torch.randn(2, m.weight.shape[0], 4, 4) * 3)
    m.act.mode = "branch"
    # 4 bits
    m.act.branch = 1
    s = mm.positive(m.act.step.detach()[1])
    y = m.act(x)
    codes = (y.detach() + 0.375) / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -1e-4
    assert codes.max() <= 15 + 1e-4
    assert torch.allclose(y, s * torch.clamp((x + 0.375) / s, 0, 15).round() - 0.375, atol=1e-6)
    fp = torchvision.models.get_model(arch, num_classes=10)
    plain = mm.patch_model(fp, [8, 4, 3], 4, bops_image_size=64, plain=True)
    mm.init_quantizers(plain, torch.randn(8, 3, 64, 64))
    assert all(m.act.offset == 0.0 for m in mm.quant_layers(plain))
    assert all(m.weight_quant.step.shape == (1,) for m in mm.quant_layers(plain))
    assert [m.act.signed for m in mm.quant_layers(plain)] == [s or n in graph for n, s in signed.items()]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_lsq_no_offset_grid_without_hardswish(arch):
    """ResNet-18 and MobileNet-v2 (ReLU, ReLU6) have no hardswish-fed input, whatever the calibration batch; on
    EfficientNet-B0 the SiLU-fed inputs (SiLU's minimum is -0.278, inside hardswish's [-3/8, 0)) get the signed
    grid, our stated choice, not the hardswish offset."""
    model = mm.patch_model(torchvision.models.get_model(arch, num_classes=10), [8, 4, 3], 4, bops_image_size=64)
    assert mm.hardswish_fed(torchvision.models.get_model(arch)) == set()
    mm.init_quantizers(model, torch.randn(4, 3, 64, 64) * 0.01)
    layers = mm.quant_layers(model)
    assert all(m.act.offset == 0.0 for m in layers)
    if arch == "efficientnet_b0":
        # the depthwise convs' inputs: SiLU outputs, with negatives, so signed
        silu_fed = [m for m in layers if m.name.endswith("block.1.0") and m.kind == "Conv2d"]
        assert silu_fed
        assert all(m.act.signed for m in silu_fed)


class Untraceable(nn.Module):
    """A model torch.fx cannot read (control flow on a tensor's value), with a hardswish-fed layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        if x.sum() > -1e9:
            x = self.mid(x)
        return self.head(x.mean((2, 3)))


def test_lsq_offset_grid_falls_back_to_the_data_with_a_warning_naming_the_layers():
    """A model torch.fx cannot read: the grid comes from the first batch (a minimum in [-3/8, 0): the offset), and
    a warning names the layers that got the offset that way: the hardswish-fed conv and the head fed by its mean."""
    model = mm.patch_model(Untraceable(), [8, 4, 2], 4, bops_image_size=16)
    assert mm.hardswish_fed(Untraceable()) is None
    assert all(m.act.offset is None for m in mm.quant_layers(model))
    with pytest.warns(UserWarning, match="offset grid from the first batch: mid, head$"):
        mm.init_quantizers(model, torch.randn(4, 3, 16, 16))
    offsets = {m.name: m.act.offset for m in mm.quant_layers(model)}
    assert offsets == {"stem": 0.0, "mid": 0.375, "head": 0.375}


def test_lsq_two_bit_weights_take_four_levels():
    """The narrow range from 3 bits up: 2-bit weight codes take the 4 values [-2, 1], as BOPs count 2 bits; 3 and 4
    bits are symmetric (-3..3, -7..7)."""
    # every integer from -20 to 20 in each of 4 channels, at a step of 1: the clamp shows the range
    w = torch.arange(-20.0, 21.0).repeat(4, 1)
    for bits, levels in ((2, {-2, -1, 0, 1}), (3, set(range(-3, 4))), (4, set(range(-7, 8)))):
        q = mm.LSQQuantizer(bits, 4, narrow=True)
        q.init_step(w)
        with torch.no_grad():
            q.step.fill_(1.0)
            codes = q(w)
        assert set(codes.unique().int().tolist()) == levels


# PyTorch's own LSQ kernels as an independent oracle: torch._fake_quantize_learnable_per_tensor_affine and
# _per_channel_affine (what torch.ao.quantization's _LearnableFakeQuantize runs) compute LSQ's forward and both
# gradients in C++, with LSQ's gradient scale as grad_factor (float32 only). One definition differs: PyTorch passes
# the input's gradient where the *rounded* code round(v) lies in [Qn, Qp], LSQ's paper (and lsq_quantize) where
# v = x/s itself does. They differ on a sliver of half a step beyond each end, v in (Qp, Qp + 1/2) or
# [Qn - 1/2, Qn): there PyTorch passes the input's gradient and gives the step round(v) - v, LSQ gives the input
# none and the step Qp (Qn). Everywhere else the two agree.


def _codes_away_from_ties(n: int, qn: int, qp: int, seed: int) -> torch.Tensor:
    """v = x/s spread over [Qn - 3, Qp + 3] (the slivers included), none within 1e-3 of a rounding tie, so that
    x/s and PyTorch's x * (1/s) round alike."""
    v = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * (qp - qn + 6) + qn - 3
    frac = v - v.floor()
    return torch.where((frac - 0.5).abs() < 1e-3, v + 2e-3, v)


def _sliver(v: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return ((v > qp) & (v < qp + 0.5)) | ((v >= qn - 0.5) & (v < qn))


def _assert_values_and_input_grads_agree_but_on_the_sliver(v, qn, qp, up, y, gx, y_pt, gx_pt, at_least: int) -> None:
    """Our and PyTorch's outputs equal; the input gradients equal off the sliver (float noise aside); on the sliver
    (at least `at_least` values of it), ours none, PyTorch's the upstream gradient."""
    sliver = _sliver(v, qn, qp)
    assert sliver.sum() >= at_least
    assert torch.equal(y, y_pt)
    assert torch.allclose(gx[~sliver], gx_pt[~sliver], rtol=1e-6)
    assert not gx[sliver].any()
    assert torch.equal(gx_pt[sliver], up[sliver])


def _pytorch_minus_lsq_step_grad(v, up, qn, qp, grad_scale):
    """What PyTorch's step gradient adds to LSQ's: on the sliver, round(v) - v in place of Qp (Qn), per channel."""
    end = torch.where(v > qp, float(qp), float(qn))
    share = torch.where(_sliver(v, qn, qp), (v.round() - v - end) * up, torch.zeros_like(v))
    return share.reshape(len(share), -1).sum(1) * grad_scale


@pytest.mark.parametrize("bits, signed", [(2, False), (4, False), (8, False), (2, True), (4, True), (8, True)])
def test_lsq_quantize_against_pytorchs_learnable_fake_quantize_per_tensor(bits, signed):
    """lsq_quantize (section 1) against PyTorch's per-tensor kernel: the same values, the same input gradient but
    on the sliver, and a step gradient that differs by exactly the sliver's share."""
    qn, qp = mm.lsq_range(bits, signed)
    step = torch.tensor([0.37])
    v = _codes_away_from_ties(4096, qn, qp, seed=bits)
    x = v * step
    g = mm.lsq_grad_scale(x.numel(), bits, signed)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    zero = torch.zeros(1)
    results = []
    for quantize in (
        lambda x, s: mm.lsq_quantize(x, s, bits, signed, g),
        lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(x, s, zero, qn, qp, g),
    ):
        xi = x.clone().requires_grad_()
        si = step.clone().requires_grad_()
        y = quantize(xi, si)
        results.append((y, *torch.autograd.grad(y, (xi, si), up)))
    (y, gx, gs), (y_pt, gx_pt, gs_pt) = results
    _assert_values_and_input_grads_agree_but_on_the_sliver(v, qn, qp, up, y, gx, y_pt, gx_pt, at_least=11)
    share = _pytorch_minus_lsq_step_grad(v[None], up[None], qn, qp, g)
    assert gs_pt.item() == pytest.approx((gs + share).item(), rel=1e-4)
    assert gs_pt.item() != pytest.approx(gs.item(), rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_weight_quantizer_against_pytorchs_learnable_fake_quantize_per_channel(bits):
    """LSQQuantizer (a step per output channel, the narrow range from 3 bits up) against PyTorch's per-channel
    kernel: the same values, input gradient but on the sliver, and step gradients that differ by the sliver's share
    (grad_factor: LSQ's 1/sqrt(N Qp), N a channel's weights)."""
    wq = mm.LSQQuantizer(bits, channels=6, narrow=True)
    qn, qp = mm.lsq_range(bits, True, narrow=True)
    steps = torch.tensor([0.1, 0.2, 0.3, 0.05, 0.4, 0.25])
    v = _codes_away_from_ties(6 * 576, qn, qp, seed=bits).view(6, 64, 3, 3)
    w = v * steps.view(-1, 1, 1, 1)
    g = mm.lsq_grad_scale(576, bits, True)
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        wq.step.copy_(steps)
    wq.initialized = True
    wi = w.clone().requires_grad_()
    y = wq(wi)
    gw, gs = torch.autograd.grad(y, (wi, wq.step), up)
    wi = w.clone().requires_grad_()
    si = steps.clone().requires_grad_()
    y_pt = torch._fake_quantize_learnable_per_channel_affine(wi, si, torch.zeros(6), 0, qn, qp, g)
    gw_pt, gs_pt = torch.autograd.grad(y_pt, (wi, si), up)
    _assert_values_and_input_grads_agree_but_on_the_sliver(v, qn, qp, up, y, gw, y_pt, gw_pt, at_least=4)
    assert torch.allclose(gs_pt, gs + _pytorch_minus_lsq_step_grad(v, up, qn, qp, g), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 2. Multi-branch block (Fig. 4, Eq. 2): metamix.py section 2
# ---------------------------------------------------------------------------------------


def test_fig4_multibranch_init_signedness_and_grad_scale():
    """Fig. 4's block: a branch's LSQ step from the first batch it sees, signed iff the input has negatives, and
    each branch's step gradient scaled by 1/sqrt(N * Qp) (N: features per sample)."""
    q = mm.MultiBranchQuantizer([8, 4, 2])
    x = torch.relu(torch.randn(4, 3, 5, 5))
    q.mode = "branch"
    q.branch = 1
    q(x)
    assert q.signed is False
    assert q.initialized == [False, True, False]
    assert q.step[1].item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)
    q2 = mm.MultiBranchQuantizer([8, 4, 2])
    q2.mode = "search"
    xs = torch.randn(4, 3, 5, 5)
    q2(xs)
    assert q2.signed is True
    assert all(q2.initialized)
    for b, bits in enumerate([8, 4, 2]):
        qp = 2 ** (bits - 1) - 1
        assert q2.step[b].item() == pytest.approx(2 * xs.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    # gradient scale 1/sqrt(N * Qp), N = features per sample (3*5*5), by the slow formula
    q2.mode = "branch"
    q2.branch = 2
    q2(xs).sum().backward()
    s = q2.step[2].item()
    _, _, ds = slow_lsq(xs.reshape(-1).tolist(), [s] * xs.numel(), 2, True)
    assert q2.step.grad[2].item() == pytest.approx(sum(ds) / math.sqrt(75 * 1), rel=1e-4)
    assert q2.step.grad[0].item() == 0
    assert q2.step.grad[1].item() == 0


def _branch_outputs(q, x):
    outs = []
    for b in range(len(q.bits)):
        q.mode = "branch"
        q.branch = b
        outs.append(q(x))
    return outs


def test_eq2_mixture_branch_is_lsq_search_is_softmax_weighted_sum():
    """Eq. 2: branch b alone is LSQ at bits b; search mode is the softmax(alpha)-weighted sum of the branches."""
    torch.manual_seed(0)
    q = mm.MultiBranchQuantizer([8, 4, 3])
    x = torch.randn(2, 4, 6, 6)
    q.mode = "search"
    # init
    q(x)
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([0.2, 1.0, -0.5]))
    outs = _branch_outputs(q, x)
    for b, out in enumerate(outs):
        assert torch.equal(out, mm.lsq_quantize(x, q.step[b].detach(), q.bits[b], True))
    q.mode = "search"
    p = F.softmax(q.alpha.detach(), 0)
    mixture = sum(p[b] * outs[b] for b in range(3))
    assert torch.allclose(q(x), mixture, atol=1e-6)


def test_eq2_mixture_runs_one_convolution(monkeypatch):
    """Eq. 2 before a linear op: the mixture is computed once and convolved once (not once per branch)."""
    calls = []
    real = F.conv2d

    def counting_conv2d(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "conv2d", counting_conv2d)
    q = mm.QuantLayer(nn.Conv2d(3, 4, 3), [8, 6, 5, 4, 3, 2], 4, "c")
    q.act.mode = "search"
    for fused in (False, True):
        calls.clear()
        q.fused = fused
        q(torch.randn(1, 3, 8, 8))
        assert len(calls) == 1


# ---------------------------------------------------------------------------------------
# 3. Straight-through softmax (Eq. 5): metamix.py section 3
# ---------------------------------------------------------------------------------------


def test_eq5_straight_through_softmax_one_hot_forward_softmax_backward():
    """Eq. 5: the forward is onehot(argmax); the backward is softmax's."""
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], requires_grad=True)
    y = mm.straight_through_softmax(logits)
    assert y.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    up = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
    (y * up).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    (F.softmax(ref, -1) * up).sum().backward()
    assert torch.allclose(logits.grad, ref.grad)


# ---------------------------------------------------------------------------------------
# 4. BOPs (Eq. 6) and the BOPs regularizer (Eq. 4): metamix.py section 4
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "mobilenet_v3_large"])
def test_eq6_bops_against_an_independent_count(arch):
    """Eq. 6 and Eq. 4's C_fixed against PyTorch's FLOP counter: each layer's MACs, the fixed first/last layers,
    uniform W4A4, the feasible range, and a mixed configuration by branches_gbops and by the regularizer."""
    model = torchvision.models.get_model(arch)
    macs = independent_macs(model)
    if arch == "resnet18":
        bits = [8, 4, 2]
    else:
        bits = [8, 4, 3]
    mm.patch_model(model, bits, 4)
    layers = mm.quant_layers(model)
    assert {m.name: m.macs for m in layers} == macs
    first = layers[0]
    last = layers[-1]
    fixed = (macs[first.name] + macs[last.name]) * 8 * 8 / 1e9
    assert mm.c_fixed_of(model) == pytest.approx(fixed)
    searched = [n for n in macs if n not in (first.name, last.name)]
    searched_macs = sum(macs[n] for n in searched)
    assert mm.candidate_costs(model) == [b * 4 for b in bits]
    # uniform W4A4
    uniform = searched_macs * 4 * 4 / 1e9 + fixed
    gbops = mm.config_gbops([macs[n] for n in searched], [16] * len(searched), mm.c_fixed_of(model))
    assert gbops == pytest.approx(uniform)
    lo, hi = mm.gbops_range(model)
    assert hi == pytest.approx(searched_macs * 8 * 4 / 1e9 + fixed)
    assert lo == pytest.approx(searched_macs * min(bits) * 4 / 1e9 + fixed)
    # a mixed configuration: cycle through the candidates, by branches_gbops and the regularizer's one-hot forward
    idx = [i % 3 for i in range(len(searched))]
    mixed = sum(macs[n] * bits[i] for n, i in zip(searched, idx)) * 4 / 1e9 + fixed
    assert mm.branches_gbops(model, idx) == pytest.approx(mixed)
    alphas = F.one_hot(torch.tensor(idx), 3).float() * 5
    layer_macs = [m.macs for m in layers[1:-1]]
    _, gb = mm.bops_regularizer(alphas, mm.candidate_costs(model), layer_macs, mm.c_fixed_of(model), 0.0)
    assert gb.item() == pytest.approx(mixed, rel=1e-5)
    if arch == "resnet18":
        # by hand: conv1 = 64 * 3 * 7 * 7 * 112 * 112, fc = 512 * 1000
        assert first.macs == 64 * 3 * 49 * 112 * 112
        assert last.macs == 512 * 1000


def test_eq6_bops_of_a_depthwise_conv_count_its_groups():
    """Eq. 6's OPs of a depthwise conv: Cout * (Cin / groups) * kh * kw * Hout * Wout."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.zeros(1, 3, 224, 224))
    mm.patch_model(model, [8, 4], 4)
    assert model[1].macs == 8 * 1 * 9 * 224 * 224


def test_eq4_bops_regularizer_value_and_gradient_by_hand():
    """Eq. 4 by hand: |GBOPs of the one-hot argmax - target|, and its straight-through gradient (Eq. 5)."""
    bits = [8, 4, 2]
    macs = [1e8, 2e8]
    w_bits = 4
    fixed = 0.5
    target = 3.0
    a = torch.tensor([[0.0, 1.0, 0.5], [0.2, -0.3, 0.9]], requires_grad=True)
    reg, gb = mm.bops_regularizer(a, [b * w_bits for b in bits], macs, fixed, target)
    # argmax: layer 0 -> 4 bits, layer 1 -> 2 bits: (4*1e8 + 2*2e8) * 4 / 1e9 + 0.5 = 3.7
    assert gb.item() == pytest.approx(3.7)
    assert reg.item() == pytest.approx(0.7)
    reg.backward()
    for layer in range(2):
        e = [math.exp(v) for v in a[layer].tolist()]
        p = [v / sum(e) for v in e]
        mean_b = sum(pi * b for pi, b in zip(p, bits))
        # d|.|/d alpha_lj = sign * w * macs_l / 1e9 * p_j * (b_j - sum_b p_b b), sign +1 (over the target)
        for j in range(3):
            by_hand = +1 * w_bits * macs[layer] / 1e9 * p[j] * (bits[j] - mean_b)
            assert a.grad[layer, j].item() == pytest.approx(by_hand, rel=1e-5)


def test_eq4_budget_repair_lowers_the_least_probable_per_bop():
    """Over the budget, the repair lowers the layer whose move costs the least probability per BOP saved, and
    ends within the budget."""
    # W1: a candidate costs its activation bits
    bits = [8, 4, 2]
    macs = [100, 100, 400]
    fixed = 0.0
    probs = [[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1]]
    # 8 * 600 = 4800 bit-ops
    chosen = [0, 0, 0]
    target = 4400 / 1e9
    out = mm.repair_to_budget(probs, chosen, bits, macs, fixed, target)
    # candidate moves (8 -> 4): layer 0 costs 0.1/400, layer 1 0.85/400, layer 2 0.3/1600: layer 2 is cheapest
    assert out == [0, 0, 1]
    assert mm.config_gbops(macs, [bits[c] for c in out], fixed) <= target
    out = mm.repair_to_budget(probs, chosen, bits, macs, fixed, 1200 / 1e9)
    assert mm.config_gbops(macs, [bits[c] for c in out], fixed) <= 1200 / 1e9


# ---------------------------------------------------------------------------------------
# 5. Model patching: metamix.py section 5
# ---------------------------------------------------------------------------------------


ARCH_ENDS = {
    "resnet18": ("conv1", "fc"),
    "mobilenet_v2": ("features.0.0", "classifier.1"),
    "mobilenet_v3_large": ("features.0.0", "classifier.3"),
    "mobilenet_v3_small": ("features.0.0", "classifier.3"),
}


@pytest.mark.parametrize("arch", list(ARCH_ENDS) + ["shufflenet_v2_x0_5"])
def test_patching_replaces_every_conv_and_linear_and_keeps_the_outputs(arch):
    """Every Conv2d/Linear becomes a QuantLayer on the same weight tensors, first and last fixed; in "fp" mode
    the outputs are unchanged; a patched model cannot be patched again."""
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
    # the same tensors
    assert all(p is weights[n] for n, p in model.named_parameters() if n in weights)
    if arch in ARCH_ENDS:
        assert (layers[0].name, layers[-1].name) == ARCH_ENDS[arch]
    assert layers[0].fixed
    assert layers[-1].fixed
    assert not any(m.fixed for m in layers[1:-1])
    # identity ("fp") mode leaves outputs unchanged
    assert torch.equal(model(x), ref)
    mm.set_mode(model, "search")
    assert model(x).shape == ref.shape
    # a patched model has none left
    with pytest.raises(ValueError, match="at least three Conv2d/Linear"):
        mm.patch_model(model, [8, 4], 4, bops_image_size=64)


def test_patching_state_dict_round_trip(tmp_path):
    """A patched model's state dict (alphas, steps, signedness, selection) saves and loads into a fresh patched
    model with the same outputs; an unpatched model's full-precision state dict loads into it too."""
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
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))
    assert [m.act.signed for m in mm.quant_layers(a)] == [m.act.signed for m in mm.quant_layers(b)]
    assert [m.selected_branch for m in mm.quant_layers(b)[1:-1]] == [1] * len(mm.searched_layers(b))
    # a full-precision checkpoint of the unpatched model loads into the patched one
    plain = torchvision.models.resnet18(num_classes=10).state_dict()
    missing, unexpected = b.load_state_dict(plain, strict=False)
    assert not unexpected
    quantizer_keys = (".act.", ".weight_quant.")
    assert all(any(q in k for q in quantizer_keys) or k.endswith("_extra_state") for k in missing)


# ---------------------------------------------------------------------------------------
# 6. The two phases (Table 1; Eq. 1 and Eq. 3) and the authors' recipe: metamix.py section 6
# ---------------------------------------------------------------------------------------


def _tiny_patched(fused=True):
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.resnet18(num_classes=4), [8, 4, 2], 4, bops_image_size=32)
    mm.use_speed_path(model, fused)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 4
    with torch.no_grad():
        for b in range(3):
            mm.set_mode(model, "meta", b)
            model(x)
    return model, x, y


def test_eq1_bit_meta_step_trains_weights_and_steps_not_alphas():
    """Eq. 1: the mean of the single-precision losses; weights and every branch's step get gradients, alphas none."""
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
    assert all(m.weight.grad is not None for m in layers)
    assert all(m.weight.grad.abs().sum() > 0 for m in layers)
    # every branch's step learns
    assert all((m.act.step.grad != 0).all() for m in layers)


def test_eq3_bit_search_step_trains_only_alphas():
    """Eq. 3 with the meta-state fixed: only the searched layers' alphas get gradients; BN statistics untouched."""
    model, x, y = _tiny_patched()
    model.train()
    bn_keys = [k for k, v in model.state_dict().items() if torch.is_tensor(v) and ("running" in k or "batches" in k)]
    bn_before = {k: model.state_dict()[k].clone() for k in bn_keys}
    loss, gb = mm.bit_search_step(model, x, y, 0.4, 30.0)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        fixed_layer = any(name.startswith(f) for f in ("conv1.", "fc."))
        if name.endswith("act.alpha") and not fixed_layer:
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
        # restored
        assert p.requires_grad
    assert len(bn_before) == 3 * 20
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items())
    assert model.training
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_fig7a_unfixed_search_step_trains_the_meta_state_too():
    """Figure 7(a)'s ablation: weights, steps and BN train on Eq. 3's loss as well as the alphas."""
    model, x, y = _tiny_patched()
    model.train()
    opt = torch.optim.SGD(mm.meta_params(model), lr=0.05, momentum=0.9)
    opt_alpha = torch.optim.SGD(mm.alphas_of(model), lr=0.05, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    params = []

    def sync(p, loss):
        params.append(len(p))
        return loss

    mm.bit_selection_step(model, x, y, opt, opt_alpha, search=True, lam=0.4, target_gbops=30.0, fixed=False, sync=sync)
    n_meta = len(mm.meta_params(model))
    assert params == [n_meta, len(mm.alphas_of(model)) + n_meta]
    fixed_model, _, _ = _tiny_patched()
    fixed_model.train()
    fopt = torch.optim.SGD(mm.meta_params(fixed_model), lr=0.05, momentum=0.9)
    fopt_alpha = torch.optim.SGD(mm.alphas_of(fixed_model), lr=0.05, momentum=0.9)
    mm.bit_selection_step(fixed_model, x, y, fopt, fopt_alpha, search=True, lam=0.4, target_gbops=30.0)
    w = "layer1.0.conv1.weight"
    # a second step on the weights
    assert not torch.equal(model.state_dict()[w], fixed_model.state_dict()[w])
    bn_mean = "layer1.0.bn1.running_mean"
    assert not torch.equal(model.state_dict()[bn_mean], before[bn_mean])


def test_table1_init_quantizers_uses_batch_statistics_and_leaves_bn_alone():
    """Table 1's start: every branch's step from one batch. From scratch, eval-mode BN (running statistics 0/1)
    lets MobileNet-v3's deep activations vanish (steps of 0); the batch's statistics, as in training, give every
    step a sensible size."""
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.mobilenet_v3_small(num_classes=10), [8, 4, 3], 4, bops_image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(8, 3, 64, 64)
    model.eval()
    mm.init_quantizers(model, x)
    # restored
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    steps = torch.cat([m.act.step.detach() for m in mm.quant_layers(model)])
    assert steps.min() > 1e-3, steps.min()
    assert steps.max() < 1e3, steps.max()
    assert all(m.act.mode == "fp" for m in mm.quant_layers(model))


def _optimizers(model):
    opt = torch.optim.SGD(mm.meta_params(model), lr=0.05, momentum=0.9)
    opt_alpha = torch.optim.Adam(mm.alphas_of(model), lr=0.1, betas=(0.5, 0.999))
    return opt, opt_alpha


def test_table1_bit_selection_step_is_meta_then_search_on_the_same_batch():
    """Table 1: Eq. 1 and an SGD step, then Eq. 3 on the meta-state just updated, with the same batch."""
    model, x, y = _tiny_patched()
    model.train()
    ref = copy.deepcopy(model)
    opt, opt_alpha = _optimizers(model)
    ropt, ropt_alpha = _optimizers(ref)
    seen = []

    def sync(params, loss):
        seen.append(len(params))
        return loss

    meta, search, gb = mm.bit_selection_step(
        model, x, y, opt, opt_alpha, search=True, lam=0.4, target_gbops=30.0, sync=sync
    )
    # sync before each update
    assert seen == [len(mm.meta_params(model)), len(mm.alphas_of(model))]
    ropt.zero_grad()
    ref_meta = mm.bit_meta_step(ref, x, y)
    ropt.step()
    ropt_alpha.zero_grad()
    ref_search, ref_gb = mm.bit_search_step(ref, x, y, 0.4, 30.0)
    ropt_alpha.step()
    assert torch.equal(meta, ref_meta)
    assert torch.equal(search, ref_search)
    assert torch.equal(gb, ref_gb)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert not torch.is_tensor(a) or torch.equal(a, b), n
    # epoch 1: bit-meta only, the alphas do not move
    before = [a.detach().clone() for a in mm.alphas_of(model)]
    meta, search, gb = mm.bit_selection_step(model, x, y, opt, opt_alpha)
    assert search is None
    assert gb is None
    assert torch.isfinite(meta)
    assert all(torch.equal(a, b) for a, b in zip(before, mm.alphas_of(model)))


def test_table1_start_weight_training_selects_switches_and_inits_weight_steps():
    """Table 1's switch: bits = argmax alpha (repaired to the budget), every layer on its branch, weight steps
    from the meta-state's weights ("mixed-precision-aware init"); no repair, or a given selection, on request."""
    model, x, y = _tiny_patched()
    with torch.no_grad():
        # argmax: A8 everywhere, over a tight target
        for a in mm.alphas_of(model):
            a.copy_(torch.tensor([1.0, 0.0, 0.0]))
    lo, hi = mm.gbops_range(model)
    target = (lo + hi) / 2
    branches, gbops, repaired = mm.start_weight_training(model, target)
    assert repaired
    assert gbops <= target
    assert branches == [m.selected_branch for m in mm.searched_layers(model)]
    searched_macs = [m.macs for m in mm.searched_layers(model)]
    costs = [(32, 16, 8)[i] for i in branches]
    assert gbops == pytest.approx(mm.config_gbops(searched_macs, costs, mm.c_fixed_of(model)))
    # the first forward sets each weight step from the weights of this moment (the meta-state's)
    with torch.no_grad():
        model(x)
    for m in mm.quant_layers(model):
        assert m.weight_quant.enabled
        assert m.act.mode == "branch"
        assert m.act.branch == (0 if m.fixed else m.selected_branch)
        # per output channel: 2 mean|W_c| / sqrt(Qp)
        qp = 2 ** (m.weight_quant.bits - 1) - 1
        per_channel = 2 * m.weight.detach().abs().reshape(len(m.weight), -1).mean(1) / math.sqrt(qp)
        assert torch.allclose(m.weight_quant.step.detach(), per_channel, rtol=1e-5)
    opt = torch.optim.SGD(mm.meta_params(model), lr=0.01)
    loss = mm.weight_training_step(model, x, y, opt)
    assert torch.isfinite(loss)
    assert all(m.weight_quant.step.grad is not None for m in mm.quant_layers(model))
    # no repair: the argmax, over the target; a given selection: taken as it is
    assert mm.start_weight_training(model, target, repair=False)[0] == [0] * len(branches)
    given = [2, 1] * (len(branches) // 2) + [2] * (len(branches) % 2)
    assert mm.start_weight_training(model, target, branches=given)[0] == given


def test_readme_use_the_pieces_block_runs():
    """Table 1 in the reader's own loop: the README's "Use the pieces in your own loop" code, extracted and run
    as written."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the pieces in your own loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {"__name__": "readme"}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), ns)
    model = ns["model"]
    assert ns["gbops"] <= ns["target"]
    assert math.isfinite(float(ns["loss"]))
    assert all(m.weight_quant.enabled for m in mm.quant_layers(model))
    assert all(m.act.mode == "branch" for m in mm.quant_layers(model))


def test_readme_first_command_lines_exact_on_every_cpu(tmp_path, monkeypatch, capsys):
    """The README's first-command block: the lines it calls exact on every CPU are what the command prints (the
    header, the FP model's top-1 before quantization, the layers' names and MOPs); the rest varies with the CPU."""
    text = (REPO / "README.md").read_text()
    section = text.split("## What the first command prints", 1)[1]
    readme = section.split("```\n", 1)[1].split("```", 1)[0].splitlines()
    # The first command as written, in an empty folder (its default --output-dir is relative), stopped where
    # training would start: its first two lines come before it.
    monkeypatch.chdir(tmp_path)

    def stop(*args):
        raise Stopped("before training")

    monkeypatch.setattr(mm, "train_one_epoch", stop)
    assert main_in_process() == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == readme[0]
    assert printed[1] == readme[1]
    # The layer table's names, types and MOPs (the bits are the search's): the model of the first command.
    args = mm.resolve_args(mm.get_args_parser().parse_args([]))
    model = mm.build_model(args, 10)
    mm.check_budget(model, args)
    table = mm.layer_table(mm.bits_report(model, args)).splitlines()
    start = readme.index(table[0])
    columns = len(table[0].removesuffix("bits"))
    assert [line[:columns] for line in readme[start : start + len(table)]] == [line[:columns] for line in table]


# ---- the authors' recipe: the teacher (distillation), act-only epochs, their optimizers ------------------


def test_distillation_loss_by_hand():
    """Row 1: teacher softmax (1/4, 3/4), student log-softmax (-ln 2, -ln 2): ln 2. Row 2: teacher (1/2, 1/2),
    student softmax (3/4, 1/4): -(ln 3/4 + ln 1/4) / 2. The loss is their batch mean; the labels play no part."""
    teacher = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    rows = [math.log(2), -(math.log(0.75) + math.log(0.25)) / 2]
    loss = mm.distillation_loss(teacher)(student, torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    other_labels = mm.distillation_loss(teacher)(student, torch.tensor([0, 1]))
    assert loss.item() == other_labels.item()
    # d/d logits = (softmax(student) - softmax(teacher)) / batch
    loss.backward()
    by_hand = torch.tensor([[0.25 / 2, -0.25 / 2], [0.25 / 2, -0.25 / 2]])
    assert torch.allclose(student.grad, by_hand, atol=1e-7)


def _step_grads(step, model, targets) -> tuple[float, dict]:
    out = step(model, targets)
    loss = out[0] if isinstance(out, tuple) else out
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def test_distillation_leaves_the_labels_out_of_all_three_steps():
    """With a teacher (and no label term), permuted labels give bit-identical losses and gradients in bit-meta,
    bit-search and weight training; with labels as the criterion they differ (the test can fail)."""
    torch.manual_seed(0)
    patched = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4, bops_image_size=32)
    base = mm.use_speed_path(patched)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8) % 10
    mm.init_quantizers(base, images)
    kd = mm.distillation_loss(torch.randn(8, 10))

    def train(m, t, c):
        return mm.weight_training_step(m, images, t, torch.optim.SGD(m.parameters(), lr=0.0), criterion=c)

    steps = {
        "meta": lambda m, t, c: mm.bit_meta_step(m, images, t, criterion=c),
        "search": lambda m, t, c: mm.bit_search_step(m, images, t, 0.1, 30.0, criterion=c),
        "train": train,
    }
    cases = {
        "kd": (labels, kd),
        "kd-perm": (labels.flip(0), kd),
        "ce": (labels, F.cross_entropy),
        "ce-perm": (labels.flip(0), F.cross_entropy),
    }
    for name, step in steps.items():
        if name == "train":
            mm.apply_selection(base, [1] * len(mm.searched_layers(base)))
            mm.set_mode(base, "selected", quant_weights=True)
        results = {}
        for key, (targets, crit) in cases.items():
            model = copy.deepcopy(base)
            results[key] = _step_grads(lambda m, t, step=step, crit=crit: step(m, t, crit), model, targets)
        loss_a, grads_a = results["kd"]
        loss_b, grads_b = results["kd-perm"]
        assert loss_a == loss_b, name
        assert grads_a.keys() == grads_b.keys(), name
        assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a), name
        assert results["ce"][0] != results["ce-perm"][0], name


@pytest.mark.parametrize("fixed", [True, False])
def test_distillation_criterion_reaches_every_bit_selection_pass(fixed):
    """bit_selection_step in the search epoch: the criterion of each of bit-meta's 3 passes and of the search step."""
    torch.manual_seed(0)
    model = mm.patch_model(torchvision.models.resnet18(num_classes=10), [8, 4, 2], 4, bops_image_size=32)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.arange(4)
    mm.init_quantizers(model, images)
    calls = []

    def criterion(logits, targets):
        calls.append(targets is labels)
        return F.cross_entropy(logits, targets)

    opt = torch.optim.SGD(mm.meta_params(model), lr=0.0)
    opt_alpha = torch.optim.SGD(mm.alphas_of(model), lr=0.0)
    mm.bit_selection_step(
        model, images, labels, opt, opt_alpha, search=True, lam=0.1, target_gbops=30.0, fixed=fixed, criterion=criterion
    )
    assert calls == [True] * 4


def test_distillation_teacher_runs_once_per_batch_frozen_and_unchanged(tmp_path, monkeypatch):
    """The teacher is evaluated in eval mode once per training batch (not per bit-meta pass), gets no gradient,
    and its weights and BN buffers end as they were loaded."""
    path = tiny_teacher(tmp_path / "teacher.pth")
    built = []
    calls = []
    fp_model = mm.fp_model

    def record(mod, inputs, output):
        calls.append((mod.training, torch.is_grad_enabled()))

    def spy(arch, name, classes, flag="--pretrained"):
        m = fp_model(arch, name, classes, flag)
        if flag == "--teacher":
            built.append(m)
            m.register_forward_hook(record)
        return m

    monkeypatch.setattr(mm, "fp_model", spy)
    out = tmp_path / "out"
    assert main_in_process(*REF, "--teacher", f"resnet18:{path}", "--output-dir", out) == 0
    assert len(built) == 1
    # 4 epochs of 4 steps (bit-meta's 3 passes share one)
    assert len(calls) == 4 * 4
    assert all(not training and not grad for training, grad in calls)
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in built[0].state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in built[0].parameters())
    assert json.loads((out / "args.json").read_text())["teacher"] == f"resnet18:{path}"


def test_table1_act_only_epochs_then_weights_from_that_moment(tmp_path, monkeypatch):
    """--act-only-epochs 1 after 2 bit-selection epochs: epoch 3 with FP weights (no weight step initialised),
    epoch 4 with W4, every weight step initialised at its first use from epoch 3's final weights, and a fresh
    optimizer whose cosine restarts (SGD, per epoch: epoch 3 alone, then epochs 4-5)."""
    flags = [*TINY, "--epochs", "5", "--act-only-epochs", "1"]
    out = tmp_path / "out"
    assert main_in_process(*flags, "--output-dir", out, stop_after_epoch=3) == 0
    ck3 = load_ck(out / "checkpoint.pth")
    wq = {k: v for k, v in ck3["model"].items() if k.endswith("weight_quant._extra_state")}
    assert wq
    assert not any(v["initialized"] for v in wq.values())
    inits = []
    init_step = mm.LSQQuantizer.init_step
    # Qp of the narrow grids
    narrow_qp = {4: 7, 8: 127}

    def spy(self, w):
        init_step(self, w)
        inits.append((w.detach().clone(), self.step.detach().clone(), narrow_qp[self.bits]))

    monkeypatch.setattr(mm.LSQQuantizer, "init_step", spy)
    assert main_in_process(*flags, "--output-dir", out, "--resume", "auto") == 0
    model3 = ck3["model"]
    weight_keys = [k for k in model3 if k.endswith(".weight") and k.replace(".weight", ".weight_quant.step") in model3]
    weights = [model3[k] for k in weight_keys]
    assert len(inits) == 21
    assert len(weights) == 21
    # each from epoch 3's weights, 2 mean|W_c| / sqrt(Qp) per output channel
    for w, step, qp in inits:
        assert any(torch.equal(w, v) for v in weights)
        assert torch.allclose(step, 2 * w.abs().reshape(len(w), -1).mean(1) / math.sqrt(qp))
    lr = [r["lr"] for r in read_log(out)]
    # a restart at epoch 4; T_max 2 from there
    assert lr[2] == lr[3] == 0.05
    assert lr[4] == pytest.approx(0.025)
    final = load_ck(out / "checkpoint.pth")["model"]
    assert all(v["initialized"] for k, v in final.items() if k in wq)


def test_the_authors_recipe_resumes_exactly_across_the_act_only_boundary(capsys, tmp_path):
    """MobileNet-v3-small (hardswish-fed inputs on the offset grid, a weight step per output channel) with the
    authors' recipe: teacher, act-only epoch, Adam with per-step cosine and clipping, the alphas' Adam from a
    random init. Stopped after the last act-only epoch and resumed, it ends as the run that never stopped, tensor
    for tensor; the checkpoint carries each layer's offset and one weight step per output channel."""
    path = tiny_teacher(tmp_path / "teacher.pth", "mobilenet_v3_small")
    flags = [
        *TINY,
        "--data",
        "synthetic:32,16,10",
        "--epochs",
        "5",
        "--act-only-epochs",
        "1",
        "--optimizer",
        "adam",
        "--alpha-optimizer",
        "authors",
        "--teacher",
        f"mobilenet_v3_small:{path}",
        "--arch",
        "mobilenet_v3_small",
    ]
    ref = tmp_path / "ref"
    out = tmp_path / "out"
    assert main_in_process(*flags, "--output-dir", ref) == 0
    # the last act-only epoch
    assert main_in_process(*flags, "--output-dir", out, stop_after_epoch=3) == 0
    assert main_in_process(*flags, "--output-dir", out, "--resume", "auto", stop_after_epoch=4) == 0
    assert main_in_process(*flags, "--output-dir", out, "--resume", "auto") == 0
    assert_same_run(ref, out)
    # each epoch's first rate: 1e-4 in bit selection, a restart per stage
    lr = [r["lr"] for r in read_log(ref)]
    assert lr == pytest.approx([1e-4, 1e-4, 5e-4, 5e-4, 2.5e-4])
    model = load_ck(out / "checkpoint.pth")["model"]
    offsets = {
        k.removesuffix(".act._extra_state"): v["offset"] for k, v in model.items() if k.endswith("act._extra_state")
    }
    # the offset grid on exactly the hardswish-fed inputs, listed by hand (conftest.hardswish_fed)
    fed = hardswish_fed("mobilenet_v3_small")
    assert {name for name, o in offsets.items() if o == 0.375} == fed
    assert set(offsets.values()) == {0.0, 0.375}
    steps = {k: v for k, v in model.items() if k.endswith("weight_quant.step")}
    assert steps
    assert all(v.shape == model[k.replace("weight_quant.step", "weight")].shape[:1] for k, v in steps.items())
    layers = json.loads((out / "bits.json").read_text())["layers"]
    assert [r["offset"] for r in layers] == list(offsets.values())
    # on another number of processes, Adam's per-step schedule is refused
    ck = load_ck(out / "checkpoint.pth")
    torch.save({**ck, "rng": ck["rng"] * 2}, out / "two.pth")
    line = error_in_process(capsys, *flags, "--output-dir", tmp_path / "again", "--resume", out / "two.pth")
    assert "per-step schedule needs its 2 processes again" in line


@pytest.mark.parametrize("optimizer", ["authors", "adam"])
def test_the_authors_alpha_init_is_a_small_normal_draw(tmp_path, optimizer):
    """--alpha-optimizer authors: a normal draw with std 1e-3; the others (adam here) start from zeros."""
    out = tmp_path / "out"
    assert main_in_process(*REF, "--alpha-optimizer", optimizer, "--output-dir", out, stop_after_epoch=1) == 0
    model = load_ck(out / "checkpoint.pth")["model"]
    # the searched layers' (a fixed one has one)
    alphas = torch.cat([v for k, v in model.items() if k.endswith("act.alpha") and len(v) == 3])
    assert len(alphas) == 3 * 19
    if optimizer == "adam":
        assert not alphas.any()
    else:
        assert 5e-4 < alphas.std().item() < 2e-3
        assert abs(alphas.mean().item()) < 5e-4


def _run_for(tmp_path, *flags) -> mm.Run:
    # ablations.py's parser: metamix.py's flags and --alpha-lr
    args = mm.resolve_args(ablations.get_args_parser().parse_args([*TINY, *flags, "--output-dir", str(tmp_path)]))
    torch.manual_seed(0)
    return mm.Run(args, mm.Dist(), mm.build_model(args, 10), steps=4)


def test_the_authors_adam_clips_its_own_gradients_at_norm_10(tmp_path):
    """The authors' Adam: its own parameters' gradients clipped to norm 10 (not the alphas'), weight decay 5e-6
    on conv weights only; SGD's decay 1e-4 reaches the Linear weights too."""
    run = _run_for(tmp_path, "--optimizer", "adam")
    params = [p for g in run.opt.param_groups for p in g["params"]]
    for p in params + mm.alphas_of(run.model):
        p.grad = torch.full_like(p, 3.0)
    alpha_grads = [a.grad.clone() for a in mm.alphas_of(run.model)]
    run.opt.step()
    norm = sum(p.grad.double().square().sum() for p in params).sqrt()
    assert norm.item() == pytest.approx(10.0, rel=1e-5)
    # not the alphas'
    assert all(torch.equal(a.grad, g) for a, g in zip(mm.alphas_of(run.model), alpha_grads))
    decay = run.opt.param_groups[0]
    assert decay["weight_decay"] == 5e-6
    # conv weights only
    assert all(p.dim() == 4 for p in decay["params"])
    assert run.opt.param_groups[1]["weight_decay"] == 0
    # bit selection
    assert decay["lr"] == pytest.approx(5e-4 / 5)
    sgd = _run_for(tmp_path, "--optimizer", "sgd")
    sgd_decay = sgd.opt.param_groups[0]
    assert sgd_decay["weight_decay"] == 1e-4
    assert any(p.dim() == 2 for p in sgd_decay["params"])


def test_the_authors_alpha_adam_first_step_by_hand(tmp_path):
    """Adam with L2 on its first step: g' = g + 1e-3 alpha; m_hat = g', v_hat = g'^2 (bias-corrected, betas
    0.5/0.999), so alpha -= lr * g' / (|g'| + eps), lr = 1e-4 (the authors', from pretrained weights)."""
    run = _run_for(tmp_path, "--alpha-optimizer", "authors", "--alpha-lr", "1e-4")
    folder = ["--data", str(tmp_path), "--pretrained", "--optimizer", "adam", "--alpha-optimizer", "authors"]
    args = mm.resolve_args(mm.get_args_parser().parse_args(folder))
    # the authors' rates, from pretrained weights
    assert args.lr == 5e-4
    assert args.alpha_lr == 1e-4
    assert run.opt_alpha.param_groups[0]["betas"] == (0.5, 0.999)
    assert run.opt_alpha.defaults["weight_decay"] == 1e-3
    alphas = mm.alphas_of(run.model)
    with torch.no_grad():
        for a in alphas:
            a.normal_(0, 1e-3)
    before = [a.detach().clone() for a in alphas]
    grads = [torch.randn_like(a) * 1e-3 for a in alphas]
    for a, g in zip(alphas, grads):
        a.grad = g.clone()
    run.opt_alpha.step()
    for a, a0, g in zip(alphas, before, grads):
        g2 = g.double() + 1e-3 * a0.double()
        by_hand = a0.double() - 1e-4 * g2 / (g2.abs() + 1e-8)
        assert torch.allclose(a.detach().double(), by_hand, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------
# 7. The fused op, held equal to sections 1-2: metamix.py section 7
# ---------------------------------------------------------------------------------------


def _layer_and_input(kind: str, dtype=torch.float64):
    torch.manual_seed(1)
    if kind == "linear":
        layer = nn.Linear(12, 5)
        x = torch.randn(3, 12)
        return layer.to(dtype), x.to(dtype)
    conv = kind == "conv"
    out_channels = 6 if conv else 4
    groups = 1 if conv else 4
    layer = nn.Conv2d(4, out_channels, 3, stride=2, padding=1, groups=groups, bias=conv)
    x = torch.randn(2, 4, 7, 7)
    return layer.to(dtype), x.to(dtype)


# no-x-grad: the first layer (the image needs no gradient)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("kind", ["conv", "grouped", "linear"])
@pytest.mark.parametrize("mode", ["branch", "search"])
@pytest.mark.parametrize("weights", [True, False], ids=["W4", "fp-weights"])
@pytest.mark.parametrize("quantizers", ["per-channel", "per-channel+offset", "plain"])
def test_fused_op_equals_sections_1_2_in_value_and_every_gradient(kind, mode, x_grad, weights, quantizers):
    """The speed path (section 7) == op(MultiBranchQuantizer(x), LSQQuantizer(W)) + b (sections 1-2), in
    float64, in value and in every gradient: x, the steps, alpha, the weight, the weight step (a vector per
    output channel, or one per tensor with `plain`), the bias; with the hardswish offset 3/8 too."""
    layer, x = _layer_and_input(kind)
    plain = quantizers == "plain"
    q = mm.QuantLayer(layer, [8, 4, 2], 4, "l", plain=plain).double()
    q.act.offset = 0.375 * quantizers.endswith("offset")
    weight_step_shape = (1,) if plain else (len(layer.weight),)
    assert q.weight_quant.step.shape == weight_step_shape
    q.set_state(mode, 2, quant_weights=weights)
    with torch.no_grad():
        q.act.alpha.copy_(torch.tensor([0.3, -0.2, 0.5]))
    # init steps
    q(x)
    params = [q.act.step, q.act.alpha, q.weight, q.weight_quant.step]
    if q.bias is not None:
        params.append(q.bias)
    results = []
    for fused in (False, True):
        q.fused = fused
        xi = x.clone().requires_grad_(x_grad)
        y = q(xi)
        up = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
        grads = torch.autograd.grad(y, [xi] * x_grad + params, up, allow_unused=True)
        results.append((y, grads))
    y_readable, g_readable = results[0]
    y_fused, g_fused = results[1]
    assert torch.allclose(y_readable, y_fused, atol=1e-10)
    for a, b in zip(g_readable, g_fused):
        # a parameter the mode does not use: no gradient, or an exact zero
        if a is None or b is None:
            assert all(t is None or not t.any() for t in (a, b))
        else:
            assert torch.allclose(a, b, atol=1e-9), (a, b)


def _codes_off_the_slivers(shape, qn: int, qp: int, seed: int) -> torch.Tensor:
    """_codes_away_from_ties with the slivers moved a step outward: where both definitions of LSQ agree."""
    v = _codes_away_from_ties(math.prod(shape), qn, qp, seed).view(shape)
    return torch.where(_sliver(v, qn, qp), torch.where(v > qp, v + 0.5, v - 0.5), v)


@pytest.mark.parametrize("signed", [False, True])
def test_fused_op_against_pytorchs_learnable_fake_quantize_kernels(signed):
    """The speed path (section 7) at a branch with quantized weights against PyTorch's kernels composed by hand,
    conv(per-tensor fake quant of x, per-channel fake quant of W) + b, off the slivers: the same output and the same
    gradients of the input, the branch's step, the weight, the weight's steps and the bias."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = mm.QuantLayer(conv, [8, 4, 2], 4, "l")
    q.fused = True
    q.act.offset = 0.0
    q.act.signed = signed
    q.act.initialized = [True] * 3
    q.weight_quant.initialized = True
    q.set_state("branch", 1, quant_weights=True)
    qn, qp = mm.lsq_range(4, signed)
    wn, wp = mm.lsq_range(4, True, narrow=True)
    act_step = torch.tensor(0.37)
    w_steps = torch.linspace(0.02, 0.07, 6)
    x = _codes_off_the_slivers((2, 4, 8, 8), qn, qp, seed=3) * act_step
    with torch.no_grad():
        q.act.step.copy_(torch.tensor([0.1, 0.37, 0.9]))
        q.weight_quant.step.copy_(w_steps)
        q.weight.copy_(_codes_off_the_slivers((6, 4, 3, 3), wn, wp, seed=4) * w_steps.view(-1, 1, 1, 1))
    up = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(5))
    xi = x.clone().requires_grad_()
    y = q(xi)
    ours = torch.autograd.grad(y, (xi, q.act.step, q.weight, q.weight_quant.step, q.bias), up)
    g_act = mm.lsq_grad_scale(4 * 8 * 8, 4, signed)
    g_w = mm.lsq_grad_scale(4 * 3 * 3, 4, True)
    xi = x.clone().requires_grad_()
    si = act_step.view(1).clone().requires_grad_()
    wi = q.weight.detach().clone().requires_grad_()
    wsi = w_steps.clone().requires_grad_()
    bi = q.bias.detach().clone().requires_grad_()
    xq = torch._fake_quantize_learnable_per_tensor_affine(xi, si, torch.zeros(1), qn, qp, g_act)
    wq = torch._fake_quantize_learnable_per_channel_affine(wi, wsi, torch.zeros(6), 0, wn, wp, g_w)
    y_pt = F.conv2d(xq, wq, bi, padding=1)
    theirs = torch.autograd.grad(y_pt, (xi, si, wi, wsi, bi), up)
    assert torch.allclose(y, y_pt, atol=1e-5)
    gx, gs, gw, gws, gb = ours
    assert torch.allclose(gx, theirs[0], atol=1e-5)
    # the other branches' steps have no gradient in this mode
    assert gs[1].item() == pytest.approx(theirs[1].item(), rel=1e-4)
    assert gs[0] == 0 and gs[2] == 0
    assert torch.allclose(gw, theirs[2], atol=1e-5)
    assert torch.allclose(gws, theirs[3], rtol=1e-4, atol=1e-6)
    assert torch.allclose(gb, theirs[4], atol=1e-5)


@pytest.mark.parametrize("mode", ["branch", "search"])
def test_fused_op_saves_only_input_and_weight(mode):
    """The fused op keeps x and the raw weight for backward, and recomputes the quantized tensors there."""
    q = mm.QuantLayer(nn.Conv2d(8, 8, 3, padding=1, bias=False), [8, 4, 2], 4, "c")
    q.act.mode = mode
    q.weight_quant.enabled = True
    q.fused = True
    x = torch.relu(torch.randn(2, 8, 16, 16)).requires_grad_()
    q(x)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(x)
    # x and the raw weight Parameter; everything else is a step (the weight's: one per output channel, 8) or a
    # probability (<= 3 numbers). The quantized activation and weight are recomputed in backward, not stored.
    assert any(t is x for t in saved)
    assert any(t is q.weight for t in saved)
    assert all(t is x or t is q.weight or t.numel() <= 8 for t in saved), [tuple(t.shape) for t in saved]


def test_fused_op_under_cpu_bf16_autocast():
    """Under CPU bf16 autocast the fused op returns bf16, float32 input gradients, finite alpha gradients, and
    values near the float32 ones."""
    torch.manual_seed(0)
    q = mm.QuantLayer(nn.Conv2d(4, 8, 3, padding=1), [8, 4, 2], 4, "c")
    q.act.mode = "search"
    q.fused = True
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ref = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()
    assert q.act.alpha.grad is not None
    assert torch.isfinite(q.act.alpha.grad).all()
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)


def _codes(x, step, bits, signed, narrow=False):
    """Integer codes exactly as training forms them (fp32 division; a weight's steps along dim 0), as float64."""
    qn, qp = mm.lsq_range(bits, signed, narrow)
    if step.dim():
        v = x / step.view(-1, *[1] * (x.dim() - 1))
    else:
        v = x / step
    return torch.clamp(v, qn, qp).round().double()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fused_op_under_bf16_autocast_runs_on_integer_codes(bits, kind):
    """Under bf16 autocast the fused layer equals s_a*s_w*op(q_a, q_w) + b, computed in float64 from the
    codes, within the rounding of the op's bf16 output and of the final cast: <= 2^-8 of each."""
    torch.manual_seed(bits)
    conv = kind == "conv"
    if conv:
        layer = nn.Conv2d(16, 8, 3, padding=1)
        x = torch.relu(torch.randn(2, 16, 8, 8)) * 3
    else:
        layer = nn.Linear(64, 10)
        x = torch.relu(torch.randn(4, 64)) * 3
    q = mm.QuantLayer(layer, [bits], bits, "l", fixed=True)
    q.set_state("branch", 0, quant_weights=True)
    q.fused = True
    # LSQ init
    q(x)
    s_a = mm.positive(q.act.step.detach()[0])
    s_w = mm.positive(q.weight_quant.step.detach())
    qa = _codes(x, s_a, bits, False)
    qw = _codes(q.weight.detach(), s_w, bits, True, narrow=True)
    b = q.bias.detach().double()
    if conv:
        core = F.conv2d(qa, qw, None, 1, 1) * (s_a.double() * s_w.double().view(-1, 1, 1))
        ref = core + b.view(-1, 1, 1)
    else:
        core = F.linear(qa, qw) * (s_a.double() * s_w.double())
        ref = core + b
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    assert (err <= 2**-8 * (core.abs() + ref.abs()) + 1e-30).all(), err.max()


def test_fused_op_under_bf16_autocast_eq2_mixture_error_is_bounded():
    """The Eq. 2 mixture is on no grid: bf16 rounds each mixed element once (<= 2^-8 relative),
    the weight codes are exact, then the output rounds as above."""
    torch.manual_seed(0)
    q = mm.QuantLayer(nn.Conv2d(16, 8, 3, padding=1, bias=False), [8, 4, 2], 4, "c")
    q.set_state("search", 0, quant_weights=True)
    q.fused = True
    x = torch.relu(torch.randn(2, 16, 8, 8)) * 3
    q(x)
    with torch.no_grad():
        q.act.alpha.copy_(torch.tensor([0.3, 0.1, -0.2]))
    steps = mm.positive(q.act.step.detach())
    s_w = mm.positive(q.weight_quant.step.detach())
    p = F.softmax(q.act.alpha.detach(), 0)
    branches = [p[i].double() * steps[i].double() * _codes(x, steps[i], b, False) for i, b in enumerate((8, 4, 2))]
    xm = sum(branches)
    w = _codes(q.weight.detach(), s_w, 4, True, narrow=True) * s_w.double().view(-1, 1, 1, 1)
    ref = F.conv2d(xm, w, None, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    bound = 2**-8 * F.conv2d(xm.abs(), w.abs(), None, 1, 1) + 2**-7 * ref.abs() + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


# ---------------------------------------------------------------------------------------
# 8. The driver (tiers 2 and 3): metamix.py section 8, run_imagenet.sh. The reference run `ref_run` is in conftest.py
# ---------------------------------------------------------------------------------------


# ---- run_imagenet.sh -------------------------------------------------------------------------------------


def run_imagenet(*argv, **env) -> list[list[str]]:
    """The metamix.py words of each command `DRY_RUN=1 bash run_imagenet.sh ARGV` prints."""
    cluster = dict(DRY_RUN="1", DATA="/data/in1k", GPUS="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    env = dict(os.environ, **cluster, **env)
    cmd = ["bash", "run_imagenet.sh", *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [shlex.split(line) for line in p.stdout.strip().splitlines()]
    for words in lines:
        assert words[0] == "torchrun"
        assert "--nnodes=2" in words
        assert "--node_rank=1" in words
        assert "--master_addr=10.0.0.1" in words
        assert "--nproc_per_node=4" in words
    return [words[words.index("metamix.py") + 1 :] for words in lines]


@pytest.mark.parametrize("recipe", ["", "paper"])
def test_run_imagenet_dry_run_prints_the_three_recipes(recipe):
    """The paper's candidates, lambda, target and epochs for each model; the authors' recipe (teacher, 18
    act-only epochs, their optimizers) by default, the paper-text one with one more word."""
    cmds = run_imagenet("all", *[recipe] * bool(recipe))
    assert len(cmds) == 3
    expect = {
        "resnet18": (33.0, [8, 4, 2], 0.4, 90),
        "mobilenet_v2": (5.12, [8, 4, 3], 1.0, 140),
        "mobilenet_v3_large": (3.29, [8, 4, 3], 4.0, 140),
    }
    if recipe:
        expect_recipe = (None, 0, "sgd", "sgd", 0.01, 0.005)
    else:
        expect_recipe = ("resnet101:ResNet101_Weights.IMAGENET1K_V1", 18, "adam", "authors", 5e-4, 1e-4)
    for words in cmds:
        args = mm.resolve_args(mm.get_args_parser().parse_args(words))
        assert args.amp
        assert args.resume == "auto"
        assert args.search_epochs == 2
        assert (args.target_gbops, args.bits, args.lam, args.epochs) == expect[args.arch]
        assert args.data == "/data/in1k"
        assert args.batch_size == 32
        assert args.w_bits == 4
        authors = (args.teacher, args.act_only_epochs, args.optimizer, args.alpha_optimizer, args.lr, args.alpha_lr)
        assert authors == expect_recipe
    bad = subprocess.run(["bash", "run_imagenet.sh", "all", "paperr"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "unknown recipe 'paperr'" in bad.stderr


def test_run_imagenet_recipes_run_on_tiny_data(tmp_path):
    """Each of the three commands, on tiny synthetic data for a few steps (the teacher: a local model with 10
    classes, no pretrained weights; one act-only epoch, then one with W4)."""
    # in place of ResNet-101: the same code, less time
    teacher = tiny_teacher(tmp_path / "resnet18.pth")
    tiny = {
        "--data": "synthetic:16,8,10",
        "--epochs": "4",
        "--act-only-epochs": "1",
        "--batch-size": "8",
        "--teacher": f"resnet18:{teacher}",
    }
    for words in run_imagenet("all"):
        # no weights to download here
        words = [w for w in words if w != "--pretrained"]
        for flag, value in tiny.items():
            words[words.index(flag) + 1] = value
        out = tmp_path / words[words.index("--arch") + 1]
        assert main_in_process(*words, "--image-size", "32", "--search-steps", "0", "--output-dir", out) == 0
        log = read_log(out)
        assert [r["phase"] for r in log] == ["bit_selection"] * 2 + ["weight_training"] * 2


# ---- outputs, resume, torchrun, the budget ---------------------------------------------------------------


def test_driver_outputs_bits_log_and_checkpoints_of_one_process(ref_run):
    """One process's run: its files; bits.json (Fig. 7's data), log.jsonl, args.json, the checkpoint and the
    meta-state (Table 1's phase boundary); and how the search ended, from bits.json's own probabilities."""
    out = ref_run
    files = ["args.json", "bits.json", "checkpoint.pth", "log.jsonl", "meta_state.pth"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", *files]
    bits = json.loads((out / "bits.json").read_text())
    assert bits["arch"] == "resnet18"
    assert bits["candidates"] == [[8, 4], [4, 4], [2, 4]]
    assert bits["gbops"] <= bits["target_gbops"] + 1e-6
    assert bits["selection"] == "metamix"
    assert len(bits["layers"]) == 21
    searched = [r for r in bits["layers"] if not r["fixed"]]
    assert len(searched) == 19
    for r in bits["layers"]:
        assert {"name", "macs", "a_bits", "w_bits", "probs", "signed"} <= r.keys()
        assert r["macs"] > 0
    for r in searched:
        assert r["a_bits"] in (8, 4, 2)
        assert r["w_bits"] == 4
        assert len(r["probs"]) == 3
        assert abs(sum(r["probs"]) - 1) < 1e-4
    for r in (bits["layers"][0], bits["layers"][-1]):
        assert r["fixed"]
        assert r["a_bits"] == 8
        assert r["w_bits"] == 8
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert [r["phase"] for r in log] == ["bit_selection", "bit_selection", "weight_training", "weight_training"]
    for r in log:
        for k in ("loss", "top1", "top5", "val_loss", "gbops"):
            assert isinstance(r[k], float), (k, r)
            # not NaN
            assert r[k] == r[k], (k, r)
        assert r["n"] == 32
        assert r["world_size"] == 1
    assert log[-1]["gbops"] == pytest.approx(bits["gbops"])
    args = json.loads((out / "args.json").read_text())
    assert args["arch"] == "resnet18"
    assert args["epochs"] == 4
    assert args["bits"] == [8, 4, 2]
    assert args["target_gbops"] == pytest.approx(bits["target_gbops"])
    ck = load_ck(out / "checkpoint.pth")
    meta = load_ck(out / "meta_state.pth")
    assert ck["format"] == mm.CHECKPOINT_FORMAT
    assert ck["epoch"] == 4
    assert ck["phase"] == "weight_training"
    assert len(ck["history"]) == 4
    assert ck["selected"] == [[8, 4, 2].index(r["a_bits"]) for r in searched]
    # the phase boundary: bit selection done, the alphas searched, bits not selected, weights in full precision
    assert meta["epoch"] == 2
    assert meta["selected"] is None
    assert meta["phase"] == "bit_selection"
    weight_quants = [v for k, v in meta["model"].items() if k.endswith("weight_quant._extra_state")]
    assert all(not v["initialized"] for v in weight_quants)
    # how the search ended, from bits.json's own probabilities: top-2 margins, the argmax and its GBOPs by hand
    search = bits["search"]
    margins = sorted(sorted(r["probs"])[-1] - sorted(r["probs"])[-2] for r in searched)
    assert search["median_margin"] == pytest.approx(statistics.median(margins), abs=1e-5)
    assert search["min_margin"] == pytest.approx(margins[0], abs=1e-5)
    # the argmax's BOPs by hand; where rounded probabilities tie, any of the tied candidates may be the argmax
    lo_bops = sum(8 * 8 * r["macs"] for r in bits["layers"] if r["fixed"])
    hi_bops = lo_bops
    for r in searched:
        tied = [b for b, p in zip([8, 4, 2], r["probs"]) if p == max(r["probs"])]
        lo_bops += min(tied) * 4 * r["macs"]
        hi_bops += max(tied) * 4 * r["macs"]
    # without a tie lo == hi: the argmax's GBOPs, to pytest.approx's default 1e-6
    assert lo_bops / 1e9 * (1 - 1e-6) <= search["argmax_gbops"] <= hi_bops / 1e9 * (1 + 1e-6)
    assert search["vs_target"] == pytest.approx(search["argmax_gbops"] / bits["target_gbops"] - 1)
    assert search["steps"] == 4
    assert 0 <= search["argmax_last_changed"] <= 4
    assert search["settled"] == (search["argmax_last_changed"] <= 3 and search["median_margin"] >= 0.05)
    # the search epoch's row
    assert log[1]["search"] == search
    assert all("search" not in r for r in log[:1] + log[2:])
    stdout = (out.parent / "stdout.txt").read_text()
    assert "selected:" in stdout
    assert "summary:" in stdout
    assert "world size 1 on cpu" in stdout
    assert f"settled: argmax last changed at step {search['argmax_last_changed']}/4; top-2 margins" in stdout


@pytest.mark.parametrize(
    "flags, settled, changed",
    [
        # softmax saturates in a step or two: large margins, no more changes
        (["--alpha-lr", "1000"], True, "early"),
        # margins of almost 0: the argmax of alphas equal to 1e-9 follows the gradients' noise, not asserted
        (["--alpha-lr", "1e-9"], False, None),
        (["--alpha-optimizer", "adam", "--alpha-lr", "0.5", "--lam", "100", "--target-gbops", "28"], False, "late"),
    ],
    ids=["saturated", "tiny-lr", "oscillating"],
)
def test_the_search_says_whether_it_settled(tmp_path, capsys, monkeypatch, flags, settled, changed):
    """--search-steps 5 on 4 steps per epoch: two passes, 8 search steps. argmax_last_changed is the last search
    step after which the argmax of the alphas differs from the one before (0: never). A search that settles, one
    on margins of almost 0 (not settled, whatever its argmax does), and one that the budget term flips to the
    last step (lambda 100)."""
    # the argmax configuration before the first search step and after each one, read independently of the driver
    history = []
    real_step = mm.bit_selection_step

    def argmax(model):
        return [int(a.detach().argmax()) for a in mm.alphas_of(model)]

    def spy(model, *args, **kw):
        if kw.get("search") and not history:
            history.append(argmax(model))
        out = real_step(model, *args, **kw)
        if kw.get("search"):
            history.append(argmax(model))
        return out

    monkeypatch.setattr(mm, "bit_selection_step", spy)
    out = tmp_path / "out"
    # ablations.py: metamix.py's flags and --lam
    assert (
        main_in_process(*TINY, "--epochs", "2", "--search-steps", "5", *flags, "--output-dir", out, main=ablations.main)
        == 0
    )
    search = read_log(out)[-1]["search"]
    assert search["steps"] == 8
    assert len(history) == 1 + 8
    changes = [step for step in range(1, 9) if history[step] != history[step - 1]]
    assert search["argmax_last_changed"] == max(changes, default=0)
    assert search["settled"] is settled
    if changed == "early":
        assert search["argmax_last_changed"] <= 2
    if changed == "late":
        assert search["argmax_last_changed"] >= 7
    if changed is None:
        assert search["median_margin"] < 1e-6
    stdout = capsys.readouterr().out
    assert "step 8/8" in stdout
    if settled:
        assert "search settled:" in stdout
    else:
        assert "search NOT settled:" in stdout


def test_resume_is_exact_in_both_phases_and_from_the_phase_boundary(ref_run, tmp_path):
    """Stopped in bit selection (epoch 1), then in weight training (epoch 3), then to the end: the same run
    as ref_run, tensor for tensor. And from ref_run's meta_state.pth, into another folder: the same again."""
    out = tmp_path / "out"
    assert main_in_process(*REF, "--output-dir", out, stop_after_epoch=1) == 0
    assert load_ck(out / "checkpoint.pth")["epoch"] == 1
    assert not (out / "meta_state.pth").exists()
    assert main_in_process(*REF, "--output-dir", out, "--resume", "auto", stop_after_epoch=3) == 0
    assert load_ck(out / "checkpoint.pth")["phase"] == "weight_training"
    assert main_in_process(*REF, "--output-dir", out, "--resume", "auto") == 0
    assert_same_run(ref_run, out)
    fork = tmp_path / "fork"
    assert main_in_process(*REF, "--output-dir", fork, "--resume", ref_run / "meta_state.pth") == 0
    assert_same_model(ref_run / "checkpoint.pth", fork / "checkpoint.pth")
    assert [r["top1"] for r in read_log(fork)] == [r["top1"] for r in read_log(ref_run)]


def test_torchrun_two_ranks_on_an_image_folder(tmp_path):
    """Two ranks (gloo) on augmented ImageFolder data (MobileNet-v3-small): one calibration batch and one grid
    (sign, offset) for both, each validation image counted once, one RNG state per rank; the run then finishes in
    one process."""
    data = make_image_folder(tmp_path / "data", textured=True)
    flags = [
        "--arch",
        "mobilenet_v3_small",
        "--search-steps",
        "0",
        "--data",
        data,
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--search-epochs",
        "2",
    ]
    out = tmp_path / "out"
    # bit selection only (--epochs 2), continued to weight training from its phase boundary (--epochs 3)
    cmd = torchrun_cmd(*flags, "--epochs", "2", "--output-dir", out)
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "world size 2" in p.stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["n"] == 12 for r in log)
    assert all(r["world_size"] == 2 for r in log)
    ck = load_ck(out / "checkpoint.pth")
    assert len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    # the steps a single process initialises from the same seed are the two ranks'
    single = tmp_path / "single"
    flags += ["--epochs", "3"]
    assert main_in_process(*flags, "--output-dir", single, stop_after_epoch=1) == 0
    models = [ck["model"], load_ck(single / "checkpoint.pth")["model"]]
    grids = [[(v["signed"], v["offset"]) for k, v in m.items() if k.endswith("act._extra_state")] for m in models]
    assert grids[0] == grids[1]
    # the offset grid on exactly the hardswish-fed inputs, listed by hand (conftest.hardswish_fed)
    fed = hardswish_fed("mobilenet_v3_small")
    assert sum(o == 0.375 for _, o in grids[0]) == len(fed)
    # another world size
    assert main_in_process(*flags, "--output-dir", out, "--resume", "auto") == 0
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["world_size"] == 1
    assert json.loads((out / "bits.json").read_text())["gbops"] <= 1e9
    assert load_ck(out / "checkpoint.pth")["model"]["classifier.3.weight"].shape[0] == 3


def test_calibration_batch_is_the_same_on_every_rank(tmp_path):
    """LSQ's calibration batch does not depend on the rank's RNG stream, and leaves it untouched."""
    data = make_image_folder(tmp_path / "data", textured=True)
    argv = ["--data", str(data), "--image-size", "32", "--batch-size", "6", "--workers", "0"]
    args = mm.resolve_args(mm.get_args_parser().parse_args(argv))
    train, val, _ = mm.build_datasets(args)
    batches = []
    for rank in (0, 1):
        # the driver's per-rank seed, set before the loaders are built
        torch.manual_seed(args.seed + rank)
        before = torch.get_rng_state()
        dist = argparse.Namespace(world=2, rank=rank, cuda=False)
        batches.append(mm.build_loaders(args, dist, train, val)[2])
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(batches[0], batches[1])
    args.seed = 1
    # augmentation is random
    assert not torch.equal(batches[0], mm.build_loaders(args, dist, train, val)[2])


def dry_budget(*flags, classes=1000):
    """The resolved flags and the feasible range (lo, hi) of a command line, nothing trained."""
    args = mm.resolve_args(mm.get_args_parser().parse_args([*map(str, flags)]))
    lo, hi = mm.check_budget(mm.build_model(args, classes), args)
    return args, lo, hi


def test_the_header_names_the_feasible_range_and_a_target_outside_it_is_refused(capsys, tmp_path):
    """Every run's first line: the candidates, the target and the feasible range, every searched layer at its
    cheapest and at its dearest candidate (Eq. 6 on PyTorch's MAC count, the first and last layers at A8/W8); a
    target outside the range is refused in one line that names the range."""
    assert main_in_process(*TINY, "--epochs", "2", "--output-dir", tmp_path / "out", stop_after_epoch=1) == 0
    header = capsys.readouterr().out.splitlines()[0]
    macs = list(independent_macs(torchvision.models.resnet18(num_classes=10)).values())
    fixed = (macs[0] + macs[-1]) * 64
    lo = (sum(macs[1:-1]) * 2 * 4 + fixed) / 1e9
    hi = (sum(macs[1:-1]) * 8 * 4 + fixed) / 1e9
    assert "candidates [8, 4, 2], W4, target 33.000 GBOPs" in header
    assert f"(feasible {lo:.3f} .. {hi:.3f})" in header
    # candidates 8 and 6 bits: the default target, 95% of uniform A4, lies below the cheapest configuration
    line = error_in_process(capsys, "--arch", "mobilenet_v2", "--bits", "8,6", "--w-bits", "4")
    _, lo, hi = dry_budget("--arch", "mobilenet_v2", "--bits", "8,6", "--target-gbops", "8", classes=10)
    assert f"outside the feasible range [{lo:.3f}, {hi:.3f}]" in line
    assert "set --target-gbops" in line


@pytest.mark.parametrize(
    "arch, flags, target",
    [
        ("resnet18", [], 33.0),
        ("mobilenet_v2", [], 5.12),
        ("mobilenet_v3_large", [], 3.29),
        ("resnet18", ["--w-bits", "3"], None),
        ("mobilenet_v3_small", [], None),
    ],
)
def test_default_target_is_the_papers_or_95_percent_of_uniform_a4(arch, flags, target):
    """The default --target-gbops: the paper's headline budget for its three settings, else 95% of uniform A4."""
    args, _, _ = dry_budget("--arch", arch, *flags)
    # outside the paper's setting: 95% of uniform A4, computed independently here
    if target is None:
        macs = list(independent_macs(torchvision.models.get_model(arch, num_classes=1000)).values())
        uniform_a4 = sum(macs[1:-1]) * 4 * args.w_bits + (macs[0] + macs[-1]) * 64
        target = 0.95 * uniform_a4 / 1e9
    assert args.target_gbops == pytest.approx(target)


def test_average_bits_plain_and_weighted_by_input_size():
    """The plain mean over the searched layers, and the authors' reading: weighted by each searched layer's input
    values per image at the BOPs resolution (8 px here), by hand."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 1, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    mm.patch_model(model, [8, 4, 2], 4, bops_image_size=8)
    # A8, A2
    mm.apply_selection(model, [0, 2])
    args = argparse.Namespace(
        arch="custom", bits=[8, 4, 2], w_bits=4, first_last_bits=8, target_gbops=1.0, bits_from=None
    )
    r = mm.bits_report(model, args)
    # 9216, 512
    macs = [4 * 4 * 9 * 64, 8 * 4 * 16]
    assert [layer["macs"] for layer in r["layers"][1:-1]] == macs
    assert [layer["in_size"] for layer in r["layers"]] == [3 * 64, 4 * 64, 4 * 64, 8]
    assert r["avg_a_bits"] == 5.0
    # two inputs of 256 values each
    assert r["avg_a_bits_weighted"] == 5.0
    # as if its input were three times larger
    mm.searched_layers(model)[1].in_size = 768
    assert mm.bits_report(model, args)["avg_a_bits_weighted"] == (8 * 256 + 2 * 768) / 1024
    fixed_macs = 3 * 4 * 9 * 64 + 16
    assert r["gbops"] == pytest.approx((9216 * 8 * 4 + 512 * 2 * 4 + fixed_macs * 64) / 1e9)


@pytest.mark.parametrize(
    "arch, bits, target, branches, weighted, plain",
    [
        ("resnet18", [8, 4, 2], 33.0, [2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 0, 1, 1], 3.85, 4.0),
        (
            "mobilenet_v3_large",
            [8, 4, 3],
            3.29,
            [int(c) for c in "22211211211112211222212211112221121202122011111212212122211121"],
            3.83,
            3.66,
        ),
    ],
    ids=["resnet18", "mobilenet_v3_large"],
)
def test_the_weighted_average_reaches_the_papers_figures(arch, bits, target, branches, weighted, plain):
    """The paper's "3.85/4" (ResNet-18, 33 GBOPs) and "3.83/4" (MobileNet-v3-large, 3.29 GBOPs): out of reach of
    the plain mean (19 layers of even bits: 72/19 or 74/19; no sum over 62 layers), reached by the authors' reading
    (input size weighted) with configurations within the budget (found by a random search over configurations)."""
    model = mm.patch_model(torchvision.models.get_model(arch), bits, 4)
    mm.apply_selection(model, branches)
    args = argparse.Namespace(arch=arch, bits=bits, w_bits=4, first_last_bits=8, target_gbops=target, bits_from=None)
    r = mm.bits_report(model, args)
    assert r["gbops"] <= target
    assert round(r["avg_a_bits_weighted"], 2) == weighted
    assert round(r["avg_a_bits"], 2) == plain
    n = len(mm.searched_layers(model))
    # every plain mean k / n the candidates allow (ResNet-18's are even)
    stride = 2 if arch == "resnet18" else 1
    assert all(round(k / n, 2) != weighted for k in range(2 * n, 8 * n + 1, stride))


# ---- bad input: one line, exit 2, nothing touched --------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--arch", "resnet999"], ["resnet999", "resnet18", "mobilenet_v2"]),
        (["--bits", "8,x"], ["--bits", "8,x"]),
        (["--bits", "1,4"], ["--bits", "1,4", "between 2 and 16"]),
        (["--bits", "4,4"], ["--bits", "4,4", "distinct"]),
        (["--bits", "8"], ["--bits [8]", "two candidates or more"]),
        (["--bits", ""], ["--bits"]),
        (["--w-bits", "1"], ["--w-bits", "1"]),
        (["--w-bits", "8,4"], ["--w-bits", "8,4"]),
        (["--w-bits", "17"], ["--w-bits", "invalid choice: 17"]),
        (["--lam", "1"], ["unrecognized arguments: --lam"]),
        (["--act-only-epochs", "-1"], ["--act-only-epochs", "-1", "at least 0"]),
        (["--act-only-epochs", "1"], ["--act-only-epochs 1", "no epoch with quantized weights", "--epochs 3"]),
        (["--optimizer", "rmsprop"], ["--optimizer", "rmsprop"]),
        (["--teacher", "resnet999"], ["--teacher resnet999", "not a torchvision classification model"]),
        (["--teacher", "resnet18:V9"], ["--teacher V9", "IMAGENET1K_V1"]),
        (["--teacher", "resnet18"], ["--teacher ResNet18_Weights.IMAGENET1K_V1 needs 1000 classes", "10"]),
        (["--teacher", "resnet18:/nonexistent/sd.pth"], ["--teacher /nonexistent/sd.pth: no such file"]),
        (["--lr", "0"], ["--lr", "above 0"]),
        (["--lr", "inf"], ["--lr", "inf"]),
        (["--workers", "x"], ["--workers", "'x' is not an integer"]),
        (["--batch-size", "0"], ["--batch-size", "at least 1"]),
        (["--epochs", "2.5"], ["--epochs", "'2.5' is not an integer"]),
        (["--target-gbops", "-3"], ["--target-gbops", "above 0"]),
        (["--image-size", "4"], ["--image-size", "at least 8"]),
        (["--seed", "-1"], ["--seed", "at least 0"]),
        (["--alpha-optimizer", "rmsprop"], ["--alpha-optimizer", "rmsprop"]),
        (["--epochs", "1"], ["--epochs 1", "--search-epochs 2"]),
        (["--pretrained", "V9"], ["--pretrained V9", "IMAGENET1K_V1"]),
        (["--bits", "16,12"], ["(the default; set --target-gbops)", "[16, 12]"]),
        (["--target-gbops", "1"], ["--target-gbops 1", "feasible range"]),
        (["--data", "synthetic:64,0"], ["--data synthetic:64,0", "1 image each"]),
        (["--batch-size", "1"], ["--batch-size 1", "BatchNorm", "2 or more"]),
        (["--batch-size", "100000"], ["--batch-size 100000", "64 training images"]),
        (["--arch", "vit_b_16"], ["--arch vit_b_16", "MultiheadAttention", "outside the BOPs"]),
        (["--arch", "swin_t"], ["--arch swin_t", "not called as a module"]),
        (["--arch", "maxvit_t"], ["--arch maxvit_t", "RelativePositionalMultiHeadAttention", "outside the BOPs"]),
        (["--arch", "inception_v3", "--target-gbops", "30"], ["--image-size 32", "too small", "inception_v3"]),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments(capsys, tmp_path, flags, needles):
    """Each bad flag: one line that names it (and what would do), exit 2, no output folder made."""
    out = tmp_path / "out"
    line = error_in_process(capsys, "--epochs", "3", *TINY, *flags, "--output-dir", out)
    for n in needles:
        assert n in line, (n, line)
    if flags == ["--batch-size", "100000"]:
        # checked against the data, once the folder may exist: no checkpoint in it
        assert not list(out.glob("*.pth"))
    else:
        assert not out.exists()


def test_one_line_on_the_real_command_line(tmp_path):
    """The same contract from a real process: argparse's own errors and the driver's (exit 2, one line)."""
    p = run_cli("--act-only-epochs", "-1", check=False)
    assert p.returncode == 2
    assert error_line(p, "argument --act-only-epochs", "at least 0").startswith("metamix: error:")
    p = run_cli(*TINY, "--epochs", "3", "--target-gbops", "1", "--output-dir", tmp_path / "out", check=False)
    error_line(p, "--target-gbops 1", "feasible range")
    assert p.returncode == 2
    assert not (tmp_path / "out").exists()


def _folder_error(capsys, tmp_path, data, *needles, workers=0) -> str:
    out = tmp_path / "out"
    line = error_in_process(
        capsys,
        "--arch",
        "resnet18",
        "--data",
        data,
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        workers,
        "--epochs",
        "3",
        "--output-dir",
        out,
    )
    for n in needles:
        assert n in line, (n, line)
    assert not (out / "checkpoint.pth").exists()
    assert not (out / "bits.json").exists()
    return line


def test_data_errors_name_the_folder_or_file(capsys, tmp_path):
    """A missing folder, a missing split, a class in one split only, a class without images: one line each."""
    _folder_error(capsys, tmp_path, tmp_path / "nope", str(tmp_path / "nope"), "No such file or directory")
    data = make_image_folder(tmp_path / "data")
    shutil.rmtree(data / "val")
    _folder_error(capsys, tmp_path, data, str(data / "val"))
    data = make_image_folder(tmp_path / "data2")
    (data / "train" / "class_3").mkdir()
    _folder_error(capsys, tmp_path, data, "class_3")
    data = make_image_folder(tmp_path / "data3")
    for f in (data / "train" / "class_1").iterdir():
        f.rename(f.with_suffix(".txt"))
    _folder_error(capsys, tmp_path, data, "class_1", ".png")
    data = make_image_folder(tmp_path / "data4")
    shutil.rmtree(data / "val" / "class_2")
    _folder_error(capsys, tmp_path, data, "class_2", "different classes")


@pytest.mark.parametrize("workers", [0, 2])
def test_data_corrupt_image(capsys, tmp_path, workers):
    """A corrupt image, read in this process or in a loader worker: one line naming the file, not the worker."""
    data = make_image_folder(tmp_path / "data")
    bad = data / "train" / "class_2" / "img_5.png"
    bad.write_bytes(b"this is not a PNG file \x00\x01\x02" * 10)
    line = _folder_error(capsys, tmp_path, data, str(bad), workers=workers)
    assert "worker" not in line.lower(), line


def test_output_dir_not_writable(capsys, tmp_path):
    """An --output-dir that cannot be made: one line naming it; what is in the way is left alone."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "sub"
    line = error_in_process(capsys, *TINY, "--epochs", "3", "--output-dir", out, "--data", "synthetic:64,32,10")
    assert "--output-dir" in line
    assert str(out) in line
    assert blocker.read_text() == "not a directory"


def test_resume_in_weight_training_refuses_another_lr(capsys, ref_run, tmp_path):
    """A changed --lr would make the resumed run another run; at the phase boundary it may change (a new optimizer)."""
    # checkpoint.pth: epoch 4, weight training
    out = copy_run(ref_run, tmp_path / "out")
    before = fingerprint(out)
    line = error_in_process(capsys, *REF, "--output-dir", out, "--resume", "auto", "--lr", "0.02")
    assert "the checkpoint has --lr 0.05, not 0.02" in line
    assert fingerprint(out) == before
    teacher = tiny_teacher(tmp_path / "t.pth")
    changes = [
        (["--optimizer", "adam", "--lr", "0.05"], "--optimizer sgd, not adam"),
        (["--act-only-epochs", "1"], "--act-only-epochs 0, not 1"),
        (["--teacher", f"resnet18:{teacher}"], "--teacher None, not resnet18:"),
    ]
    for flags, says in changes:
        assert says in error_in_process(capsys, *REF, "--output-dir", out, "--resume", "auto", *flags)
    assert fingerprint(out) == before
    # at the phase boundary they may change: the optimizers are rebuilt before any step (SGD's state is not Adam's)
    fork = tmp_path / "fork"
    meta_state = ref_run / "meta_state.pth"
    assert main_in_process(*REF, "--optimizer", "adam", "--output-dir", fork, "--resume", meta_state) == 0
    # a fresh Adam, per-step cosine
    assert [r["lr"] for r in read_log(fork)][2:] == pytest.approx([5e-4, 2.5e-4])


def test_resume_and_pretrained_refuse_bad_files_in_a_sentence(capsys, ref_run, tmp_path):
    """Each bad file is named with what it is; the run's folder is left byte for byte as it was."""
    out = copy_run(ref_run, tmp_path / "out")
    real = out / "meta_state.pth"
    # the run stands at the phase boundary: --resume auto is its meta-state
    (out / "checkpoint.pth").unlink()
    shutil.copy(real, out / "checkpoint.pth")
    before = fingerprint(out)
    truncated = tmp_path / "cut.pth"
    text = tmp_path / "notes.pth"
    js = tmp_path / "x.json"
    foreign = tmp_path / "f.pth"
    evil = tmp_path / "e.pth"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    text.write_text("hello, I am not a checkpoint\n")
    js.write_text(json.dumps({"layer1.0.conv1": 4}))
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, foreign)
    marker = tmp_path / "PWNED"
    torch.save({"x": Evil(str(marker))}, evil)
    cases = [
        (["--resume", tmp_path / "missing.pth"], [str(tmp_path / "missing.pth"), "No such file or directory"]),
        (["--resume", truncated], [str(truncated), "torch.load cannot read it"]),
        (["--resume", text], [str(text), "torch.load cannot read it"]),
        (["--resume", js], [str(js), "torch.load cannot read it"]),
        (["--resume", out], [str(out), "Is a directory"]),
        (["--resume", foreign], [str(foreign), "not a metamix-checkpoint-4 file"]),
        (["--resume", evil], [str(evil), "torch.load cannot read it", "Weights only load failed"]),
        (["--pretrained", js], [str(js), "torch.load cannot read it"]),
        (["--pretrained", real], [str(real), "not a state dict of resnet18"]),
        (["--resume", "auto", "--bits", "8,4", "--target-gbops", "40"], [str(out / "checkpoint.pth"), "--bits"]),
        (["--resume", "auto", "--arch", "mobilenet_v3_small"], ["--arch"]),
        # no --resume: refuse to overwrite
        ([], ["already holds checkpoint.pth", "--resume auto"]),
    ]
    for extra, needles in cases:
        args = list(REF)
        if "--arch" in extra:
            i = args.index("--arch")
            del args[i : i + 2]
        line = error_in_process(capsys, *args, "--output-dir", out, *extra)
        for n in needles:
            assert n in line, (extra, n, line)
        assert fingerprint(out) == before, f"{extra}: the output dir changed"
    assert not marker.exists(), "a pickled object was executed on load"


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(capsys, ref_run, tmp_path):
    """A NaN loss stops the run before its update, in one line naming the step and the last good checkpoint."""
    line = error_in_process(capsys, *REF, "--output-dir", tmp_path / "fresh", "--lr", "1e30")
    assert "epoch 1 step" in line
    assert "nan" in line
    assert "none written yet" in line
    assert not (tmp_path / "fresh" / "checkpoint.pth").exists()
    # from the phase boundary with an absurd --lr: it is used from the first resumed step, and the
    # epoch-2 checkpoint, log and bits stay byte for byte as they were
    out = copy_run(ref_run, tmp_path / "out")
    shutil.copy(out / "meta_state.pth", out / "checkpoint.pth")
    # bits.json is written again, the same
    kept = {k: v[0] for k, v in fingerprint(out).items() if k != "args.json"}
    line = error_in_process(capsys, *REF, "--output-dir", out, "--resume", "auto", "--lr", "1e30")
    m = re.search(r"at epoch (\d+) step .*last good checkpoint: epoch (\d+) in checkpoint\.pth", line)
    assert m, line
    assert (m.group(1), m.group(2)) == ("3", "2"), line
    assert {k: v[0] for k, v in fingerprint(out).items() if k != "args.json"} == kept


# ---- real processes: signals, kill -9, a rank's death, a second run, a full disk -------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_resumes_exactly(ref_run, tmp_path, sig, code):
    """SIGTERM or SIGINT: exit 128 + signal, one line, no temporary file; resumed, the same run as ref_run."""
    out = tmp_path / "out"
    proc = popen_cli(*REF, "--output-dir", out)
    try:
        # SIGINT in epoch 1, before any checkpoint
        if sig == signal.SIGINT:
            wait_for(lambda: (out / "args.json").exists(), proc, 180, "the start of the run")
        else:
            wait_for((out / "checkpoint.pth").exists, proc, 180, "the first checkpoint")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == code, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert "interrupted by" in lines[0], stderr
    assert not list(out.glob("*.tmp.*")), "temporary files left behind"
    if (out / "checkpoint.pth").exists():
        assert "--resume auto" in lines[0]
        assert load_ck(out / "checkpoint.pth")["epoch"] >= 1
        assert main_in_process(*REF, "--output-dir", out, "--resume", "auto") == 0
        assert_same_run(ref_run, out)
    else:
        assert "no checkpoint was written yet" in lines[0], lines[0]


def test_sigkill_never_leaves_a_broken_checkpoint(ref_run, tmp_path):
    """kill -9 while checkpoint.pth is being rewritten, then at a random moment; then finish the run exactly.
    The killed run's lock does not block the next run."""
    out = tmp_path / "out"
    ck = out / "checkpoint.pth"
    rng = random.Random(1)
    epochs_seen = []
    mid_write = 0
    for attempt in range(2):
        proc = popen_cli(*REF, "--output-dir", out, "--resume", "auto")
        try:
            tmp = None
            # at a random moment
            if attempt == 1:
                wait_for(lambda: (out / "args.json").exists(), proc, 120, "the start of the run")
                time.sleep(rng.uniform(1.0, 4.0))
            # while a checkpoint write is in flight (after a first one exists)
            else:
                if not ck.exists():
                    wait_for(ck.exists, proc, 180, "the first checkpoint", poll=0.005)
                # this process's write (killed ones leave theirs)
                tmp = out / "checkpoint.pth.tmp"
                wait_for(tmp.exists, proc, 180, "a checkpoint write", poll=0.002)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            # the kill left this write unfinished
            mid_write += bool(tmp is not None and tmp.exists())
        finally:
            kill_group(proc)
        if ck.exists():
            # weights_only=True
            state = load_ck(ck)
            assert state["format"] == mm.CHECKPOINT_FORMAT
            epochs_seen.append(state["epoch"])
            assert [r["epoch"] for r in state["history"]] == list(range(1, state["epoch"] + 1))
    assert epochs_seen, "no checkpoint was ever written"
    assert mid_write >= 1, "no kill landed while checkpoint.pth was being written"
    assert main_in_process(*REF, "--output-dir", out, "--resume", "auto") == 0
    assert_same_run(ref_run, out)


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    """Two runs on one --output-dir: the second is refused in one line naming the folder and the first's
    process, and the first run's files are untouched; once the first is killed (-9), a run may continue."""
    out = tmp_path / "out"
    first = popen_cli(*TINY, "--epochs", "50", "--output-dir", out)
    try:
        wait_for((out / "checkpoint.pth").exists, first, 180, "the first run's checkpoint")
        p = run_cli(*TINY, "--epochs", "50", "--output-dir", out, "--resume", "auto", check=False)
        line = error_line(p, str(out), "in use by process", str(first.pid))
        assert p.returncode == 2, line
        assert first.poll() is None, "the first run must go on"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    finally:
        kill_group(first)
    before = load_ck(out / "checkpoint.pth")["epoch"]
    stop = before + 1
    assert main_in_process(*TINY, "--epochs", "50", "--output-dir", out, "--resume", "auto", stop_after_epoch=stop) == 0
    assert load_ck(out / "checkpoint.pth")["epoch"] == before + 1


def test_torchrun_rank_death_does_not_hang(tmp_path):
    """A rank killed (-9) under torchrun: the run ends within 90 s, no worker left, the checkpoint whole."""
    out = tmp_path / "out"
    proc = popen_group(torchrun_cmd(*TINY, "--epochs", "200", "--output-dir", out))
    try:
        wait_for((out / "checkpoint.pth").exists, proc, 180, "the first checkpoint")
        workers = []
        for pid in descendants(proc.pid):
            line = cmdline(pid)
            if "metamix.py" in line and "torch.distributed.run" not in line:
                workers.append(pid)
        assert len(workers) >= 2, [(w, cmdline(w)) for w in workers]
        os.kill(workers[-1], signal.SIGKILL)
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still running 90 s after a rank was killed")
        assert proc.returncode != 0
        time.sleep(1)
        left = []
        for pid in workers:
            status = Path(f"/proc/{pid}/status")
            if status.parent.exists() and "zombie" not in status.read_text():
                left.append(pid)
        assert not left, f"workers still alive: {left}"
    finally:
        kill_group(proc)
    assert load_ck(out / "checkpoint.pth")["format"] == mm.CHECKPOINT_FORMAT


def test_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """On a 24 MB tmpfs a MobileNet-v3-small run fills the disk writing its second checkpoint (meta_state.pth):
    one line naming the file, exit 2, the epoch-1 checkpoint whole. Without the right to mount: a write
    that fails, in this process."""
    disk = tmp_path / "disk"
    disk.mkdir()
    flags = [
        "--arch",
        "mobilenet_v3_small",
        "--image-size",
        "32",
        "--search-steps",
        "0",
        "--data",
        "synthetic:32,16,10",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--output-dir",
        disk / "out",
    ]
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip("cannot mount a tmpfs here (not root); test_full_disk_in_process covers the message")
    try:
        p = run_cli(*flags, check=False)
        line = error_line(p, "cannot write", str(disk / "out"), "No space left on device")
        assert p.returncode == 2
        assert "intact" in line
        ck = load_ck(disk / "out" / "checkpoint.pth")
        assert ck["epoch"] == 1
        assert not list((disk / "out").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_in_process(capsys, tmp_path, monkeypatch):
    """A write that fails with ENOSPC (meta_state.pth's): one line naming the file; the epoch-1 checkpoint whole."""
    real = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith("meta_state.pth"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    line = error_in_process(capsys, *REF, "--output-dir", out)
    assert f"cannot write {out / 'meta_state.pth'} (No space left on device)" in line
    assert load_ck(out / "checkpoint.pth")["epoch"] == 1
    assert not list(out.glob("*.tmp"))


# ---- the file alone, the CPU bf16 path, and the architectures the README lists ---------------------------


def test_metamix_py_runs_alone_from_an_empty_folder_with_bf16_autocast(tmp_path):
    """Copied alone into an empty folder, it runs its smallest configuration, here with --amp (CPU bf16
    autocast exercises the casts of the GPU path)."""
    shutil.copy(METAMIX, tmp_path / "metamix.py")
    p = subprocess.run(
        [
            sys.executable,
            "metamix.py",
            "--search-steps",
            "0",
            "--data",
            "synthetic:32,16,10",
            "--image-size",
            "32",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--search-epochs",
            "1",
            "--amp",
        ],
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "summary:" in p.stdout
    assert sorted(os.listdir(tmp_path)) == ["metamix.py", "runs"]
    assert read_log(tmp_path / "runs" / "metamix")[-1]["epoch"] == 2


SUPPORTED = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "googlenet",
]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_supported_architectures_end_to_end(arch, tmp_path):
    """Every architecture the README lists: bit selection with a search step and a step of weight training."""
    flags = [
        "--arch",
        arch,
        "--search-steps",
        "0",
        "--data",
        "synthetic:8,4,10",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--epochs",
        "2",
        "--search-epochs",
        "1",
    ]
    assert main_in_process(*flags, "--output-dir", tmp_path / "out") == 0
    log = read_log(tmp_path / "out")
    assert [r["phase"] for r in log] == ["bit_selection", "weight_training"]
    # not NaN
    assert all(r["loss"] == r["loss"] for r in log)
