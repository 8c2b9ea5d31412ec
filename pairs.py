"""The supplement's extension of MetaMix, beside metamix.py: (A, W) bit pairs (its Table 7).

Every searched layer's candidates are the pairs A x W under one softmax: the activation bits of --bits and
the weight bits of --w-bits, each width with its own LSQ weight step on the one shared weight. A pair costs
a * w * OPs in Eq. 4 and Eq. 6; metamix.py counts a * w per candidate (its section 4), so its phases, its
driver and its outputs serve pairs unchanged. Same flags as metamix.py:

    python pairs.py                                     # the 9 pairs {8,4,2} x {8,4,2}, synthetic data
    torchrun --nproc_per_node=8 pairs.py --arch resnet18 --data /imagenet --pretrained --target-gbops 30
    python pairs.py --resume auto --output-dir runs/metamix       # as metamix.py's --resume
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def __init__(self, layer: nn.Module, bits: Sequence[int], w_bits: int | Sequence[int], name: str = "",
                 macs: int = 0, plain: bool = False):
        w_bits = [w_bits] if isinstance(w_bits, int) else list(w_bits)
        super().__init__(layer, bits, w_bits[0], name, macs, plain=plain)
        wq = self._modules.pop("weight_quant")  # replaced by the property below, one quantizer of its kind per W
        self.weight_quants = nn.ModuleList(mm.LSQQuantizer(w, len(wq.step), wq.narrow) for w in w_bits)
        self.candidates = [(a, int(w)) for a in self.act.bits for w in w_bits]
        self.act.alpha = nn.Parameter(torch.zeros(len(self.candidates)))  # one logit per pair
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
        if self.fused:  # metamix's fused op per W, with the column p[:, w] as its mixture; the bias once
            return sum(mm.fused_forward(self, x, p[:, j], wq, bias=j == 0) for j, wq in enumerate(self.weight_quants))
        xq = [self.act.quantize(x, i) for i in range(len(self.act.bits))]  # each Q_a(x) once
        return sum(self.op(sum(p[i, j] * q for i, q in enumerate(xq)), wq(self.weight), self.bias if j == 0 else None)
                   for j, wq in enumerate(self.weight_quants))


def get_args_parser():
    p = mm.get_args_parser()
    p.description = "MetaMix over (A, W) bit pairs, the supplement's extension (its Table 7)"
    p.set_defaults(w_bits=[8, 4, 2])
    return p


if __name__ == "__main__":
    sys.exit(mm.main(get_args_parser().parse_args(), layer_type=PairQuantLayer))
