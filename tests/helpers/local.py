"""Helpers for tests of local training: a small text corpus, photon CLIs run as real subprocesses, metrics files."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.helpers.procs import console

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "cats",
    "watch",
    "from",
    "the",
    "old",
    "stone",
    "wall",
    "and",
    "nobody",
    "knows",
    "why",
]


def write_corpus(directory: Path, *, files: int = 6, lines: int = 150, seed: int = 0) -> Path:
    """``files`` small text files of pseudo-random sentences (learnable: spelling and a small vocabulary)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(files):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(lines))
        (directory / f"doc{i}.txt").write_text(text + "\n", encoding="utf-8")
    return directory


def env(tmp: Path) -> dict[str, str]:
    """The environment of a test subprocess: its own TMPDIR, offline, and no shard cache outside ``tmp``."""
    return dict(
        os.environ,
        TMPDIR=str(tmp),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PHOTON_CACHE_DIR=str(tmp / "photon-cache"),
    )


def run_cli(name: str, args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a console script of this project to completion in ``cwd``, capturing its output."""
    # a short TMPDIR: Unix socket paths (torch_shm_manager) max out at 108 bytes
    tmp = Path(tempfile.mkdtemp(prefix="ph-cli-", dir="/tmp"))
    try:
        return subprocess.run(
            console(name) + [str(a) for a in args],
            cwd=cwd,
            env=env(tmp),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(records: list[dict[str, Any]]) -> dict[int, float]:
    """step -> training loss; a later record for the same step (a resumed run) wins."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` line on stderr mentioning every needle, and no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]
