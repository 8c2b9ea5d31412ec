"""Integer export of a MetaMix run, beside metamix.py: the trained network as integers, and the proof that it
computes what the fake-quantized network computes. Our choice, not the paper's (it has no deployment section).

    python export.py runs/metamix                                    # writes runs/metamix/model_int.pth
    python export.py runs/metamix --checkpoint runs/metamix/old.pth  # another checkpoint file of that run
    python export.py runs/metamix --onnx                             # also runs/metamix/model.onnx (QDQ), checked

--onnx (needs onnx and onnxruntime, optional) writes the torchvision graph in opset 21 with each quantized
layer as QuantizeLinear / Clip / DequantizeLinear and integer weight initializers, and checks it in
onnxruntime against the fake-quantized model (one line, exit 1, if they disagree beyond float rounding). It takes
layers of at most 8 activation and weight bits; a run with a layer above is refused (one line, exit 2).

The run must be in weight training (its bits chosen, its weights quantized); runs of (A, W) pairs (pairs.py)
export each layer at its own selected pair. After writing, the file is loaded back and its integer model runs
beside the fake-quantized model on the run's own validation set (one process, on the GPU if there is one);
the size is printed beside FP32's. Bad input (no such run, a checkpoint still in bit selection, a file that
is not a checkpoint) is one line on stderr, exit status 2, and nothing is written. Load the file:

    import export
    model = export.load_integer_model("runs/metamix/model_int.pth")  # torchvision model, eval mode, CPU

model_int.pth (torch.load(path, weights_only=True)): per quantized layer, its weight codes packed at w_bits,
its activation step and offset, its weight steps (one per output channel c), its bias; everything else (BN,
anything not quantized) as a float state dict. An IntegerLayer computes what the QuantLayer computes, in integers:
    q_a = round(clamp((x + o) / s_a, Qn, Qp))    the activation's codes, as training computes them (o: 3/8 for a
                                                 hardswish-fed input, else 0)
    acc = op(q_a, q_w)                           code x code, summed exactly (see IntegerLayer)
    y   = s_a * s_w[c] * acc - o * s_w[c] * op(1, q_w) + bias
The op is bilinear, op(s_a q_a - o, s_w q_w) = s_a s_w op(q_a, q_w) - o s_w op(1, q_w): the second term is the
offset's zero point, a map that differs from the interior's constant only at the borders, where zero padding
(a real 0, no code) enters; it is an exact integer sum of weight codes too. The fake-quantized forward and this
one differ only by float rounding. BN, activations, pooling and residual adds stay float.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch
import torch.nn as nn
import torch.fx
import torch.nn.functional as F

import metamix as mm
import pairs
import runs

INT_FORMAT = "metamix-int-2"
PACKING = (
    "codes stored as code - Qn; 2-bit four per byte, 3-4 bit two, 5-8 bit one, 9-16 bit two bytes (low "
    "first); first code in the low bits; row-major"
)
# Our choice of what "float summation order" explains. Layer by layer, on the same input, float32 sums differ
# from the exact ones by about 1e-7..1e-5 of the output's scale: the tolerance is 1e-4. End to end there is no
# such bound: a code that sits on a rounding boundary flips with the last bit of an earlier sum, and the step it
# moves by propagates (when the fake-quantized op summed s_a q_a x s_w q_w, one flipped code moved logits by half
# their scale, no layer differing by more than 1e-6; since it sums codes too, we measured 1e-7). So end to end
# we only ask that the argmax agree on all but 1% of the images (and one more); a wrong scale, code, bias or BN
# state changes most of them. In float64 (float64_logit_diff) the two agree to about 1e-15. onnxruntime's layer
# inputs and logits are held to the same tolerance layer by layer (own_input_rel_diff; we measured 6e-7 on
# ResNet-18).
LAYER_REL_TOL = 1e-4
FLOAT64_REL_TOL = 1e-9

# ---- packing ---------------------------------------------------------------------------


def _slot_bits(bits: int) -> int:
    """Bits each code occupies when packed: 2 (2-bit, four per byte), 4 (3-4 bits, two per byte),
    8 (5-8 bits, one per byte), 16 (9-16 bits, two bytes, low byte first)."""
    for slot in (2, 4, 8, 16):
        if bits <= slot:
            return slot
    raise ValueError(f"cannot pack {bits}-bit codes (at most 16)")


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    slot = _slot_bits(bits)
    if slot == 16:
        return numel * 2
    return -(-numel // (8 // slot))


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (any shape, any dtype holding integers in [Qn, Qp]) -> flat uint8.

    Each code is stored as the unsigned offset u = code - Qn in [0, 2^bits - 1], so signed and unsigned
    codes pack the same way (our choice). Row-major order; code j of a byte sits in bits [j*slot, (j+1)*slot)
    of it (the first code in the low bits); the last byte is zero-padded. Unpack with
    `unpack_codes(packed, bits, signed, codes.numel())`.
    """
    qn, qp = mm.lsq_range(bits, signed)
    c = codes.detach().reshape(-1).cpu()
    if c.is_floating_point() and not torch.equal(c, c.round()):
        raise ValueError("codes must be integers")
    u = c.to(torch.int64) - qn
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > qp - qn):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"codes outside [{qn}, {qp}] for {bits}-bit {kind}")
    slot = _slot_bits(bits)
    if slot == 16:
        return torch.stack([u & 255, u >> 8], 1).reshape(-1).to(torch.uint8)
    per = 8 // slot
    u = F.pad(u, (0, (-u.numel()) % per)).reshape(-1, per)
    return (u << (torch.arange(per) * slot)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, numel: int) -> torch.Tensor:
    """The inverse of pack_codes: flat uint8 -> (numel,) int64 codes in [Qn, Qp]."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel, bits):
        raise ValueError(
            f"expected {packed_size(numel, bits)} packed bytes (uint8, flat) for {numel} {bits}-bit "
            f"codes, got {tuple(packed.shape)} {packed.dtype}"
        )
    qn = mm.lsq_range(bits, signed)[0]
    b = packed.cpu().to(torch.int64)
    slot = _slot_bits(bits)
    if slot == 16:
        u = b[0::2] | (b[1::2] << 8)
    else:
        per = 8 // slot
        u = ((b[:, None] >> (torch.arange(per) * slot)) & (2**slot - 1)).reshape(-1)
    return u[:numel] + qn


# ---- the export ------------------------------------------------------------------------


def selected_quantizers(m: mm.QuantLayer) -> tuple[int, mm.LSQQuantizer]:
    """(activation branch, weight quantizer) of a layer's selected candidate. Read from the selection, not from
    the mode. A layer of (A, W) pairs (pairs.py) holds one weight quantizer per W; its candidate i is the pair
    (bits[i // len(W)], W[i % len(W)])."""
    i = 0 if m.fixed else m.selected_branch
    w_quants = getattr(m, "weight_quants", None)
    if w_quants is None:
        return i, m.weight_quant
    branch, j = divmod(i, len(w_quants))
    return branch, w_quants[j]


def export_layer(m: mm.QuantLayer) -> dict:
    """One QuantLayer at its selected bits (weight training) as plain tensors and builtins.

    Steps are the ones the forward uses, positive(s): the activation's as a Python float (a float32 value is
    exact in a Python float), the weight's as a float32 tensor, one per output channel. The weight codes are
    computed as training computes them (`lsq_codes` on the float32 weight) and packed by `pack_codes`.
    """
    branch, w_quant = selected_quantizers(m)
    if not w_quant.enabled or not w_quant.initialized or m.act.signed is None or not m.act.initialized[branch]:
        raise ValueError(f"{m.name}: not in weight training (weights not quantized yet); nothing to export")
    a_bits = m.act.bits[branch]
    w_bits = w_quant.bits
    a_step = mm.positive(m.act.step.detach()[branch : branch + 1]).item()
    codes, w_step_t = pairs.weight_codes(w_quant, m.weight)
    bias = None
    if m.bias is not None:
        bias = m.bias.detach().float().cpu().clone()
    entry = {
        "name": m.name,
        "order": m.order,
        "kind": m.op.kind,
        "fixed": m.fixed,
        "weight_shape": list(m.weight.shape),
    }
    if m.op.kind == "conv2d":
        entry.update(
            stride=list(m.op.stride), padding=list(m.op.padding), dilation=list(m.op.dilation), groups=m.op.groups
        )
    entry.update(
        a_bits=a_bits,
        a_signed=bool(m.act.signed),
        a_step=a_step,
        a_offset=float(m.act.offset),
        w_bits=w_bits,
        w_signed=True,
        w_step=w_step_t.reshape(-1).cpu(),
        w_packed=pack_codes(codes, w_bits, True),
        bias=bias,
    )
    return entry


def integer_export(model: nn.Module, arch: str, num_classes: int, bits_report: dict | None = None) -> dict:
    """The content of model_int.pth: every quantized layer in forward order (export_layer), and the float state
    of the rest, keyed as in the torchvision model. Loads with weights_only=True."""
    layers = mm.quant_layers(model)
    prefixes = tuple(m.name + "." for m in layers)
    float_state = {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if torch.is_tensor(v) and not k.startswith(prefixes)
    }
    return {
        "format": INT_FORMAT,
        "arch": arch,
        "num_classes": int(num_classes),
        "packing": PACKING,
        "layers": [export_layer(m) for m in layers],
        "float_state": float_state,
        "bits_report": bits_report,
    }


# ---- the integer model -----------------------------------------------------------------


class IntegerLayer(nn.Module):
    """An exported Conv2d or Linear on integer codes: y = s_a * s_w[c] * op(q_a, q_w) - o * s_w[c] * op(1, q_w) + b.

    The input is rounded to codes by the training formula itself (`lsq_codes`: round(clamp((x + o) /
    positive(s_a), Qn, Qp)), round half to even, x + o in float32) on a float32 step, so the same x gives the same
    codes. op(1, q_w) is the offset's zero-point map, computed at the input's size, exact like the accumulator.
    The accumulation runs in float64 on integer values and is exact, as an int32 would be: every product and every
    partial sum is an
    integer, and float64 represents (and adds) integers exactly below 2^53. |acc| <= fan_in * max|q_a| *
    max|q_w|; at 8-bit activations and weights that is fan_in * 255 * 128 < fan_in * 2^15, exact up to fan_in
    2^38 (int32 would hold up to 2^16; ResNet-18's largest fan-in is 4608, MobileNet-v3's 1280). The constructor
    refuses a layer whose bound reaches 2^53. The convolution runs with cuDNN off, so that it is a direct or
    im2col + GEMM sum of products (no Winograd/FFT transforms, which would not be exact); on the CPU, float64
    convolutions never use those. The scale and the bias are applied in float64, and the result is cast to the
    input's float dtype.
    """

    def __init__(self, entry: dict):
        super().__init__()
        self.name = entry["name"]
        self.kind = entry["kind"]
        shape = [int(v) for v in entry["weight_shape"]]
        if self.kind == "conv2d":
            self.op = mm.LayerOp(
                "conv2d",
                tuple(entry["stride"]),
                tuple(entry["padding"]),
                tuple(entry["dilation"]),
                int(entry["groups"]),
            )
        elif self.kind == "linear":
            self.op = mm.LayerOp("linear")
        else:
            raise ValueError(f"{self.name}: unknown layer kind {self.kind!r}")
        self.a_bits = int(entry["a_bits"])
        self.a_signed = bool(entry["a_signed"])
        self.w_bits = int(entry["w_bits"])
        self.a_qrange = mm.lsq_range(self.a_bits, self.a_signed)
        fan_in = math.prod(shape[1:])
        largest_a = max(abs(v) for v in self.a_qrange)
        largest_w = max(abs(v) for v in mm.lsq_range(self.w_bits, True))
        bound = fan_in * largest_a * largest_w
        if bound >= 2**53:
            raise ValueError(f"{self.name}: |accumulator| may reach {bound} >= 2^53, not exact in float64")
        codes = unpack_codes(entry["w_packed"], self.w_bits, bool(entry["w_signed"]), math.prod(shape))
        self.offset = float(entry["a_offset"])
        a_step = float(entry["a_step"])
        bias = entry["bias"]
        if bias is not None:
            bias = bias.to(torch.float64)
        w_step = entry["w_step"].to(torch.float64)
        # along the output's channels
        if self.kind == "conv2d":
            w_step = w_step.view(-1, 1, 1)
        # not persistent: the layer is rebuilt from the export entry, never from a state dict
        self.register_buffer("w_codes", codes.reshape(shape).to(torch.float64), persistent=False)
        self.register_buffer("a_step", torch.tensor(a_step, dtype=torch.float32), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("w_step", w_step, persistent=False)
        # s_a * s_w[c], float64
        self.register_buffer("scale", a_step * w_step, persistent=False)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """q_a: the input's codes, as training computes them (float tensor of integers)."""
        return mm.lsq_codes(mm.upcast(x) + self.offset, mm.positive(self.a_step), *self.a_qrange)

    def accumulate(self, q: torch.Tensor) -> torch.Tensor:
        """op(q_a, q_w) in float64, exact (the int32 accumulator); q_a as from `codes`."""
        with torch.backends.cudnn.flags(enabled=False):
            return self.op(q.to(torch.float64), self.w_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = mm.upcast(x).dtype
        y = self.accumulate(self.codes(x)) * self.scale
        # the zero point: o * s_w[c] * op(1, q_w), exact integers times a scale
        if self.offset:
            ones = x.new_ones(1, *x.shape[1:])
            y = y - self.accumulate(ones) * (self.offset * self.w_step)
        if self.bias is not None:
            bias = self.bias
            if self.kind != "linear":
                bias = bias[:, None, None]
            y = y + bias
        return y.to(dtype)

    def extra_repr(self):
        grid = "s" if self.a_signed else "u"
        if self.offset:
            grid += f"{-self.offset:+g}"
        shape = tuple(self.w_codes.shape)
        return f"{self.kind}, A{self.a_bits}{grid}/W{self.w_bits}, weight {shape}"


def integer_model(export: dict, model: nn.Module | None = None) -> nn.Module:
    """The model of an export (integer_export's dict) with an IntegerLayer in place of each quantized Conv2d and
    Linear and the float state loaded; in eval mode, on the CPU. `model` is the float architecture, unpatched
    (its values are replaced); by default torchvision's `export["arch"]`, built as metamix builds it."""
    if not isinstance(export, dict) or export.get("format") != INT_FORMAT:
        raise ValueError(f"not a metamix integer export (format {INT_FORMAT})")
    if model is None:
        import torchvision

        # as mm.build_model (one output); no init, every value is replaced
        kw = {}
        if export["arch"] in ("googlenet", "inception_v3"):
            kw = {"aux_logits": False, "init_weights": False}
        model = torchvision.models.get_model(export["arch"], weights=None, num_classes=export["num_classes"], **kw)
    for entry in export["layers"]:
        name = entry["name"]
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Conv2d, nn.Linear)) or list(old.weight.shape) != list(entry["weight_shape"]):
            raise ValueError(f"{name}: the export's layer does not fit the model's {type(old).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, IntegerLayer(entry))
    # strict: exactly the rest of the model
    model.load_state_dict(export["float_state"])
    return model.eval()


def load_integer_model(path: str, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the integer model from model_int.pth (see integer_model)."""
    return integer_model(torch.load(path, map_location="cpu", weights_only=True), model)


# ---- the proof -------------------------------------------------------------------------


@torch.no_grad()
def compare_logits(model: nn.Module, int_model: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """The fake-quantized model against the integer model on the whole validation set, in float32.

    End to end: top-1 of each, the largest logit difference, the largest |logit|, and on how many images the
    argmax differs. Layer by layer: each IntegerLayer is also run on the very input its QuantLayer got, and
    `layer_rel_diff` is the largest max|y_int - y_fq| / max|y_fq|. On the same input both round to the same
    codes, so only float summation order is left; end to end, an activation that sits on a rounding boundary
    (x/s = k + 0.5) can round the other way after a last-bit difference in an earlier float32 sum, and that
    moves the logits by more.
    """
    model.eval()
    int_model.eval()
    int_layers = {m.name: m for m in int_model.modules() if isinstance(m, IntegerLayer)}
    layer_rel = torch.zeros((), dtype=torch.float64, device=device)

    # a forward hook on each QuantLayer
    def same_input(mod, inp, out):
        nonlocal layer_rel
        ref = out.float()
        diff = (int_layers[mod.name](inp[0]).float() - ref).abs().max()
        d = diff / ref.abs().max().clamp_min(1e-30)
        layer_rel = torch.maximum(layer_rel, d.double())

    handles = [m.register_forward_hook(same_input) for m in mm.quant_layers(model)]
    # top1 fake-quantized, top1 integer, argmax differs, n
    tot = torch.zeros(4, dtype=torch.float64, device=device)
    # largest |difference|, largest |logit|
    mx = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for images, targets in loader:
            images = images.to(device)
            targets = targets.to(device)
            a = model(images).float()
            b = int_model(images).float()
            pa = a.argmax(1)
            pb = b.argmax(1)
            n = torch.tensor(len(targets), device=device)
            counts = [(pa == targets).sum(), (pb == targets).sum(), (pa != pb).sum(), n]
            tot += torch.stack(counts).double()
            largest = [(a - b).abs().max(), a.abs().max()]
            mx = torch.maximum(mx, torch.stack(largest).double())
    finally:
        for h in handles:
            h.remove()
    n = max(tot[3].item(), 1.0)
    return {
        "top1_fake_quant": 100 * tot[0].item() / n,
        "top1_integer": 100 * tot[1].item() / n,
        "argmax_differs": int(tot[2].item()),
        "n": int(tot[3].item()),
        "max_logit_diff": mx[0].item(),
        "max_abs_logit": mx[1].item(),
        "layer_rel_diff": layer_rel.item(),
    }


@torch.no_grad()
def float64_logit_diff(model: nn.Module, int_model: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """(largest |logit difference|, largest |logit|) of copies of both models run in float64 on `images`.

    Without float32 rounding no code sits close enough to a rounding boundary to flip, so this checks the whole
    model end to end (BN, residual adds, wiring). The fake-quantized copy's weights are set to s_w * q_w with the
    float32 codes, so that its own float64 division finds the same codes.
    """
    fq = copy.deepcopy(model).eval()
    im = copy.deepcopy(int_model).eval()
    for m in mm.quant_layers(fq):
        codes, s_w = pairs.weight_codes(selected_quantizers(m)[1], m.weight)
        m.weight.copy_(codes.mul_(s_w))
    a = fq.double()(images.double())
    b = im.double()(images.double())
    return (a - b).abs().max().item(), a.abs().max().item()


def export_agrees(p: dict) -> bool:
    """Whether compare_logits' result is explained by float summation order (see LAYER_REL_TOL)."""
    layers_agree = p["layer_rel_diff"] <= LAYER_REL_TOL
    argmax_agrees = p["argmax_differs"] <= 0.01 * p["n"] + 1
    float64_tol = FLOAT64_REL_TOL * max(p.get("float64_scale", 1.0), 1.0)
    float64_agrees = p.get("float64_diff", 0.0) <= float64_tol
    return layers_agree and argmax_agrees and float64_agrees


# ---- ONNX (optional: onnx and onnxruntime) --------------------------------------------


# Opset 21: the first with INT4 initializers in DequantizeLinear; onnxruntime 1.32 runs it on CPU. The Clip on
# integer codes needs opset 12 or later.
ONNX_OPSET = 21
ONNX_INSTALL = "pip install onnx onnxruntime"
# The most bits of a layer's codes, activation or weight, that --onnx exports: above 8 they would need 16-bit
# tensors, and from 9 to 15 bits a Clip of 16-bit codes, which onnxruntime 1.32 does not implement. Refused before
# anything is written (check_onnx_bits).
ONNX_MAX_BITS = 8
# (ONNX element type name, numpy dtype, [lo, hi]) of the integer tensor that holds b-bit codes
INT_TYPES = {
    (4, True): ("INT4", "int8", (-8, 7)),
    (8, True): ("INT8", "int8", (-128, 127)),
    (8, False): ("UINT8", "uint8", (0, 255)),
}


class OnnxDisagrees(Exception):
    """onnxruntime's model.onnx computes something else than the fake-quantized model (exit 1: a bug of ours)."""


def onnx_modules() -> tuple:
    """(onnx, onnxruntime), imported here only: metamix.py and the rest of export.py need neither.
    Without them a BadInput naming what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise mm.BadInput(f"--onnx needs onnx and onnxruntime, optional ({e}): {ONNX_INSTALL}") from None
    return onnx, onnxruntime


def check_onnx_bits(model: nn.Module) -> None:
    """A BadInput naming the first quantized layer whose selected activation or weight bits are above
    ONNX_MAX_BITS, and how many more there are."""
    over = []
    for m in mm.quant_layers(model):
        branch, w_quant = selected_quantizers(m)
        if max(m.act.bits[branch], w_quant.bits) > ONNX_MAX_BITS:
            over.append(f"{m.name} is at A{m.act.bits[branch]}/W{w_quant.bits}")
    if over:
        more = f" (and {len(over) - 1} more layers above {ONNX_MAX_BITS} bits)" if len(over) > 1 else ""
        raise mm.BadInput(
            f"--onnx exports layers of at most {ONNX_MAX_BITS} activation and weight bits (onnxruntime has no Clip "
            f"of 16-bit codes): {over[0]}{more}"
        )


def code_type(bits: int, signed: bool, int4: bool = False) -> tuple:
    """INT_TYPES' entry of the smallest type that holds b-bit codes (INT4 only where `int4`: weights)."""
    widths = [w for w in (4, 8) if bits <= w and (w != 4 or int4)]
    if not widths or bits < 1:
        raise mm.BadInput(f"no ONNX integer type holds {bits}-bit codes")
    return INT_TYPES[(widths[0], signed or widths[0] == 4)]


class LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer with each QuantLayer a leaf: the graph is the torchvision model's, one node per layer."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, mm.QuantLayer) or super().is_leaf_module(m, qualname)


def pair(v) -> tuple:
    """A size of nn.Conv2d's or a pool's, (h, w)."""
    if isinstance(v, (tuple, list)):
        return tuple(v)
    return (v, v)


class OnnxBuilder:
    """The ONNX graph of a fake-quantized model, node by node from its torch.fx trace (see onnx_graph).

    Every QuantLayer becomes QDQ: its input through QuantizeLinear (scale s_a, zero point 0), a Clip to [Qn, Qp]
    unless that is the type's own range, DequantizeLinear; the offset o as an Add before and a Sub after. Its
    weight is an integer initializer of its codes, dequantized per output channel (axis 0). Everything else is
    the float operator of the module or function. `codes`: each layer's input and codes are extra outputs.
    """

    def __init__(self, onnx, codes: bool = False):
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes = []
        self.inits = []
        self.outputs = []
        self.codes = codes
        self.used = set()

    def fresh(self, name: str) -> str:
        """A tensor or node name not used yet."""
        base = name
        i = 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def init(self, name: str, value, dtype: str = "float32") -> str:
        """A constant: an initializer of `value` (a number, a list or a tensor) as numpy's `dtype`."""
        import numpy as np

        if torch.is_tensor(value):
            value = value.detach().cpu().double().numpy()
        array = np.asarray(value).astype(dtype)
        name = self.fresh(name)
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list, name: str, **attrs) -> str:
        """One node with one output, named after `name`; its output's name."""
        out = self.fresh(name)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def output(self, x: str, name: str, elem: str, rank: int) -> None:
        """An extra graph output `name` (an Identity of x), of ONNX element type `elem` and rank `rank`."""
        self.outputs.append((self.node("Identity", [x], name), elem, rank))

    def int_weight(self, name: str, codes: torch.Tensor, bits: int) -> str:
        """An integer initializer of weight codes: INT4 (two per byte, first code in the low nibble) up to
        4 bits, INT8 up to 8."""
        type_name, np_type, _ = code_type(bits, True, int4=True)
        name = self.fresh(name)
        c = codes.detach().cpu().to(torch.int64).reshape(-1)
        dims = list(codes.shape)
        if type_name != "INT4":
            raw = c.numpy().astype(np_type).tobytes()
        else:
            nibbles = F.pad(c & 15, (0, c.numel() % 2)).reshape(-1, 2)
            raw = (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8).numpy().tobytes()
        elem = getattr(self.onnx.TensorProto, type_name)
        self.inits.append(self.helper.make_tensor(name, elem, dims, raw, raw=True))
        return name

    def quant_input(self, m: mm.QuantLayer, x: str) -> str:
        """A layer's input at its selected bits: [Add o], QuantizeLinear, [Clip], DequantizeLinear, [Sub o]."""
        branch = selected_quantizers(m)[0]
        bits = m.act.bits[branch]
        signed = bool(m.act.signed)
        qn, qp = mm.lsq_range(bits, signed)
        _, np_type, type_range = code_type(bits, signed)
        offset = float(m.act.offset)
        if self.codes:
            self.output(x, f"{m.name}.input", "FLOAT", m.weight.dim())
        scale = self.init(f"{m.name}.act_step", mm.positive(m.act.step.detach()[branch]))
        zero = self.init(f"{m.name}.act_zero_point", 0, np_type)
        if offset:
            x = self.node("Add", [x, self.init(f"{m.name}.act_offset", offset)], f"{m.name}.add_offset")
        q = self.node("QuantizeLinear", [x, scale, zero], f"{m.name}.act_codes")
        if (qn, qp) != type_range:
            bounds = [self.init(f"{m.name}.act_{k}", v, np_type) for k, v in (("qn", qn), ("qp", qp))]
            q = self.node("Clip", [q, *bounds], f"{m.name}.act_clip")
        if self.codes:
            self.output(q, f"{m.name}.codes", np_type.upper(), m.weight.dim())
        x = self.node("DequantizeLinear", [q, scale, zero], f"{m.name}.act_dequant")
        if offset:
            x = self.node("Sub", [x, self.init(f"{m.name}.act_offset", offset)], f"{m.name}.sub_offset")
        return x

    def quant_layer(self, m: mm.QuantLayer, x: str) -> str:
        """A QuantLayer: its quantized input, its dequantized integer weight, Conv or Gemm, its float bias."""
        x = self.quant_input(m, x)
        w_quant = selected_quantizers(m)[1]
        codes, s_w = pairs.weight_codes(w_quant, m.weight)
        w = self.int_weight(f"{m.name}.weight_codes", codes, w_quant.bits)
        if s_w.numel() == 1:
            scale = self.init(f"{m.name}.weight_step", s_w.reshape(()))
            axis = {}
        else:
            scale = self.init(f"{m.name}.weight_step", s_w.reshape(-1))
            axis = {"axis": 0}
        w = self.node("DequantizeLinear", [w, scale], f"{m.name}.weight", **axis)
        inputs = [x, w]
        if m.bias is not None:
            inputs.append(self.init(f"{m.name}.bias", m.bias))
        if m.op.kind == "linear":
            return self.node("Gemm", inputs, m.name, transB=1)
        op = m.op
        attrs = {
            "kernel_shape": list(m.weight.shape[2:]),
            "strides": list(op.stride),
            "pads": list(op.padding) * 2,
            "dilations": list(op.dilation),
            "group": op.groups,
        }
        return self.node("Conv", inputs, m.name, **attrs)

    def module(self, name: str, m: nn.Module, x: str) -> str:
        """A leaf module (not quantized) as its float ONNX operator; a BadInput for one this builder lacks."""
        if isinstance(m, mm.QuantLayer):
            return self.quant_layer(m, x)
        if isinstance(m, nn.BatchNorm2d):
            stats = [m.weight, m.bias, m.running_mean, m.running_var]
            inputs = [self.init(f"{name}.{k}", t) for k, t in zip(("weight", "bias", "mean", "var"), stats)]
            return self.node("BatchNormalization", [x, *inputs], name, epsilon=m.eps)
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return x
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return self.node("GlobalAveragePool", [x], name)
        if isinstance(m, nn.Flatten) and m.end_dim == -1:
            return self.node("Flatten", [x], name, axis=m.start_dim)
        if isinstance(m, nn.ReLU6):
            return self.node("Clip", [x, self.init(f"{name}.min", 0.0), self.init(f"{name}.max", 6.0)], name)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return self.pool(name, m, x)
        simple = {
            nn.ReLU: ("Relu", {}),
            nn.Hardswish: ("HardSwish", {}),
            nn.Hardsigmoid: ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),
            nn.Sigmoid: ("Sigmoid", {}),
        }
        if type(m) in simple:
            op, attrs = simple[type(m)]
            return self.node(op, [x], name, **attrs)
        if isinstance(m, nn.SiLU):
            return self.node("Mul", [x, self.node("Sigmoid", [x], f"{name}.sigmoid")], name)
        raise mm.BadInput(f"{name}: no ONNX export of {type(m).__name__} ({m})")

    def pool(self, name: str, m: nn.Module, x: str) -> str:
        """MaxPool2d or AvgPool2d (square or not, ceil_mode as the module's)."""
        attrs = {
            "kernel_shape": list(pair(m.kernel_size)),
            "strides": list(pair(m.stride)),
            "pads": list(pair(m.padding)) * 2,
            "ceil_mode": int(m.ceil_mode),
        }
        if isinstance(m, nn.MaxPool2d):
            return self.node("MaxPool", [x], name, dilations=list(pair(m.dilation)), **attrs)
        return self.node("AveragePool", [x], name, count_include_pad=int(m.count_include_pad), **attrs)

    def function(self, n: torch.fx.Node, args: list) -> str:
        """A call_function or call_method node (add, mul, cat, flatten, relu, pooling to 1) as its operator."""
        target = n.target
        if not isinstance(target, str):
            target = getattr(target, "__name__", str(target))
        binary = {"add": "Add", "iadd": "Add", "mul": "Mul", "imul": "Mul"}
        if target in binary and len(args) == 2:
            inputs = [self.operand(n.name, a) for a in args]
            return self.node(binary[target], inputs, n.name)
        if target == "cat":
            axis = n.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            return self.node("Concat", list(args[0]), n.name, axis=axis)
        if target == "flatten":
            start = n.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = n.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            if end == -1:
                return self.node("Flatten", [args[0]], n.name, axis=start)
        if target in ("relu", "relu_"):
            return self.node("Relu", [args[0]], n.name)
        if target == "adaptive_avg_pool2d" and args[1] in (1, (1, 1), [1, 1]):
            return self.node("GlobalAveragePool", [args[0]], n.name)
        if target == "dropout":
            return args[0]
        raise mm.BadInput(f"{n.name}: no ONNX export of {target}{tuple(n.args)}")

    def operand(self, name: str, a) -> str:
        """A tensor's name, or a number as a float initializer."""
        if isinstance(a, str):
            return a
        return self.init(f"{name}.const", float(a))


def onnx_graph(model: nn.Module, onnx, codes: bool = False):
    """The ONNX model (opset ONNX_OPSET) of a fake-quantized model at its selected bits (OnnxBuilder), from its
    torch.fx trace. Input "input" (N, C, H, W) float32, output "logits"; with `codes`, each layer's input (float)
    and codes (integers) too, in forward order. Layers above ONNX_MAX_BITS are refused (check_onnx_bits)."""
    check_onnx_bits(model)
    model = model.eval()
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:
        raise mm.BadInput(f"cannot trace {type(model).__name__} with torch.fx for ONNX: {mm.one_line(e)}") from None
    b = OnnxBuilder(onnx, codes)
    names = {}
    helper = onnx.helper
    inputs = []
    outputs = []
    for n in graph.nodes:
        args = torch.fx.node.map_arg(n.args, lambda a: names[a])
        if n.op == "placeholder":
            names[n] = b.fresh("input")
            dims = ["N", m_channels(model), "H", "W"]
            inputs.append(helper.make_tensor_value_info(names[n], onnx.TensorProto.FLOAT, dims))
        elif n.op == "call_module":
            names[n] = b.module(n.target, model.get_submodule(n.target), args[0])
        elif n.op in ("call_function", "call_method"):
            names[n] = b.function(n, list(args))
        elif n.op == "output":
            logits = b.node("Identity", [args[0]], "logits")
            outputs.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["N", "classes"]))
        else:
            raise mm.BadInput(f"{n.name}: no ONNX export of a {n.op} node ({n.target})")
    for name, elem, rank in b.outputs:
        outputs.append(helper.make_tensor_value_info(name, getattr(onnx.TensorProto, elem), [None] * rank))
    g = helper.make_graph(b.nodes, "metamix", inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    m = helper.make_model(g, opset_imports=opsets, producer_name="metamix export.py")
    onnx.checker.check_model(m)
    return m


def m_channels(model: nn.Module) -> int:
    """The input's channels: the first quantized layer's (3 for the torchvision models)."""
    return mm.quant_layers(model)[0].weight.shape[1]


def onnx_session(ort, model_bytes: bytes, optimize: bool):
    """An onnxruntime CPU session of a model: graph optimisations off, or all of them on; torch's thread count."""
    so = ort.SessionOptions()
    levels = ort.GraphOptimizationLevel
    so.graph_optimization_level = levels.ORT_DISABLE_ALL
    if optimize:
        so.graph_optimization_level = levels.ORT_ENABLE_ALL
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor, names: list | None = None) -> list[torch.Tensor]:
    """The session's outputs (all, or those named) on a float32 batch, as tensors."""
    feed = {"input": images.detach().cpu().float().numpy()}
    return [torch.from_numpy(v) for v in session.run(names, feed)]


@torch.no_grad()
def compare_onnx(model: nn.Module, sessions: dict, loader) -> dict:
    """The fake-quantized model (float32, on the CPU) against each onnxruntime session on the whole validation set:
    top-1 of each, and per session the largest logit difference and on how many images the argmax differs."""
    model.eval()
    n = 0
    correct = 0
    largest = 0.0
    per = {k: {"correct": 0, "max_logit_diff": 0.0, "argmax_differs": 0} for k in sessions}
    for images, targets in loader:
        a = model(images.cpu()).float()
        n += len(targets)
        correct += int((a.argmax(1) == targets).sum())
        largest = max(largest, a.abs().max().item())
        for k, s in sessions.items():
            b = run_session(s, images, ["logits"])[0]
            p = per[k]
            p["correct"] += int((b.argmax(1) == targets).sum())
            p["argmax_differs"] += int((b.argmax(1) != a.argmax(1)).sum())
            p["max_logit_diff"] = max(p["max_logit_diff"], (a - b).abs().max().item())
    for p in per.values():
        p["top1"] = 100 * p.pop("correct") / max(n, 1)
    return {"n": n, "top1_fake_quant": 100 * correct / max(n, 1), "max_abs_logit": largest, "sessions": per}


@torch.no_grad()
def torch_codes(model: nn.Module, images: torch.Tensor) -> dict:
    """name -> the codes of each quantized layer's input in the fake-quantized model's forward, as training
    computes them (`lsq_codes` of x + o on the selected step)."""
    codes = {}

    def hook(m, inp, out):
        branch = selected_quantizers(m)[0]
        qrange = mm.lsq_range(m.act.bits[branch], bool(m.act.signed))
        codes[m.name] = layer_codes(m, inp[0], branch, qrange)

    handles = [m.register_forward_hook(hook) for m in mm.quant_layers(model)]
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return codes


def layer_codes(m: mm.QuantLayer, x: torch.Tensor, branch: int, qrange: tuple) -> torch.Tensor:
    """round(clamp((x + o) / s_a, Qn, Qp)) of a layer's branch, in float32 as training computes it."""
    step = mm.positive(m.act.step.detach()[branch])
    return mm.lsq_codes(mm.upcast(x) + m.act.offset, step, *qrange)


@torch.no_grad()
def compare_onnx_codes(model: nn.Module, session, images: torch.Tensor) -> dict:
    """Each layer's input codes in onnxruntime (a session of onnx_graph(..., codes=True)) against PyTorch's.

    On the same input (onnxruntime's own float input to the layer, rounded by the training formula) they must be
    equal: that is QuantizeLinear + Clip against lsq_codes. The rest of the graph (weights, BN, wiring, the last
    layer's output) layer by layer: `layer_rel_diff` (own_input_rel_diff). End to end (each from its own forward)
    a code may differ, by any share: a value x/s on a rounding boundary (k + 1/2) goes the other way after a
    last-bit difference in an earlier float sum, and the step it moves by changes later layers' inputs; reported,
    not judged. Returns the codes that differ on the same input, layer_rel_diff, and end to end: how many codes
    differ, of how many, the largest share in one layer and the largest difference."""
    ref = torch_codes(model, images)
    layers = mm.quant_layers(model)
    names = [f"{m.name}.{k}" for m in layers for k in ("input", "codes")] + ["logits"]
    outs = dict(zip(names, run_session(session, images, names)))
    p = {"same_input_differs": 0, "differs": 0, "codes": 0, "worst_share": 0.0, "max_diff": 0.0}
    for m in layers:
        branch = selected_quantizers(m)[0]
        qrange = mm.lsq_range(m.act.bits[branch], bool(m.act.signed))
        q = outs[f"{m.name}.codes"].float()
        own = layer_codes(m, outs[f"{m.name}.input"], branch, qrange)
        p["same_input_differs"] += int((own != q).sum())
        differs = int((ref[m.name] != q).sum())
        p["differs"] += differs
        p["codes"] += q.numel()
        p["worst_share"] = max(p["worst_share"], differs / q.numel())
        p["max_diff"] = max(p["max_diff"], (ref[m.name] - q).abs().max().item())
    p["layer_rel_diff"] = own_input_rel_diff(model, images, outs)
    return p


@torch.no_grad()
def own_input_rel_diff(model: nn.Module, images: torch.Tensor, outs: dict) -> float:
    """The largest max|x - x_ort| / max|x_ort| over the quantized layers' inputs and the logits, where x_ort is
    onnxruntime's input of a layer (outs[name + ".input"]) or its logits (outs["logits"]) and x is PyTorch's,
    computed with every quantized layer fed onnxruntime's own input of that layer. So each layer's codes are
    onnxruntime's, and a code flipped on a rounding tie does not travel: only float summation order is left (a
    path with no quantized layer, a residual's identity, sums those of the layers before it), within
    LAYER_REL_TOL; a wrong weight, step, BN or wire between two quantized layers, or in the last layer (the
    logits are its output), is not."""
    diffs = []

    def rel_diff(ours, theirs):
        diffs.append(((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item())

    def own_input(m, args):
        theirs = outs[f"{m.name}.input"].to(args[0])
        rel_diff(args[0], theirs)
        return (theirs, *args[1:])

    handles = [m.register_forward_pre_hook(own_input) for m in mm.quant_layers(model)]
    try:
        logits = model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    rel_diff(logits, outs["logits"].to(logits))
    return max(diffs)


def onnx_agrees(p: dict, c: dict) -> bool:
    """Whether onnxruntime agrees with the fake-quantized model within float rounding: codes equal on the same
    input, each layer's input and the logits within LAYER_REL_TOL when every quantized layer runs on onnxruntime's
    own input (own_input_rel_diff), and each session's argmax agrees on all but 1% of the images (and one more), as
    export_agrees asks of the integer model. How many codes differ end to end is not judged (compare_onnx_codes)."""
    argmax_agrees = all(s["argmax_differs"] <= 0.01 * p["n"] + 1 for s in p["sessions"].values())
    return argmax_agrees and c["same_input_differs"] == 0 and c["layer_rel_diff"] <= LAYER_REL_TOL


# ---- the command -----------------------------------------------------------------------


def export_run(run_dir: str, checkpoint: str | None = None, onnx: bool = False) -> tuple[str, dict]:
    """Write RUN_DIR/model_int.pth from the run's checkpoint (default RUN_DIR/checkpoint.pth), then prove it:
    the integer model against the fake-quantized one on the run's validation set, and the file's size against
    FP32's. With `onnx`, RUN_DIR/model.onnx too, checked in onnxruntime (export_onnx). Every input problem is a
    BadInput raised before anything is written. Returns (path, the proof)."""
    onnx_libs = None
    if onnx:
        onnx_libs = onnx_modules()
    runs.run_folder(run_dir)
    source = checkpoint
    flag = "--checkpoint"
    if checkpoint is None:
        source = runs.run_file(run_dir, "checkpoint.pth")
        flag = "checkpoint"
    # whole-sentence errors: no such file, not torch.save's, corrupt, not of this metamix
    ck = mm.load_checkpoint(source, flag, mm.CHECKPOINT_FORMAT)
    if ck.get("selected") is None:
        raise mm.BadInput(
            f"{flag} {source}: the run is still in bit selection (checkpoint of epoch {ck['epoch']}, "
            f"bit selection takes {ck['args']['search_epochs']}): bits are not chosen and weights not "
            "quantized yet; export a checkpoint of weight training"
        )
    if not mm.weights_quantized(argparse.Namespace(**ck["args"]), ck["epoch"], ck["selected"]):
        raise mm.BadInput(
            f"{flag} {source}: the run is in its --act-only-epochs (checkpoint of epoch {ck['epoch']}): "
            "weights not quantized yet; export a checkpoint of a later epoch"
        )
    # either kind of run, in the mode it was evaluated in
    args, model = runs.run_model(ck)
    if onnx:
        check_onnx_bits(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # before writing: a run whose data is gone writes nothing
    try:
        _, val_set, _ = mm.build_datasets(args)
    except mm.BadInput as e:
        raise mm.BadInput(f"cannot read the run's validation set: {e}") from None
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size)
    # the fused op, as training computed it
    mm.use_speed_path(model.to(device).eval())

    layers = mm.quant_layers(model)
    report = mm.bits_report(model, args)
    export = integer_export(model, args.arch, ck["num_classes"], report)
    data = mm.saved_bytes(export)
    path = os.path.join(run_dir, "model_int.pth")
    try:
        mm.atomic_write(path, data)
    except OSError as e:
        raise mm.BadInput(f"cannot write {path} ({e.strerror or e})") from None
    # the proof runs on what was written, loaded back
    int_model = load_integer_model(path).to(device)
    p = compare_logits(model, int_model, val_loader, device)
    first_batch = next(iter(val_loader))[0].to(device)
    p["float64_diff"], p["float64_scale"] = float64_logit_diff(model, int_model, first_batch)

    fp32 = dict(export["float_state"])
    for m in layers:
        for k, t in (("weight", m.weight), ("bias", m.bias)):
            if t is not None:
                fp32[f"{m.name}.{k}"] = t.detach().float().cpu()
    mib = len(data) / 2**20
    fp32_mib = len(mm.saved_bytes(fp32)) / 2**20
    unfinished = ""
    if ck["epoch"] < args.epochs:
        unfinished = f" (checkpoint of epoch {ck['epoch']} of {args.epochs})"
    fl = args.first_last_bits
    w = f"W{args.w_bits}"
    if not isinstance(args.w_bits, int):
        w = f"per-layer W (average {report['avg_w_bits']:.2f})"
    print(
        f"export: wrote {path}{unfinished}: {args.arch}, {w} with A{fl}/W{fl} first/last, average activation "
        f"bits {report['avg_a_bits']:.2f}: {mib:.1f} MiB vs {fp32_mib:.1f} MiB FP32 ({fp32_mib / mib:.1f}x smaller)",
        flush=True,
    )
    print(
        f"export: integer model top-1 {p['top1_integer']:.2f}% vs fake-quantized {p['top1_fake_quant']:.2f}% "
        f"(float32) on {p['n']} images; end to end: largest logit difference {p['max_logit_diff']:.3g} (largest "
        f"|logit| {p['max_abs_logit']:.3g}), argmax differs on {p['argmax_differs']}; layer by layer on the same "
        f"input: largest relative difference {p['layer_rel_diff']:.2g}; end to end in float64 on one batch: "
        f"largest logit difference {p['float64_diff']:.2g}",
        flush=True,
    )
    if not export_agrees(p):
        print(
            f"export: WARNING: the integer model disagrees with the fake-quantized one beyond float summation "
            f"order (layer by layer {p['layer_rel_diff']:.2g}, tolerance {LAYER_REL_TOL:g}; argmax differs on "
            f"{p['argmax_differs']} of {p['n']} images; float64 {p['float64_diff']:.2g}); {path} is written "
            "anyway",
            flush=True,
        )
    if onnx_libs:
        sizes = {"model_int.pth": mib, "FP32": fp32_mib}
        export_onnx(run_dir, model.cpu(), val_loader, onnx_libs, sizes)
    return path, p


def export_onnx(run_dir: str, model: nn.Module, loader, libs: tuple, sizes: dict) -> tuple[str, dict, dict]:
    """Write RUN_DIR/model.onnx (onnx_graph) and check it: onnxruntime on the CPU, graph optimisations off and
    on, against the fake-quantized model in float32, readable form (sections 1-2, the same operators in the same
    order), on the validation set; the codes on its first batch. An OnnxDisagrees (exit 1) if they disagree
    beyond float rounding (onnx_agrees); the file stays. `sizes`: MiB of the files to print beside it.
    Returns (path, compare_onnx's result, compare_onnx_codes')."""
    onnx, ort = libs
    mm.use_speed_path(model.eval(), False)
    data = onnx_graph(model, onnx).SerializeToString()
    path = os.path.join(run_dir, "model.onnx")
    try:
        mm.atomic_write(path, data)
    except OSError as e:
        raise mm.BadInput(f"cannot write {path} ({e.strerror or e})") from None
    with open(path, "rb") as f:
        data = f.read()
    sessions = {"optimisations off": onnx_session(ort, data, False), "on": onnx_session(ort, data, True)}
    p = compare_onnx(model, sessions, loader)
    with_codes = onnx_graph(model, onnx, codes=True).SerializeToString()
    images = next(iter(loader))[0]
    c = compare_onnx_codes(model, onnx_session(ort, with_codes, False), images)
    mib = len(data) / 2**20
    others = ", ".join(f"{v:.1f} MiB {k}" for k, v in sizes.items())
    print(f"export: wrote {path} (opset {ONNX_OPSET}, QDQ): {mib:.1f} MiB vs {others}", flush=True)
    tops = "; ".join(
        f"{k}: top-1 {s['top1']:.2f}%, largest logit difference {s['max_logit_diff']:.3g}, argmax differs on "
        f"{s['argmax_differs']}"
        for k, s in p["sessions"].items()
    )
    print(
        f"export: onnxruntime (CPU) vs fake-quantized top-1 {p['top1_fake_quant']:.2f}% (float32) on {p['n']} "
        f"images (largest |logit| {p['max_abs_logit']:.3g}): {tops}; input codes on {len(images)} images: "
        f"{c['same_input_differs']} differ on the same input, {c['differs']} of {c['codes']} end to end; layer by "
        f"layer on onnxruntime's own input: largest relative difference {c['layer_rel_diff']:.2g}",
        flush=True,
    )
    if not onnx_agrees(p, c):
        raise OnnxDisagrees(
            f"{path} disagrees with the fake-quantized model beyond float rounding: argmax differs on "
            f"{max(s['argmax_differs'] for s in p['sessions'].values())} of {p['n']} images, codes on the same "
            f"input on {c['same_input_differs']}, layer by layer on onnxruntime's own input a relative difference "
            f"of {c['layer_rel_diff']:.2g} (tolerance {LAYER_REL_TOL:g})"
        )
    return path, p, c


def get_args_parser() -> argparse.ArgumentParser:
    p = mm.Parser(
        prog="export.py",
        description="Integer export of a MetaMix run (model_int.pth) and its check against the fake-quantized model",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's --output-dir; model_int.pth is written there")
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="export this checkpoint file of the run instead (default: RUN_DIR/checkpoint.pth)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help=f"also write RUN_DIR/model.onnx (QDQ) and check it in onnxruntime; needs {ONNX_INSTALL}",
    )
    return p


def run_export(a: argparse.Namespace) -> int:
    export_run(a.run_dir, a.checkpoint, a.onnx)
    return 0


def what_survived() -> str:
    """What an interrupted export leaves: the end of the `interrupted by SIGINT` line."""
    return "; model_int.pth, if written, is whole but unchecked"


def main(argv: list[str] | None = None) -> int:
    """Export, under metamix's error contract (mm.guarded): every failure one line on stderr and an exit status."""
    a = get_args_parser().parse_args(argv)
    return mm.guarded("export", run_export, a, interrupted=what_survived)


if __name__ == "__main__":
    sys.exit(main())
