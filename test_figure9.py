"""Tests for figure9.py, the supplement's Figure 9 for a run (Hessian trace, OPs and trace / OPs against the
selected bits). Run: python -m pytest -q test_figure9.py

Spearman's correlation against hand values and an independent formula; the traces are the hessian proxy's own
and disturb nothing; figure9.py on the reference run and on a tiny run of (A, W) pairs; bad input.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baselines as bl
import figure9 as f9
import metamix as mm
import pairs
from conftest import (
    REPO,
    TINY,
    error_line,
    files_of,
    main_in_process,
)

# A tiny run of (A, W) pairs (pairs.py's default --w-bits 8,4,2): TINY with one bit-selection epoch of one step,
# which also searches, then one weight-training step (bits.json is written as weight training starts)
PAIR = TINY + [
    "--data",
    "synthetic:16,16,10",
    "--search-epochs",
    "1",
    "--epochs",
    "2",
]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory) -> Path:
    """pairs.py PAIR, its main run in this process (no interpreter start-up)."""
    out = tmp_path_factory.mktemp("pair") / "out"
    assert main_in_process(*PAIR, "--output-dir", out, main=pairs.main) == 0
    return out


# ---------------------------------------------------------------------------------------
# Spearman's rank correlation
# ---------------------------------------------------------------------------------------


def test_spearman_by_hand_with_ties():
    """Spearman's rank correlation with ties at their average rank, against hand values."""
    assert f9.average_ranks([8, 4, 4, 2]) == [4, 2.5, 2.5, 1]
    assert f9.average_ranks([2, 2, 2, 8, 2]) == [2.5, 2.5, 2.5, 5, 2.5]
    # ranks (4, 2.5, 2.5, 1) against (1, 2, 3, 4): deviations (1.5, 0, 0, -1.5) and (-1.5, -.5, .5, 1.5),
    # covariance sum -4.5, squares 4.5 and 5: -4.5 / sqrt(22.5) = -3 / sqrt(10)
    want = -3 / math.sqrt(10)
    assert f9.spearman([8, 4, 4, 2], [1, 2, 3, 4]) == pytest.approx(want, rel=1e-12)
    # ties on both sides: ranks (1.5, 1.5, 3, 4) and (1, 2.5, 2.5, 4), deviations (-1, -1, .5, 1.5) and
    # (-1.5, 0, 0, 1.5): 3.75 / sqrt(4.5 * 4.5)
    want = 3.75 / 4.5
    assert f9.spearman([2, 2, 4, 8], [0.1, 0.5, 0.5, 3.0]) == pytest.approx(want, rel=1e-12)
    assert f9.spearman([1, 2, 3], [10, 20, 300]) == 1.0
    assert f9.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    # undefined: a constant series (every layer at one width), too few values, a NaN
    assert f9.spearman([4, 4, 4], [1, 2, 3]) is None
    assert f9.spearman([1, 2, 3], [5, 5, 5]) is None
    assert f9.spearman([4], [1]) is None
    assert f9.spearman([1, 2, float("nan")], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        f9.spearman([1, 2], [1, 2, 3])


def test_spearman_equals_an_independent_formula():
    """Ranks by counting (#smaller + (#equal + 1) / 2), then Pearson by torch.corrcoef; without ties,
    also the textbook 1 - 6 sum d^2 / (n (n^2 - 1))."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = 3 + trial % 17
        x = [[8, 4, 2][int(i)] for i in torch.randint(0, 3, (n,), generator=g)]  # bits: many ties
        y = torch.randn(n, generator=g, dtype=torch.float64).tolist()
        if trial % 3 == 0:
            y = [round(v) for v in y]  # ties in the other series too
        if len(set(x)) == 1 or len(set(y)) == 1:
            assert f9.spearman(x, y) is None
            continue

        def ranks(v):
            return torch.tensor(
                [sum(u < w for u in v) + (sum(u == w for u in v) + 1) / 2 for w in v], dtype=torch.float64
            )

        ref = torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1].item()
        assert f9.spearman(x, y) == pytest.approx(ref, abs=1e-12)
        distinct = torch.randperm(n, generator=g).tolist()
        rd = ranks(distinct).tolist()
        ry = ranks(y).tolist()
        d2 = sum((a - b) ** 2 for a, b in zip(rd, ry))
        if len(set(y)) == n:
            textbook = 1 - 6 * d2 / (n * (n * n - 1))
            assert f9.spearman(distinct, y) == pytest.approx(textbook, abs=1e-12)


def test_figure9_text_says_n_a_for_a_constant_series():
    """figure9_fields' traces per OP and correlations by hand; figure9_text prints n/a where one is undefined."""
    report = {
        "layers": [
            {"name": "conv1", "fixed": True, "macs": 5, "a_bits": 8, "w_bits": 8},
            {"name": "a", "fixed": False, "macs": 10, "a_bits": 4, "w_bits": 4},
            {"name": "b", "fixed": False, "macs": 30, "a_bits": 4, "w_bits": 2},
            {"name": "c", "fixed": False, "macs": 20, "a_bits": 4, "w_bits": 8},
        ],
        "candidates": [[4, 8], [4, 4], [4, 2]],
    }
    fig = f9.figure9_fields(report, [3.0, 1.0, 2.0], batches=2, probes=4)
    assert [r.get("trace_per_op") for r in report["layers"]] == [None, 0.3, 1 / 30, 0.1]
    assert fig["spearman"]["a_bits"] == {"hessian_trace": None, "macs": None, "trace_per_op": None}
    # W (4, 2, 8) ranks (2, 1, 3); traces (3, 1, 2) and trace/OPs (.3, .033, .1) rank (3, 1, 2), OPs (1, 3, 2)
    assert fig["spearman"]["w_bits"] == {"hessian_trace": 0.5, "macs": -0.5, "trace_per_op": 0.5}
    assert json.loads(json.dumps(fig))["spearman"]["a_bits"]["macs"] is None  # null in figure9.json
    text = f9.figure9_text(fig)
    assert "selected A bits with Hessian trace n/a, OPs n/a, trace/OPs n/a" in text
    assert "selected W bits with Hessian trace +0.50, OPs -0.50, trace/OPs +0.50" in text
    one_w = {**report, "candidates": [[4, 4], [2, 4]]}  # one W: the A bits only
    assert f9.figure9_fields(one_w, [3.0, 1.0, 2.0], 1, 1)["spearman"].keys() == {"a_bits"}


# ---------------------------------------------------------------------------------------
# The traces: the hessian proxy's, and nothing disturbed
# ---------------------------------------------------------------------------------------


def layer_modes(model) -> list[tuple]:
    """Each quantized layer's (activation mode, branch, weights quantized or not)."""
    return [(m.act.mode, m.act.branch, m.weight_quant.enabled) for m in mm.quant_layers(model)]


def test_figure9_traces_are_the_hessian_proxys_and_change_nothing(meta):
    """mean_hessian_traces gives the hessian proxy's own traces, and leaves the model, every mode, every
    train/eval flag, the .grad fields and the global RNG as they were (here: a model in weight training)."""
    args, model, _ = meta
    model = copy.deepcopy(model)
    x, y = bl.proxy_batches(args, 1, 0)[0]
    first = (x[:2], y[:2])
    second = (x[2:4], y[2:4])
    batches = [first, second]
    mm.apply_selection(model, [0, 1, 2] * 6 + [1])
    mm.set_mode(model, "selected", quant_weights=True)
    model.train()
    # a module whose flag differs from the model's: restored as it was
    model.layer2[0].bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    modes = layer_modes(model)
    flags = [mod.training for mod in model.modules()]
    rng = torch.get_rng_state()
    py = random.getstate()
    got = f9.mean_hessian_traces(model, batches, probes=1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py
    assert layer_modes(model) == modes
    assert [mod.training for mod in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert got.shape == (19,)
    assert got.abs().sum() > 0
    traces: list = []
    bl.proxy_scores(model, batches, "hessian", probes=1, seed=3, traces_out=traces)
    assert len(traces) == 2
    assert torch.equal(torch.stack(traces).mean(0), got)


# ---------------------------------------------------------------------------------------
# figure9.py on a run of one W and on a run of (A, W) pairs
# ---------------------------------------------------------------------------------------


def _check_figure9(run: Path, bits_file: Path, stdout: str, pairs: bool) -> dict:
    """figure9.py's figure9.json and two stdout lines for run, against bits_file: the figure9.json."""
    bits = json.loads(bits_file.read_text())
    fig = json.loads((run / "figure9.json").read_text())
    searched = [r for r in bits["layers"] if not r["fixed"]]
    rows = fig["layers"]
    assert [(r["name"], r["macs"], r["a_bits"], r["w_bits"]) for r in rows] == [
        (r["name"], r["macs"], r["a_bits"], r["w_bits"]) for r in searched
    ]
    for r in rows:
        assert math.isfinite(r["hessian_trace"])
        assert r["trace_per_op"] == pytest.approx(r["hessian_trace"] / r["macs"])
    for key in ("arch", "gbops", "selection"):
        assert fig[key] == bits[key]
    f = fig["figure9"]
    settings = (f["layers"], f["batches"], f["probes"], f["seed"])
    assert settings == (19, 1, 1, 0)
    series = {"a_bits": [r["a_bits"] for r in rows]}
    if pairs:
        series["w_bits"] = [r["w_bits"] for r in rows]
        series["a_times_w"] = [r["a_bits"] * r["w_bits"] for r in rows]
    assert f["spearman"].keys() == series.keys()
    for k, sel in series.items():
        for key in ("hessian_trace", "macs", "trace_per_op"):
            want = f9.spearman(sel, [r[key] for r in rows])
            if want is None:
                assert f["spearman"][k][key] is None
            else:
                assert f["spearman"][k][key] == pytest.approx(want, abs=1e-12)
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("Figure 9: rank correlation of selected A bits with "), stdout
    assert len(lines) == 2, stdout
    assert "(19 layers; traces on 1 batch(es) x 1 probe(s), " in lines[0]
    c = f["spearman"]["a_bits"]
    fmt = {key: "n/a" if c[key] is None else f"{c[key]:+.2f}" for key in c}
    assert f"Hessian trace {fmt['hessian_trace']}, OPs {fmt['macs']}, trace/OPs {fmt['trace_per_op']}" in lines[0]
    assert ("selected W bits with" in lines[0] and "selected a*w with" in lines[0]) == pairs
    # optional: the analysis runs without it
    if importlib.util.find_spec("matplotlib") is None:
        assert (
            lines[1]
            == f"wrote {run / 'figure9.json'} (figure9.png and bits.png need matplotlib, which is not installed)"
        )
        assert not (run / "figure9.png").exists()
        return fig
    assert lines[1] == f"wrote {run / 'figure9.json'}, figure9.png and bits.png"
    for png in ("figure9.png", "bits.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return fig


def test_figure9_of_a_run_of_one_w(ref_run, meta, tmp_path, call):
    """figure9.py RUN: the traces the hessian proxy takes on the meta-state, against RUN/bits.json; nothing else in
    RUN changes. Here RUN holds bits.json only, and the meta-state is given with --meta-state."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "bits.json").write_bytes((ref_run / "bits.json").read_bytes())
    before = files_of(run)
    p = call(f9.main, run, "--batches", "1", "--probes", "1", "--meta-state", ref_run / "meta_state.pth")
    assert p.returncode == 0, p.stderr
    assert not p.stderr, p.stderr
    fig = _check_figure9(run, run / "bits.json", p.stdout, pairs=False)
    assert fig["bits"] == str(run / "bits.json")
    assert fig["meta_state"] == str(ref_run / "meta_state.pth")
    after = files_of(run)
    pictures = {"figure9.png", "bits.png"} if importlib.util.find_spec("matplotlib") else set()
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"figure9.json", *pictures}
    args, model, _ = meta
    traces: list = []
    batches = bl.proxy_batches(args, 1, args.seed)
    bl.proxy_scores(model, batches, "hessian", probes=1, seed=args.seed, traces_out=traces)
    assert [r["hessian_trace"] for r in fig["layers"]] == traces[0].tolist()  # exactly the proxy's


def test_figure9_of_a_run_of_pairs(pair_run, call):
    """pairs.py's run: the W bits and a*w correlate too; the per-layer W of bits.json varies."""
    p = call(f9.main, pair_run, "--batches", "1", "--probes", "1")
    assert p.returncode == 0, p.stderr
    assert not p.stderr, p.stderr
    fig = _check_figure9(pair_run, pair_run / "bits.json", p.stdout, pairs=True)
    assert fig["meta_state"] == str(pair_run / "meta_state.pth")
    assert len(fig["candidates"]) == 9


def test_plots_are_optional(pair_run, tmp_path, monkeypatch):
    """Without matplotlib, no figure9.png or bits.png and no failure (figure9.json is written before them)."""
    # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    fig = json.loads((pair_run / "figure9.json").read_text())
    bits = json.loads((pair_run / "bits.json").read_text())
    assert not f9.plot_figure9(fig, str(tmp_path / "figure9.png"))
    assert not f9.plot_bits(bits, str(tmp_path / "b.png"))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------


def test_bad_input(ref_run, tmp_path, call):
    """Bad input (runs.run_file's missing files, a foreign bits.json, a later checkpoint): one line, exit 2."""
    only_bits, only_meta, foreign, later = (tmp_path / n for n in ("only_bits", "only_meta", "foreign", "later"))
    for d in (only_bits, only_meta, foreign, later):
        d.mkdir()
    (only_bits / "bits.json").write_bytes((ref_run / "bits.json").read_bytes())
    (only_meta / "meta_state.pth").symlink_to(ref_run / "meta_state.pth")
    bits = json.loads((ref_run / "bits.json").read_text())
    bits["layers"][3]["name"] = "layer9.conv"
    (foreign / "bits.json").write_text(json.dumps(bits))
    (foreign / "meta_state.pth").symlink_to(ref_run / "meta_state.pth")
    (later / "bits.json").write_bytes((ref_run / "bits.json").read_bytes())
    # a checkpoint after bits were selected
    (later / "meta_state.pth").symlink_to(ref_run / "checkpoint.pth")
    cases = [
        ([tmp_path / "nowhere"], ["nowhere: no such folder"]),
        ([only_meta], [f"{only_meta} has no bits.json"]),
        ([only_bits], [f"{only_bits} has no meta_state.pth", "--meta-state"]),
        (
            [only_bits, "--meta-state", tmp_path / "x.pth"],
            [f"--meta-state {tmp_path / 'x.pth'}: torch.load cannot read it", "No such file"],
        ),
        ([only_bits, "--probes", "0"], ["--probes", "0 must be at least 1"]),
        ([foreign], [f"{foreign / 'bits.json'} does not match the meta-state's model", "layer9.conv"]),
        ([later], ["is not a meta-state", "at epoch 4, bits selected"]),
    ]
    for argv, needles in cases:
        before = files_of(tmp_path)
        p = call(f9.main, *argv)
        assert error_line(p, *needles).startswith("figure9: error: "), argv
        assert p.returncode == 2, argv
        assert files_of(tmp_path) == before


def test_bad_input_from_the_command_line(tmp_path, capsys, monkeypatch):
    """`python figure9.py RUN` (the script as __main__, run here: no interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", ["figure9.py", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "figure9.py"), run_name="__main__")
    p = subprocess.CompletedProcess(sys.argv, e.value.code, *capsys.readouterr())
    assert error_line(p, f"figure9: error: {tmp_path} has no bits.json")
    assert p.returncode == 2
    assert not any(tmp_path.iterdir())
