"""Tests for export.py. Run: python -m pytest -q test_export.py

The packing and the integer layer against values computed by hand or by an independent formula; the export
of the shared reference run (resnet18), of a MobileNet-v3-large run of (A, W) pairs, and bad input; the ONNX
export (--onnx) of ResNet-18, MobileNet-v3-large and a MobileNet-v2 run of pairs, checked in onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import export as ex
import metamix as mm
import runs
import pairs
from conftest import copy_run, error_line, load_ck, main_in_process, run_cli

# ---- packing ---------------------------------------------------------------------------


def test_pack_codes_by_hand():
    """pack_codes' layout by hand: code - Qn, first code in the low bits, four 2-bit or two 4-bit codes a byte."""
    # 2-bit unsigned, four per byte, first code in the low bits: 1 | 2<<2 | 3<<4 | 0<<6 = 57, then 1
    assert ex.pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2, signed=False).tolist() == [57, 1]
    # 4-bit signed, stored as code - Qn = code + 8: [-8, 7, -1] -> [0, 15, 7] -> 0 | 15<<4 = 240, then 7
    assert ex.pack_codes(torch.tensor([-8.0, 7.0, -1.0]), 4, signed=True).tolist() == [240, 7]
    # 3-bit signed, two per byte: [-4, 3] -> [0, 7] -> 0 | 7<<4 = 112
    assert ex.pack_codes(torch.tensor([-4, 3]), 3, signed=True).tolist() == [112]
    # 8-bit signed, one per byte: -128 -> 0, 127 -> 255
    assert ex.pack_codes(torch.tensor([-128, 127, 0]), 8, signed=True).tolist() == [0, 255, 128]
    with pytest.raises(ValueError, match="outside"):
        ex.pack_codes(torch.tensor([4]), 3, signed=True)
    with pytest.raises(ValueError, match="integers"):
        ex.pack_codes(torch.tensor([0.5]), 4, signed=False)


@pytest.mark.parametrize("bits,signed", list(itertools.product([2, 3, 4, 5, 6, 7, 8, 12, 16], [False, True])))
def test_pack_codes_round_trip(bits, signed):
    """unpack_codes inverts pack_codes at every width and signedness; out-of-range codes are refused."""
    qn, qp = mm.lsq_range(bits, signed)
    per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
    g = torch.Generator().manual_seed(bits)
    for n in (1, 2, 3, 5, 7, 8, 9, 1001):
        codes = torch.randint(qn, qp + 1, (n,), generator=g)
        codes[0] = qn
        codes[-1] = qp if n > 1 else codes[-1]
        packed = ex.pack_codes(codes.float(), bits, signed)
        assert packed.dtype == torch.uint8
        assert packed.numel() == (2 * n if bits > 8 else -(-n // per_byte)) == ex.packed_size(n, bits)
        assert torch.equal(ex.unpack_codes(packed, bits, signed, n), codes)
    with pytest.raises(ValueError, match="packed bytes"):
        ex.unpack_codes(packed[:-1], bits, signed, n)


# ---- the integer layer -----------------------------------------------------------------


def _exported_layer(layer: nn.Module, a_bits: int, w_bits: int, x: torch.Tensor, offset: float = 0.0) -> tuple:
    """A QuantLayer in weight training at (a_bits, w_bits), its steps set by LSQ's init on x, exported and
    loaded back through torch.save / torch.load(weights_only=True)."""
    q = mm.QuantLayer(layer, [8, a_bits], w_bits, name="layer")
    q.act.offset = offset
    q.selected_branch = 1
    q.set_state("branch", 1, quant_weights=True)
    with torch.no_grad():
        # LSQ init of the activation and weight steps
        q(x)
    buf = io.BytesIO()
    torch.save(ex.export_layer(q), buf)
    buf.seek(0)
    return q, ex.IntegerLayer(torch.load(buf, weights_only=True))


def _int64_accumulator(q_a: torch.Tensor, w_codes: torch.Tensor, op) -> torch.Tensor:
    """op(q_a, q_w) in int64, independently of the float64 convolution: unfold + integer matmul per group."""
    qa = q_a.round().long()
    qw = w_codes.round().long()
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


# layer, activation bits, weight bits, input (signed, relu, or hardswish: offset 3/8)
INT_LAYER_CASES = {
    "conv3x3_a4_hardswish_w4": (lambda: nn.Conv2d(6, 5, 3, padding=1), 4, 4, "hardswish"),
    "depthwise_stride2_a3_hardswish_w4": (
        lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),
        3,
        4,
        "hardswish",
    ),
    "linear_a8_hardswish_w8": (lambda: nn.Linear(24, 10), 8, 8, "hardswish"),
    "conv3x3_a2u_w3": (lambda: nn.Conv2d(6, 5, 3, padding=1), 2, 3, "relu"),
    "depthwise_stride2_a3s_w8": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False), 3, 8, "signed"),
    "grouped_strided_dilated_a8u_w2": (
        lambda: nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2),
        8,
        2,
        "relu",
    ),
    "conv1x1_stride2_a2s_w4": (lambda: nn.Conv2d(6, 7, 1, stride=2, bias=False), 2, 4, "signed"),
    "linear_a8s_w8": (lambda: nn.Linear(24, 10), 8, 8, "signed"),
    "linear_a3u_w2": (lambda: nn.Linear(24, 10, bias=False), 3, 2, "relu"),
}


@pytest.mark.parametrize("case", list(INT_LAYER_CASES))
def test_integer_layer_matches_quant_layer(case):
    """IntegerLayer's y = s_a s_w[c] op(q_a, q_w) - o s_w[c] op(1, q_w) + b equals the QuantLayer's output."""
    make, a_bits, w_bits, kind = INT_LAYER_CASES[case]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(4, 24) if isinstance(layer, nn.Linear) else torch.randn(3, 6, 9, 9)
    x = {"relu": x.relu(), "hardswish": F.hardswish(3 * x)}.get(kind, x)
    o = 0.375 * (kind == "hardswish")
    q, il = _exported_layer(layer, a_bits, w_bits, x, o)
    assert il.a_signed == (kind == "signed")
    assert (il.a_bits, il.w_bits, il.offset) == (a_bits, w_bits, o)
    # another input, partly outside the calibrated range (clamped)
    x2 = x * 1.3 + 0.05 * (kind == "relu")
    for inp in (x, x2):
        with torch.no_grad():
            # the fake-quantized forward (float32), readable form
            ref = q(inp)
            # and the speed path, which training runs
            fused = mm.use_speed_path(q)(inp)
            mm.use_speed_path(q, False)
            out = il(inp)
        assert out.dtype == ref.dtype
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (out - fused).abs().max() <= 1e-5 * ref.abs().max()
        # the codes: LSQ's own fake quantization divided by its step, and the exact accumulator
        s_a = mm.positive(q.act.step.detach()[1])
        codes = mm.lsq_quantize(inp + o, s_a, a_bits, il.a_signed) / s_a
        assert torch.equal(il.codes(inp), codes.round())
        assert (codes - codes.round()).abs().max() < 1e-4
        acc = il.accumulate(il.codes(inp))
        assert acc.dtype == torch.float64
        assert torch.equal(acc, _int64_accumulator(il.codes(inp), il.w_codes, il.op).double())
        # y = s_a * s_w[c] * acc - o * s_w[c] * op(1, q_w) + bias, in float64 by hand, per output channel c
        s_w = mm.positive(q.weight_quant.step.detach()).double()
        s_w = s_w.view(-1, 1, 1) if q.op.kind == "conv2d" else s_w
        ones = _int64_accumulator(torch.ones(1, *inp.shape[1:]), il.w_codes, il.op).double()
        by_hand = acc * (s_a.item() * s_w) - o * s_w * ones
        if layer.bias is not None:
            by_hand = by_hand + (layer.bias.double() if q.op.kind == "linear" else layer.bias.double()[:, None, None])
        assert torch.equal(out, by_hand.float())
        # the border map differs from the interior's
        if o and q.op.kind == "conv2d" and q.op.padding[0]:
            assert (ones[..., 0, 0] != ones[..., 1, 1]).any()
    # the weight codes are LSQ's, at w_bits, one step per output channel, on the narrow range
    s_w = mm.positive(q.weight_quant.step.detach()).view(-1, *[1] * (layer.weight.dim() - 1))
    assert s_w.numel() == len(layer.weight) > 1
    qmax = 2 ** (w_bits - 1) - 1
    assert torch.equal(il.w_codes.float(), (layer.weight.detach() / s_w).clamp(-qmax, qmax).round())
    assert il.w_codes.abs().max() <= qmax


def test_integer_layer_refuses_an_inexact_accumulator():
    """A layer whose |accumulator| bound reaches 2^53 (not exact in float64) is refused."""
    entry = {
        "name": "big",
        "kind": "linear",
        "weight_shape": [1, 2**40],
        "a_bits": 8,
        "a_signed": False,
        "a_step": 1.0,
        "a_offset": 0.0,
        "w_bits": 8,
        "w_signed": True,
        "w_step": torch.ones(1),
        "bias": None,
        "w_packed": torch.zeros(0, dtype=torch.uint8),
    }
    with pytest.raises(ValueError, match="2\\^53"):
        ex.IntegerLayer(entry)


def _tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )


def test_export_of_any_model_and_the_disagreement_check(tmp_path):
    """integer_model on a model that is not torchvision's; compare_logits finds a wrong scale."""
    torch.manual_seed(0)
    model = mm.patch_model(_tiny_net(), [8, 4, 2], 4, bops_image_size=16)
    x = torch.randn(16, 3, 16, 16)
    mm.init_quantizers(model, x)
    mm.start_weight_training(model, mm.gbops_range(model)[1])
    # the first forward sets each weight step from the meta-state weights
    model.eval()(x)
    with pytest.raises(ValueError, match="not in weight training"):
        ex.export_layer(mm.QuantLayer(nn.Linear(3, 3), [4], 4))
    export = ex.integer_export(model, "tiny", 5)
    path = tmp_path / "model_int.pth"
    torch.save(export, path)
    int_model = ex.load_integer_model(str(path), _tiny_net())
    assert sum(isinstance(m, ex.IntegerLayer) for m in int_model.modules()) == 4
    loader = [(x[:8], torch.arange(8) % 5), (x[8:], torch.arange(8) % 5)]
    p = ex.compare_logits(model, int_model, loader)
    assert p["n"] == 16
    assert p["argmax_differs"] == 0
    assert p["top1_integer"] == p["top1_fake_quant"]
    assert p["layer_rel_diff"] < 1e-5
    assert p["max_logit_diff"] <= 1e-5 * p["max_abs_logit"]
    assert ex.export_agrees(p)
    diff64, scale64 = ex.float64_logit_diff(model, int_model, x)
    assert diff64 <= 1e-12 * scale64
    assert ex.export_agrees({**p, "float64_diff": diff64, "float64_scale": scale64})
    # the copies were made float64, not the models
    assert next(model.parameters()).dtype == torch.float32
    # a wrong scale in the depthwise layer
    int_model[3].scale *= 1.001
    p = ex.compare_logits(model, int_model, loader)
    assert p["layer_rel_diff"] > 5e-4
    assert not ex.export_agrees(p)
    int_model[3].scale /= 1.001
    # wrong float state: layer by layer cannot see it, float64 does
    int_model[4].running_mean += 0.5
    p = ex.compare_logits(model, int_model, loader)
    diff64, scale64 = ex.float64_logit_diff(model, int_model, x)
    assert p["layer_rel_diff"] < 1e-5
    assert not ex.export_agrees({**p, "float64_diff": diff64, "float64_scale": scale64})
    assert not ex.export_agrees({"layer_rel_diff": 0.0, "argmax_differs": 3, "n": 100})
    assert ex.export_agrees({"layer_rel_diff": 1e-6, "argmax_differs": 2, "n": 100})
    with pytest.raises(ValueError, match="not a metamix integer export"):
        ex.integer_model({"format": "other"})


# ---- the export of a run ---------------------------------------------------------------


def fingerprint(d: Path) -> dict:
    """name -> (size, mtime_ns, inode) of every file in d: a rewrite (atomic_write: a new file) changes it."""
    return {
        str(f.relative_to(d)): (f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino)
        for f in sorted(Path(d).rglob("*"))
        if f.is_file()
    }


def export_in_process(*argv) -> tuple[int, str, str]:
    """export.py's main in this process (no interpreter start): (exit status, stdout, stderr)."""
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = ex.main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _fake_quant_from_checkpoint(path: Path) -> tuple:
    """The trained fake-quantized model rebuilt from a checkpoint file (either kind of run), readable form,
    and the run's validation images."""
    args, model, _ = runs.load_run(str(path))
    val = mm.build_datasets(args)[1]
    return model.eval(), torch.stack([val[i][0] for i in range(len(val))])


def check_export(out: Path, ck_path: Path, stdout: str, arch: str, n_layers: int, w_text: str, n_val: int) -> tuple:
    """model_int.pth: plain types, every layer packed at its width; the integer model's logits equal the
    fake-quantized model's within float tolerance (float64), with the same argmax (float32 too).
    Returns (the export, the fake-quantized model)."""
    assert not list(out.glob("*.tmp.*"))
    export = torch.load(out / "model_int.pth", map_location="cpu", weights_only=True)
    assert export["format"] == "metamix-int-2"
    assert export["arch"] == arch
    assert export["num_classes"] == 10
    assert export["bits_report"]["arch"] == arch
    assert len(export["layers"]) == n_layers
    bits = json.loads((out / "bits.json").read_text())
    assert [(e["name"], e["a_bits"], e["a_signed"], e["w_bits"]) for e in export["layers"]] == [
        (r["name"], r["a_bits"], r["signed"], r["w_bits"]) for r in bits["layers"]
    ]
    for e in export["layers"]:
        numel = math.prod(e["weight_shape"])
        assert e["w_packed"].numel() == -(-numel // {2: 4, 3: 2, 4: 2}.get(e["w_bits"], 1))
        assert e["a_step"] > 0
        assert isinstance(e["a_step"], float)
        assert e["a_offset"] in (0.0, 0.375)
        assert e["w_step"].shape == (e["weight_shape"][0],)
        assert (e["w_step"] > 0).all()  # per output channel
    assert export["layers"][0]["w_bits"] == 8
    assert export["layers"][-1]["w_bits"] == 8
    # one W for every searched layer
    if w_text == "W4":
        assert all(e["w_bits"] == 4 for e in export["layers"][1:-1])
    assert not any(k.startswith(export["layers"][0]["name"] + ".") for k in export["float_state"])

    lines = [line for line in stdout.splitlines() if line.startswith("export:")]
    assert len(lines) == 2, stdout[-3000:]  # no WARNING line
    assert f"{arch}, {w_text}" in lines[0]
    assert "with A8/W8 first/last" in lines[0]
    assert "MiB FP32" in lines[0]
    mib, fp32_mib = map(float, re.findall(r"([\d.]+) MiB", lines[0]))
    assert mib == pytest.approx((out / "model_int.pth").stat().st_size / 2**20, abs=0.051)
    assert fp32_mib > 5 * mib
    top1_int, top1_fq = map(float, re.search(r"top-1 ([\d.]+)% vs fake-quantized ([\d.]+)%", lines[1]).groups())
    assert top1_int == top1_fq
    assert f"on {n_val} images" in lines[1]
    assert float(re.search(r"float64 on one batch: largest logit difference (\S+)", lines[1]).group(1)) < 1e-9

    model, x = _fake_quant_from_checkpoint(ck_path)
    int_model = ex.load_integer_model(str(out / "model_int.pth"))
    with torch.no_grad():
        a32 = model(x)
        b32 = int_model(x)
        assert torch.equal(a32.argmax(1), b32.argmax(1))
        # float32 codes times their steps: float64 division finds the same codes
        for m in mm.quant_layers(model):
            codes, s_w = pairs.weight_codes(ex.selected_quantizers(m)[1], m.weight)
            m.weight.copy_(codes * s_w)
        a64 = model.double()(x.double())
        b64 = int_model.double()(x.double())
    scale = a64.abs().max().item()
    assert (a64 - a64.mean(0)).abs().max() > 0.1 * scale, "logits that do not depend on the image prove nothing"
    assert (a64 - b64).abs().max() <= 1e-9 * scale
    assert torch.equal(a64.argmax(1), b64.argmax(1))
    return export, model.float()


def test_export_resnet18_of_the_reference_run(ref_run, tmp_path):
    """export.py RUN on the reference ResNet-18 run: model_int.pth agrees with the fake-quantized model."""
    out = copy_run(ref_run, tmp_path / "out")
    before = fingerprint(out)
    code, stdout, stderr = export_in_process(out)
    assert code == 0, stderr
    assert not stderr, stderr
    assert {k: v for k, v in fingerprint(out).items() if k != "model_int.pth"} == before, "export changed the run"
    check_export(out, out / "checkpoint.pth", stdout, "resnet18", 21, "W4", 32)
    assert "(checkpoint of epoch" not in stdout


MOBILENET = [
    "--arch",
    "mobilenet_v3_large",
    "--image-size",
    "32",
    "--search-steps",
    "0",
    "--data",
    "synthetic:16,16,10",
    "--batch-size",
    "16",
    "--w-bits",
    "8,4",
    "--search-epochs",
    "1",
    "--epochs",
    "3",
]


@pytest.fixture(scope="module")
def mobilenet_pair_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """A MobileNet-v3-large run of (A, W) pairs (pairs.py), stopped in weight training (epoch 2 of 3), its
    checkpoint moved out of the run's folder and exported from there with --checkpoint. Our choice for this
    test: start from BN statistics of the synthetic images (--pretrained PATH). From torchvision's init,
    MobileNet-v3's eval-mode logits do not depend on the image (about 1e-10)."""
    tmp = tmp_path_factory.mktemp("mobilenet")
    torch.manual_seed(0)
    fp = torchvision.models.mobilenet_v3_large(num_classes=10)
    bns = [m for m in fp.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        # a cumulative average over one pass
        m.momentum = None
    ds = mm.synthetic_dataset(16, 10, 32, 0, "train")  # the run's training images
    with torch.no_grad():
        fp.train()(ds.tensors[0])
    for m in bns:
        # torchvision's for MobileNet-v3
        m.momentum = 0.01
    torch.save(fp.state_dict(), tmp / "init.pth")
    out = tmp / "out"
    # stopped right after epoch 2's checkpoint
    assert (
        main_in_process(
            *MOBILENET, "--pretrained", tmp / "init.pth", "--output-dir", out, main=pairs.main, stop_after_epoch=2
        )
        == 0
    )
    assert load_ck(out / "checkpoint.pth")["epoch"] == 2
    ck = tmp / "epoch2.pth"
    os.replace(out / "checkpoint.pth", ck)
    code, stdout, stderr = export_in_process(out, "--checkpoint", ck)
    assert code == 0, stderr
    assert not stderr, stderr
    return out, ck, stdout


def test_export_mobilenet_v3_large_pairs(mobilenet_pair_run):
    """Each layer at its own selected (A, W) pair, through hardswish, squeeze-excitation and depthwise convs."""
    out, ck, stdout = mobilenet_pair_run
    # the export read the file given, not the folder's
    assert not (out / "checkpoint.pth").exists()
    export, model = check_export(out, ck, stdout, "mobilenet_v3_large", 64, "per-layer W (average", 16)
    assert "(checkpoint of epoch 2 of 3)" in stdout
    searched = mm.searched_layers(model)
    assert all(isinstance(m, pairs.PairQuantLayer) for m in searched)
    assert len({m.candidates[m.selected_branch][1] for m in searched}) > 1, "one W for all proves little here"
    # the exported steps are the selected W's
    for m, e in zip(mm.quant_layers(model), export["layers"]):
        assert torch.equal(e["w_step"], mm.positive(m.weight_quant.step.detach()))
        assert e["w_bits"] == m.weight_quant.bits == m.candidates[0 if m.fixed else m.selected_branch][1]
    # hardswish-fed inputs (25 searched layers and the last) on the offset grid: exact with their zero point
    assert sum(e["a_offset"] == 0.375 for e in export["layers"]) == 26
    assert [e["a_offset"] for e in export["layers"]] == [m.act.offset for m in mm.quant_layers(model)]
    avg_w = sum(e["w_bits"] for e in export["layers"][1:-1]) / len(searched)
    assert f"per-layer W (average {avg_w:.2f})" in stdout


# ---- bad input -------------------------------------------------------------------------


def _failed(code: int, stdout: str, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["export.py"], code, stdout, stderr)


def test_export_bad_input(ref_run, tmp_path):
    """Still in bit selection or in the act-only epochs, a missing or a foreign run or checkpoint: one line, exit 2,
    nothing written."""
    # a run whose checkpoint.pth is at the phase boundary (bit selection)
    selecting = tmp_path / "selecting"
    selecting.mkdir()
    os.symlink(ref_run / "meta_state.pth", selecting / "checkpoint.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, foreign)
    # epoch 4 of a run whose epochs 3-4 keep the weights in full precision
    act_only = tmp_path / "act_only.pth"
    ck = torch.load(ref_run / "checkpoint.pth", weights_only=True)
    torch.save({**ck, "args": {**ck["args"], "act_only_epochs": 2}}, act_only)
    cases = [
        (
            [selecting],
            [
                "still in bit selection",
                "checkpoint of epoch 2, bit selection takes 2",
                "export a checkpoint of weight training",
            ],
        ),
        ([empty, "--checkpoint", ref_run / "meta_state.pth"], ["--checkpoint", "still in bit selection"]),
        ([tmp_path / "missing"], [str(tmp_path / "missing"), "no such folder"]),
        ([foreign], [str(foreign), "not a folder"]),
        ([empty], [str(empty), "has no checkpoint.pth"]),
        (
            [empty, "--checkpoint", tmp_path / "missing.pth"],
            [str(tmp_path / "missing.pth"), "No such file or directory"],
        ),
        ([empty, "--checkpoint", foreign], [str(foreign), "not a metamix-checkpoint-4 file"]),
        ([empty, "--checkpoint", act_only], ["--act-only-epochs", "checkpoint of epoch 4", "not quantized yet"]),
        ([empty, "--checkpoint", ref_run / "bits.json"], ["bits.json", "torch.load cannot read it"]),
        ([empty, "--checkpoint", empty], [str(empty), "Is a directory"]),
        ([], ["export: error:", "RUN_DIR"]),
        ([empty, "--epochs", "3"], ["export: error:", "--epochs"]),
    ]
    before = fingerprint(ref_run), fingerprint(tmp_path)
    for argv, needles in cases:
        code, stdout, stderr = export_in_process(*argv)
        line = error_line(_failed(code, stdout, stderr), *needles)
        assert code == 2, (argv, stdout)
        assert line.startswith("export: error: "), (argv, stdout)
        assert not stdout, (argv, stdout)
    assert (fingerprint(ref_run), fingerprint(tmp_path)) == before
    # the script itself: the same one line and exit status
    p = run_cli(selecting, script="export.py", check=False)
    error_line(p, "export: error:", "still in bit selection")
    assert p.returncode == 2
    assert not p.stdout
    assert [f.name for f in selecting.iterdir()] == ["checkpoint.pth"]


@pytest.mark.parametrize(
    "error, code, needles",
    [
        (mm.BadInput("--data /gone: no such folder"), 2, ["cannot read the run's validation set: --data /gone"]),
        (OSError("disk on fire"), 2, ["export: error: disk on fire"]),
        (ValueError("a bug"), 1, ["export: error: ValueError: a bug", "METAMIX_DEBUG=1"]),
        (
            KeyboardInterrupt(),
            130,
            ["export: interrupted by SIGINT; model_int.pth, if written, is whole but unchecked"],
        ),
    ],
)
def test_export_data_errors(ref_run, tmp_path, monkeypatch, error, code, needles):
    """mm.guarded's contract when the run's data cannot be read: one line (exit 2 for the user's problem, a BadInput
    or an OSError; 1 for any other; 130 for SIGINT, saying what survived) and nothing written, since the data is
    read before the file is written."""
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(ref_run / "checkpoint.pth", out / "checkpoint.pth")

    def broken(args):
        raise error

    monkeypatch.setattr(mm, "build_datasets", broken)
    result = export_in_process(out)
    error_line(_failed(*result), *needles)
    assert result[0] == code
    assert not (out / "model_int.pth").exists()


def test_load_run_keeps_the_weights_of_an_act_only_checkpoint_in_full_precision(ref_run, tmp_path):
    """runs.load_run puts a checkpoint in the mode it was evaluated in: weight LSQ off in the act-only epochs."""
    # epoch 4; bits selected after epoch 2
    ck = torch.load(ref_run / "checkpoint.pth", weights_only=True)
    # W4 from epoch 4, or from epoch 5
    for act_only, quantized in ((1, True), (2, False)):
        torch.save({**ck, "args": {**ck["args"], "act_only_epochs": act_only}}, tmp_path / "ck.pth")
        _, model, _ = runs.load_run(str(tmp_path / "ck.pth"))
        assert all(m.weight_quant.enabled == quantized for m in mm.quant_layers(model)), act_only


# ---- ONNX ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_libs() -> tuple:
    """(onnx, onnxruntime): optional for export.py, installed by CI for these tests."""
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def onnx_initializers(graph) -> dict:
    """name -> initializer of an ONNX graph."""
    return {t.name: t for t in graph.initializer}


def check_onnx_graph(out: Path, onnx) -> None:
    """model.onnx's quantized layers as bits.json says: a Clip to [Qn, Qp] per sub-8-bit input, none at 8 bits;
    QuantizeLinear to int8 for a signed grid, uint8 for an unsigned one; integer weight codes, dequantized along
    axis 0; the offset 3/8 as an Add and a Sub."""
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    assert model.opset_import[0].version == ex.ONNX_OPSET
    inits = onnx_initializers(graph)
    nodes = {n.name: n for n in graph.node}
    T = onnx.TensorProto
    layers = json.loads((out / "bits.json").read_text())["layers"]
    for r in layers:
        name = r["name"]
        qn, qp = mm.lsq_range(r["a_bits"], r["signed"])
        zero = inits[f"{name}.act_zero_point"].data_type
        assert zero == (T.INT8 if r["signed"] else T.UINT8)
        clip = nodes.get(f"{name}.act_clip")
        assert (clip is not None) == (r["a_bits"] < 8)
        if clip:
            bounds = [onnx.numpy_helper.to_array(inits[k]).item() for k in clip.input[1:]]
            assert bounds == [qn, qp]
        codes = inits[f"{name}.weight_codes"]
        assert codes.data_type == (T.INT4 if r["w_bits"] <= 4 else T.INT8)
        dq = nodes[f"{name}.weight"]
        assert dq.op_type == "DequantizeLinear"
        assert dq.input[0] == codes.name
        assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0
        assert nodes[name].input[1] == dq.output[0]
        assert (f"{name}.add_offset" in nodes) == (f"{name}.sub_offset" in nodes)
    clips = [n for n in graph.node if n.op_type == "Clip" and n.name.endswith(".act_clip")]
    assert len(clips) == sum(r["a_bits"] < 8 for r in layers)
    assert layers[0]["a_bits"] == layers[-1]["a_bits"] == 8
    # no float copy of a quantized weight
    shapes = {tuple(t.dims) for t in graph.initializer if t.data_type == T.FLOAT}
    weights = [inits[f"{r['name']}.weight_codes"] for r in layers]
    assert not any(tuple(w.dims) in shapes for w in weights)
    # every initializer is some node's input
    assert set(inits) <= {i for n in graph.node for i in n.input}


def check_onnx_codes(out: Path, ck_path: Path, onnx, ort) -> dict:
    """Every layer's input codes in onnxruntime (extra outputs) against PyTorch's on the validation images: equal
    on the same input (LSQ's own fake quantization divided by its step); each layer's input within LAYER_REL_TOL
    when every quantized layer runs on onnxruntime's own input (export.own_input_rel_diff). End to end, from each
    one's own forward, codes may differ by ties of the rounding after a last-bit difference of an earlier float
    sum, and how far those travel is not held (see export.compare_onnx_codes). Returns compare_onnx_codes'
    result."""
    model, x = _fake_quant_from_checkpoint(ck_path)
    graph = ex.onnx_graph(model, onnx, codes=True)
    session = ex.onnx_session(ort, graph.SerializeToString(), False)
    layers = mm.quant_layers(model)
    names = [f"{m.name}.{k}" for m in layers for k in ("input", "codes")]
    outs = dict(zip(names, ex.run_session(session, x, names)))
    ref = ex.torch_codes(model, x)
    for m in layers:
        branch = ex.selected_quantizers(m)[0]
        s_a = mm.positive(m.act.step.detach()[branch])
        bits = m.act.bits[branch]
        inp = outs[f"{m.name}.input"] + m.act.offset
        lsq = mm.lsq_quantize(inp, s_a, bits, bool(m.act.signed)) / s_a
        q = outs[f"{m.name}.codes"].float()
        assert torch.equal(q, lsq.round()), m.name
        assert q.shape == ref[m.name].shape
    c = ex.compare_onnx_codes(model, session, x)
    assert c["same_input_differs"] == 0
    assert c["layer_rel_diff"] <= ex.LAYER_REL_TOL
    assert c["codes"] == sum(t.numel() for t in ref.values())
    return c


def check_onnx_export(out: Path, ck_path: Path, stdout: str, libs: tuple) -> dict:
    """`export.py RUN --onnx`'s model.onnx: the graph (check_onnx_graph), its size printed beside
    model_int.pth's and FP32's, onnxruntime's top-1 equal to the fake-quantized model's with optimisations off
    and on, and the codes (check_onnx_codes)."""
    onnx, ort = libs
    lines = [line for line in stdout.splitlines() if line.startswith("export:")]
    assert len(lines) == 4, stdout[-3000:]
    assert f"wrote {out / 'model.onnx'} (opset 21, QDQ)" in lines[2]
    sizes = [float(v) for v in re.findall(r"([\d.]+) MiB", lines[2])]
    files = [out / "model.onnx", out / "model_int.pth"]
    assert sizes[:2] == pytest.approx([f.stat().st_size / 2**20 for f in files], abs=0.051)
    assert sizes[2] > 4 * sizes[0]
    top1 = re.findall(r"top-1 ([\d.]+)%", lines[3])
    assert len(top1) == 3
    assert len(set(top1)) == 1, lines[3]
    assert "argmax differs on 0;" in lines[3]
    assert "0 differ on the same input" in lines[3]
    check_onnx_graph(out, onnx)
    return check_onnx_codes(out, ck_path, onnx, ort)


def test_onnx_export_resnet18(ref_run, tmp_path, onnx_libs):
    """export.py RUN --onnx on the reference ResNet-18 run: model.onnx beside model_int.pth, QDQ as bits.json
    says, and onnxruntime agrees with the fake-quantized model."""
    out = copy_run(ref_run, tmp_path / "out")
    code, stdout, stderr = export_in_process(out, "--onnx")
    assert code == 0, stderr
    assert not stderr, stderr
    check_onnx_export(out, out / "checkpoint.pth", stdout, onnx_libs)


def test_onnx_export_mobilenet_v3_large_pairs(mobilenet_pair_run, onnx_libs):
    """MobileNet-v3-large of (A, W) pairs: hardswish-fed inputs on the offset grid (an Add and a Sub around
    QDQ), squeeze-excitation, depthwise convs."""
    out, ck, _ = mobilenet_pair_run
    code, stdout, stderr = export_in_process(out, "--checkpoint", ck, "--onnx")
    assert code == 0, stderr
    check_onnx_export(out, ck, stdout, onnx_libs)
    graph = onnx_libs[0].load(str(out / "model.onnx")).graph
    adds = [n for n in graph.node if n.name.endswith(".add_offset")]
    subs = [n for n in graph.node if n.name.endswith(".sub_offset")]
    assert len(adds) == len(subs) == 26
    assert {n.op_type for n in graph.node} >= {"HardSwish", "HardSigmoid", "Mul", "GlobalAveragePool"}


MOBILENET_V2_PAIRS = [
    "--arch",
    "mobilenet_v2",
    "--image-size",
    "32",
    "--search-steps",
    "0",
    "--data",
    "synthetic:32,16,10",
    "--batch-size",
    "16",
    "--w-bits",
    "2,4,8",
    "--search-epochs",
    "1",
    "--epochs",
    "2",
]


def test_onnx_export_mobilenet_v2_pairs_w248(tmp_path, onnx_libs):
    """A MobileNet-v2 run of pairs.py with W in {2, 4, 8}: 2- and 4-bit weights as INT4, 8-bit as INT8, and
    onnxruntime agrees with the fake-quantized model."""
    out = tmp_path / "out"
    run_cli(*MOBILENET_V2_PAIRS, "--output-dir", out, script="pairs.py")
    code, stdout, stderr = export_in_process(out, "--onnx")
    assert code == 0, stderr
    check_onnx_export(out, out / "checkpoint.pth", stdout, onnx_libs)
    export = torch.load(out / "model_int.pth", weights_only=True)
    assert {e["w_bits"] for e in export["layers"]} == {2, 4, 8}


@pytest.mark.parametrize("which", ["act_step", "weight_step", "last_weight_step"])
def test_onnx_disagreement_ends_in_one_line(ref_run, tmp_path, monkeypatch, onnx_libs, which):
    """A model.onnx whose first searched layer has a wrong activation step (its codes differ on the same input) or
    a wrong weight step on one output channel (the next layer's input differs on onnxruntime's own input), or
    whose last layer (fc) has every weight step 1.5 times too large (its output, the logits, differs on
    onnxruntime's own input; their argmax barely moves): exit 1, one line naming the disagreement (the file
    stays, for a look)."""
    out = copy_run(ref_run, tmp_path / "out")
    right = ex.onnx_graph

    def wrong(model, onnx, codes=False):
        m = right(model, onnx, codes)
        layer = mm.quant_layers(model)[-1 if which == "last_weight_step" else 1]
        step = onnx_initializers(m.graph)[f"{layer.name}.{which.removeprefix('last_')}"]
        value = onnx.numpy_helper.to_array(step).copy()
        if which == "last_weight_step":
            value *= 1.5
        else:
            value.reshape(-1)[0] *= 1.5
        step.CopyFrom(onnx.numpy_helper.from_array(value, step.name))
        return m

    monkeypatch.setattr(ex, "onnx_graph", wrong)
    code, stdout, stderr = export_in_process(out, "--onnx")
    needles = ["export: error: OnnxDisagrees", "beyond float rounding"]
    if which != "act_step":
        # caught by the layer-by-layer check alone
        needles.append("codes on the same input on 0, layer by layer")
    error_line(_failed(code, stdout, stderr), *needles)
    assert code == 1
    assert (out / "model.onnx").exists()


def test_onnx_of_per_tensor_weight_steps(onnx_libs):
    """LSQ's own quantizers (ablations.py --plain-lsq: one weight step per tensor): each weight dequantized by one
    scalar step, no initializer that no node reads, and onnxruntime's logits those of the fake-quantized model."""
    onnx, ort = onnx_libs
    torch.manual_seed(0)
    model = mm.patch_model(_tiny_net(), [8, 4, 2], 4, bops_image_size=16, plain=True)
    x = torch.randn(16, 3, 16, 16)
    mm.init_quantizers(model, x)
    mm.start_weight_training(model, mm.gbops_range(model)[1])
    model.eval()(x)
    exported = ex.onnx_graph(model, onnx)
    graph = exported.graph
    inits = onnx_initializers(graph)
    assert set(inits) <= {i for n in graph.node for i in n.input}
    for m in mm.quant_layers(model):
        steps = [k for k in inits if k.startswith(f"{m.name}.weight_step")]
        assert steps == [f"{m.name}.weight_step"] and list(inits[steps[0]].dims) == [], m.name
    session = ex.onnx_session(ort, exported.SerializeToString(), False)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(ex.run_session(session, x, ["logits"])[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("a_bits, w_bits", [(16, 4), (12, 4), (9, 4), (8, 12)])
def test_onnx_refuses_layers_above_8_bits(tmp_path, onnx_libs, a_bits, w_bits):
    """A run whose searched layers are at 16, 12 or 9 activation bits (16-bit codes, and from 9 to 15 bits a Clip
    that onnxruntime 1.32 does not implement for 16-bit integers) or at 12 weight bits: --onnx refuses it in one
    line naming the first such layer and its bits, exit 2, before anything is written; without --onnx it exports."""
    model = mm.patch_model(torchvision.models.resnet18(num_classes=10), [a_bits, 2], w_bits)
    rows = [{"name": m.name, "a_bits": a_bits, "w_bits": w_bits} for m in mm.searched_layers(model)]
    (tmp_path / "bits.json").write_text(json.dumps({"layers": rows}))
    out = tmp_path / "out"
    flags = ["--arch", "resnet18", "--image-size", "32", "--search-steps", "0", "--data", "synthetic:32,16,10"]
    flags += ["--batch-size", "16", "--search-epochs", "1", "--epochs", "2", "--bits", f"{a_bits},2"]
    flags += ["--w-bits", w_bits, "--bits-from", tmp_path / "bits.json", "--target-gbops", mm.gbops_range(model)[1]]
    assert main_in_process(*flags, "--output-dir", out) == 0
    before = fingerprint(out)
    code, stdout, stderr = export_in_process(out, "--onnx")
    # 19 searched layers; the first and last at A8/W8
    needles = ["export: error: --onnx exports layers of at most 8 activation and weight bits", "no Clip of 16-bit"]
    needles.append(f": layer1.0.conv1 is at A{a_bits}/W{w_bits} (and 18 more layers above 8 bits)")
    error_line(_failed(code, stdout, stderr), *needles)
    assert code == 2
    assert not stdout
    assert fingerprint(out) == before
    code, stdout, stderr = export_in_process(out)
    assert code == 0, stderr
    assert (out / "model_int.pth").exists()


def test_onnx_bad_input(ref_run, tmp_path, monkeypatch, onnx_libs):
    """--onnx on a run still in bit selection, and --onnx without onnx installed: one line, exit 2, nothing
    written."""
    selecting = tmp_path / "selecting"
    selecting.mkdir()
    os.symlink(ref_run / "meta_state.pth", selecting / "checkpoint.pth")
    code, stdout, stderr = export_in_process(selecting, "--onnx")
    error_line(_failed(code, stdout, stderr), "export: error:", "still in bit selection")
    assert code == 2
    out = copy_run(ref_run, tmp_path / "out")
    before = fingerprint(out)
    # an import of onnx fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "onnx", None)
    code, stdout, stderr = export_in_process(out, "--onnx")
    error_line(_failed(code, stdout, stderr), "export: error: --onnx needs onnx", "pip install onnx onnxruntime")
    assert code == 2
    assert not stdout
    assert fingerprint(out) == before
