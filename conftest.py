"""What every test file shares: the real scripts run in subprocesses on tiny synthetic data, and one tiny
reference run (made once per test run) whose files the tests of metamix.py and of the tools beside it read;
the helpers that run, stop and compare runs; and the independent references the tier-1 tests check against
(LSQ element by element, PyTorch's FLOP counter, the hardswish-fed layers read from the torch.fx graph).

Every run is tiny: resnet18 at 32 px, 64 synthetic training images, batch 16 (4 steps per epoch).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import metamix as mm
import runs

REPO = Path(__file__).resolve().parent
# metamix.py itself, for the tests that copy or run the file
METAMIX = REPO / "metamix.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "METAMIX_DEBUG"):
    ENV.pop(_key, None)
TINY = [
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--search-steps",
    "0",
    "--data",
    "synthetic:64,32,10",
    "--batch-size",
    "16",
    "--search-epochs",
    "2",
]
# the reference run: 2 epochs of bit selection, 2 of weight training
REF = TINY + ["--epochs", "4"]
# what a log.jsonl row holds
METRICS = ("loss", "val_loss", "top1", "top5", "gbops", "lr", "phase", "epoch")
# as the subprocesses (OMP_NUM_THREADS=1): in-process runs then equal theirs, bit for bit
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    # one-line errors, not tracebacks, in this process too
    monkeypatch.delenv("METAMIX_DEBUG", raising=False)


# ---- running the scripts: in this process, in a subprocess, under torchrun ---------------------------------


def metamix_main(argv: list[str]) -> int:
    """metamix.py's main on argv, taken as the tools' main functions take it (pairs.main)."""
    return mm.main(mm.get_args_parser().parse_args(argv))


class Stopped(BaseException):
    """The end of a run that stop_after() cut short, right after an epoch's checkpoint (a BaseException: main
    lets it through, as it would a kill)."""


@contextlib.contextmanager
def stop_after(epoch: int | None):
    """Runs in this process end right after epoch `epoch`'s files are written (unless it is the last), as a kill
    between two epochs ends them: what a resumed run has is what the checkpoint holds. None: no stop."""
    save = mm.Run.save

    def save_then_stop(run):
        save(run)
        if run.epoch == epoch and run.epoch < run.args.epochs:
            raise Stopped(f"after epoch {epoch}")

    mm.Run.save = save_then_stop
    try:
        yield
    except Stopped:
        pass
    finally:
        mm.Run.save = save


def main_in_process(*argv, main=metamix_main, stop_after_epoch: int | None = None) -> int:
    """A script's main (metamix.py's unless given, e.g. pairs.main) on argv in this process (no interpreter
    start-up): its exit status (argparse's too), 0 for a run cut short by `stop_after_epoch` (stop_after); the signal
    handlers it installs are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    rc = 0
    try:
        with stop_after(stop_after_epoch):
            rc = main([str(a) for a in argv])
    # argparse's own errors
    except SystemExit as e:
        rc = e.code
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return rc


@pytest.fixture
def call(capsys):
    """call(main, *argv): a tool's main() in this process, as a CompletedProcess (for error_line)."""

    def run(main, *argv) -> subprocess.CompletedProcess:
        try:
            rc = main([str(a) for a in argv])
        # argparse
        except SystemExit as e:
            rc = e.code
        return subprocess.CompletedProcess(argv, rc, *capsys.readouterr())

    return run


def run_cli(
    *args, script: str = "metamix.py", check: bool = True, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository; with check, fail on a non-zero exit."""
    p = subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(map(str, args))} exited {p.returncode}\n"
            f"--- stdout (tail)\n{p.stdout[-3000:]}\n--- stderr (tail)\n{p.stderr[-3000:]}"
        )
    return p


def popen_cli(*args, cwd=REPO) -> subprocess.Popen:
    """`python metamix.py ARGS` started in its own process group (kill_group ends it and its children)."""
    return popen_group([sys.executable, "metamix.py", *map(str, args)], cwd=cwd)


def popen_group(cmd: list[str], cwd=REPO) -> subprocess.Popen:
    """The command line cmd started in its own process group, its output piped (kill_group ends it and its
    children)."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def torchrun_cmd(*args, nproc: int = 2) -> list[str]:
    """The torchrun command line of metamix.py ARGS on one node, with a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        "metamix.py",
        *map(str, args),
    ]


def wait_for(cond, proc: subprocess.Popen | None, timeout: float, what: str, poll: float = 0.05):
    """cond()'s first true value within timeout seconds; fail if proc exits first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited {proc.returncode} before {what}\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the process group of a popen_group process that still runs, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # the parent's pid: the second field after the command name, which may hold spaces and parentheses
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(d))
    out = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    """A process's command line ("" once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


# ---- the one-line error contract -----------------------------------------------------------------------------


def error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    """The one-line contract: non-zero exit, exactly one non-blank stderr line, no traceback."""
    assert p.returncode != 0, f"expected a failure, got exit 0\nstdout:\n{p.stdout[-2000:]}"
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{p.stderr[-4000:]}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in the error line: {lines[0]!r}"
    return lines[0]


def error_in_process(capsys, *argv) -> str:
    """The one-line contract of metamix.py's main in this process: exit 2, one stderr line, no traceback; returns
    the line."""
    capsys.readouterr()
    code = main_in_process(*argv)
    out, err = capsys.readouterr()
    line = error_line(subprocess.CompletedProcess(argv, code, out, err))
    assert code == 2, (code, err)
    return line


# ---- a run's files ----------------------------------------------------------------------------------------------


def load_ck(path: Path) -> dict:
    """A checkpoint's dict, on the CPU, loaded as the scripts load it (weights only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(d: Path) -> list[dict]:
    """A run's log.jsonl, a dict per row."""
    text = (Path(d) / "log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of the run folder src at dst (without its lock): dst."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def fingerprint(d: Path) -> dict:
    """name -> (bytes, mtime_ns) of every file in d but the lock."""
    files = [f for f in sorted(Path(d).iterdir()) if f.is_file() and f.name != ".lock"]
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def files_of(d: Path) -> dict:
    """name -> (size, mtime_ns) of everything in d, links as links."""
    listing = {}
    for f in sorted(d.rglob("*")):
        info = f.lstat()
        listing[str(f.relative_to(d))] = (info.st_size, info.st_mtime_ns)
    return listing


def assert_same_model(a: Path, b: Path) -> None:
    """Two checkpoints hold the same model, tensor for tensor (and the same extra states)."""
    ma = load_ck(a)["model"]
    mb = load_ck(b)["model"]
    assert ma.keys() == mb.keys()
    diff = []
    for k in ma:
        same = torch.equal(ma[k], mb[k]) if torch.is_tensor(ma[k]) else ma[k] == mb[k]
        if not same:
            diff.append(k)
    assert not diff, f"{len(diff)} model tensors differ, e.g. {diff[:5]}"


def assert_same_run(a: Path, b: Path) -> None:
    """Two output dirs hold the same result: model tensors, per-epoch metrics, selected bits."""
    assert_same_model(a / "checkpoint.pth", b / "checkpoint.pth")
    metrics_a = [{k: r[k] for k in METRICS} for r in read_log(a)]
    metrics_b = [{k: r[k] for k in METRICS} for r in read_log(b)]
    assert metrics_a == metrics_b
    bits_a = json.loads((a / "bits.json").read_text())
    bits_b = json.loads((b / "bits.json").read_text())
    assert [(r["name"], r["a_bits"]) for r in bits_a["layers"]] == [(r["name"], r["a_bits"]) for r in bits_b["layers"]]
    assert bits_a["gbops"] == bits_b["gbops"]


# ---- inputs: image folders, a teacher, a pickle that must not load, a two-layer model -------------------------


def make_image_folder(
    root: Path, classes: int = 3, n_train: int = 8, n_val: int = 4, size: int = 40, textured: bool = False
) -> Path:
    """Class k: a colour near a class colour; `textured` adds a random pattern, so that crops and flips
    change the image (augmentation of a plain colour is the identity)."""
    from PIL import Image

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            base = [(255 if c == k % 3 else 40) for c in range(3)]
            for i in range(n):
                colour = tuple(min(255, max(0, v + rng.randint(-30, 30))) for v in base)
                img = Image.new("RGB", (size, size), colour)
                if textured:
                    noise = 60 * torch.randn(size, size, 3, generator=g)
                    pattern = torch.tensor(colour).view(1, 1, 3) + noise
                    img = Image.fromarray(pattern.clamp(0, 255).to(torch.uint8).numpy())
                img.save(d / f"img_{i}.png")
    return root


def tiny_teacher(path: Path, arch: str = "resnet18") -> Path:
    """A 10-class torchvision model's state dict at path (for --teacher ARCH:PATH), with BN statistics that are
    not the init's."""
    torch.manual_seed(1)
    model = torchvision.models.get_model(arch, num_classes=10)
    model.train()(torch.randn(16, 3, 32, 32))
    torch.save(model.state_dict(), path)
    return path


class Evil:
    """Unpickling this runs a shell command: a loader with weights_only=True must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def two_layer_model(w_bits, layer_type: type[nn.Module]) -> nn.Module:
    """conv (fixed) -> conv A -> conv B -> linear (fixed), patched with layer_type (mm.QuantLayer,
    pairs.PairQuantLayer) at 8 px: two searched layers with MACs counted by hand (9216 and 2048)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    return mm.patch_model(model, [4, 2], w_bits, first_last_bits=8, bops_image_size=8, layer_type=layer_type)


# ---- independent references for the tier-1 tests ---------------------------------------------------------------


def slow_lsq(x, s, bits, signed):
    """LSQ forward and d/dx, d/ds element by element in plain Python floats (independent of torch ops)."""
    if signed:
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qn, qp = 0, 2**bits - 1
    out, dx, ds = [], [], []
    for v, sv in zip(x, s):
        r = v / sv
        if r < qn:
            out.append(qn * sv)
            dx.append(0.0)
            ds.append(float(qn))
        elif r > qp:
            out.append(qp * sv)
            dx.append(0.0)
            ds.append(float(qp))
        else:
            # round half to even, like torch
            q = float(torch.round(torch.tensor(r, dtype=torch.float64)))
            out.append(q * sv)
            dx.append(1.0)
            ds.append(q - r)
    return out, dx, ds


def independent_macs(model: nn.Module) -> dict[str, int]:
    """Per-module MACs from PyTorch's own FLOP counter (FLOPs / 2) at 224x224."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    counts = fc.get_flop_counts()
    prefix = type(model).__name__
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {name: sum(counts[f"{prefix}.{name}"].values()) // 2 for name in layers}


def hardswish_fed(arch: str) -> set[str]:
    """The Conv2d/Linear modules of torchvision's MobileNet-v3 (`arch`) whose input is a Hardswish output, written
    out by hand from its module structure, not read from a graph. features.0 is the stem, conv-BN-Hardswish. Each
    InvertedResidual features.k is `block`: [an expand conv-BN-act, if it expands,] the depthwise conv-BN-act,
    [SqueezeExcitation: fc1 on the pooled depthwise output, ReLU, fc2, Hardsigmoid, times that output, if use_se,]
    the project conv-BN; act is Hardswish where use_hs. Then the last conv-BN-Hardswish, pooling, classifier.0
    (Linear), Hardswish, Dropout, classifier.3 (Linear). So Hardswish feeds: features.1's depthwise conv (no
    expansion: the stem's output), in each use_hs block that expands its depthwise conv, its SE's fc1 and its
    project conv (block.1.0, block.2.fc1, block.3.0; without SE block.1.0, block.2.0), and both Linear layers.
    The use_hs blocks (MobileNetV3's Tables 1 and 2, "HS"): large features.7-10 without SE and 11-15 with SE,
    small features.4-11, all with SE."""
    se = ("1.0", "2.fc1", "3.0")
    blocks = {
        "mobilenet_v3_large": [(k, ("1.0", "2.0")) for k in range(7, 11)] + [(k, se) for k in range(11, 16)],
        "mobilenet_v3_small": [(k, se) for k in range(4, 12)],
    }[arch]
    fed = {f"features.{k}.block.{part}" for k, parts in blocks for part in parts}
    return fed | {"features.1.block.0.0", "classifier.0", "classifier.3"}


# ---- the reference run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory) -> Path:
    """REF, uninterrupted: checkpoint.pth (epoch 4), meta_state.pth (epoch 2), bits.json, log.jsonl.
    Read it, never change it: copy_run first."""
    out = tmp_path_factory.mktemp("ref") / "out"
    p = run_cli(*REF, "--output-dir", out)
    assert "summary:" in p.stdout
    # beside the run, not in it
    (out.parent / "stdout.txt").write_text(p.stdout)
    return out


@pytest.fixture(scope="module")
def meta(ref_run):
    """(args, model, checkpoint) of the reference run's meta-state, loaded once per test file; deep-copy the model
    to change it."""
    return runs.load_run(str(ref_run / "meta_state.pth"))
