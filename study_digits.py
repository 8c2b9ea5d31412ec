"""Does MetaMix pick good bits? Every selection through the same pipeline, at equal BOPs, on real data.

scikit-learn's bundled handwritten digits (1797 real 8x8 scans, no download) are written out as an
ImageFolder (upscaled to 32 px, 3 channels; 300 validation images, 30 per class; trained at 16 px crops).
Following the paper's protocol, a full-precision model is trained first (plain PyTorch, below), and every
run of `metamix.py` starts from it (`--pretrained PATH`). MetaMix's variants are runs of their own; every
other selection (baselines.py: uniform, random, the Hessian and sensitivity proxies) is made from the
meta-state of the same seed's MetaMix run (SGD 0.05; in the convergence part SGD 0.005, the default from
pretrained weights) and trained from it with `metamix.py --resume
RUN/meta_state.pth --bits-from`: the same FP model, the same meta-state, the same data order, only the
selection different. The table reports each method's paired difference to `random`.

    python study_digits.py --out runs/digits --part baselines     # every selection against random, ~50 min
    python study_digits.py --out runs/digits --part pairs         # the supplement's Table 7 in miniature
    python study_digits.py --out runs/digits --part convergence   # the defaults' alpha recipes, 8 seeds, ~2 h
    python study_digits.py --out runs/digits --part convergence-lsq   # the search's variants, LSQ's quantizers, ~2 h
    python study_digits.py --out runs/digits --part quantizers    # the authors' quantizers against LSQ's own
    python study_digits.py --out runs/digits --part recipe        # the authors' training recipe against ours
    python study_digits.py --out runs/digits-quick --quick        # one seed, MetaMix against random, a few steps

Writes, in --out: data/ (the ImageFolder), fp_<arch>.pth, runs/<arch>_t<target>_<method>_s<seed>/ (each run's
output dir: bits.json, log.jsonl, selection.json for the selections, figure9.json for the pairs part;
runs_<part>/ for the convergence, quantizers and recipe parts), results.json (with each FP model's SHA-256),
table.md, alphas.md and top1_vs_gbops.png (--part baselines), table_pairs.md (--part pairs),
table_convergence.md and convergence.png (--part convergence; table_convergence_lsq.md and convergence_lsq.png
for --part convergence-lsq), table_quantizers.md (--part quantizers),
table_recipe.md (--part recipe). scikit-learn is needed (a dependency of this study only); matplotlib is
optional (the plots). Finished runs are kept: rerunning the command continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ablations  # noqa: E402
import metamix as mm  # noqa: E402  (the study uses metamix's own data pipeline and transforms)
from figure9 import pyplot  # noqa: E402  (matplotlib, optional)

# The training settings (our choice, stated in the README).
# the training crop from the 32 px files; 8x8 scans lose nothing at 16 px, and it is 4x cheaper
IMAGE_SIZE = 16
# The full-precision model: SGD, cosine, 40 epochs, crops of 35-100% of the image, no flip (a flipped
# digit is another shape); 98.7% (ResNet-18) and 97.3% (MobileNet-v2) on the validation set.
FP = dict(epochs=40, lr=0.05, batch_size=64, wd=5e-4, crop_scale=0.35)
COMMON = [
    "--image-size",
    str(IMAGE_SIZE),
    "--batch-size",
    "32",
    "--workers",
    "0",
    "--lr",
    "0.01",
    "--search-epochs",
    "2",
]
# 2 bit selection (46 steps each) + 6 weight training
EPOCHS = 8
ALPHA = {
    # metamix.py's defaults from scratch (the study passes them from pretrained weights too)
    "adam": ["--alpha-optimizer", "adam", "--alpha-lr", "0.1"],
    "sgd": ["--alpha-optimizer", "sgd", "--alpha-lr", "0.05"],
    # the authors' Adam recipe at its default from pretrained weights
    "authors": ["--alpha-optimizer", "authors", "--alpha-lr", "1e-4"],
}
# baselines.py's, from SOURCE's meta-state
SELECTIONS = ["uniform", "random", "hessian", "sensitivity"]
# the run whose meta_state.pth the selections of its (arch, target, seed) train from
SOURCE = "metamix-sgd"
ALL = ["metamix-sgd", "metamix-sgd-lr0.5", *SELECTIONS]
# the alpha LR question, on more seeds
HEAD = ["metamix-sgd", "metamix-sgd-lr0.5", "random"]
# (arch, target GBOPs, methods, seeds): ResNet-18 {8,4,2} near the all-A2 floor (21.12) and a little under
# uniform A4 (34.68); MobileNet-v2 {8,4,3} between all-A3 (4.16) and uniform A4 (5.31). 10 classes.
# Every method on seeds 0-2; MetaMix with each alpha LR and random on three more seeds (3-5).
GRID = [
    ("resnet18", 23.0, ALL, [0, 1, 2]),
    ("resnet18", 23.0, HEAD, [3, 4, 5]),
    ("resnet18", 33.0, ALL, [0, 1, 2]),
    ("resnet18", 33.0, HEAD, [3, 4, 5]),
    ("mobilenet_v2", 4.6, ALL, [0, 1, 2]),
    ("mobilenet_v2", 4.6, HEAD, [3, 4, 5]),
]
# Supplement, Table 7 in miniature: A = {8,4,2} at W4 against the 9 (A, W) pairs, at equal BOPs (30 GBOPs:
# uniform A4/W4 is 34.68, all-A2 at W4 21.12). "<method>-pairs" is <method> run by pairs.py (--w-bits 8,4,2).
# SGD at 0.05 on the alphas (metamix.py's default from scratch)
PAIR_METHOD = "metamix-sgd"
PAIR_GRID = [("resnet18", 30.0, [PAIR_METHOD, PAIR_METHOD + "-pairs"], [0, 1, 2, 3, 4, 5])]
# Does the search converge? (--part convergence-lsq: LSQ's own quantizers, the part ran before the authors' became
# the default.) MetaMix's variants against random and the Hessian proxy (from the SGD 0.05 run's meta-state) on 8
# seeds, at two budgets per arch: tight (the all-A3 floor + 5% of the feasible range) and mid-range (+25%):
# MobileNet-v2 4.45 and 5.6 GBOPs (range 4.16-9.93, uniform A4 5.31), MobileNet-v3-large 3.08 and 3.92 (range
# 2.87-7.06, uniform A4 3.71). Variants: SGD 0.05, one search epoch of 46 steps; the search 4x and 16x
# longer (--search-steps; 16x on MobileNet-v2's tight budget, seed 0, a probe: one such run costs six); SGD and Adam
# with LR x steps matched to the authors' ImageNet search (1e-4 x 5005 = 0.5: LR 0.5/46); on seeds 0-3, SGD 0.5
# (the margins left by SGD 0.05 are ~0.01: the alphas barely move). 2 bit-selection epochs + 3 of weight training (the
# other parts: 2 + 6).
CONV = ["metamix-sgd", "metamix-sgd-x4", "metamix-sgd-matched", "metamix-adam-matched", "random", "hessian"]
# how the table and the plot list them
CONV_ORDER = [
    "metamix-sgd-lr0.005-x4",
    "metamix-sgd-lr0.005",
    "metamix-sgd",
    "metamix-sgd-x4",
    "metamix-sgd-x16",
    "metamix-sgd-lr0.5",
    "metamix-sgd-matched",
    "metamix-adam-matched",
    "metamix-authors-x4",
    "hessian",
]
SEEDS8 = list(range(8))
CONV_BUDGETS = [
    ("mobilenet_v2", 4.45),
    ("mobilenet_v2", 5.6),
    ("mobilenet_v3_large", 3.08),
    ("mobilenet_v3_large", 3.92),
]
# variants on fewer seeds, at every budget
PROBES = [("metamix-sgd-lr0.5", [0, 1, 2, 3])]
CONV_GRID = (
    [(arch, t, CONV, SEEDS8) for arch, t in CONV_BUDGETS]
    + [(arch, t, [m], seeds) for m, seeds in PROBES for arch, t in CONV_BUDGETS]
    + [("mobilenet_v2", 4.45, ["metamix-sgd-x16"], [0])]
)
# The same question on the defaults a user gets (--part convergence): the authors' quantizers, at the default search
# length (180 steps: 4 passes of 46, as -x4), with each alpha recipe a user can get from pretrained weights: SGD 0.005
# (the default), SGD 0.05 and the authors' Adam (1e-4); SGD 0.005 over one epoch (the paper's length, --search-steps
# 0); random and the Hessian proxy from the 0.005 run's meta-state. The same budgets, seeds and epochs.
DEFAULT_SOURCE = "metamix-sgd-lr0.005-x4"
DEFAULT_CONV = [DEFAULT_SOURCE, "metamix-sgd-x4", "metamix-authors-x4", "metamix-sgd-lr0.005", "random", "hessian"]
DEFAULT_GRID = [(arch, t, DEFAULT_CONV, SEEDS8) for arch, t in CONV_BUDGETS]
# the authors' alpha LR x search steps on ImageNet (Adam, 1e-4 x 5005)
MATCHED = 0.5
# The quantizers: one selection (the default search's bits.json, same seed) trained from the FP model twice with
# --bits-from, once with the authors' quantizers (a weight step per output channel on -7..7, hardswish-fed inputs on
# the offset grid: metamix.py's default) and once with LSQ's own (--plain-lsq: a step per tensor on -8..7, a signed
# grid), so that only the quantizers differ; and MetaMix against random under the new quantizers. W4, a budget near
# the middle of the feasible range: MobileNet-v2 7.0 GBOPs (4.16-9.93), MobileNet-v3-large 5.0 (2.87-7.06).
QUANT = ["metamix-sgd-x4", "random", "quant-authors", "quant-plain"]
QUANT_GRID = [("mobilenet_v2", 7.0, QUANT, [0, 1, 2, 3]), ("mobilenet_v3_large", 5.0, QUANT, [0, 1, 2, 3])]
# The training recipe: one selection (the default search's bits.json, same seed) trained from the FP model with
# --bits-from five ways, so that only the recipe differs: ours (labels, W4 from epoch 3, SGD); distillation from
# the study's FP model of the same architecture (the teacher; 98-99% here); the first 2 of the 6 weight-training
# epochs with FP weights (the authors' 18 of 138, scaled up: 2 epochs are 92 steps); the authors' Adam recipe; all
# three together (the authors' recipe). The budgets of the quantizers part, 2 + 6 epochs, seeds 0-3.
RECIPE_FLAGS = {
    "recipe-ours": [],
    "recipe-kd": ["--teacher", "{teacher}"],
    "recipe-actonly": ["--act-only-epochs", "2"],
    "recipe-adam": ["--optimizer", "adam", "--lr", "5e-4"],
}
RECIPE_FLAGS["recipe-authors"] = sum(RECIPE_FLAGS.values(), [])
RECIPE = list(RECIPE_FLAGS)
RECIPE_GRID = [
    ("mobilenet_v2", 7.0, ["metamix-sgd-x4", *RECIPE], [0, 1, 2, 3]),
    ("mobilenet_v3_large", 5.0, ["metamix-sgd-x4", *RECIPE], [0, 1, 2, 3]),
]
# made from a source run's bits or meta-state
FROM_SOURCE = [*SELECTIONS, "quant-authors", "quant-plain", *RECIPE]
PART_EPOCHS = {"convergence": 5, "convergence-lsq": 5, "quantizers": 5}  # the other parts: EPOCHS
# the other parts: SOURCE
PART_SOURCE = {"convergence": DEFAULT_SOURCE, "quantizers": "metamix-sgd-x4", "recipe": "metamix-sgd-x4"}
# The parts that ran before the authors' quantizers became metamix.py's default keep LSQ's own (ablations.py's
# --plain-lsq).
PLAIN_PARTS = ("baselines", "pairs", "convergence-lsq")
PARTS = {
    "baselines": GRID,
    "pairs": PAIR_GRID,
    "convergence": DEFAULT_GRID,
    "convergence-lsq": CONV_GRID,
    "quantizers": QUANT_GRID,
    "recipe": RECIPE_GRID,
}
# the default alpha optimizer against random
QUICK_GRID = [("resnet18", 28.0, ["metamix-sgd", "random"], [0])]


def label(method: str) -> str:
    """How the table and plot name a method: which optimizer and LR the alphas had, and the search's length. The run
    folders keep the short names (metamix = Adam at 0.1, metamix.py's default when the study began)."""
    names = {
        "metamix": "metamix Adam 0.1",
        "metamix-sgd": "metamix SGD 0.05, one epoch",
        "metamix-sgd-lr0.5": "metamix SGD 0.5",
        "metamix-unfixed": "metamix-unfixed (Adam 0.1)",
        "metamix-sgd-x4": "metamix SGD 0.05, 4x longer",
        "metamix-sgd-x16": "metamix SGD 0.05, 16x longer",
        "metamix-sgd-lr0.005-x4": "metamix SGD 0.005, 4x longer (default from pretrained)",
        "metamix-sgd-lr0.005": "metamix SGD 0.005, one epoch",
        "metamix-authors-x4": "metamix the authors' Adam 1e-4, 4x longer",
        "metamix-sgd-matched": "metamix SGD, LR x steps 0.5",
        "metamix-adam-matched": "metamix Adam, LR x steps 0.5",
        "quant-authors": "the authors' quantizers (per-channel W, offset for hardswish)",
        "quant-plain": "LSQ's own quantizers (per-tensor W, signed grid)",
        "recipe-ours": "ours (labels, W4 from epoch 3, SGD)",
        "recipe-kd": "distillation (teacher: the FP model)",
        "recipe-actonly": "2 act-only epochs first",
        "recipe-adam": "the authors' Adam recipe",
        "recipe-authors": "the authors' recipe (all three)",
    }
    base = method.removesuffix("-pairs")
    return names.get(base, base) + (", 9 (A, W) pairs" if method.endswith("-pairs") else "")


def method_flags(method: str, epoch_steps: int = 46) -> list[str]:
    """The flags (metamix.py's; --unfixed: ablations.py's) of a MetaMix variant (the selections take SOURCE's):
    metamix[-sgd|-authors][-lrLR|-matched][-xK][-unfixed][-pairs]; without -sgd or -authors the alphas have Adam
    at 0.1; -authors: the authors' Adam at 1e-4; -xK searches K epochs' steps (--search-steps); -matched: alpha
    LR = MATCHED / search steps. epoch_steps: the search steps of one epoch (46 on the digits)."""
    # the same method over the product set A x W (one softmax over 9 pairs)
    if method.endswith("-pairs"):
        return [*method_flags(method[: -len("-pairs")], epoch_steps), "--w-bits", "8,4,2"]
    words = method.split("-")[1:]
    opt = next((w for w in words if w in ("sgd", "authors")), "adam")
    mult = next((int(w[1:]) for w in words if w[:1] == "x" and w[1:].isdigit()), 1)
    lr = next((w[2:] for w in words if w.startswith("lr")), ALPHA[opt][-1])
    if "matched" in words:
        lr = f"{MATCHED / (mult * epoch_steps):.6g}"
    return (
        ["--alpha-optimizer", opt, "--alpha-lr", lr]
        + (["--unfixed"] if "unfixed" in words else [])
        + ["--search-steps", str(mult * epoch_steps if mult > 1 else 0)]
    )


# The flags of ablations.py that metamix.py lacks (--plain-lsq, --unfixed, ...).
ABLATION_FLAGS = {s for a in ablations.get_args_parser()._actions for s in a.option_strings} - {
    s for a in mm.get_args_parser()._actions for s in a.option_strings
}


def command_line(cmd: list[str]) -> list[str]:
    """The command line of cmd ([script, *flags]) in this interpreter; with a flag of ABLATION_FLAGS, metamix.py's
    run by ablations.py (pairs.py takes them itself)."""
    script, flags = cmd[0], cmd[1:]
    if ABLATION_FLAGS.intersection(flags) and script == "metamix.py":
        return [sys.executable, str(HERE / "ablations.py"), *flags]
    return [sys.executable, str(HERE / script), *flags]


# ---- data ----------------------------------------------------------------------------------


def write_digits(root: Path, size: int = 32, n_val_per_class: int = 30, n_train_per_class: int | None = None) -> None:
    """digits -> root/{train,val}/<digit>/<i>.png, 8x8 upscaled to size x size (bilinear), grey to RGB.
    Validation: the first n_val_per_class images of each class in a fixed shuffle (seed 0); training:
    the rest (or the next n_train_per_class)."""
    if (root / "done").exists():
        return
    from PIL import Image

    # the study's optional dependency
    from sklearn.datasets import load_digits

    d = load_digits()
    order = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0)).tolist()
    seen = {k: 0 for k in range(10)}
    shutil.rmtree(root, ignore_errors=True)
    for i in order:
        k = int(d.target[i])
        split = "val" if seen[k] < n_val_per_class else "train"
        seen[k] += 1
        if n_train_per_class and seen[k] > n_val_per_class + n_train_per_class:
            continue
        img = Image.fromarray((d.images[i] * (255 / 16)).round().astype("uint8"), "L")
        path = root / split / str(k)
        path.mkdir(parents=True, exist_ok=True)
        img.resize((size, size), Image.BILINEAR).convert("RGB").save(path / f"{i}.png")
    (root / "done").write_text("ok")


def datasets(data: Path):
    args = argparse.Namespace(data=str(data), image_size=IMAGE_SIZE)
    # metamix's transforms: RandomResizedCrop + flip; resize + centre crop
    return mm.build_datasets(args)


# ---- the full-precision model (plain PyTorch) ------------------------------------------------------


def train_fp(arch: str, data: Path, path: Path, epochs: int, log) -> float:
    """SGD (momentum 0.9, cosine), milder crops than metamix's ImageNet ones; returns top-1 on the validation
    set, with metamix's validation transform."""
    import torchvision
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    _, val_set, classes = datasets(data)
    train_set = ImageFolder(
        str(data / "train"),
        T.Compose(
            [
                T.RandomResizedCrop(IMAGE_SIZE, scale=(FP["crop_scale"], 1.0)),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        ),
    )  # metamix's normalisation
    if path.exists():
        model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
        model.load_state_dict(torch.load(path, weights_only=True))
        return evaluate_fp(model, val_set)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    loader = torch.utils.data.DataLoader(train_set, FP["batch_size"], shuffle=True, drop_last=True)
    # weight decay on every parameter: sparing BN and biases left MobileNet-v2 at 43% here (97% with it)
    opt = torch.optim.SGD(model.parameters(), lr=FP["lr"], momentum=0.9, weight_decay=FP["wd"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    top1 = evaluate_fp(model, val_set)
    log(f"FP {arch}: {epochs} epochs, top-1 {top1:.2f}% ({time.time() - t0:.0f}s)")
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return top1


@torch.no_grad()
def evaluate_fp(model, val_set) -> float:
    model.eval()
    hits = n = 0
    for x, y in torch.utils.data.DataLoader(val_set, 100):
        hits += (model(x).argmax(1) == y).sum().item()
        n += len(y)
    return 100 * hits / n


# ---- the runs ------------------------------------------------------------------------------


def run_one(job: dict, log) -> dict:
    """One run: a MetaMix variant (metamix.py, or pairs.py for "-pairs"; command_line: ablations.py for its
    settings), or a selection of baselines.py made from the meta-state of SOURCE's run and trained from it
    (metamix.py --resume meta_state.pth --bits-from)."""
    out = Path(job["out"])
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    script = "pairs.py" if job["method"].endswith("-pairs") else "metamix.py"
    flags = [
        "--arch",
        job["arch"],
        "--data",
        job["data"],
        "--pretrained",
        job["init"],
        "--target-gbops",
        str(job["target"]),
        "--seed",
        str(job["seed"]),
        "--epochs",
        str(job["epochs"]),
        *COMMON,
    ]
    # the parts run before the authors' quantizers became the default keep LSQ's own
    if job["part"] in PLAIN_PARTS:
        flags.append("--plain-lsq")
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    cmds = [[script, *flags, *method_flags(job["method"], job["epoch_steps"]), "--output-dir", str(out)]]
    # the source's bits, trained from the FP model
    if job["method"] in ("quant-authors", "quant-plain", *RECIPE):
        recipe = [f.format(teacher=f"{job['arch']}:{job['init']}") for f in RECIPE_FLAGS.get(job["method"], [])]
        if job["method"] == "quant-plain":
            recipe.append("--plain-lsq")
        cmds = [
            [
                "metamix.py",
                *flags,
                *method_flags(job["source_method"], job["epoch_steps"]),
                "--bits-from",
                str(Path(job["source"]) / "bits.json"),
                *recipe,
                "--output-dir",
                str(out),
            ]
        ]
    elif job["method"] in SELECTIONS:
        src = Path(job["source"])
        out.mkdir(parents=True)
        cmds = [
            [
                "baselines.py",
                str(src),
                "--method",
                job["method"],
                "--target-gbops",
                str(job["target"]),
                "--seed",
                str(job["seed"]),
                "--batches",
                "4",
                "--probes",
                "4",
                "--out",
                str(out / "selection.json"),
            ],
            [
                "metamix.py",
                *flags,
                *method_flags(job["source_method"], job["epoch_steps"]),
                "--resume",
                str(src / "meta_state.pth"),
                "--bits-from",
                str(out / "selection.json"),
                "--output-dir",
                str(out),
            ],
        ]
    # the supplement's Figure 9 for each run, on its meta-state
    if job["part"] == "pairs":
        cmds.append(["figure9.py", str(out), "--batches", "4", "--probes", "4"])
    t0 = time.time()
    for cmd in cmds:
        p = subprocess.run(command_line(cmd), capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    bits = json.loads((out / "bits.json").read_text())
    fig9 = json.loads((out / "figure9.json").read_text()) if (out / "figure9.json").exists() else {}
    searched = [r for r in bits["layers"] if not r["fixed"]]
    res = {k: job[k] for k in ("arch", "target", "method", "seed")} | {"dir": str(out)}
    res.update(
        top1=logs[-1]["top1"],
        top1_after_selection=logs[job["search_epochs"] - 1]["top1"],
        gbops=bits["gbops"],
        avg_bits=sum(r["a_bits"] for r in searched) / len(searched),
        avg_bits_weighted=bits.get("avg_a_bits_weighted"),
        a_signed=[r["signed"] for r in searched],
        avg_bits_mac=sum(r["a_bits"] * r["macs"] for r in searched) / sum(r["macs"] for r in searched),
        a_bits=[r["a_bits"] for r in searched],
        macs=[r["macs"] for r in searched],
        w_bits=[r["w_bits"] for r in searched],
        search=bits.get("search"),
        avg_w_bits=sum(r["w_bits"] for r in searched) / len(searched),
        figure9=fig9.get("figure9"),
        seconds=round(time.time() - t0, 1),
    )
    (out / "result.json").write_text(json.dumps(res))
    log(
        f"{out.name}: top-1 {res['top1']:.2f}% at {res['gbops']:.3f} GBOPs, avg bits {res['avg_bits']:.2f} "
        f"({res['seconds']:.0f}s)"
    )
    return res


# ---- the table and the plots ---------------------------------------------------------------


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):+.2f} ± {sd:.2f}"


def table(results: list[dict], fp: dict) -> str:
    rows = [
        "| arch | target GBOPs | method | n | top-1 % (mean ± sd) | paired Δ vs random (points) | "
        "Δ per seed | GBOPs | avg A bits (plain / MAC-weighted) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["arch"], r["target"]) for r in results}, key=lambda k: (k[0] != "resnet18", k))
    for arch, target in keys:
        here = [r for r in results if (r["arch"], r["target"]) == (arch, target)]
        rand = {r["seed"]: r["top1"] for r in here if r["method"] == "random"}
        for method in [m for m in ALL if any(r["method"] == m for r in here)]:
            rs = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            top = [r["top1"] for r in rs]
            d = [r["top1"] - rand[r["seed"]] for r in rs if r["seed"] in rand]
            sd = statistics.stdev(top) if len(top) > 1 else 0.0
            rows.append(
                f"| {arch} (FP {fp[arch]:.2f}) | {target:g} | {label(method)} | {len(rs)} | "
                f"{statistics.mean(top):.2f} ± {sd:.2f} | "
                f"{'-' if method == 'random' else mean_sd(d)} | "
                f"{'-' if method == 'random' else ' '.join(f'{v:+.2f}' for v in d)} | "
                f"{statistics.mean(r['gbops'] for r in rs):.2f} | "
                f"{statistics.mean(r['avg_bits'] for r in rs):.2f} / "
                f"{statistics.mean(r['avg_bits_mac'] for r in rs):.2f} |"
            )
    return "\n".join(rows) + "\n"


def table_pairs(results: list[dict], fp: dict) -> str:
    """Supplement, Table 7 in miniature: each "-pairs" method against its activation-only (W4) self, paired
    per seed, with the average A and W bits (figure9_summary gives the runs' Figure 9 correlations)."""
    rows = [
        "| arch | target GBOPs | method | n | top-1 % (mean ± sd) | paired Δ vs W4 (points) | Δ per seed | "
        "GBOPs | avg A bits | avg W bits (MAC-weighted) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["arch"], r["target"]) for r in results})
    for arch, target in keys:
        here = [r for r in results if (r["arch"], r["target"]) == (arch, target)]
        for method in sorted({r["method"] for r in here}, key=lambda m: (m.endswith("-pairs"), m)):
            rs = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            ref = {r["seed"]: r["top1"] for r in here if r["method"] == method.removesuffix("-pairs")}
            top = [r["top1"] for r in rs]
            d = [r["top1"] - ref[r["seed"]] for r in rs if r["seed"] in ref] if method.endswith("-pairs") else []
            w_mac = [sum(w * m for w, m in zip(r["w_bits"], r["macs"])) / sum(r["macs"]) for r in rs]
            sd = statistics.stdev(top) if len(top) > 1 else 0.0
            rows.append(
                f"| {arch} (FP {fp[arch]:.2f}) | {target:g} | {label(method)} | {len(rs)} | "
                f"{statistics.mean(top):.2f} ± {sd:.2f} | {mean_sd(d) if d else '-'} | "
                f"{' '.join(f'{v:+.2f}' for v in d) if d else '-'} | "
                f"{statistics.mean(r['gbops'] for r in rs):.2f} | "
                f"{statistics.mean(r['avg_bits'] for r in rs):.2f} | "
                f"{statistics.mean(r['avg_w_bits'] for r in rs):.2f} ({statistics.mean(w_mac):.2f}) |"
            )
    return "\n".join(rows) + "\n"


def figure9_summary(results: list[dict]) -> str:
    """The supplement's Figure 9 over the runs that carry bits.json's "figure9": per method and selected series,
    Spearman's rank correlation with the Hessian trace, the OPs and the trace per OP (mean ± sd over seeds)."""
    rows = [
        "| method | selected | n | ρ with Hessian trace | ρ with OPs | ρ with trace / OPs |",
        "|---|---|---|---|---|---|",
    ]
    for method in sorted({r["method"] for r in results}, key=lambda m: (m.endswith("-pairs"), m)):
        rs = [r for r in results if r["method"] == method and (r.get("figure9") or {}).get("spearman")]
        for sel in ("a_bits", "w_bits", "a_times_w"):
            corr = [r["figure9"]["spearman"][sel] for r in rs if sel in r["figure9"]["spearman"]]
            if not corr:
                continue
            cells = []
            for key in ("hessian_trace", "macs", "trace_per_op"):
                vals = [c[key] for c in corr if c[key] is not None]
                cells.append(mean_sd(vals) if vals else "n/a")
            rows.append(f"| {label(method)} | {sel.replace('_times_', '*')} | {len(corr)} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def alpha_summary(out: Path, results: list[dict]) -> str:
    """Per searching run, how its search ended (bits.json): p(largest candidate) across layers (min / median / max,
    and how many layers lie within 0.02 of the median), the median top-2 margin of softmax(alpha), the last
    step at which the argmax changed, and the argmax configuration's GBOPs against the target."""
    rows = [
        "| arch | target | method | seed | p(A_max) min / median / max | layers within 0.02 of the median | "
        "median top-2 margin | argmax last changed at step | argmax GBOPs vs target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # a selection's bits.json: its meta-state's search
        if not r.get("search") or r["method"] in SELECTIONS:
            continue
        bits = json.loads((Path(r["dir"]) / "bits.json").read_text())
        top = max(range(len(bits["candidates"])), key=lambda i: bits["candidates"][i][0] * bits["candidates"][i][1])
        p_top = sorted(layer["probs"][top] for layer in bits["layers"] if not layer["fixed"])
        med, c = statistics.median(p_top), r["search"]
        rows.append(
            f"| {r['arch']} | {r['target']:g} | {r['method']} | {r['seed']} | {p_top[0]:.2f} / {med:.2f} / "
            f"{p_top[-1]:.2f} | {sum(abs(p - med) <= 0.02 for p in p_top)} of {len(p_top)} | "
            f"{c['median_margin']:.3f} | {c['argmax_last_changed']} of {c['steps']} | "
            f"{c['vs_target']:+.1%} |"
        )
    return "\n".join(rows) + "\n"


def table_convergence(results: list[dict], fp: dict, fp_hash: dict) -> str:
    """Each variant paired per seed with random and with the Hessian proxy (both from the default's meta-state):
    mean ± sd of the difference, the seeds it wins / ties / loses against random, and how its searches ended."""
    rows = [
        "| arch | target GBOPs | method | n | top-1 % (mean ± sd) | Δ vs random (points) | wins / ties / losses "
        "vs random | Δ vs hessian (points) | GBOPs | searches settled | median top-2 margin | argmax last changed "
        "(median step / steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["random", *CONV_ORDER]
    for arch, target in sorted({(r["arch"], r["target"]) for r in results}):
        here = [r for r in results if (r["arch"], r["target"]) == (arch, target)]
        ref = {m: {r["seed"]: r["top1"] for r in here if r["method"] == m} for m in ("random", "hessian")}
        for method in sorted({r["method"] for r in here}, key=lambda m: order.index(m) if m in order else 99):
            rs = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            top = [r["top1"] for r in rs]
            d = {m: [r["top1"] - ref[m][r["seed"]] for r in rs if r["seed"] in ref[m]] for m in ref}
            dr = d["random"]
            wins = (
                "-"
                if method == "random"
                else f"{sum(v > 0 for v in dr)} / {sum(v == 0 for v in dr)} / {sum(v < 0 for v in dr)}"
            )
            se = [r["search"] for r in rs if r.get("search") and method not in SELECTIONS]  # theirs: the source's
            conv = (
                (
                    f"{sum(c['settled'] for c in se)} of {len(se)} | "
                    f"{statistics.median(c['median_margin'] for c in se):.3f} | "
                    f"{statistics.median(c['argmax_last_changed'] for c in se):g} / {se[0]['steps']}"
                )
                if se
                else "- | - | -"
            )
            sd = statistics.stdev(top) if len(top) > 1 else 0.0
            rows.append(
                f"| {arch} (FP {fp[arch]:.2f}, {fp_hash.get(arch, '?')}) | {target:g} | {label(method)} | "
                f"{len(rs)} | {statistics.mean(top):.2f} ± {sd:.2f} | "
                f"{'-' if method == 'random' else mean_sd(d['random'])} | {wins} | "
                f"{'-' if method == 'hessian' else mean_sd(d['hessian'])} | "
                f"{statistics.mean(r['gbops'] for r in rs):.3f} | {conv} |"
            )
    return "\n".join(rows) + "\n"


def table_quantizers(results: list[dict], fp: dict, fp_hash: dict) -> str:
    """The same bits trained with the authors' quantizers and with LSQ's own, paired per seed; MetaMix (the default
    search) against random under the authors' quantizers, paired per seed."""
    rows = [
        "| arch | target GBOPs | method | n | top-1 % (mean ± sd) | paired Δ (points) | Δ per seed | GBOPs | "
        "avg A bits (plain / weighted by input size) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pair = {"quant-authors": "quant-plain", "metamix-sgd-x4": "random"}  # each method's reference
    for arch, target in sorted({(r["arch"], r["target"]) for r in results}):
        here = [r for r in results if (r["arch"], r["target"]) == (arch, target)]
        for method in [
            m
            for m in ("quant-plain", "quant-authors", "random", "metamix-sgd-x4")
            if any(r["method"] == m for r in here)
        ]:
            rs = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            ref = {r["seed"]: r["top1"] for r in here if r["method"] == pair.get(method)}
            top, d = [r["top1"] for r in rs], [r["top1"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
            sd = statistics.stdev(top) if len(top) > 1 else 0.0
            vs = f"{mean_sd(d)} vs {label(pair[method])}" if d else "-"
            rows.append(
                f"| {arch} (FP {fp[arch]:.2f}, {fp_hash.get(arch, '?')}) | {target:g} | {label(method)} | "
                f"{len(rs)} | {statistics.mean(top):.2f} ± {sd:.2f} | {vs} | "
                f"{' '.join(f'{v:+.2f}' for v in d) if d else '-'} | "
                f"{statistics.mean(r['gbops'] for r in rs):.3f} | "
                f"{statistics.mean(r['avg_bits'] for r in rs):.2f} / "
                f"{statistics.mean(r['avg_bits_weighted'] for r in rs):.2f} |"
            )
    return "\n".join(rows) + "\n"


def table_recipe(results: list[dict], fp: dict, fp_hash: dict) -> str:
    """The same bits trained with each recipe, paired per seed with ours."""
    rows = [
        "| arch | target GBOPs | recipe | n | top-1 % (mean ± sd) | paired Δ vs ours (points) | Δ per seed | "
        "wins / ties / losses | GBOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, target in sorted({(r["arch"], r["target"]) for r in results}):
        here = [r for r in results if (r["arch"], r["target"]) == (arch, target)]
        ours = {r["seed"]: r["top1"] for r in here if r["method"] == "recipe-ours"}
        for method in [m for m in RECIPE if any(r["method"] == m for r in here)]:
            rs = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            top = [r["top1"] for r in rs]
            d = [r["top1"] - ours[r["seed"]] for r in rs if r["seed"] in ours] if method != "recipe-ours" else []
            sd = statistics.stdev(top) if len(top) > 1 else 0.0
            wtl = f"{sum(v > 0 for v in d)} / {sum(v == 0 for v in d)} / {sum(v < 0 for v in d)}" if d else "-"
            rows.append(
                f"| {arch} (FP {fp[arch]:.2f}, {fp_hash.get(arch, '?')}) | {target:g} | {label(method)} | "
                f"{len(rs)} | {statistics.mean(top):.2f} ± {sd:.2f} | {mean_sd(d)} | "
                f"{' '.join(f'{v:+.2f}' for v in d) if d else '-'} | {wtl} | "
                f"{statistics.mean(r['gbops'] for r in rs):.3f} |"
            )
    return "\n".join(rows) + "\n"


def plot_convergence(results: list[dict], path: Path) -> bool:
    """One panel per (arch, budget): each variant's paired difference to random, a point per seed, the mean a bar."""
    plt = pyplot()
    if plt is None:
        return False
    keys = sorted({(r["arch"], r["target"]) for r in results})
    order = CONV_ORDER
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.6), squeeze=False, sharey=True)
    for ax, (arch, target) in zip(axes[0], keys):
        here = [r for r in results if (r["arch"], r["target"]) == (arch, target)]
        rand = {r["seed"]: r["top1"] for r in here if r["method"] == "random"}
        methods = [m for m in order if any(r["method"] == m for r in here)]
        for x, m in enumerate(methods):
            d = [r["top1"] - rand[r["seed"]] for r in here if r["method"] == m and r["seed"] in rand]
            ax.scatter([x + 0.06 * (i - len(d) / 2) for i in range(len(d))], d, s=14, alpha=0.7)
            if d:
                ax.hlines(statistics.mean(d), x - 0.3, x + 0.3, color="black", lw=1.5)
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xticks(
            range(len(methods)),
            [label(m).replace("metamix ", "") for m in methods],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        ax.set_title(f"{arch} at {target:g} GBOPs", fontsize=9)
    axes[0][0].set_ylabel("top-1 minus random's, same seed (points)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(results: list[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    archs = sorted({r["arch"] for r in results}, key=lambda a: a != "resnet18")
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    marks = dict(zip(ALL, "o^vsDx"))
    for ax, arch in zip(axes[0], archs):
        for method in ALL:
            rs = [r for r in results if r["arch"] == arch and r["method"] == method]
            if rs:
                ax.scatter(
                    [r["gbops"] for r in rs],
                    [r["top1"] for r in rs],
                    marker=marks[method],
                    label=label(method),
                    alpha=0.75,
                )
        for t in sorted({r["target"] for r in results if r["arch"] == arch}):
            ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{arch} on digits (each point one seed)")
        ax.set_xlabel("GBOPs (at 224 px; dotted: targets)")
        ax.set_ylabel("top-1 %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/digits", help="output folder (kept between invocations)")
    p.add_argument("--quick", action="store_true", help="one seed, two methods, a few steps (CI)")
    p.add_argument("--jobs", type=int, default=2, help="metamix.py runs at a time (1 thread each)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every entry (default: the grid's own)")
    p.add_argument(
        "--part",
        choices=["all", *PARTS],
        default="all",
        help="baselines: every selection against "
        "random; pairs: the supplement's Table 7 in miniature; convergence: the defaults' alpha recipes against "
        "random and the Hessian proxy, 8 seeds; convergence-lsq: the search's variants under LSQ's quantizers; "
        "quantizers: the authors' against LSQ's own, the same bits; recipe: the authors' training recipe "
        "against ours, the same bits",
    )
    p.add_argument("--only", default=None, help="run only these archs (comma-separated), e.g. resnet18")
    a = p.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("study_digits: error: scikit-learn is needed for the digits (pip install scikit-learn)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    data = out / "data"
    write_digits(data, **(dict(n_val_per_class=10, n_train_per_class=20) if a.quick else {}))
    if a.quick:
        parts = {"baselines": QUICK_GRID}
    elif a.part == "all":
        parts = PARTS
    else:
        parts = {a.part: PARTS[a.part]}
    grid = [(part, *g) for part, entries in parts.items() for g in entries]
    # the same seeds for every entry of the grid
    if a.seeds:
        grid = [(part, arch, t, methods, [int(s) for s in a.seeds.split(",")]) for part, arch, t, methods, _ in grid]
    if a.only:
        grid = [g for g in grid if g[1] in a.only.split(",")]
    fp_epochs = 1 if a.quick else FP["epochs"]
    # on a shared machine, 2 OpenMP threads that wait for each other are slower
    torch.set_num_threads(1)
    archs = dict.fromkeys(g[1] for g in grid)
    fp = {arch: train_fp(arch, data, out / f"fp_{arch}.pth", fp_epochs, log) for arch in archs}
    for arch, top1 in fp.items():
        log(f"FP {arch}: top-1 {top1:.2f}% on {sum(1 for _ in (data / 'val').rglob('*.png'))} validation images")
    fp_hash = {arch: hashlib.sha256((out / f"fp_{arch}.pth").read_bytes()).hexdigest()[:12] for arch in archs}
    # one epoch's steps at batch 32 (46)
    epoch_steps = sum(1 for _ in (data / "train").rglob("*.png")) // 32

    def folder(part, arch, t, m, s):
        runs = f"runs_{part}" if part in ("convergence", "convergence-lsq", "quantizers", "recipe") else "runs"
        return str(out / runs / f"{arch}_t{t:g}_{m}_s{s}")

    jobs = [
        dict(
            arch=arch,
            target=t,
            method=m,
            seed=s,
            data=str(data),
            init=str(out / f"fp_{arch}.pth"),
            epochs=3 if a.quick else PART_EPOCHS.get(part, EPOCHS),
            search_epochs=2,
            threads=1,
            part=part,
            out=folder(part, arch, t, m, s),
            source=folder(part, arch, t, PART_SOURCE.get(part, SOURCE), s),
            source_method=PART_SOURCE.get(part, SOURCE),
            epoch_steps=epoch_steps,
        )
        for part, arch, t, methods, seeds in grid
        for s in seeds
        for m in methods
    ]
    missing = {j["source"] for j in jobs if j["method"] in FROM_SOURCE} - {j["out"] for j in jobs}
    if missing:
        raise SystemExit(f"study_digits: error: the grid selects from runs it does not make: {sorted(missing)[0]}")
    # The long searches (16x) last; before them, seed by seed (finished seeds can be tabled while later ones run),
    # each seed's searches before the selections made from their meta-states (a selection waits for its source,
    # which is queued before it).
    order = sorted(jobs, key=lambda j: ("-x16" in j["method"], j["seed"], j["method"] in FROM_SOURCE))
    finished = {j["out"]: threading.Event() for j in jobs}

    def work(job):
        if job["method"] in FROM_SOURCE:
            finished[job["source"]].wait()
        try:
            return run_one(job, log)
        finally:
            finished[job["out"]].set()

    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        done_runs = dict(zip([j["out"] for j in order], ex.map(work, order)))
    results = [done_runs[j["out"]] for j in jobs]
    done = {part: [r for r, j in zip(results, jobs) if j["part"] == part] for part in parts}
    keys = {
        "baselines": "runs",
        "pairs": "pairs",
        "convergence": "convergence",
        "convergence-lsq": "convergence_lsq",
        "quantizers": "quantizers",
        "recipe": "recipe",
    }
    saved = {"fp_top1": {}}
    # keep the other parts' runs in results.json
    if (out / "results.json").exists() and not a.quick:
        saved = json.loads((out / "results.json").read_text())
    saved["fp_top1"] = {**saved.get("fp_top1", {}), **fp}
    # which FP model every run started from
    saved["fp_sha256"] = {**saved.get("fp_sha256", {}), **fp_hash}
    saved.update({keys[part]: rs for part, rs in done.items()})
    fp = saved["fp_top1"]
    (out / "results.json").write_text(json.dumps(saved, indent=1))
    if done.get("baselines"):
        results = done["baselines"]
        (out / "table.md").write_text(table(results, fp))
        (out / "alphas.md").write_text(alpha_summary(out, results))
        print(table(results, fp))
        if plot(results, out / "top1_vs_gbops.png"):
            log(f"wrote {out / 'top1_vs_gbops.png'}")
    if done.get("pairs"):
        pairs = done["pairs"]
        (out / "table_pairs.md").write_text(table_pairs(pairs, fp) + "\n" + figure9_summary(pairs))
        print(table_pairs(pairs, fp) + "\n" + figure9_summary(pairs))
    for part in ("convergence", "convergence-lsq"):
        if not done.get(part):
            continue
        name = keys[part]
        conv = done[part]
        (out / f"table_{name}.md").write_text(
            table_convergence(conv, fp, saved["fp_sha256"]) + "\n" + alpha_summary(out, conv)
        )
        print(table_convergence(conv, fp, saved["fp_sha256"]))
        if plot_convergence(conv, out / f"{name}.png"):
            log(f"wrote {out / f'{name}.png'}")
    if done.get("quantizers"):
        (out / "table_quantizers.md").write_text(table_quantizers(done["quantizers"], fp, saved["fp_sha256"]))
        print(table_quantizers(done["quantizers"], fp, saved["fp_sha256"]))
    if done.get("recipe"):
        (out / "table_recipe.md").write_text(table_recipe(done["recipe"], fp, saved["fp_sha256"]))
        print(table_recipe(done["recipe"], fp, saved["fp_sha256"]))
    log(f"study done in {time.time() - t0:.0f}s: {len(jobs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
