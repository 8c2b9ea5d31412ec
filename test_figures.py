"""Tests for figures.py, the paper's Figures 1, 2, 6 and 8 for a run (activation instability across bit-widths).
Run: python -m pytest -q test_figures.py

figures.py on a tiny MobileNet-v2 run started from a tiny FP state dict: the report's structure, Figure 8's
variances against a direct LSQ computation, one layer's input statistics (Figures 1 / 6) against a hook of the
test's own, the spreads against their definition; a run from scratch without matplotlib; bad input in one line.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

import figures
import metamix as mm
import runs
from conftest import error_line, main_in_process

# A tiny MobileNet-v2 run: one bit-selection epoch of 2 steps (which also searches), one of weight training.
TINY_MBV2 = [
    "--arch",
    "mobilenet_v2",
    "--data",
    "synthetic:32,16,10",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--search-epochs",
    "1",
    "--epochs",
    "2",
    "--search-steps",
    "0",
]
# figures.py's tiny settings: one validation batch, Figure 2 over 2 epochs (4 steps), a draw every step, BN
# recalibrated on one training batch.
TINY_FIGS = ["--batches", "1", "--fig2-epochs", "2", "--switch-every", "1", "--fig8-samples", "20000"]
TINY_FIGS += ["--recal-batches", "1"]


def tiny_fp(path: Path) -> Path:
    """A MobileNet-v2 state dict whose BN running statistics come from the synthetic images (a forward in train
    mode, no step), so that its eval-mode activations are not all zero: the run's --pretrained."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    images = mm.synthetic_dataset(32, 10, 32, 0, "train").tensors[0]
    with torch.no_grad():
        for x in images.split(16):
            model.train()(x)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """metamix.py TINY_MBV2 from tiny_fp, in this process; then figures.py TINY_FIGS on it (RUN/figures)."""
    root = tmp_path_factory.mktemp("figures")
    fp = tiny_fp(root / "fp.pth")
    out = root / "run"
    assert main_in_process(*TINY_MBV2, "--pretrained", fp, "--output-dir", out) == 0
    assert figures.main([str(out), *TINY_FIGS]) == 0
    return out


@pytest.fixture(scope="module")
def report(run) -> dict:
    return json.loads((run / "figures" / "figures.json").read_text())


def test_report_structure(run, report):
    """Every searched layer has, for the FP start and the meta-state, the FP input and each candidate's mean and
    variance with FP and W4 weights; Figure 2 has three traces, one value per step; the tables are written."""
    _, meta, _ = runs.load_run(str(run / "meta_state.pth"))
    names = [m.name for m in mm.searched_layers(meta)]
    rows = report["figure1_6"]["layers"]
    assert [r["name"] for r in rows] == names
    assert report["candidates"] == [8, 4, 3]
    for r in rows:
        assert set(r["models"]) == {"fp_start", "meta_state"}
        for entry in r["models"].values():
            assert set(entry) == {"fp", "W-FP", "W4"}
            for weights in ("W-FP", "W4"):
                assert [b["bits"] for b in entry[weights]["bits"]] == [8, 4, 3]
                assert entry[weights]["spread_var"] >= 0
                assert math.isfinite(entry[weights]["spread_mean"])
    # the first searched layer's input comes from the fixed 8-bit first layer: the same at every candidate
    assert rows[0]["models"]["meta_state"]["W-FP"]["spread_var"] == pytest.approx(0, abs=1e-9)
    smaller = report["figure1_6"]["summary"]["meta_state"]["W-FP"]["layers_smaller_than_fp_start"]
    assert 0 <= smaller <= len(rows)
    fig2 = report["figure2"]
    layer = meta.get_submodule(fig2["layer"])
    assert figures.is_depthwise(layer)
    assert isinstance(meta.get_submodule(fig2["bn"]), torch.nn.BatchNorm2d)
    # 32 images at batch 16: 2 steps per epoch, 2 epochs
    for case, c in fig2["cases"].items():
        assert len(c["trace"]) == 4
        assert all(v > 0 for v in c["trace"])
        if case == "metamix":
            assert c["bits"] == [None] * 4
        else:
            assert set(c["bits"]) <= {8, 4, 3}
    md = (run / "figures" / "figures.md").read_text()
    assert "## Figures 1 / 6" in md
    assert "## Figure 2" in md
    assert "## Figure 8" in md


def test_rerun_is_identical(run, report, tmp_path):
    """A second run of figures.py on the same run writes the same numbers (Figure 2 trains with dropout: seeded)."""
    assert figures.main([str(run), *TINY_FIGS, "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "figures.json").read_text())
    assert again["figure2"] == report["figure2"]
    assert again["figure1_6"]["layers"] == report["figure1_6"]["layers"]


def test_figure8_against_direct_lsq(report):
    """Figure 8's rows: LSQ's init step 2 mean|x| / sqrt(Qp) and the variances, computed here directly."""
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert report["figure8"]["input_var"] == pytest.approx(float(x.var()), rel=1e-12)
    for r, bits in zip(report["figure8"]["rows"], (8, 4, 3, 2)):
        qp = 2 ** (bits - 1) - 1
        step = 2 * float(x.abs().mean()) / math.sqrt(qp)
        q = mm.lsq_quantize(x, torch.tensor(step, dtype=torch.float64), bits, True).detach()
        assert r["bits"] == bits
        assert r["step"] == pytest.approx(step, rel=1e-12)
        assert r["var"] == pytest.approx(float(q.var()), rel=1e-9)
        assert r["error_var"] == pytest.approx(float((q - x).var()), rel=1e-9)
    # the supplement's claim, on a Gaussian, with LSQ's init step: fewer bits, more variance
    variances = [r["var"] for r in report["figure8"]["rows"]]
    assert variances == sorted(variances)


def test_figure8_mse_step_is_the_least_squared_error(report):
    """Figure 8's second step: no step of a fine grid around it, nor LSQ's init step, quantizes the Gaussian with a
    smaller mean squared error; its variances are those of a direct LSQ computation."""
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def quantized(step, bits):
        return mm.lsq_quantize(x, torch.tensor(step, dtype=torch.float64), bits, True).detach()

    for r in report["figure8"]["rows"]:
        best = (quantized(r["mse_step"], r["bits"]) - x).square().mean()
        for step in [r["step"]] + [r["mse_step"] * (1 + k / 100) for k in (-5, -2, -1, 1, 2, 5)]:
            assert (quantized(step, r["bits"]) - x).square().mean() >= best * (1 - 1e-9)
        q = quantized(r["mse_step"], r["bits"])
        assert r["mse_var"] == pytest.approx(float(q.var()), rel=1e-9)
        assert r["mse_error_var"] == pytest.approx(float((q - x).var()), rel=1e-9)
    # at 2 bits the MSE step shrinks the clipped Gaussian: its variance falls below the input's
    assert report["figure8"]["rows"][-1]["mse_var"] < report["figure8"]["input_var"]


def _meta_and_batch(run):
    args, meta, _ = runs.load_run(str(run / "meta_state.pth"))
    _, val_set, _ = mm.build_datasets(args)
    x = torch.stack([val_set[i][0] for i in range(16)])
    y = torch.tensor([val_set[i][1] for i in range(16)])
    return meta, x, y


def test_bn_statistics_per_candidate_by_hand(run, report):
    """One BN's per-channel input statistics at each candidate (W4, batch statistics) from a hook of the test's
    own, and its mismatch from torch.distributions' KL divergence between Normals: the report's number."""
    meta, x, _ = _meta_and_batch(run)
    name = list(report["bn_stats"]["per_bn"]["meta_state"]["W4"])[5]
    bn = meta.get_submodule(name)
    seen = []
    bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().double()))
    stats = []
    for branch in range(3):
        mm.set_mode(meta, "meta", branch, quant_weights=True)
        with torch.no_grad(), mm.batch_stats_bn(meta):
            meta(x)
        v = seen[-1].transpose(0, 1).flatten(1)
        stats.append((v.mean(1), v.var(1, correction=0)))
    mm.set_mode(meta, "meta", 2, quant_weights=True)
    mean, var = figures.bn_input_stats(meta, [x])[name]
    assert torch.allclose(mean, stats[2][0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(var, stats[2][1], rtol=1e-9, atol=1e-12)
    normal = torch.distributions.Normal
    kls = []
    for b in range(3):
        for c in range(3):
            if b != c:
                sd_c = (stats[c][1] + bn.eps).sqrt()
                output = normal((stats[b][0] - stats[c][0]) / sd_c, (stats[b][1] + bn.eps).sqrt() / sd_c)
                kls.append(torch.distributions.kl_divergence(output, normal(0.0, 1.0)).mean())
    assert report["bn_stats"]["per_bn"]["meta_state"]["W4"][name] == pytest.approx(float(torch.stack(kls).mean()))
    # the same statistics at every candidate: no mismatch
    assert figures.bn_mismatch([stats[0]] * 3, bn.eps) == pytest.approx(0, abs=1e-12)


def test_recalibration_changes_only_the_bn_statistics(run):
    """recalibrated(): weights, steps and every other parameter and buffer as they were; BN's running statistics
    re-estimated (and the original network untouched)."""
    meta, x, _ = _meta_and_batch(run)
    mm.set_mode(meta, "meta", 2, quant_weights=True)
    figures.top1(meta, [(x, torch.zeros(16, dtype=torch.long))])
    before = copy.deepcopy(meta.state_dict())

    def same(a, b):
        # the quantizers' extra state is a dict of plain values
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    recal = figures.recalibrated(meta, [x])
    running = ("running_mean", "running_var", "num_batches_tracked")
    changed = {k for k, v in recal.state_dict().items() if not same(v, before[k])}
    assert changed and all(k.endswith(running) for k in changed)
    assert all(same(v, before[k]) for k, v in meta.state_dict().items())


def test_no_recalibration_gain_where_the_statistics_are_that_candidates(run):
    """A network whose running statistics were estimated at A4 (recalibrated there): recalibrating it at A4 again
    gains exactly nothing, while at A3 its statistics are another candidate's and the measurement can move."""
    meta, x, y = _meta_and_batch(run)
    mm.set_mode(meta, "meta", 1, quant_weights=False)
    at_a4 = figures.recalibrated(meta, [x])
    costs = figures.mismatch_costs(at_a4, [(x, y)], [x], 4)
    a4 = costs["W-FP"][1]
    assert a4["bits"] == 4
    assert a4["gain"] == 0
    assert a4["shared"] == a4["recalibrated"]
    mm.set_mode(at_a4, "meta", 2, quant_weights=False)
    at_a3 = figures.recalibrated(at_a4, [x])
    # the last BN (the first one's input comes from the fixed 8-bit first layer: the same at every candidate)
    bn, name = list(figures.batch_norms(at_a3).items())[-1]
    assert not torch.equal(bn.running_var, at_a4.get_submodule(name).running_var)


def test_bn_and_cost_report(report):
    """Every BN of both networks has a finite, non-negative mismatch with FP and W4 weights; the cost table has
    each candidate's top-1, shared and recalibrated, and their difference."""
    per_bn = report["bn_stats"]["per_bn"]
    assert set(per_bn) == {"fp_start", "meta_state"}
    for by_w in per_bn.values():
        assert set(by_w) == {"W-FP", "W4"}
        assert all(v >= 0 and math.isfinite(v) for per in by_w.values() for v in per.values())
    assert report["mismatch_cost"]["calibration_images"] == 16
    for by_w in report["mismatch_cost"]["models"].values():
        for rows in by_w.values():
            assert [r["bits"] for r in rows] == [8, 4, 3]
            assert all(r["gain"] == pytest.approx(r["recalibrated"] - r["shared"]) for r in rows)


def test_layer_input_against_own_hook(run, report):
    """One layer's input statistics, Figure 6's meta-state at the second candidate (A4) with FP weights and in FP:
    a forward pre-hook of the test's own on the first validation batch, in eval mode."""
    args, meta, _ = runs.load_run(str(run / "meta_state.pth"))
    _, val_set, _ = mm.build_datasets(args)
    x = torch.stack([val_set[i][0] for i in range(16)])
    name = report["figure1_6"]["plotted"][1]
    layer = meta.get_submodule(name)
    seen = []
    layer.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().double()))
    meta.eval()
    row = next(r for r in report["figure1_6"]["layers"] if r["name"] == name)["models"]["meta_state"]
    with torch.no_grad():
        mm.set_mode(meta, "meta", 1, quant_weights=False)
        meta(x)
        mm.set_mode(meta, "fp")
        meta(x)
    a4 = row["W-FP"]["bits"][1]
    assert a4["bits"] == 4
    assert a4["mean"] == pytest.approx(float(seen[0].mean()), rel=1e-6, abs=1e-9)
    assert a4["var"] == pytest.approx(float(seen[0].var(correction=0)), rel=1e-6)
    assert row["fp"]["var"] == pytest.approx(float(seen[1].var(correction=0)), rel=1e-6)


def test_batch_statistics(run, tmp_path):
    """--bn batch: the inputs with BN on each batch's statistics (as in training), against a hook of the test's own
    under metamix.batch_stats_bn; the run's BN buffers are not touched."""
    assert (
        figures.main([str(run), "--bn", "batch", "--batches", "1", "--fig2-epochs", "0", "--out", str(tmp_path)]) == 0
    )
    report = json.loads((tmp_path / "figures.json").read_text())
    assert report["figure1_6"]["bn"] == "batch"
    args, meta, _ = runs.load_run(str(run / "meta_state.pth"))
    _, val_set, _ = mm.build_datasets(args)
    x = torch.stack([val_set[i][0] for i in range(16)])
    name = report["figure1_6"]["plotted"][-1]
    seen = []
    meta.get_submodule(name).register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().double()))
    with torch.no_grad(), mm.batch_stats_bn(meta):
        mm.set_mode(meta, "meta", 2, quant_weights=True)
        meta(x)
    row = next(r for r in report["figure1_6"]["layers"] if r["name"] == name)["models"]["meta_state"]
    a3 = row["W4"]["bits"][2]
    assert a3["bits"] == 3
    assert a3["mean"] == pytest.approx(float(seen[0].mean()), rel=1e-6, abs=1e-9)
    assert a3["var"] == pytest.approx(float(seen[0].var(correction=0)), rel=1e-6)


def test_spreads_follow_their_definition(report):
    """spread_var = (max - min) / mean of the variances; spread_mean = (max - min) of the means / the FP std."""
    for r in report["figure1_6"]["layers"]:
        for entry in r["models"].values():
            var = [b["var"] for b in entry["W4"]["bits"]]
            mean = [b["mean"] for b in entry["W4"]["bits"]]
            want_var = (max(var) - min(var)) / max(sum(var) / 3, 1e-12)
            want_mean = (max(mean) - min(mean)) / max(math.sqrt(entry["fp"]["var"]), 1e-12)
            assert entry["W4"]["spread_var"] == pytest.approx(want_var, rel=1e-9, abs=1e-12)
            assert entry["W4"]["spread_mean"] == pytest.approx(want_mean, rel=1e-9, abs=1e-12)


def test_from_scratch_without_matplotlib(run, tmp_path, monkeypatch, capsys):
    """A run from scratch: no FP model, so the meta-state's rows only, no Figure 2, a note saying so; without
    matplotlib the numbers still come out and one line says the plots were skipped."""
    ck = torch.load(run / "meta_state.pth", weights_only=True)
    ck["args"]["pretrained"] = None
    folder = tmp_path / "scratch"
    folder.mkdir()
    torch.save(ck, folder / "meta_state.pth")
    monkeypatch.setattr(figures, "pyplot", lambda: None)
    assert figures.main([str(folder), "--batches", "1", "--fig8-samples", "100"]) == 0
    assert "plots need matplotlib" in capsys.readouterr().out
    report = json.loads((folder / "figures" / "figures.json").read_text())
    assert "from scratch" in report["fp_note"]
    assert "figure2" not in report
    assert set(report["figure1_6"]["layers"][0]["models"]) == {"meta_state"}
    assert not list((folder / "figures").glob("*.png"))


def test_bad_input_in_one_line(run, tmp_path, call):
    """No folder, no meta_state.pth, a broken file, a checkpoint that is not a meta-state, a run of pairs, a
    --pretrained that is not there: one line, exit 2."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta_state.pth").write_bytes(b"PK\x03\x04 not a zip")
    late = tmp_path / "late"
    late.mkdir()
    (late / "meta_state.pth").write_bytes((run / "checkpoint.pth").read_bytes())
    ck = torch.load(run / "meta_state.pth", weights_only=True)
    ck["args"]["w_bits"] = [8, 4, 2]
    pair = tmp_path / "pair"
    pair.mkdir()
    torch.save(ck, pair / "meta_state.pth")
    cases = [
        (tmp_path / "nothing", "no such folder"),
        (tmp_path, "has no meta_state.pth"),
        (broken, "torch.load cannot read it"),
        (late, "is not a meta-state"),
        (pair, "(A, W) pairs"),
    ]
    for folder, needle in cases:
        p = call(figures.main, folder)
        assert error_line(p, needle).startswith("figures: error: ")
        assert p.returncode == 2
    p = call(figures.main, run, "--pretrained", tmp_path / "missing.pth")
    assert error_line(p, "--pretrained", "no such file")
    assert p.returncode == 2
