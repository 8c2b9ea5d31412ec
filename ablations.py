"""metamix.py with the settings of the paper's ablations and of our studies as flags, beside metamix.py.

metamix.py keeps the flags a user of the paper's runs or of the authors' recipe needs; these six are settings of
its command line without a flag (`get_args_parser`'s defaults), recorded in args.json and checked on --resume like
every other:

    --lam L                 lambda of Eq. 3 (default: the paper's per model: ResNet-18 0.4, MobileNet-v2 1, v3 4)
    --alpha-lr LR           the alphas' rate (default: the recipe's: SGD .005, Adam .01, the authors' 1e-4; x10
                            from scratch)
    --unfixed               the paper's Figure 7(a): the weights also train during bit-search
    --plain-lsq             LSQ's own quantizers (a weight step per tensor on [-2^(b-1), 2^(b-1)-1], no offset grid)
    --first-last-bits B     the fixed first and last layers' bits (the paper's 8)
    --no-budget-repair      keep the argmax bits even over the target

    python ablations.py --unfixed --arch mobilenet_v2 --data /imagenet --pretrained --target-gbops 5.3
"""

from __future__ import annotations

import argparse
import sys

import metamix as mm


def get_args_parser() -> argparse.ArgumentParser:
    """metamix.py's flags and the six settings above."""
    p = mm.get_args_parser()
    p.description = "MetaMix with the paper's ablations and our studies' settings as flags"
    add = p.add_argument
    add("--lam", type=mm.number(float, 0), help="lambda of Eq. 3 (default: resnet18 0.4, mobilenet_v2 1, v3 4)")
    add("--alpha-lr", type=mm.number(float, 0, above=True), help="SGD .005, Adam .01, authors 1e-4; x10 from scratch")
    add("--unfixed", action="store_true", help="the paper's Figure 7(a) ablation: train the weights in bit-search")
    add("--plain-lsq", action="store_true", help="LSQ's quantizers: a weight step per tensor, no offset grid")
    add("--first-last-bits", type=int, choices=range(2, 17), default=8, metavar="B", help="first and last layers' bits")
    add("--no-budget-repair", action="store_true", help="keep the argmax bits even if they are over the target")
    return p


def main(argv: list[str] | None = None) -> int:
    return mm.main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
