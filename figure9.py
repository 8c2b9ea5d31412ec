"""The supplement's Figure 9 for a run, beside metamix.py: what did its selection follow? An analysis of a run's
result, off the training path; not part of MetaMix's method.

The supplement's Figure 9 sets each layer's selected bits beside its Hessian trace, its OPs and the trace divided
by OPs: the bits follow the trace in early layers but not in late ones, whose OPs are high, and trace / OPs
follows them better than either. For a run of one W or of (A, W) pairs (pairs.py):

    python figure9.py runs/m                        # runs/m/figure9.json, figure9.png, bits.png; prints "Figure 9:"
    python figure9.py runs/m --batches 2 --probes 1
    python figure9.py runs/m-random --meta-state runs/m/meta_state.pth     # a run trained from runs/m's meta-state

It takes the selected bits from RUN/bits.json and the network the selection was made on from RUN/meta_state.pth
(bit selection done, weights in full precision), and writes, per searched layer,
    hessian_trace   Tr(H_l), H_l = d^2 L / d x_l^2: Hutchinson's estimate, the raw trace that baselines.py's
                    hessian proxy reports (baselines.meta_state_traces on baselines.proxy_batches, seeded by the
                    run's --seed plus each batch's index; the proxy's scores take the Gauss-Newton trace instead),
                    averaged over --batches batches with --probes probes each; it can be negative where H_l is
                    indefinite
    trace_per_op    Tr(H_l) / OPs_l (OPs_l = the row's "macs")
and "figure9": Spearman's rank correlation of the selected A bits (pairs: also W, and a*w) with each of the two and
with OPs. figure9.png and bits.png need matplotlib (optional). Nothing else in RUN changes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn as nn

import baselines as bl
import metamix as mm
import runs

# ---- Spearman's rank correlation ---------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks with ties at their average rank (Spearman's convention): [8, 4, 4, 2] -> [4, 2.5, 2.5, 1]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        # positions i..j (0-based) share the rank (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the average ranks. None where it is undefined:
    a constant series (every layer at the same bits), fewer than 2 values, or a value that is not finite."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    if len(x) < 2 or not all(math.isfinite(v) for v in list(x) + list(y)):
        return None
    rx = average_ranks(x)
    ry = average_ranks(y)
    mx = sum(rx) / len(rx)
    my = sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


# ---- the traces and the figure's fields ------------------------------------------------------


def mean_hessian_traces(model: nn.Module, batches, probes: int, seed: int) -> torch.Tensor:
    """(L,) Tr(H_l) per searched layer: the mean over `batches` of the hessian proxy's own traces
    (baselines.meta_state_traces: eval and "fp" mode, clamped inputs, batch k's generator seeded by `seed` + k).
    Leaves the model's modes, flags, parameters and buffers as they were, and writes no .grad."""
    traces = [bl.meta_state_traces(model, x, y, probes, seed + k) for k, (x, y) in enumerate(batches)]
    return torch.stack(traces).mean(0)


FIGURE9_SERIES = (("hessian_trace", "Hessian trace"), ("macs", "OPs"), ("trace_per_op", "trace/OPs"))


def is_pairs(report: dict) -> bool:
    """A report (bits.json, figure9.json) of (A, W) pairs: its candidates have more than one W."""
    return len({w for _, w in report["candidates"]}) > 1


def figure9_fields(report: dict, traces: Sequence[float], batches: int, probes: int) -> dict:
    """Add hessian_trace and trace_per_op to each searched row of a report, and return its "figure9" entry:
    the Spearman correlation of the selected bits (pairs: also W and a*w) with each series."""
    rows = [r for r in report["layers"] if not r["fixed"]]
    for r, t in zip(rows, traces):
        r["hessian_trace"] = float(t)
        r["trace_per_op"] = float(t) / r["macs"]
    selected = {"a_bits": [r["a_bits"] for r in rows]}
    # Supplement, Table 7: the selected W, and the pair's cost per OP
    if is_pairs(report):
        selected["w_bits"] = [r["w_bits"] for r in rows]
        selected["a_times_w"] = [r["a_bits"] * r["w_bits"] for r in rows]
    corr = {}
    for k, bits in selected.items():
        corr[k] = {key: spearman(bits, [r[key] for r in rows]) for key, _ in FIGURE9_SERIES}
    return {"layers": len(rows), "batches": batches, "probes": probes, "spearman": corr}


def rho_text(rho: float | None) -> str:
    """A rank correlation as printed: signed, two decimals; "n/a" where it is undefined."""
    if rho is None:
        return "n/a"
    return f"{rho:+.2f}"


def figure9_text(fig9: dict, cost: str = "") -> str:
    """The line figure9.py prints: the rank correlations, "n/a" where one is undefined; `cost` ends it."""
    names = {"a_bits": "selected A bits", "w_bits": "selected W bits", "a_times_w": "selected a*w"}
    parts = []
    for k, corr in fig9["spearman"].items():
        vals = ", ".join(f"{label} {rho_text(corr[key])}" for key, label in FIGURE9_SERIES)
        parts.append(f"{names[k]} with {vals}")
    return f"Figure 9: rank correlation of {'; '.join(parts)} ({fig9['layers']} layers{cost})"


def read_selection(path: str, model: nn.Module) -> dict:
    """A run's bits.json, checked against the meta-state's model: the same searched layers, each at one of its
    candidates. Every problem a BadInput."""
    try:
        with open(path) as f:
            bits = json.load(f)
        got = [(r["name"], (r["a_bits"], r["w_bits"])) for r in bits["layers"] if not r["fixed"]]
        missing = [k for k in ("arch", "candidates", "gbops") if k not in bits]
    except OSError as e:
        raise mm.BadInput(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise mm.BadInput(f"{path} is not a bits.json of metamix ({type(e).__name__}: {e})") from None
    if missing:
        raise mm.BadInput(f"{path} is not a bits.json of metamix (no {missing[0]!r})")
    layers = mm.searched_layers(model)
    for i, (mine, theirs) in enumerate(itertools.zip_longest([n for n, _ in got], [m.name for m in layers])):
        if mine != theirs:
            raise mm.BadInput(
                f"{path} does not match the meta-state's model: its searched layer {i + 1} is "
                f"{mine!r}, the model's {theirs!r}"
            )
    for (name, pair), m in zip(got, layers):
        if pair not in m.candidates:
            raise mm.BadInput(
                f"{path}: layer {name} is at A{pair[0]}/W{pair[1]}, not one of the meta-state's "
                f"candidates ({', '.join(f'A{a}/W{w}' for a, w in m.candidates)})"
            )
    return bits


def figure9_report(bits: dict, traces: Sequence[float], batches: int, probes: int, seed: int, sources: dict) -> dict:
    """figure9.json: the selection's searched rows with their traces, and the "figure9" correlations."""
    keep = ("name", "type", "macs", "fixed", "a_bits", "w_bits")
    report = {
        "arch": bits["arch"],
        "selection": bits.get("selection"),
        "gbops": bits["gbops"],
        "target_gbops": bits.get("target_gbops"),
        "candidates": bits["candidates"],
        **sources,
        "layers": [{k: r[k] for k in keep if k in r} for r in bits["layers"] if not r["fixed"]],
    }
    report["figure9"] = {**figure9_fields(report, traces, batches, probes), "seed": seed}
    return report


# ---- the plots (matplotlib, optional) -------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None without matplotlib (the plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_figure9(report: dict, path: str) -> bool:
    """figure9.png as the supplement's Figure 9: per searched layer, the selected bits (pairs: A and W),
    the Hessian trace, OPs and trace / OPs (log scale; symmetric log where a trace is not positive).
    Needs matplotlib (optional); False without it or without the figure9 fields."""
    plt = pyplot()
    if "spearman" not in report.get("figure9", {}) or plt is None:
        return False
    rows = [r for r in report["layers"] if not r["fixed"]]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(max(6, len(rows) * 0.3), 8))
    if is_pairs(report):
        axes[0].bar([i - 0.2 for i in x], [r["a_bits"] for r in rows], width=0.4, color="tab:blue", label="A")
        axes[0].bar([i + 0.2 for i in x], [r["w_bits"] for r in rows], width=0.4, color="tab:green", label="W")
        axes[0].legend(loc="upper right", fontsize=7)
    else:
        axes[0].bar(x, [r["a_bits"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("selected bits")
    corr = report["figure9"]["spearman"]["a_bits"]
    for ax, (key, label), colour in zip(axes[1:], FIGURE9_SERIES, ("tab:red", "tab:orange", "tab:purple")):
        vals = [r[key] for r in rows]
        ax.plot(x, vals, "o-", color=colour, ms=3)
        if min(vals) > 0:
            ax.set_yscale("log")
        elif any(vals):
            # linear within the smallest nonzero magnitude, log beyond it
            ax.set_yscale("symlog", linthresh=min(abs(v) for v in vals if v))
        ax.set_ylabel(label)
        ax.set_title(f"{label}: Spearman with A bits {rho_text(corr[key])}", fontsize=8)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    axes[0].set_title(
        f"{report['arch']} ({report['selection']}, {report['gbops']:.2f} GBOPs): the supplement's Figure 9", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_bits(report: dict, path: str) -> bool:
    """bits.png, paper Fig. 7 as a plot: the bits (pairs: A and W) and MOPs of every layer of a bits.json.
    Needs matplotlib (optional); False without it."""
    plt = pyplot()
    if plt is None:
        return False
    layers = report["layers"]
    x = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.25), 3.5))
    # each layer's activation and weight bits side by side
    if is_pairs(report):
        ax.bar([i - 0.2 for i in x], [r["a_bits"] for r in layers], width=0.4, color="tab:blue", label="A")
        ax.bar([i + 0.2 for i in x], [r["w_bits"] for r in layers], width=0.4, color="tab:green", label="W")
        ax.legend(loc="upper left", fontsize=7)
        ax.set_ylabel("bits (A, W)")
    else:
        ax.bar(x, [r["a_bits"] for r in layers], color="tab:blue")
        ax.set_ylabel("activation bits")
    ax2 = ax.twinx()
    ax2.plot(x, [r["macs"] / 1e6 for r in layers], "o-", color="tab:orange", ms=3)
    ax2.set_ylabel("MOPs")
    ax.set_xlabel("layer (forward order)")
    ax.set_title(f"{report['arch']}: {report['gbops']:.2f} GBOPs (target {report['target_gbops']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- the command line ---------------------------------------------------------------------


# Why a run may have no meta_state.pth of its own.
NO_META_STATE = "a run trained from another run's meta-state with --resume: give that file with --meta-state"


def run_figure9(a: argparse.Namespace) -> int:
    run_dir = os.path.normpath(a.run)
    bits_path = runs.run_file(run_dir, "bits.json")
    meta = a.meta_state
    flag = "--meta-state"
    if meta is None:
        meta = runs.run_file(run_dir, "meta_state.pth", NO_META_STATE)
        flag = "meta-state"
    # a run of one W or of (A, W) pairs
    ck = mm.load_checkpoint(meta, flag, mm.CHECKPOINT_FORMAT)
    runs.check_meta_state(ck, meta)
    args, model = runs.run_model(ck)
    bits = read_selection(bits_path, model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    batches = bl.proxy_batches(args, a.batches, args.seed, device)
    traces = mean_hessian_traces(model.to(device), batches, a.probes, args.seed)
    sources = {"bits": bits_path, "meta_state": meta}
    report = figure9_report(bits, traces.tolist(), len(batches), a.probes, args.seed, sources)
    cost = f"; traces on {len(batches)} batch(es) x {a.probes} probe(s), {time.time() - t0:.1f}s"
    line = figure9_text(report["figure9"], cost)
    out = os.path.join(run_dir, "figure9.json")
    mm.atomic_write(out, json.dumps(report, indent=1).encode())
    figure_plotted = plot_figure9(report, os.path.join(run_dir, "figure9.png"))
    bits_plotted = plot_bits(bits, os.path.join(run_dir, "bits.png"))
    pictures = ", figure9.png and bits.png"
    if not (figure_plotted and bits_plotted):
        pictures = " (figure9.png and bits.png need matplotlib, which is not installed)"
    print(f"{line}\nwrote {out}{pictures}", flush=True)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = mm.Parser(
        prog="figure9.py",
        description="The supplement's Figure 9 for a MetaMix run: Hessian trace, OPs and "
        "trace / OPs per layer against the selected bits, with Spearman's rank correlations",
    )
    add = p.add_argument
    add("run", metavar="RUN", help="a metamix.py or pairs.py run's --output-dir, holding bits.json")
    add(
        "--batches",
        metavar="N",
        type=mm.number(int, 1),
        default=4,
        help="training batches the traces average over (default: 4)",
    )
    add("--probes", metavar="K", type=mm.number(int, 1), default=4, help="Hutchinson probes per batch (default: 4)")
    add("--meta-state", metavar="FILE", help="the network the selection was made on (default: RUN/meta_state.pth)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    return mm.guarded("figure9", run_figure9, a)


if __name__ == "__main__":
    sys.exit(main())
