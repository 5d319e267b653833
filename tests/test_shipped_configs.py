"""Every configuration file we ship parses and validates, as litgpt's test_config_hub does for its configs.

``bootstrap/*.toml`` go through photon-bootstrap's own loader (``--config``), ``peers/*.toml`` through
``photon_p2p.config.load_toml`` and ``RunConfig``: an unknown key, a wrong type or an invalid value in a shipped
file fails here, not on a volunteer's machine. The systemd unit and the Containerfile are checked for what would
break a deployment silently: the command line they run must parse, must point at the shipped config, and the
identity key must live in the state directory that survives restarts.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from photon_p2p.bootstrap import SECTIONS as BOOTSTRAP_SECTIONS
from photon_p2p.bootstrap import BootstrapConfig
from photon_p2p.cli import bootstrap as bootstrap_cli
from photon_p2p.config import RunConfig, load_toml

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP_TOMLS = sorted((ROOT / "bootstrap").glob("*.toml"))
PEER_TOMLS = sorted((ROOT / "peers").glob("**/*.toml")) if (ROOT / "peers").is_dir() else []


def test_bootstrap_ships_a_config():
    assert [p.name for p in BOOTSTRAP_TOMLS] == ["photon-bootstrap.toml"]


@pytest.mark.parametrize("path", BOOTSTRAP_TOMLS, ids=lambda p: p.name)
def test_bootstrap_config_parses(path):
    load_toml(path, BOOTSTRAP_SECTIONS)  # strict: unknown keys, wrong types
    cfg = bootstrap_cli.parse_config(["--config", str(path)])
    assert isinstance(cfg, BootstrapConfig)
    assert cfg.identity_path, "a shipped bootstrap config must keep a persistent identity"


@pytest.mark.parametrize("path", PEER_TOMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_peer_config_parses(path):
    RunConfig.from_dict(load_toml(path), origin=str(path))  # type-checks, then builds and validates every section


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat, as Environment= does)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: unexpected line {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit():
    unit = _unit(ROOT / "bootstrap" / "photon-bootstrap.service")
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/bin/photon-bootstrap")
    cfg_args = bootstrap_cli.build_parser().parse_args(argv[1:])
    assert Path(cfg_args.config).name == "photon-bootstrap.toml"
    assert service["Restart"] == ["on-failure"] and service["KillMode"] == ["mixed"]
    assert service["KillSignal"] == ["SIGTERM"]
    state_dir = "/var/lib/" + service["StateDirectory"][0]
    shipped = bootstrap_cli.parse_config(["--config", str(ROOT / "bootstrap" / "photon-bootstrap.toml")])
    assert str(Path(shipped.identity_path).parent) == state_dir, "the key must live in the unit's state directory"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "DynamicUser"):
        assert service[hardening][0] in ("yes", "strict"), hardening
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_containerfile():
    text = (ROOT / "bootstrap" / "Containerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    runs = [line for line in instructions if line.startswith(("RUN", "ARG"))]
    torch_at = next(i for i, line in enumerate(runs) if "torch==2.13.0" in line)
    project_at = next(i for i, line in enumerate(runs) if re.search(r"pip install \.( |$)", line))
    assert torch_at < project_at, "torch (CPU wheel) is installed first, then the project"
    assert "download.pytorch.org/whl/cpu" in text
    entrypoint = json.loads(next(line for line in instructions if line.startswith("ENTRYPOINT")).split(None, 1)[1])
    cmd = json.loads(next(line for line in instructions if line.startswith("CMD")).split(None, 1)[1])
    assert entrypoint == ["photon-bootstrap"]
    config = bootstrap_cli.build_parser().parse_args(cmd).config
    assert f"bootstrap/photon-bootstrap.toml {config}" in text, "CMD points at the config the image copies in"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the node runs unprivileged"
    shipped = bootstrap_cli.parse_config(["--config", str(ROOT / "bootstrap" / "photon-bootstrap.toml")])
    volume = json.loads(next(line for line in instructions if line.startswith("VOLUME")).split(None, 1)[1])
    assert str(Path(shipped.identity_path).parent) in volume, "the key must live in the volume"
