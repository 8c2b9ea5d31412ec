"""The tools' plumbing beside metamix.py (baselines.py, figure9.py, figures.py, export.py): a run's folder and its
files found (one-line BadInput errors), a checkpoint loaded once with its format checked, its model rebuilt, the
meta-state check, and a flag's value as the command line writes it. Every tool runs under metamix.guarded, the
driver's own error contract."""

from __future__ import annotations

import argparse
import os

import torch.nn as nn

import metamix as mm
import pairs


def flag_text(value):
    """A flag's value as the command line writes it: a list as 8,4,2."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


# Why a run's folder may lack one of its files: the end of the tools' one-line error.
WHY_MISSING = {
    "checkpoint.pth": "not a metamix run's --output-dir, or no epoch finished yet",
    "meta_state.pth": "metamix.py writes it when bit selection ends",
    "bits.json": "its bits are not selected yet: metamix.py writes it as weight training starts",
}


def run_folder(run_dir: str) -> str:
    """A run's --output-dir, as given; a BadInput if it is not a folder."""
    if os.path.isdir(run_dir):
        return run_dir
    if os.path.exists(run_dir):
        raise mm.BadInput(f"{run_dir}: not a folder (give a run's --output-dir)")
    raise mm.BadInput(f"{run_dir}: no such folder (expected the --output-dir of a metamix or pairs.py run)")


def run_file(run_dir: str, name: str, why: str | None = None) -> str:
    """RUN/name (checkpoint.pth, meta_state.pth, bits.json); a BadInput, saying `why` (default: WHY_MISSING's), if
    the folder or the file is missing."""
    path = os.path.join(run_folder(run_dir), name)
    if not os.path.exists(path):
        reason = why or WHY_MISSING[name]
        raise mm.BadInput(f"{run_dir} has no {name} ({reason})")
    return path


def run_model(ck: dict) -> tuple[argparse.Namespace, nn.Module]:
    """(args, model) of a loaded checkpoint, of one W or of (A, W) pairs: the model rebuilt without downloading
    anything (the checkpoint holds its weights), loaded, in the mode it was evaluated in."""
    args = argparse.Namespace(**{**mm.get_args_parser().parse_args([]).__dict__, **ck["args"], "pretrained": None})
    layer_type = mm.QuantLayer
    if isinstance(args.w_bits, list):
        layer_type = pairs.PairQuantLayer
    model = mm.build_model(args, ck["num_classes"], layer_type)
    model.load_state_dict(ck["model"])
    quantized = mm.weights_quantized(args, ck["epoch"], ck["selected"])
    mm.set_mode(model, "selected", quant_weights=quantized)
    return args, model


def load_run(path: str, flag: str = "checkpoint") -> tuple[argparse.Namespace, nn.Module, dict]:
    """(args, model, checkpoint) of a run's checkpoint file (e.g. its meta_state.pth): metamix.load_checkpoint
    (loaded once, its format checked), then run_model."""
    ck = mm.load_checkpoint(path, flag, mm.CHECKPOINT_FORMAT)
    args, model = run_model(ck)
    return args, model, ck


def check_meta_state(ck: dict, path: str) -> None:
    """A meta-state is a checkpoint at the phase boundary: bit selection done, bits not selected yet."""
    search_epochs = ck["args"]["search_epochs"]
    if ck["selected"] is None and ck["epoch"] == search_epochs:
        return
    selected = ""
    if ck["selected"] is not None:
        selected = ", bits selected"
    raise mm.BadInput(
        f"{path} is not a meta-state (the end of bit selection, epoch {search_epochs}):"
        f" it is at epoch {ck['epoch']}{selected}"
    )
