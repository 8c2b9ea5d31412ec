"""GPU checks of metamix.py: on a machine without CUDA every test here is skipped (the reason says how to run them).

Run them on one GPU with `bash gpu_check.sh` (it also runs the benchmark on CUDA and keeps the figures), or alone
with `python -m pytest -q test_gpu.py`.
    - section 7's fused op equal to sections 1-2's readable form on CUDA in float32 (value and every gradient), and
      within bf16 rounding of it under torch.autocast("cuda", torch.bfloat16);
    - the real script, two synthetic epochs with --amp, in a subprocess;
    - torchrun: nccl initialised on the GPU, and the script under torchrun with as many ranks as there are GPUs
      (two at most).
The comparison helpers take a `device`, so that their logic can be checked on CPU too.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import metamix as mm
from conftest import ENV, REPO, torchrun_cmd

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bash gpu_check.sh runs these on one)"
)

# every gradient the fused op gives: the input, the activation steps, the alphas, the weight, the weight's
# per-output-channel steps, the bias
GRADS = ("x", "act.step", "act.alpha", "weight", "weight_quant.step", "bias")
# the Eq. 2 logits, set away from uniform so that the mixture's terms differ
ALPHA = (0.3, -0.2, 0.5)
# branch mode runs this branch (4 bits of 8, 4, 2)
BRANCH = 1


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 convolutions and matmuls in float32: TF32 (cuDNN's default for convolutions) would round the readable
    form's non-integer operands to 10 bits and hide the comparison under its error."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- helpers (device-agnostic) ----------------------------------------------------------------------------


def make_layer(kind: str, mode: str, offset: bool, quant_weights: bool, device) -> tuple[mm.QuantLayer, torch.Tensor]:
    """A float32 QuantLayer (candidates 8, 4, 2; W4 per output channel) and its input on `device`, steps
    initialised by one forward of the readable form. `offset`: the hardswish grid (x + 3/8, unsigned) on a
    hardswish output; else a signed grid on a Gaussian input."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(64, 32)
        x = torch.randn(8, 64) * 2
    elif kind == "conv":
        layer = nn.Conv2d(16, 32, 3, stride=1, padding=1)
        x = torch.randn(4, 16, 14, 14) * 2
    elif kind == "depthwise":
        layer = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        x = torch.randn(4, 16, 14, 14) * 2
    else:
        raise ValueError(kind)
    if offset:
        x = F.hardswish(x)
    q = mm.QuantLayer(layer, [8, 4, 2], 4, "l").to(device)
    x = x.to(device)
    q.act.offset = 0.375 if offset else 0.0
    q.set_state(mode, BRANCH, quant_weights=quant_weights)
    with torch.no_grad():
        q.act.alpha.copy_(torch.tensor(ALPHA))
        # LSQ's init of the steps (and the grid's sign), from this batch
        q(x)
    assert q.act.signed == (not offset)
    return q, x


def upstream(shape, device) -> torch.Tensor:
    """The gradient fed into the layer's output: the same numbers on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)


def forward_backward(q: mm.QuantLayer, x: torch.Tensor, fused: bool, amp: bool = False):
    """(output, {name: gradient or None}) of q on x, the readable form (fused=False) or section 7's fused op; `amp`:
    under bf16 autocast on x's device."""
    q.fused = fused
    xi = x.clone().requires_grad_()
    params = [q.act.step, q.act.alpha, q.weight, q.weight_quant.step, q.bias]
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        y = q(xi)
    up = upstream(y.shape, x.device).to(y.dtype)
    grads = torch.autograd.grad(y, [xi, *params], up, allow_unused=True)
    return y, dict(zip(GRADS, grads))


def unused(*ts) -> bool:
    """A gradient the mode does not use: None, or all zeros."""
    return all(t is None or not t.any() for t in ts)


def assert_fp32_equal(q: mm.QuantLayer, x: torch.Tensor, rtol: float = 1e-3) -> dict[str, float]:
    """Fused == readable in float32, value and every gradient, each to rtol of the tensor's largest magnitude. The
    two forms round differently (s*s_w*op(q_a, q_w) against op(s*q_a, s_w*q_w); a step's gradient as <g, q> -
    <g inside, v> against autograd's sum of g (round(v) - v), which cancel): on CPU the largest error is about 1e-4
    of the magnitude, a step's; a wrong mask, code or offset term is of the order of the magnitude. Returns the
    relative errors."""
    y_r, g_r = forward_backward(q, x, fused=False)
    y_f, g_f = forward_backward(q, x, fused=True)
    assert y_f.dtype == y_r.dtype == torch.float32
    errors = {}
    for name, a, b in [("value", y_r, y_f), *((n, g_r[n], g_f[n]) for n in GRADS)]:
        if a is None or b is None:
            assert unused(a, b), name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = a.abs().max().item()
        err = (a - b).abs().max().item()
        errors[name] = err / scale if scale else err
        assert err <= rtol * scale, f"{name}: max error {err:.3g} against {rtol} x {scale:.3g}"
    return errors


def assert_bf16_close(q: mm.QuantLayer, x: torch.Tensor) -> dict[str, float]:
    """The fused op under bf16 autocast against the readable form in float32: bf16 output; the value within the
    rounding of bf16 (elementwise, <= 2^-7 of |op|(|x_hat|, |w_hat|) + |y|: the codes are exact, the op's output and
    the mixture round once each); every gradient in its parameter's dtype, finite, within 2^-5 of the float32 one
    (normwise), a step's within 2^-3 (a sum whose terms cancel: about 1e-2 on CPU), the alphas' within 2^-5 of the
    largest dL/dp_i. Returns the relative errors."""
    y_r, g_r = forward_backward(q, x, fused=False)
    y_b, g_b = forward_backward(q, x, fused=True, amp=True)
    assert y_b.dtype == torch.bfloat16
    errors = {}
    with torch.no_grad():
        # |op|(|x_hat| + o, |w_hat|): what the rounding of the op's operands and output is relative to
        x_hat = q.act(x).abs() + q.act.offset
        w_hat = q.weight_quant(q.weight).abs()
        op_abs = q.op(x_hat, w_hat)
        err = (y_b.float() - y_r).abs()
        bound = 2**-7 * (op_abs + y_r.abs()) + 1e-6
        errors["value"] = (err / bound).max().item() * 2**-7
        assert (err <= bound).all(), f"value: max error {err.max().item():.3g}"
    # dL/dp_i of Eq. 2 in float32, the scale of the alphas' gradients (softmax's backward subtracts nearly equal ones)
    gp_scale = None
    if q.act.mode == "search":
        q.fused = True
        probs = F.softmax(q.act.alpha.detach(), 0).requires_grad_()
        y = mm.fused_forward(q, x, probs=probs)
        (gp,) = torch.autograd.grad(y, [probs], upstream(y.shape, x.device))
        gp_scale = gp.abs().max().item()
    params = {"x": x, "act.step": q.act.step, "act.alpha": q.act.alpha, "weight": q.weight}
    params.update({"weight_quant.step": q.weight_quant.step, "bias": q.bias})
    for name in GRADS:
        a, b = g_r[name], g_b[name]
        if a is None or b is None:
            assert unused(a, b), name
            continue
        assert b.dtype == params[name].dtype == torch.float32, name
        assert torch.isfinite(b).all(), name
        diff = (a - b).norm().item()
        if name == "act.alpha":
            scale = gp_scale
        else:
            scale = a.norm().item()
        rtol = 2**-3 if name.endswith("step") else 2**-5
        errors[name] = diff / scale
        assert diff <= rtol * scale, f"{name}: error {diff:.3g} against {rtol} x {scale:.3g}"
    return errors


# ---- section 7 on CUDA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_weights", [True, False], ids=["W4", "fp-weights"])
@pytest.mark.parametrize("offset", [False, True], ids=["signed", "hardswish-offset"])
@pytest.mark.parametrize("mode", ["branch", "search"])
@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
def test_fused_op_equals_readable_form_on_cuda_in_float32(kind, mode, offset, quant_weights):
    """Section 7 on CUDA (cuDNN's convolution and its backward, the CUDA hardtanh_backward mask, dot and bmm) ==
    sections 1-2 in float32, value and every gradient: input, activation steps, alphas (search), weight,
    per-output-channel weight steps (W4), bias; the signed grid and the hardswish offset grid."""
    q, x = make_layer(kind, mode, offset, quant_weights, "cuda")
    assert_fp32_equal(q, x)


@pytest.mark.parametrize("offset", [False, True], ids=["signed", "hardswish-offset"])
@pytest.mark.parametrize("mode", ["branch", "search"])
@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
def test_fused_op_under_cuda_bf16_autocast_is_within_bf16_rounding(kind, mode, offset):
    """Under torch.autocast("cuda", torch.bfloat16), as the driver's --amp runs it: a bf16 output within bf16
    rounding of the float32 readable form, float32 gradients near its own (W4 weights)."""
    q, x = make_layer(kind, mode, offset, True, "cuda")
    assert_bf16_close(q, x)


# ---- the driver on one GPU --------------------------------------------------------------------------------

RUN = [
    "--data",
    "synthetic:256,64,4",
    "--epochs",
    "2",
    "--search-epochs",
    "1",
    "--search-steps",
    "0",
    "--batch-size",
    "32",
    "--image-size",
    "32",
]


def header(stdout: str) -> str:
    """The run's first line, `metamix ARCH: ... world size N on DEVICE; ...`."""
    lines = [line for line in stdout.splitlines() if line.startswith("metamix ")]
    assert lines, stdout[-3000:]
    return lines[0]


def test_metamix_py_two_synthetic_epochs_with_amp_on_cuda(tmp_path):
    """The real script in a subprocess on one GPU with --amp (bf16 autocast): one epoch of bit selection, one of
    weight training; exit 0, bits.json and checkpoint.pth written, the run on cuda."""
    out = tmp_path / "out"
    cmd = [sys.executable, "metamix.py", *RUN, "--output-dir", str(out), "--amp"]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "on cuda" in header(p.stdout)
    assert (out / "checkpoint.pth").is_file()
    bits = json.loads((out / "bits.json").read_text())
    assert bits


def test_nccl_initialises_and_all_reduces_on_one_gpu(tmp_path):
    """One rank under torchrun: an nccl process group on the GPU and one all-reduce. (metamix.py's Dist makes a
    process group only for two ranks or more, so a one-rank run of the script does not touch nccl: this does.)"""
    script = tmp_path / "nccl_check.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "torch.cuda.set_device(int(os.environ['LOCAL_RANK']))\n"
        "dist.init_process_group('nccl')\n"
        "t = torch.ones(1, device='cuda')\n"
        "dist.all_reduce(t)\n"
        "assert t.item() == dist.get_world_size(), t\n"
        "print('nccl all_reduce ok, world size', dist.get_world_size(), 'backend', dist.get_backend())\n"
        "dist.destroy_process_group()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "nccl all_reduce ok, world size 1 backend nccl" in p.stdout


def test_torchrun_on_the_gpus(tmp_path):
    """metamix.py under torchrun with two ranks on nccl where there are two GPUs. On one GPU, one rank: the
    script's ranks take cuda:LOCAL_RANK (a second rank would need a second GPU, and recent nccl refuses two ranks
    on one device anyway), and with one rank it makes no process group (nccl is checked by the test above)."""
    nproc = min(2, torch.cuda.device_count())
    out = tmp_path / "out"
    cmd = torchrun_cmd(*RUN, "--amp", "--output-dir", out, nproc=nproc)
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert f"world size {nproc} on cuda" in header(p.stdout)
    assert (out / "checkpoint.pth").is_file()
    assert (out / "bits.json").is_file()
