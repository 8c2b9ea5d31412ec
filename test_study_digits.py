"""study_digits.py: its tables against values computed by hand, and its quick mode end to end (real digits,
real runs of metamix.py and baselines.py)."""
from __future__ import annotations

import json

import pytest

import study_digits as sd
from conftest import run_cli

pytest.importorskip("sklearn")


def _result(method, seed, top1, gbops=4.5, bits=3.5, bits_mac=3.4):
    return dict(arch="mobilenet_v2", target=4.6, method=method, seed=seed, top1=top1, gbops=gbops, avg_bits=bits,
                avg_bits_mac=bits_mac)


def test_table_pairs_each_method_with_random_per_seed():
    results = [_result("random", 0, 80.0), _result("random", 1, 78.0), _result("random", 2, 79.0),
               _result("metamix-sgd", 0, 84.0, bits=4.0), _result("metamix-sgd", 1, 80.0, bits=3.0),
               _result("metamix-sgd", 2, 79.0, bits=3.5), _result("hessian", 1, 82.0)]
    rows = {r.split(" | ")[2]: r for r in sd.table(results, {"mobilenet_v2": 97.33}).splitlines()[2:]}
    # MetaMix minus random per seed: +4, +2, +0; mean 2, sd 2; top-1 mean 81.00, sd 2.65; its mean bits 3.50
    assert rows["metamix SGD 0.05 (default)"] == ("| mobilenet_v2 (FP 97.33) | 4.6 | metamix SGD 0.05 (default) | 3 | "
                                                  "81.00 ± 2.65 | +2.00 ± 2.00 | +4.00 +2.00 +0.00 | 4.50 | 3.50 / 3.40 |")
    assert " | 1 | 82.00 ± 0.00 | +4.00 ± 0.00 | +4.00 | " in rows["hessian"]  # paired with seed 1's random only
    assert " | - | - | " in rows["random"]


def test_alpha_summary_margins_and_the_last_change(tmp_path):
    """Two searched layers, three steps: the argmax changes at step 3; p(A8) of the last step 0.5 and 0.2."""
    run = tmp_path / "runs" / "mobilenet_v2_t4.6_metamix-sgd_s0"
    run.mkdir(parents=True)
    layers = [{"name": "first", "fixed": True}, {"name": "a", "fixed": False}, {"name": "b", "fixed": False},
              {"name": "last", "fixed": True}]
    (run / "bits.json").write_text(json.dumps({"candidates": [[8, 4], [4, 4], [3, 4]], "layers": layers}))
    steps = [{"step": 1, "gbops": 5.0, "probs": [[0.4, 0.3, 0.3], [0.2, 0.5, 0.3]]},
             {"step": 2, "gbops": 4.9, "probs": [[0.45, 0.3, 0.25], [0.2, 0.45, 0.35]]},
             {"step": 3, "gbops": 4.7, "probs": [[0.5, 0.3, 0.2], [0.2, 0.35, 0.45]]}]
    (run / "alphas.json").write_text(json.dumps(steps))
    assert sd.load_alphas(run)["layers"] == ["a", "b"]
    row = sd.alpha_summary(tmp_path, [_result("metamix-sgd", 0, 80.0)]).splitlines()[2]
    # p(A8) 0.2 and 0.5 (median 0.35, none within 0.02 of it); top-2 margins 0.2 and 0.1 (median 0.15)
    assert row == "| mobilenet_v2 | 4.6 | metamix-sgd | 0 | 0.20 / 0.35 / 0.50 | 0 of 2 | 0.150 | 3 of 3 |"
    assert sd.load_alphas(tmp_path) is None  # a selection's folder has no alphas.json


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
