"""What every test file shares: the real scripts run in subprocesses on tiny synthetic data, and one tiny
reference run (made once per test run) whose files the tests of metamix.py and of the tools beside it read.

Every run is tiny: resnet18 at 32 px, 64 synthetic training images, batch 16 (4 steps per epoch).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metamix as mm

REPO = Path(__file__).resolve().parent
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
REF = TINY + ["--epochs", "4"]  # the reference run: 2 epochs of bit selection, 2 of weight training
METRICS = ("loss", "val_loss", "top1", "top5", "gbops", "lr", "phase", "epoch")  # what a log.jsonl row holds
torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): in-process runs then equal theirs, bit for bit


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("METAMIX_DEBUG", raising=False)  # one-line errors, not tracebacks, in this process too


def main_in_process(*argv) -> int:
    """metamix.py's main on argv in this process (no interpreter start-up): its exit status (argparse's too); the
    signal handlers it installs are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return mm.main(mm.get_args_parser().parse_args([str(a) for a in argv]))
    except SystemExit as e:  # argparse's own errors
        return e.code
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture
def call(capsys):
    """call(main, *argv): a tool's main() in this process, as a CompletedProcess (for error_line)."""

    def run(main, *argv) -> subprocess.CompletedProcess:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
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


def error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    """The one-line contract: non-zero exit, exactly one non-blank stderr line, no traceback."""
    assert p.returncode != 0, f"expected a failure, got exit 0\nstdout:\n{p.stdout[-2000:]}"
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{p.stderr[-4000:]}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in the error line: {lines[0]!r}"
    return lines[0]


def load_ck(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(d: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines() if line.strip()]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


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
                    pattern = torch.tensor(colour).view(1, 1, 3) + 60 * torch.randn(size, size, 3, generator=g)
                    img = Image.fromarray(pattern.clamp(0, 255).to(torch.uint8).numpy())
                img.save(d / f"img_{i}.png")
    return root


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory) -> Path:
    """REF, uninterrupted: checkpoint.pth (epoch 4), meta_state.pth (epoch 2), bits.json, log.jsonl.
    Read it, never change it: copy_run first."""
    out = tmp_path_factory.mktemp("ref") / "out"
    p = run_cli(*REF, "--output-dir", out)
    assert "summary:" in p.stdout
    (out.parent / "stdout.txt").write_text(p.stdout)  # beside the run, not in it
    return out
