"""The repository as git holds it: what the README's set-up commands, CI (.ci/run) and gpu_check.sh create in the
work tree is neither tracked nor left for `git add .` to pick up, and no tracked symbolic link points outside the
repository (a clone would get a dangling link, or one into its user's own files).

Cheap (a few git calls); skipped without git or outside a git work tree (a copied folder).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
# The virtual environments of the README's commands (.venv, and .venv-new for the newest pair): ignored whatever
# they are, a folder or a symbolic link (to a cache elsewhere, say).
VENVS = [".venv", ".venv-new"]
# The folders the rest create: metamix.py's default --output-dir (runs/metamix), pytest's cache and the bytecode
# of the imports, gpu_check.sh's figures, ruff's cache (CI runs ruff in the work tree).
FOLDERS = ["runs", ".pytest_cache", "__pycache__", "gpu_check", ".ruff_cache"]
# A file each folder may hold, checked beside the folder itself.
INSIDE = {
    ".venv": "bin/python",
    ".venv-new": "bin/python",
    "runs": "metamix/checkpoint.pth",
    ".pytest_cache": "v/cache/lastfailed",
    "__pycache__": "metamix.cpython-311.pyc",
    "gpu_check": "pytest.txt",
    ".ruff_cache": "CACHEDIR.TAG",
}


def git(*args: str, cwd: Path = REPO, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    """git, blind to its user's own excludes file (what it ignores, a new user's clone does not)."""
    cmd = ["git", "-c", f"core.excludesFile={os.devnull}", *args]
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture(scope="module")
def repo() -> Path:
    """This repository's root, where git and its .git are there."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    top = None
    if (REPO / ".git").exists():
        top = git("rev-parse", "--show-toplevel", check=False).stdout.strip()
    if not top or Path(top).resolve() != REPO:
        pytest.skip(f"{REPO} is not the root of a git work tree")
    return REPO


def ignored(tree: Path, paths: list[str]) -> dict[str, bool]:
    """path -> whether git ignores it in `tree`, by its .gitignore files alone (--no-index: tracked or not)."""
    out = git("check-ignore", "--no-index", "-v", "-n", "--stdin", cwd=tree, check=False, stdin="\n".join(paths))
    assert out.returncode in (0, 1), out.stderr
    # "source:line:pattern<TAB>path", with an empty source for a path no pattern matches
    rows = [line.split("\t", 1) for line in out.stdout.splitlines()]
    return {path: bool(source.split(":", 1)[0]) for source, path in rows}


def test_set_up_outputs_are_not_tracked(repo):
    """No entry of the index at or under a path the set-up commands, CI or gpu_check.sh create."""
    tracked = git("ls-files", "-s", "--", *VENVS, *FOLDERS).stdout
    assert not tracked, f"tracked, but a set-up command or CI creates them:\n{tracked}"


def test_set_up_outputs_are_ignored(repo, tmp_path):
    """Each path ignored by the repository's .gitignore files, checked in a bare work tree that holds only them,
    so that the answer does not depend on what this work tree happens to hold: the virtual environments missing,
    as symbolic links and as folders; every folder, and a file in it."""
    tree = tmp_path / "tree"
    tree.mkdir()
    git("init", "-q", ".", cwd=tree)
    rules = [p for p in git("ls-files", "-z").stdout.split("\0") if posixpath.basename(p) == ".gitignore"]
    assert rules, "no .gitignore tracked"
    for p in rules:
        (tree / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / p, tree / p)
    elsewhere = tmp_path / "cache"
    elsewhere.mkdir()
    missing = ignored(tree, VENVS)
    for v in VENVS:
        (tree / v).symlink_to(elsewhere, target_is_directory=True)
    links = ignored(tree, VENVS)
    for v in VENVS:
        (tree / v).unlink()
    for name in VENVS + FOLDERS:
        (tree / name / INSIDE[name]).parent.mkdir(parents=True)
        (tree / name / INSIDE[name]).write_bytes(b"")
    folders = ignored(tree, [p for name in VENVS + FOLDERS for p in (name, f"{name}/{INSIDE[name]}")])
    not_ignored = [f"{p} (missing)" for p, i in missing.items() if not i]
    not_ignored += [f"{p} (a symbolic link)" for p, i in links.items() if not i]
    not_ignored += [f"{p} (a folder)" if "/" not in p else p for p, i in folders.items() if not i]
    assert not not_ignored, f"not ignored by {', '.join(rules)}: {', '.join(not_ignored)}"


def test_no_tracked_symbolic_link_points_outside(repo):
    """Every tracked symbolic link (mode 120000) resolves, relative to its folder, to a path inside the repository."""
    links = []
    for entry in git("ls-files", "-s", "-z").stdout.split("\0"):
        if entry.startswith("120000 "):
            meta, path = entry.split("\t", 1)
            links.append((path, meta.split()[1]))
    outside = []
    for path, blob in links:
        # the target as committed, which is what a clone gets
        target = git("cat-file", "blob", blob).stdout
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
            outside.append(f"{path} -> {target}")
    assert not outside, f"tracked symbolic links that point outside the repository: {', '.join(outside)}"
