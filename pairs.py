"""The supplement's extension of MetaMix, beside metamix.py: (A, W) bit pairs (its Table 7).

Every searched layer's candidates are the pairs A x W under one softmax: the activation bits of --bits and
the weight bits of --w-bits, each width with its own LSQ weight step on the one shared weight. A pair costs
a * w * OPs in Eq. 4 and Eq. 6; metamix.py counts a * w per candidate (its section 4), so its phases, its
driver and its outputs serve pairs unchanged. Same flags as metamix.py:

    python pairs.py                                     # the 9 pairs {8,4,2} x {8,4,2}, synthetic data
    torchrun --nproc_per_node=8 pairs.py --arch resnet18 --data /imagenet --pretrained --target-gbops 30
    python pairs.py --resume auto --output-dir runs/metamix       # as metamix.py's --resume

It takes ablations.py's settings as flags too (--plain-lsq, --unfixed, ...): pairs are beyond the paper's driver.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import ablations
import metamix as mm


class PairQuantLayer(mm.QuantLayer):
    """A searched layer whose candidates are (A, W) pairs, A x W, under one softmax (Supplement, Table 7).

    One LSQ weight step per W on the one shared weight (`weight_quants`); `weight_quant` is that of the
    current pair. Candidate i = (bits[i // len(W)], W[i % len(W)]). Bit-meta trains each pair with its
    weights at the pair's W, so weights are quantized in every mode but "fp" (as the supplement does), and
    weight training keeps the selected W's trained step (our choice). Search by linearity of the op in its
    input, one op per W:
        sum_{a,w} p_aw op(Q_a(x), Q_w(W)) = sum_w op(sum_a p_aw Q_a(x), Q_w(W)).
    """

    def __init__(
        self,
        layer: nn.Module,
        bits: Sequence[int],
        w_bits: int | Sequence[int],
        name: str = "",
        macs: int = 0,
        plain: bool = False,
    ):
        if isinstance(w_bits, int):
            w_bits = [w_bits]
        w_bits = list(w_bits)
        super().__init__(layer, bits, w_bits[0], name, macs, plain=plain)
        # replaced by the property below, one quantizer of its kind per W
        wq = self._modules.pop("weight_quant")
        self.weight_quants = nn.ModuleList(mm.LSQQuantizer(w, len(wq.step), wq.narrow) for w in w_bits)
        self.candidates = [(a, int(w)) for a in self.act.bits for w in w_bits]
        # one logit per pair
        self.act.alpha = nn.Parameter(torch.zeros(len(self.candidates)))
        self.w_branch = 0

    @property
    def weight_quant(self) -> mm.LSQQuantizer:
        return self.weight_quants[self.w_branch]

    def set_state(self, mode: str, branch: int = 0, quant_weights: bool | None = None) -> None:
        self.act.branch, self.w_branch = divmod(branch, len(self.weight_quants))
        self.act.mode = mode
        for wq in self.weight_quants:
            wq.enabled = mode != "fp"

    def pair_probs(self) -> torch.Tensor:
        """p_aw = softmax(alpha) over all pairs, as a (len(A), len(W)) matrix."""
        return F.softmax(self.act.alpha, dim=0).view(len(self.act.bits), len(self.weight_quants))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act.mode != "search":
            return super().forward(x)
        p = self.pair_probs()
        act = self.act
        wqs = self.weight_quants
        trained = [self.weight, *(wq.step for wq in wqs)]
        frozen = not any(t.requires_grad for t in trained)
        if self.fused and len(wqs) > 1 and frozen:
            # the search (weights and their steps frozen), several W: each Q_a(x) once
            act.init_steps(x, range(len(act.bits)))
            for wq in wqs:
                if not wq.initialized:
                    wq.init_step(self.weight)
            per_sample = x.numel() // x.shape[0]
            a_q = [mm.quant_params(b, act.signed, per_sample) for b in act.bits]
            weights = [(wq, self.weight) for wq in wqs]
            return _PairSearch.apply(x, mm.positive(act.step), p, self.bias, weights, a_q, self.op, act.offset)
        if self.fused:
            # --unfixed: metamix's fused op per W, with the column p[:, w] as its mixture; the bias once
            outs = [mm.fused_forward(self, x, p[:, j], wq, bias=j == 0) for j, wq in enumerate(wqs)]
            return sum(outs)
        # each Q_a(x) once
        xq = [act.quantize(x, i) for i in range(len(act.bits))]
        y = 0
        for j, wq in enumerate(wqs):
            mixed = sum(p[i, j] * q for i, q in enumerate(xq))
            bias = self.bias if j == 0 else None
            y = y + self.op(mixed, wq(self.weight), bias)
        return y


class _PairSearch(torch.autograd.Function):
    """The pair search with frozen weights, sum_w op(x_w, Q_w(W)) + b with x_w = sum_a p_aw (s_a q_a - o): each
    activation's codes q_a computed once (not once per W), one op per W on the weight's codes, scaled per output
    channel after (as metamix's fused op). Backward, with g_w = the gradient of x_w and G_a = sum_w p_aw g_w:
    d/dx = sum_a G_a * inside_a;  d/ds_a = (<G_a, q_a> - <G_a * inside_a, v_a>) * grad scale;  d/dp_aw = <g_w,
    s_a q_a - o>. Saves x; the weight codes are recomputed in backward."""

    @staticmethod
    def forward(ctx, x, steps, probs, bias, weights, a_q, op, offset):
        xf = mm.upcast(x)
        if offset:
            xf = xf + offset
        codes = [mm.lsq_codes(xf, steps[a], qn, qp) for a, (qn, qp, _) in enumerate(a_q)]
        y = None
        out = None
        for j, (wq, weight) in enumerate(weights):
            xw = None
            for a, q in enumerate(codes):
                weight_of_a = steps[a] * probs[a, j]
                xw = q * weight_of_a if xw is None else xw.addcmul_(q, weight_of_a)
            if offset:
                xw = xw.sub_(offset * probs[:, j].sum())
            w_codes, s_w = weight_codes(wq, weight)
            # along output channels
            w_scale = s_w.reshape(-1)
            if op.kind == "conv2d":
                w_scale = s_w.reshape(-1, 1, 1)
            out = op(xw, w_codes)
            y = mm.upcast(out).mul_(w_scale) if y is None else y.addcmul_(mm.upcast(out), w_scale)
        del codes, xw
        ctx.save_for_backward(x, steps, probs)
        ctx.weights = weights
        ctx.a_q = a_q
        ctx.op = op
        ctx.offset = offset
        if bias is not None:
            if op.kind == "conv2d":
                bias = bias.view(-1, 1, 1)
            y.add_(bias)
        return y.to(out.dtype)

    @staticmethod
    def backward(ctx, g):
        x, steps, probs = ctx.saved_tensors
        a_q = ctx.a_q
        op = ctx.op
        o = ctx.offset
        need_x, need_s, need_p, need_b = ctx.needs_input_grad[:4]
        xf = mm.upcast(x)
        if o:
            xf = xf + o
        # g_w = op's input gradient through the dequantized weight s_w * q_w
        gws = []
        for wq, weight in ctx.weights:
            w_codes, s_w = weight_codes(wq, weight)
            w = w_codes * s_w
            gws.append(mm.upcast(mm.op_backward(g, xf, w, op, True, False, False)[0]))
        gx = None
        if need_x:
            gx = torch.zeros_like(xf)
        gs = torch.zeros_like(steps)
        gp = torch.zeros_like(probs)
        # the offset's share of d/dp_aw: o * sum(g_w)
        offset_terms = [0] * len(gws)
        if o and need_p:
            offset_terms = [o * gw.sum() for gw in gws]
        v = q = G = None
        for a, (qn, qp, grad_scale) in enumerate(a_q):
            v = torch.div(xf, steps[a], out=v)
            q = torch.clamp(v, qn, qp, out=q).round_()
            for j, gw in enumerate(gws):
                G = torch.mul(gw, probs[a, j], out=G) if j == 0 else G.addcmul_(gw, probs[a, j])
                if need_p:
                    gp[a, j] = steps[a] * mm.sum_product(gw, q) - offset_terms[j]
            gq = None
            if need_s:
                gq = mm.sum_product(G, q)
            # G_a * inside_a
            G = mm.pass_inside(G, v, qn, qp, out=G)
            if need_s:
                gs[a] = (gq - mm.sum_product(G, v)) * grad_scale
            if need_x:
                gx.add_(G)
        return (
            gx.to(x.dtype) if need_x else None,
            gs if need_s else None,
            gp if need_p else None,
            bias_grad(g, op) if need_b else None,
            None,
            None,
            None,
            None,
        )


def bias_grad(g: torch.Tensor, op: mm.LayerOp) -> torch.Tensor:
    """The bias's gradient: the output's gradient summed over every dimension but the channels."""
    if op.kind == "conv2d":
        return g.sum((0, 2, 3))
    return g.reshape(-1, g.shape[-1]).sum(0)


def weight_codes(w_quant: mm.LSQQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, steps shaped (C_out, 1, ...)) of a weight, as training computes them (`lsq_codes`, the weight's dtype);
    export.py's integer weights too."""
    with torch.no_grad():
        s_w = mm.positive(w_quant.step.detach()).view(-1, *[1] * (weight.dim() - 1))
        return mm.lsq_codes(weight.detach(), s_w, *mm.lsq_range(w_quant.bits, True, w_quant.narrow)), s_w


def get_args_parser():
    """ablations.py's flags (metamix.py's and the ablations' settings), with --w-bits a list: each searched layer's
    candidates are the pairs --bits x --w-bits."""
    p = ablations.get_args_parser()
    p.description = "MetaMix over (A, W) bit pairs, the supplement's extension (its Table 7)"
    w_bits = next(action for action in p._actions if action.dest == "w_bits")
    w_bits.type = mm.bit_list
    w_bits.choices = None
    w_bits.metavar = "BITS"
    w_bits.help = "weight bits of the pairs (default: 8,4,2)"
    p.set_defaults(w_bits=[8, 4, 2])
    return p


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    # a pair's W is quantized in every phase: there is no full-precision stage to keep
    if args.act_only_epochs:
        parser.error("--act-only-epochs: (A, W) pairs quantize the weights in every phase; use metamix.py")
    # metamix.main's hook for extensions: the layer patch_model puts in each searched layer's place.
    return mm.main(args, layer_type=PairQuantLayer)


if __name__ == "__main__":
    sys.exit(main())
