"""The installable package is complete: a wheel built from this tree holds every module of ``photon_p2p`` and every
console script points at a function that exists.

``make test`` installs the project in editable mode, which imports straight from the source tree, so a module that
the packaging configuration leaves out (say, after a change to ``[tool.setuptools.packages.find]``) would pass every
other test and still be missing from ``pip install photon-p2p``. This builds the real wheel to catch that.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module(tmp_path):
    # build from a copy: setuptools reuses an in-tree build/ directory, which would hide a module it cannot find
    src = tmp_path / "src"
    shutil.copytree(ROOT / "photon_p2p", src / "photon_p2p", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("photon_p2p-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "photon_p2p").rglob("*.py"))
    assert sources, "no sources found"
    missing = [s for s in sources if s not in names]
    assert not missing, f"the wheel lacks {missing}"
    static = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "photon_p2p" / "dashboard" / "static").iterdir())
    assert len(static) >= 3 and not [s for s in static if s not in names], f"the wheel lacks dashboard files {static}"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: hivemind==1.1.12" in text
    assert "Requires-Dist: numpy<2.4" in text


def test_every_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"photon-peer", "photon-bootstrap", "photon-status", "photon-swarm"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
