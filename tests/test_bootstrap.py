"""photon-bootstrap, as an operator runs it: real processes, real sockets on 127.0.0.1.

Proves that a bootstrap node prints a paste-ready ``photon-peer --initial-peers`` line and logs its status, that a
second node joins it (--initial-peers) as a backup, that a real photon-peer joins through the first and photon-status
lists that peer and the run's manifest through the second, that SIGTERM stops all of them with exit code 0 and
leaves none of their processes (p2pd, DHT and averager children) behind, and that the node keeps its peer ID across
restarts (same key file, same port) with a 0600 key file. Bad input (a malformed address, a port in use, a key file
that is world-readable, garbage or not a file) is one ``error:`` line and a non-zero exit, with nothing left running.
The TOML config (``--config``) is checked too: flags win over the file, unknown keys and bad values name the key.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import stat
from pathlib import Path

import psutil
import pytest

from photon_p2p.bootstrap import DEFAULT_HOST_MADDRS, BootstrapConfig
from photon_p2p.cli.bootstrap import parse_config
from photon_p2p.errors import ConfigError
from tests.helpers.procs import MADDR_RE, all_gone, console
from tests.helpers.swarm import (
    PASTE_RE,
    assert_one_line_error,
    dht_client,
    peer_args,
    run_cli,
    run_cli_batch,
    start_bootstrap,
    status_json,
    wait_for_heartbeats,
    write_corpus,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_id_of(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


def descendants_of(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            out += psutil.Process(pid).children(recursive=True)
    return out


def no_process_uses(path: Path) -> bool:
    """No process at all (ours or an orphan) has ``path`` on its command line, e.g. a p2pd reading that key."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in arg for arg in proc.info["cmdline"] or ()):
                return False
        except psutil.Error:
            continue
    return True


@pytest.mark.slow
def test_bootstrap_peer_status_lifecycle(procs, tmp_path):
    key = tmp_path / "state" / "bootstrap.key"  # its directory does not exist yet, as on a fresh server
    port = free_port()
    boot, boot_maddr = start_bootstrap(procs, tmp_path, "bootstrap", identity=key, host=f"/ip4/127.0.0.1/tcp/{port}")
    paste = boot.wait_for(PASTE_RE, 5).group(0)
    assert paste.startswith("photon-peer --initial-peers /ip4/127.0.0.1/")
    assert f"/ip4/127.0.0.1/tcp/{port}/p2p/" in paste
    assert paste in boot.stdout, "the paste line goes to stdout, where a script can read it"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    boot_id = peer_id_of(boot_maddr)

    data = write_corpus(tmp_path / "corpus")
    peer = procs.start(peer_args(boot_maddr, data, tmp_path / "cache"), name="peer")
    # a second bootstrap node joins the first, so that either can be handed out
    backup, backup_maddr = start_bootstrap(procs, tmp_path, "backup", "--initial-peers", boot_maddr)
    peer_maddr = peer.wait_for(r"initial-peers (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", 90).group(1)
    peer_id = peer_id_of(peer_maddr)

    with dht_client(boot_maddr) as calls:
        wait_for_heartbeats(calls, "t", 1, watch=[peer, boot], timeout=90)
    status = status_json(backup_maddr, "t", tmp_path / "status")  # through the backup node: the same swarm
    assert [p["peer_id"] for p in status["peers"]] == [peer_id]
    row = status["peers"][0]
    assert row["device"] == "cpu" and row["client_mode"] is False and row["last_seen_s"] < 15
    manifest = status["manifest"]
    assert manifest["creator"] == peer_id and manifest["model_preset"] == "micro"
    assert manifest["local_steps"] == 5 and manifest["max_steps"] == 10000
    assert manifest["tokenizer"] == "byte" and manifest["tokenizer_vocab"] == 257
    assert manifest["parameters"] > 100_000 and len(manifest["hash"]) == 64
    assert status["rejected_records"] == 0
    # the periodic status line (every 5 s here) sees the peer and its run
    boot.wait_for(r"[1-9]\d* DHT peers? in the routing table.*; runs seen: t \(manifest [0-9a-f]{12}\)", 30)

    # SIGTERM to each main process (what systemd and docker do): exit 0, every descendant gone
    children = descendants_of([boot.pid, peer.pid, backup.pid])
    names = {p.name() for p in children}
    assert "p2pd" in names, names
    for proc in (peer, boot, backup):
        proc.popen.send_signal(signal.SIGTERM)
    assert peer.wait(60) == 0, peer.output()[-3000:]
    assert boot.wait(30) == 0, boot.output()[-3000:]
    assert backup.wait(30) == 0, backup.output()[-3000:]
    assert all_gone(children) == []
    assert "Traceback" not in peer.stderr + boot.stderr + backup.stderr
    assert no_process_uses(key)

    # restart with the same key file: the same peer ID, so the addresses handed out keep working
    boot2, boot2_maddr = start_bootstrap(procs, tmp_path, "bootstrap2", identity=key, host=f"/ip4/127.0.0.1/tcp/{port}")
    assert peer_id_of(boot2_maddr) == boot_id
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    children = boot2.descendants()
    boot2.popen.send_signal(signal.SIGINT)  # Ctrl-C stops the service cleanly too
    assert boot2.wait(30) == 0
    assert all_gone(children) == []


def test_port_in_use_is_one_line_error(procs, tmp_path):
    port = free_port()
    boot, _ = start_bootstrap(procs, tmp_path, "first", host=f"/ip4/127.0.0.1/tcp/{port}")
    key = tmp_path / "second.key"
    result = run_cli(
        console("photon-bootstrap") + ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--identity-path", str(key)],
        tmp_path / "second",
    )
    assert_one_line_error(result, "--host-maddrs", str(port), "in use")
    assert not key.exists(), "nothing is created before the addresses are checked"
    assert boot.alive(), "the first node is unaffected"


BAD_HOST_MADDRS = ["/ip4/127.0.0.1/tcp/not-a-port", "127.0.0.1:31337", "/ip4/127.0.0.1/udp/1/bogus"]
UNREACHABLE = "/ip4/127.0.0.1/tcp/{port}/p2p/QmbMExRXwcK3vMoz1geMPzPq2XxGQLbkLQYDvkn6XKcpPj"  # made-up peer ID


def _bad_identity(directory: Path, kind: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bootstrap.key"
    if kind == "loose":
        from photon_p2p.swarm.identity import Identity

        Identity.load_or_create(path)  # a real key: the mode, not the content, is the problem
        path.chmod(0o644)
    elif kind == "garbage":
        path.write_bytes(b"this is not a key\n")
        path.chmod(0o600)
    else:
        path.mkdir()  # cannot be read as a key at all
    return path


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input invocation of photon-bootstrap, run side by side once; the tests below check one each."""
    work = tmp_path_factory.mktemp("bad-bootstrap")
    loop = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    cases = {
        f"maddr{i}": ["--host-maddrs", addr, "--identity-path", str(work / f"maddr{i}.key")]
        for i, addr in enumerate(BAD_HOST_MADDRS)
    }
    keys = {kind: _bad_identity(work / f"key-{kind}", kind) for kind in ("loose", "garbage", "directory")}
    before = {kind: path.read_bytes() for kind, path in keys.items() if path.is_file()}
    cases.update({f"key-{kind}": [*loop, "--identity-path", str(path)] for kind, path in keys.items()})
    cases["unreachable"] = [*loop, "--initial-peers", UNREACHABLE.format(port=free_port()), "--join-timeout", "2"]
    (work / "bad.toml").write_text("[bootstrap]\nlisten = 1\n")
    cases["config"] = ["--config", str(work / "bad.toml")]
    results = run_cli_batch({name: console("photon-bootstrap") + args for name, args in cases.items()}, work / "runs")
    return work, results, keys, before


@pytest.mark.parametrize("i", range(len(BAD_HOST_MADDRS)))
def test_bad_host_maddrs(bad_runs, i):
    work, results, _, _ = bad_runs
    assert_one_line_error(results[f"maddr{i}"], "--host-maddrs", BAD_HOST_MADDRS[i], "not a valid multiaddr")
    assert not (work / f"maddr{i}.key").exists(), "nothing is created before the addresses are checked"


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("loose", "(mode 644); run: chmod 600"),
        ("garbage", "not a hivemind/libp2p RSA identity file"),
        ("directory", "not a regular file"),
    ],
)
def test_bad_identity_file(bad_runs, kind, needle):
    _, results, keys, before = bad_runs
    assert_one_line_error(results[f"key-{kind}"], "--identity-path", str(keys[kind]), needle)
    if kind in before:
        assert keys[kind].read_bytes() == before[kind], "a bad key file is reported, never overwritten"


def test_unreachable_initial_peer(bad_runs):
    assert_one_line_error(
        bad_runs[1]["unreachable"], "none of the initial peers answered within 2s", "/ip4/127.0.0.1/tcp/", "/p2p/QmbMEx"
    )


def test_bad_config_file_is_one_line_error(bad_runs):
    assert_one_line_error(bad_runs[1]["config"], "unknown key 'bootstrap.listen'")


# --------------------------------------------------------------------------------------------------------------
# configuration (no processes)


def test_defaults_listen_on_tcp_and_quic_31337():
    cfg = parse_config([])
    assert cfg.host_maddrs == list(DEFAULT_HOST_MADDRS)
    assert cfg.host_maddrs == ["/ip4/0.0.0.0/tcp/31337", "/ip4/0.0.0.0/udp/31337/quic-v1"]
    assert cfg.relay and not cfg.use_auto_relay and cfg.identity_path is None


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text(
        '[bootstrap]\nidentity_path = "/var/lib/photon/b.key"\nstatus_period = 30\nrelay = false\n'
        'host_maddrs = ["/ip4/0.0.0.0/tcp/4000"]\n'
    )
    cfg = parse_config(["--config", str(path), "--status-period", "5"])
    assert cfg == BootstrapConfig(
        identity_path="/var/lib/photon/b.key", status_period=5.0, relay=False, host_maddrs=["/ip4/0.0.0.0/tcp/4000"]
    )
    assert parse_config(["--config", str(path), "--relay"]).relay is True


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[bootstrap]\nidentity_pth = 'x'\n", "unknown key 'bootstrap.identity_pth' (did you mean 'identity_path'?)"),
        ("[bootstrp]\n", "unknown table [bootstrp]"),
        ("[bootstrap]\nstatus_period = 'soon'\n", "bootstrap.status_period = 'soon': expected a number"),
        ("[bootstrap]\nstatus_period = 0\n", "--status-period (TOML bootstrap.status_period) = 0.0"),
        ("[bootstrap]\nforce_reachability = 'maybe'\n", "bootstrap.force_reachability = 'maybe': choose one of"),
        ("[bootstrap\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, needle):
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(["--config", str(path)])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_help_documents_every_flag():
    from photon_p2p.cli.bootstrap import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = parser.format_help()
    for flag in (
        "--host-maddrs",
        "--announce-maddrs",
        "--identity-path",
        "--initial-peers",
        "--no-relay",
        "--use-auto-relay",
        "--force-reachability",
        "--status-period",
        "--log-level",
        "--config",
    ):
        assert flag in text


def test_paste_line_lists_every_address():
    from photon_p2p.bootstrap import paste_line

    addrs = ["/ip4/203.0.113.5/tcp/31337/p2p/QmX", "/ip4/203.0.113.5/udp/31337/quic-v1/p2p/QmX"]
    assert paste_line(addrs) == "photon-peer --initial-peers " + " ".join(addrs)
    assert MADDR_RE.search(paste_line(["/ip4/127.0.0.1/tcp/5/p2p/QmXYZabc"]))
