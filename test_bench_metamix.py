"""bench_metamix.py: it runs, reports every contender, and its memory figures say what section 7 promises.
Times are reported, never asserted (they depend on the machine and its load)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import bench_metamix as bench
import metamix
from conftest import run_cli

CONTENDERS = {
    "fp",
    "weight_train",
    "weight_train_readable",
    "weight_train_torch_kernels",
    "search_3",
    "search_6",
    "meta",
    "meta_torch_kernels",
    "meta_pairs",
    "search_pairs",
    "teacher",
    "selection",
    "selection_teacher",
    "weight_train_teacher",
}


def test_quick_run_reports_every_contender_and_the_fused_memory():
    p = run_cli(
        "--quick", "--json", "--arch", "resnet18", "--teacher", "resnet18", script="bench_metamix.py", timeout=240
    )
    res = json.loads(p.stdout.strip().splitlines()[-1])["resnet18"]
    # brevitas' peer is timed where brevitas is installed (an optional dependency of the benchmark)
    assert set(res) - {"weight_train_brevitas"} == CONTENDERS
    assert ("weight_train_brevitas" in res) == (importlib.util.find_spec("brevitas") is not None)
    for name, r in res.items():
        assert r["ms"] > 0 and math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, name
    assert res["fp"]["time_ratio"] == 1.0 and res["fp"]["saved_bytes_ratio"] == 1.0
    # the fused op saves what a full-precision layer saves, its input and its weight, plus its steps: two floats
    # per output channel for the weight's (|s| and max(|s|, eps), for positive()'s backward), a few scalars
    convs = [m for m in torchvision.models.resnet18().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert (
        0
        <= res["weight_train"]["saved_bytes"] - res["fp"]["saved_bytes"]
        <= 8 * sum(len(m.weight) for m in convs) + 4096
    )
    # the readable form keeps the quantized tensors
    assert res["weight_train_readable"]["saved_bytes_ratio"] > 1.5
    # bit-meta frees each pass before the next
    assert abs(res["meta"]["saved_bytes_ratio"] - 1) < 1e-3
    assert abs(res["search_6"]["saved_bytes"] - res["search_3"]["saved_bytes"]) < 4096  # K branches, one saved x
    assert "resnet18" in p.stdout and "weight_train" in p.stdout and "search_6 / search_3" in p.stdout
    # reported, not asserted: times depend on the load
    for name in ("selection_teacher", "weight_train_teacher"):
        assert 0 < res[name]["teacher_share"] < 1 and res[name]["time_ratio_vs_without_plus_teacher"] > 0
        assert f"{name} / (" in p.stdout
    # no gradient: nothing saved for backward
    assert res["teacher"]["saved_bytes"] == 0
    # the peer on PyTorch's kernels keeps its quantized copies of every input and weight for the op's backward
    assert res["weight_train_torch_kernels"]["saved_bytes"] > 1.5 * res["weight_train"]["saved_bytes"]


def test_the_torch_kernel_peer_computes_what_metamix_computes():
    """The benchmark's peer (TorchKernelLayer) against the speed path it is timed against, on MobileNet-v3-small (the
    +3/8 grid, signed and unsigned inputs, per-channel weight steps, mixed bits), BN on batch statistics: the same
    logits, and a gradient for every parameter that has one in metamix. (The gradients themselves differ where
    PyTorch's kernels pass the input's gradient on the half-step sliver beyond Qp, which many 3-bit inputs reach;
    test_metamix holds the kernels against sections 1-2 layer by layer.)"""
    torch.manual_seed(0)
    model = metamix.patch_model(torchvision.models.mobilenet_v3_small(num_classes=10), [8, 4, 3], 4)
    metamix.use_speed_path(model)
    images = torch.randn(8, 3, 32, 32)
    layers = metamix.searched_layers(model)
    metamix.apply_selection(model, [i % 3 for i in range(len(layers))])
    bench.init_steps(model, images, [("selected", {"quant_weights": True})])
    peer = bench.torch_kernels(model)
    assert sum(isinstance(m, bench.TorchKernelLayer) for m in peer.modules()) == len(metamix.quant_layers(model))
    for m in [*model.modules(), *peer.modules()]:
        m.train(not isinstance(m, nn.Dropout))
    out, out_peer = model(images), peer(images)
    assert out.abs().max() > 0.01
    assert torch.allclose(out, out_peer, rtol=1e-4, atol=1e-6)
    out.logsumexp(1).sum().backward()
    out_peer.logsumexp(1).sum().backward()
    with_grad = [
        (a.grad is not None and bool(a.grad.any()), b.grad is not None)
        for a, b in zip(model.parameters(), peer.parameters())
    ]
    assert sum(a for a, _ in with_grad) > 200
    assert all(b for a, b in with_grad if a)


def test_the_torch_kernel_peer_takes_metamix_s_bit_meta_step():
    """bit_meta_step on the PyTorch-kernel peer (the benchmark's meta_torch_kernels): each candidate's pass at that
    candidate's bits, weights in full precision as in metamix's bit-meta, so the same Eq. 1 loss; BN on batch
    statistics in both (train mode), both from the same state."""
    torch.manual_seed(0)
    model = metamix.patch_model(torchvision.models.mobilenet_v3_small(num_classes=10), [8, 4, 3], 4)
    metamix.use_speed_path(model)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    bench.init_steps(model, images, [("meta", {"branch": b, "quant_weights": False}) for b in range(3)])
    peer = bench.torch_kernels(model)
    for m in [*model.modules(), *peer.modules()]:
        m.train(not isinstance(m, nn.Dropout))
    loss = metamix.bit_meta_step(model, images, targets)
    loss_peer = metamix.bit_meta_step(peer, images, targets)
    assert torch.allclose(loss, loss_peer, rtol=1e-5)
    # and not the loss of one candidate alone
    metamix.set_mode(peer, "meta", 2)
    with torch.no_grad():
        assert abs(float(torch.nn.functional.cross_entropy(peer(images), targets)) - float(loss)) > 1e-4


def test_the_brevitas_peer_has_metamix_s_layers_bits_and_learned_scales():
    """The brevitas peer (brevitas_layers), where brevitas is installed: every quantized layer of the network
    replaced by brevitas' layer with metamix's geometry, weights, weight bits and the layer's activation bits, signed as
    metamix's grid; its input scale starts at metamix's threshold (step x Qp); one training step reaches every
    weight and every scale. The values differ from metamix's (other weight scales, no offset grid): not compared."""
    qnn = pytest.importorskip("brevitas.nn")
    torch.manual_seed(0)
    model = metamix.patch_model(torchvision.models.mobilenet_v3_small(num_classes=10), [8, 4, 3], 4)
    metamix.use_speed_path(model)
    images = torch.randn(8, 3, 32, 32)
    metamix.apply_selection(model, [i % 3 for i in range(len(metamix.searched_layers(model)))])
    bench.init_steps(model, images, [("selected", {"quant_weights": True})])
    peer = bench.brevitas_layers(model)
    for q in metamix.quant_layers(model):
        layer = peer.get_submodule(q.name)
        assert isinstance(layer, (qnn.QuantConv2d, qnn.QuantLinear)), q.name
        assert torch.equal(layer.weight, q.weight)
        assert int(layer.quant_weight().bit_width) == q.weight_quant.bits
        assert int(layer.input_quant.bit_width()) == q.candidates[q.selected_branch][0]
        assert layer.input_quant.is_signed == q.act.signed
        if q.op.kind == "conv2d":
            assert (tuple(layer.stride), tuple(layer.padding), layer.groups) == (q.op.stride, q.op.padding, q.op.groups)
    for m in peer.modules():
        m.train(not isinstance(m, nn.Dropout))
    out = peer(images)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    scales = [p for n, p in peer.named_parameters() if "scaling_impl" in n]
    assert len(scales) == 2 * len(metamix.quant_layers(model))
    assert all(p.grad is not None for p in peer.parameters())


def test_saved_bytes_counts_each_storage_once_and_leaves_parameters_out():
    """A linear layer saves its input for backward; x * x saves x once (one storage), the parameters never."""
    model = nn.Linear(8, 4)
    x = torch.randn(16, 8, requires_grad=True)
    assert bench.saved_bytes(model, lambda: model(x).sum().backward()) == x.numel() * 4
    twice = nn.Sequential(nn.Identity())
    assert bench.saved_bytes(twice, lambda: (twice(x) * x).sum().backward()) == x.numel() * 4
