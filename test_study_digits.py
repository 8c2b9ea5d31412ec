"""study_digits.py: its tables against values computed by hand, and its quick mode end to end (real digits,
real runs of metamix.py and baselines.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import study_digits as sd
from conftest import run_cli

pytest.importorskip("sklearn")


def _result(method, seed, top1, gbops=4.5, bits=3.5, bits_mac=3.4):
    """One run's row of a study's results (mobilenet_v2 at target 4.6)."""
    return dict(
        arch="mobilenet_v2",
        target=4.6,
        method=method,
        seed=seed,
        top1=top1,
        gbops=gbops,
        avg_bits=bits,
        avg_bits_mac=bits_mac,
    )


def _rows(table, results, *fp_hash) -> dict[str, str]:
    """The rows of a study table of results (FP mobilenet_v2 97.33; fp_hash: the FP weights' hashes, for the tables
    that take them) by their method column; the header left out."""
    return {x.split(" | ")[2]: x for x in table(results, {"mobilenet_v2": 97.33}, *fp_hash).splitlines()[2:]}


def test_table_pairs_each_method_with_random_per_seed():
    results = [
        _result("random", 0, 80.0),
        _result("random", 1, 78.0),
        _result("random", 2, 79.0),
        _result("metamix-sgd", 0, 84.0, bits=4.0),
        _result("metamix-sgd", 1, 80.0, bits=3.0),
        _result("metamix-sgd", 2, 79.0, bits=3.5),
        _result("hessian", 1, 82.0),
    ]
    rows = _rows(sd.table, results)
    # MetaMix minus random per seed: +4, +2, +0; mean 2, sd 2; top-1 mean 81.00, sd 2.65; its mean bits 3.50
    assert rows["metamix SGD 0.05, one epoch"] == (
        "| mobilenet_v2 (FP 97.33) | 4.6 | metamix SGD 0.05, one epoch | 3 | "
        "81.00 ± 2.65 | +2.00 ± 2.00 | +4.00 +2.00 +0.00 | 4.50 | 3.50 / 3.40 |"
    )
    # paired with seed 1's random only
    assert " | 1 | 82.00 ± 0.00 | +4.00 ± 0.00 | +4.00 | " in rows["hessian"]
    assert " | - | - | " in rows["random"]


def test_alpha_summary_from_bits_json(tmp_path):
    """Two searched layers: p(A8) 0.5 and 0.2 at the end of the search, which last changed its argmax at step 3."""
    layers = [
        {"name": "first", "fixed": True},
        {"name": "a", "fixed": False, "probs": [0.5, 0.3, 0.2]},
        {"name": "b", "fixed": False, "probs": [0.2, 0.35, 0.45]},
        {"name": "last", "fixed": True},
    ]
    (tmp_path / "bits.json").write_text(json.dumps({"candidates": [[8, 4], [4, 4], [3, 4]], "layers": layers}))
    search = {"steps": 3, "argmax_last_changed": 3, "median_margin": 0.15, "vs_target": -0.0123}
    row = sd.alpha_summary(
        tmp_path,
        [_result("metamix-sgd", 0, 80.0) | {"dir": str(tmp_path), "search": search}, _result("random", 0, 79.0)],
    ).splitlines()[2:]
    # p(A8) 0.2 and 0.5 (median 0.35, none within 0.02 of it); one row: random did not search
    assert row == ["| mobilenet_v2 | 4.6 | metamix-sgd | 0 | 0.20 / 0.35 / 0.50 | 0 of 2 | 0.150 | 3 of 3 | -1.2% |"]


def test_method_flags_name_the_variants():
    assert sd.method_flags("metamix") == ["--alpha-optimizer", "adam", "--alpha-lr", "0.1", "--search-steps", "0"]
    assert sd.method_flags("metamix-sgd-lr0.5") == [
        "--alpha-optimizer",
        "sgd",
        "--alpha-lr",
        "0.5",
        "--search-steps",
        "0",
    ]
    assert sd.method_flags("metamix-sgd-x16", 46) == [
        "--alpha-optimizer",
        "sgd",
        "--alpha-lr",
        "0.05",
        "--search-steps",
        "736",
    ]
    # the authors' ImageNet search, Adam 1e-4 for 5005 steps: LR x steps 0.5, here over one epoch of 46 steps
    assert sd.method_flags("metamix-adam-matched", 46)[:4] == ["--alpha-optimizer", "adam", "--alpha-lr", "0.0108696"]
    assert sd.method_flags("metamix-unfixed")[4] == "--unfixed"
    assert sd.method_flags("metamix-sgd-pairs")[-2:] == ["--w-bits", "8,4,2"]
    # the convergence part's: metamix.py's alpha recipes from pretrained weights, at its default search length
    assert sd.method_flags("metamix-sgd-lr0.005-x4", 46) == [
        "--alpha-optimizer",
        "sgd",
        "--alpha-lr",
        "0.005",
        "--search-steps",
        "184",
    ]
    assert sd.method_flags("metamix-authors-x4", 46)[:4] == ["--alpha-optimizer", "authors", "--alpha-lr", "1e-4"]


def test_the_convergence_part_runs_the_defaults_a_user_gets():
    """4 budgets x 8 seeds x (3 alpha recipes, a one-epoch search, random, hessian), the selections from the 0.005
    run's meta-state; metamix.py's own defaults from pretrained weights are that run's (SGD 0.005; 180 steps make 4
    passes of 46, as 184 do); LSQ's own quantizers only in convergence-lsq."""
    import metamix as mm

    grid = sd.PARTS["convergence"]
    assert [(arch, t) for arch, t, _, _ in grid] == sd.CONV_BUDGETS
    assert all(methods == sd.DEFAULT_CONV and seeds == list(range(8)) for _, _, methods, seeds in grid)
    assert sd.PART_SOURCE["convergence"] == sd.DEFAULT_CONV[0] == "metamix-sgd-lr0.005-x4"
    assert {"random", "hessian"} < set(sd.DEFAULT_CONV)
    assert sd.method_flags("metamix-sgd-lr0.005")[-2:] == ["--search-steps", "0"]
    assert mm.ALPHA_LR["sgd"][0] == 0.005 and mm.get_args_parser().get_default("search_steps") == 180
    assert "convergence" not in sd.PLAIN_PARTS and "convergence-lsq" in sd.PLAIN_PARTS


def test_table_convergence_pairs_each_variant_with_random_and_hessian():
    def r(method, seed, top1, search=None):
        return _result(method, seed, top1) | {"search": search}

    done = {"steps": 46, "argmax_last_changed": 10, "median_margin": 0.2, "settled": True}
    open_ = {"steps": 46, "argmax_last_changed": 45, "median_margin": 0.01, "settled": False}
    results = [
        r("random", 0, 80.0),
        r("random", 1, 78.0),
        r("random", 2, 79.0),
        r("hessian", 0, 83.0),
        r("hessian", 1, 80.0),
        r("hessian", 2, 79.0),
        r("metamix-sgd", 0, 84.0, done),
        r("metamix-sgd", 1, 78.0, open_),
        r("metamix-sgd", 2, 77.0, open_),
    ]
    rows = _rows(sd.table_convergence, results, {"mobilenet_v2": "abc"})
    # vs random: +4, 0, -2 (mean 0.67, sd 3.06); vs hessian: +1, -2, -2 (mean -1, sd 1.73); 1 of 3 settled
    assert rows["metamix SGD 0.05, one epoch"] == (
        "| mobilenet_v2 (FP 97.33, abc) | 4.6 | metamix SGD 0.05, one epoch | 3 | 79.67 ± 3.79 | +0.67 ± 3.06 | "
        "1 / 1 / 1 | -1.00 ± 1.73 | 4.500 | 1 of 3 | 0.010 | 45 / 46 |"
    )
    assert rows["hessian"].split(" | ")[5:9] == ["+1.67 ± 1.53", "2 / 1 / 0", "-", "4.500"]
    assert " | - | - | " in rows["random"]


def test_quick_mode_end_to_end(tmp_path):
    """One seed: the FP model, a MetaMix run and a random selection from its meta-state, the table."""
    out = tmp_path / "digits"
    p = run_cli("--quick", "--out", out, script="study_digits.py", timeout=600)
    results = json.loads((out / "results.json").read_text())["runs"]
    assert {r["method"] for r in results} == {"metamix-sgd", "random"}
    runs = {r["method"]: out / "runs" / f"{r['arch']}_t{r['target']:g}_{r['method']}_s{r['seed']}" for r in results}
    assert (runs["metamix-sgd"] / "meta_state.pth").exists() and (runs["random"] / "selection.json").exists()
    assert all(r["gbops"] <= r["target"] + 1e-6 for r in results)
    top1 = {r["method"]: r["top1"] for r in results}
    delta = top1["metamix-sgd"] - top1["random"]
    assert f"| {delta:+.2f} ± 0.00 | {delta:+.2f} |" in (out / "table.md").read_text()  # paired with seed 0's random
    assert "study done" in p.stdout


def test_table_quantizers_pairs_the_same_bits_and_metamix_with_random():
    def r(method, seed, top1, weighted=3.6):
        return _result(method, seed, top1) | {"avg_bits_weighted": weighted}

    results = [
        r("quant-plain", 0, 90.0),
        r("quant-plain", 1, 92.0),
        r("quant-plain", 2, 91.0),
        r("quant-authors", 0, 93.0),
        r("quant-authors", 1, 92.5),
        r("quant-authors", 2, 95.0, 3.9),
        r("random", 0, 88.0),
        r("random", 1, 89.0),
        r("metamix-sgd-x4", 0, 90.0),
        r("metamix-sgd-x4", 1, 88.0),
    ]
    rows = _rows(sd.table_quantizers, results, {"mobilenet_v2": "abc"})
    # authors' minus plain per seed: +3, +0.5, +4 (mean 2.5, sd 1.80); weighted bits (3.6 + 3.6 + 3.9) / 3 = 3.70
    assert rows["the authors' quantizers (per-channel W, offset for hardswish)"] == (
        "| mobilenet_v2 (FP 97.33, abc) | 4.6 | the authors' quantizers (per-channel W, offset for hardswish) | 3 | "
        "93.50 ± 1.32 | +2.50 ± 1.80 vs LSQ's own quantizers (per-tensor W, signed grid) | +3.00 +0.50 +4.00 | "
        "4.500 | 3.50 / 3.70 |"
    )
    # MetaMix minus random: +2, -1 (mean 0.5, sd 2.12)
    assert " | +0.50 ± 2.12 vs random | +2.00 -1.00 | " in rows["metamix SGD 0.05, 4x longer"]
    assert " | - | - | " in rows["random"] and " | - | - | " in rows["LSQ's own quantizers (per-tensor W, signed grid)"]


def test_table_recipe_pairs_each_recipe_with_ours():
    results = [
        _result("recipe-ours", 0, 90.0),
        _result("recipe-ours", 1, 92.0),
        _result("recipe-ours", 2, 91.0),
        _result("recipe-kd", 0, 93.0),
        _result("recipe-kd", 1, 92.0),
        _result("recipe-kd", 2, 90.0),
        _result("recipe-adam", 1, 91.5),
    ]
    rows = _rows(sd.table_recipe, results, {"mobilenet_v2": "abc"})
    # distillation minus ours per seed: +3, 0, -1 (mean 0.67, sd 2.08); top-1 mean 91.67, sd 1.53
    assert rows["distillation (teacher: the FP model)"] == (
        "| mobilenet_v2 (FP 97.33, abc) | 4.6 | distillation (teacher: the FP model) | 3 | 91.67 ± 1.53 | "
        "+0.67 ± 2.08 | +3.00 +0.00 -1.00 | 1 / 1 / 1 | 4.500 |"
    )
    assert " | 1 | 91.50 ± 0.00 | -0.50 ± 0.00 | -0.50 | 0 / 0 / 1 | " in rows["the authors' Adam recipe"]
    assert " | - | - | - | " in rows["ours (labels, W4 from epoch 3, SGD)"]


def _first_command(monkeypatch, tmp_path, method: str, part: str) -> list[str]:
    """The first command run_one would run for a MobileNet-v2 job of `method` in `part` (stopped there), its
    source run at tmp_path/src (the SGD 0.05 search of the quantizers and recipe parts)."""
    calls = []
    monkeypatch.setattr(sd.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or pytest.fail("stop"))
    job = dict(
        arch="mobilenet_v2",
        target=7.0,
        method=method,
        seed=1,
        data="D",
        init="FP.pth",
        epochs=8,
        search_epochs=2,
        threads=1,
        part=part,
        out=str(tmp_path / "run"),
        source=str(tmp_path / "src"),
        source_method="metamix-sgd-x4",
        epoch_steps=46,
    )
    with pytest.raises(pytest.fail.Exception):
        sd.run_one(job, print)
    return calls[0]


def test_recipe_runs_take_the_source_bits_and_their_flags(monkeypatch, tmp_path):
    """Each recipe run: metamix.py from the FP model with the source run's bits and its recipe's flags; the
    teacher is the FP model of the same architecture."""
    cmd = _first_command(monkeypatch, tmp_path, "recipe-authors", "recipe")
    assert cmd[cmd.index("--bits-from") + 1] == str(tmp_path / "src" / "bits.json")
    assert cmd[cmd.index("--teacher") + 1] == "mobilenet_v2:FP.pth" and cmd[cmd.index("--pretrained") + 1] == "FP.pth"
    assert cmd[cmd.index("--act-only-epochs") + 1] == "2" and cmd[cmd.index("--optimizer") + 1] == "adam"
    # the last --lr wins: the authors' 5e-4
    assert cmd[len(cmd) - 1 - cmd[::-1].index("--lr") + 1] == "5e-4"
    assert "--plain-lsq" not in cmd


@pytest.mark.parametrize(
    "part, method, plain",
    [
        ("quantizers", "quant-plain", True),
        ("quantizers", "quant-authors", False),
        ("pairs", "metamix-sgd", True),
        ("convergence", "metamix-sgd-lr0.005-x4", False),
        ("convergence-lsq", "metamix-sgd", True),
    ],
)
def test_runs_take_lsqs_own_quantizers_where_their_part_asks(monkeypatch, tmp_path, part, method, plain):
    """--plain-lsq: in the parts run before the authors' quantizers became the default, and in the quantizers
    part's LSQ arm; nowhere else. metamix.py has no such flag: ablations.py runs those (and every MetaMix run of the
    study, which sets the alphas' rate, --alpha-lr, a setting of ablations.py too)."""
    cmd = _first_command(monkeypatch, tmp_path, method, part)
    assert ("--plain-lsq" in cmd) == plain
    assert "--alpha-lr" in cmd
    assert cmd[0] == sys.executable and Path(cmd[1]).name == "ablations.py"


def test_ablation_flags_go_to_ablations_py_and_pairs_with_them(monkeypatch, tmp_path):
    """command_line: metamix.py's runs with an ablation's flag (--unfixed, --plain-lsq) by ablations.py; a run of
    pairs by pairs.py, whose parser is ablations.py's with its --w-bits list."""
    assert sd.command_line(["metamix.py", *sd.method_flags("metamix-unfixed")])[1] == str(sd.HERE / "ablations.py")
    assert sd.command_line(["pairs.py", "--seed", "1"])[1:] == [str(sd.HERE / "pairs.py"), "--seed", "1"]
    p = subprocess.run(
        sd.command_line(["pairs.py", "--plain-lsq", "--w-bits", "8,4", "--help"]), capture_output=True, text=True
    )
    assert p.returncode == 0 and p.stdout.startswith("usage: pairs.py"), p.stderr
    assert "--plain-lsq" in p.stdout and "--w-bits BITS" in p.stdout
    # (_first_command replaces subprocess.run)
    cmd = _first_command(monkeypatch, tmp_path, "metamix-sgd-pairs", "pairs")
    assert Path(cmd[1]).name == "pairs.py" and "--plain-lsq" in cmd and cmd[-4:-2] == ["--w-bits", "8,4,2"]
