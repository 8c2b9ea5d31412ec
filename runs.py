"""A run's files, for the tools beside metamix.py (baselines.py, figure9.py, export.py): the model of a
checkpoint rebuilt and loaded, a run's layer table, and the tools' one-line errors."""

from __future__ import annotations

import argparse
import os
import sys

import torch.nn as nn

import metamix as mm
import pairs


def load_run(path: str) -> tuple[argparse.Namespace, nn.Module, dict]:
    """(args, model, checkpoint) of a run's checkpoint file (e.g. its meta_state.pth), of one W or of (A, W)
    pairs: the model rebuilt without downloading anything (the checkpoint holds its weights), loaded, in the
    mode it was evaluated in."""
    ck = mm.load_checkpoint(path, "checkpoint")
    if ck.get("format") != mm.CHECKPOINT_FORMAT:
        raise mm.BadInput(f"{path} is not a checkpoint of this metamix (format {ck.get('format')!r})")
    args = argparse.Namespace(**{**ck["args"], "pretrained": None, "dry_run": False})
    layer_type = pairs.PairQuantLayer if isinstance(args.w_bits, list) else mm.QuantLayer
    model = mm.build_model(args, ck["num_classes"], layer_type)
    model.load_state_dict(ck["model"])
    mm.set_mode(model, "selected", quant_weights=mm.weights_quantized(args, ck["epoch"], ck["selected"]))
    return args, model, ck


def tool_main(tool: str, body, a: argparse.Namespace, interrupted: str = "interrupted") -> int:
    """Run body(a); every failure one line on stderr (`tool: error: ...`), exit 2 for bad input, 1 otherwise
    (METAMIX_DEBUG=1: tracebacks)."""
    try:
        return body(a)
    except KeyboardInterrupt:
        print(f"{tool}: {interrupted}", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("METAMIX_DEBUG"):
            raise
        bad = isinstance(e, mm.BadInput) or "BadInput" in str(e)
        print(
            f"{tool}: error: "
            + (
                mm.one_line(e) if bad else f"{type(e).__name__}: {mm.one_line(e)} (METAMIX_DEBUG=1 shows the traceback)"
            ),
            file=sys.stderr,
        )
        return 2 if bad else 1
