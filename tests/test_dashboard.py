"""The web dashboard (``photon-status --serve``, ``photon-bootstrap --serve``; photon_p2p/dashboard/).

Proves, without a swarm: ``History`` turns successive gather() snapshots into per-round loss (mean/min/max over
the peers that reported the round), validation perplexity, swarm tokens/s over time, the per-round compute /
matchmaking / all-reduce timeline (one entry per (peer, round) however often a summary is seen, the peer's summary
winning over its heartbeats) and theta agreement over time, ignores hostile values and stays bounded; the server,
over real HTTP on 127.0.0.1, serves the page, its scripts, ``/api/status`` (always valid JSON) and ``/healthz``,
shows a failing poll's error (with its time) and keeps serving, picks runs in bootstrap mode, binds to 127.0.0.1 by
default and warns when bound elsewhere; a bad ``--serve`` is one ``error:`` line and exit 2 for both commands.

Then, in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium; skipped only when they
cannot be found) against a live local swarm - a photon-bootstrap with ``--serve``, two real photon-peer processes
and a ``photon-status --serve`` process: the page lists both peers, updates in place as they train (the round or
step shown changes), logs no console errors, and the bootstrap's page lists the run and shows it; Ctrl-C stops
photon-status with exit 0 and closes the port.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from photon_p2p.dashboard.history import MAX_HASHES, History, theta_agreement
from photon_p2p.dashboard.server import DEFAULT_HOST, MAX_WATCHED_RUNS, Dashboard, parse_serve, url_of
from photon_p2p.errors import ConfigError, SwarmError
from tests.helpers.peers import peer_args
from tests.helpers.procs import ProcessPool, console, wait_until
from tests.helpers.swarm import assert_one_line_error, run_cli_batch, start_bootstrap

PEER_A, PEER_B = "QmAAAAbbbbccccddddeeeeffff1111", "QmBBBBbbbbccccddddeeeeffff2222"


def _peer(peer_id: str, **changes) -> dict:
    peer = dict(
        peer_id=peer_id,
        stage="training",
        round=0,
        step=0,
        tokens=0,
        tokens_per_s=100.0,
        loss=None,
        val_ppl=None,
        device="cpu",
        version="0.1.0",
        last_seen_s=1.0,
        client_mode=False,
    )
    peer.update(changes)
    return peer


def _snapshot(*peers: dict, **changes) -> dict:
    total = sum(p.get("tokens_per_s", 0) for p in peers if isinstance(p, dict))
    status = dict(
        run_id="r",
        manifest={"hash": "ab" * 32, "model_preset": "micro"},
        peers=list(peers),
        total_tokens_per_s=total,
        rejected_records=0,
        rejected_reasons={},
    )
    status.update(changes)
    return status


def _summary(round_: int, **changes) -> dict:
    last = dict(
        round=round_,
        outcome="averaged",
        train_s=2.0,
        matchmaking_s=0.5,
        allreduce_s=0.25,
        loss=4.0,
        val_ppl=None,
        tokens=1000,
    )
    last.update(changes)
    return last


def _by_round(history: History) -> dict[int, dict]:
    return {row["round"]: row for row in history.to_dict()["rounds"]}


# --------------------------------------------------------------------------------------------------------------
# History: pure accumulation


def test_loss_per_round_is_mean_min_max_of_the_peers_that_reported_it():
    h = History()
    h.add(_snapshot(_peer(PEER_A, round=3, loss=5.0), _peer(PEER_B, round=3, loss=3.0)), at=10.0)
    h.add(_snapshot(_peer(PEER_A, round=4, loss=2.0), _peer(PEER_B, round=3, loss=4.0)), at=15.0)
    rounds = _by_round(h)
    assert sorted(rounds) == [3, 4]
    assert rounds[3]["loss_mean"] == pytest.approx(4.5) and rounds[3]["loss_min"] == 4.0
    assert rounds[3]["loss_max"] == 5.0 and rounds[3]["peers"] == 2  # B's newer heartbeat replaced its 3.0
    assert (rounds[4]["peers"], rounds[4]["loss_mean"], rounds[4]["loss_min"], rounds[4]["loss_max"]) == (1, 2, 2, 2)
    assert rounds[4]["train_s"] is None and rounds[4]["summarised"] == 0  # no summaries from these peers
    series = h.to_dict()["throughput"]
    assert [(p["t"], p["tokens_per_s"], p["peers"]) for p in series] == [(10.0, 200.0, 2), (15.0, 200.0, 2)]


def test_round_summaries_count_once_per_peer_and_round_and_win_over_heartbeats():
    h = History()
    a3 = _summary(3, train_s=2.0, matchmaking_s=1.0, allreduce_s=0.5, loss=3.5, outcome="averaged")
    b3 = _summary(3, train_s=4.0, matchmaking_s=0.0, allreduce_s=1.5, loss=2.5, outcome="late")
    h.add(_snapshot(_peer(PEER_A, round=3, loss=9.0)), at=1.0)  # a heartbeat during round 3
    for t in range(2, 7):  # the same summaries, seen in five snapshots
        h.add(
            _snapshot(_peer(PEER_A, round=4, loss=3.0, last_round=a3), _peer(PEER_B, round=4, loss=3.1, last_round=b3)),
            at=float(t),
        )
    h.add(_snapshot(_peer(PEER_A, round=3, loss=8.0)), at=7.0)  # a stale heartbeat must not override the summary
    r3 = _by_round(h)[3]
    assert r3["summarised"] == 2 and r3["peers"] == 2
    assert r3["train_s"] == pytest.approx(3.0) and r3["matchmaking_s"] == pytest.approx(0.5)
    assert r3["allreduce_s"] == pytest.approx(1.0)
    assert r3["loss_mean"] == pytest.approx(3.0) and r3["loss_max"] == 3.5
    assert r3["outcomes"] == {"averaged": 1, "late": 1} and r3["tokens"] == 2000


def test_validation_perplexity_goes_to_the_round_it_first_appears_in():
    h = History()
    h.add(_snapshot(_peer(PEER_A, round=1, loss=4.0, val_ppl=50.0)), at=1.0)
    h.add(_snapshot(_peer(PEER_A, round=2, loss=3.0, val_ppl=50.0)), at=2.0)  # the same evaluation, repeated
    h.add(_snapshot(_peer(PEER_A, round=3, loss=2.0, val_ppl=40.0)), at=3.0)
    h.add(_snapshot(_peer(PEER_A, round=4, loss=2.0, last_round=_summary(3, val_ppl=None, loss=None))), at=4.0)
    rounds = _by_round(h)
    assert [rounds[r]["val_ppl"] for r in (1, 2, 3)] == [50.0, None, 40.0]
    assert rounds[3]["loss_mean"] == 2.0, "a summary without values keeps what the heartbeats showed"


def test_theta_agreement_from_the_snapshot_or_counted_from_peers():
    assert theta_agreement(_snapshot(_peer(PEER_A))) is None
    counted = _snapshot(_peer(PEER_A, theta_hash="aa"), _peer(PEER_B, theta_hash="aa"), _peer("Qm3", theta_hash="b"))
    assert theta_agreement(counted) == {"hashes": [["aa", 2], ["b", 1]], "other": 0}
    given = _snapshot(theta_agreement={"cc": 1, "dd": 4, "bad": -1, "nan": math.nan, 7: 3})
    assert theta_agreement(given) == {"hashes": [["dd", 4], ["cc", 1]], "other": 0}
    many = theta_agreement(_snapshot(theta_agreement={f"h{i}": i + 1 for i in range(MAX_HASHES + 3)}))
    assert len(many["hashes"]) == MAX_HASHES and many["other"] == 1 + 2 + 3
    h = History()
    h.add(counted, at=5.0)
    h.add(_snapshot(_peer(PEER_A)), at=6.0)  # old peers: no point rather than a made-up one
    assert h.to_dict()["theta"] == [{"t": 5.0, "peers": 3, "hashes": [["aa", 2], ["b", 1]], "other": 0}]


def test_hostile_or_missing_values_are_ignored():
    h = History()
    h.add({"peers": None}, at=1.0)
    h.add(
        _snapshot(
            _peer(PEER_A, round=-1, loss=1.0),
            _peer(PEER_B, round=True, loss=1.0),
            {"round": 1, "loss": 1.0},
            "not a dict",
            _peer("Qm3", round=2, loss=math.nan, val_ppl=math.inf, tokens_per_s=math.nan),
            _peer("Qm4", round=2, loss="low", last_round={"round": "2", "train_s": 1.0}),
            _peer("Qm5", round=2, loss=1.5, last_round=_summary(1, train_s=math.inf, outcome="x" * 500)),
            total_tokens_per_s=math.nan,
        ),
        at=2.0,
    )
    rounds = _by_round(h)
    assert sorted(rounds) == [1, 2]
    assert rounds[2]["loss_mean"] == 1.5 and rounds[2]["peers"] == 1
    assert rounds[1]["train_s"] is None and len(next(iter(rounds[1]["outcomes"]))) == 16
    assert [p["tokens_per_s"] for p in h.to_dict()["throughput"]] == [0.0, 100.0 * 4]
    json.dumps(h.to_dict(), allow_nan=False)  # nothing non-finite gets through


def test_memory_is_bounded():
    h = History(max_points=50, max_rounds=20)
    for i in range(300):
        h.add(
            _snapshot(_peer(PEER_A, round=i, loss=1.0, theta_hash="aa", last_round=_summary(max(0, i - 1)))),
            at=float(i),
        )
    d = h.to_dict()
    assert len(d["throughput"]) == 50 and len(d["theta"]) == 50 and d["throughput"][-1]["t"] == 299.0
    assert [r["round"] for r in d["rounds"]] == list(range(280, 300)), "the least recently updated rounds go first"
    assert d["snapshots"] == 300 and d["first_at"] == 0.0 and d["updated_at"] == 299.0


# --------------------------------------------------------------------------------------------------------------
# --serve parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8080", (DEFAULT_HOST, 8080)),
        ("0", ("127.0.0.1", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:9000", ("localhost", 9000)),
        ("[::1]:8080", ("::1", 8080)),
        (" 127.0.0.1:65535 ", ("127.0.0.1", 65535)),
    ],
)
def test_parse_serve(text, expected):
    assert parse_serve(text) == expected


@pytest.mark.parametrize("text", ["", "abc", ":8080", "host:", "70000", "::1:8080", "a b:80", "1.2.3.4:-1", "８０"])
def test_parse_serve_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_serve(text)
    assert str(info.value).startswith(f"--serve {text!r}: expected [HOST:]PORT")


def test_default_bind_host_is_loopback():
    from photon_p2p.bootstrap import BootstrapConfig
    from photon_p2p.cli.status import parse_options

    assert DEFAULT_HOST == "127.0.0.1"
    opts, _ = parse_options(["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", "--run-id", "r", "--serve", "8080"])
    assert opts.serve == ("127.0.0.1", 8080) and opts.serve_period == 5.0 and not opts.as_json
    assert BootstrapConfig().serve is None and BootstrapConfig(serve="8080").serve_period == 5.0
    assert url_of("::1", 80) == "http://[::1]:80/" and url_of("127.0.0.1", 80) == "http://127.0.0.1:80/"


def test_serve_flag_errors(tmp_path):
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmbMExRXwcK3vMoz1geMPzPq2XxGQLbkLQYDvkn6XKcpPj"]
    status = console("photon-status") + peers + ["--run-id", "r"]
    runs = run_cli_batch(
        {
            "status_bad": status + ["--serve", "nope"],
            "status_json": status + ["--serve", "8080", "--json"],
            "status_watch": status + ["--serve", "8080", "--watch", "2"],
            "status_period": status + ["--serve", "8080", "--serve-period", "0.1"],
            "bootstrap_bad": console("photon-bootstrap") + ["--serve", "host:99999"],
        },
        tmp_path,
    )
    for case in ("status_bad", "bootstrap_bad"):
        assert runs[case].returncode == 2
        assert_one_line_error(runs[case], "--serve", "expected [HOST:]PORT")
    assert_one_line_error(runs["status_json"], "--json", "--serve")
    assert_one_line_error(runs["status_watch"], "--watch", "--serve")
    assert_one_line_error(runs["status_period"], "--serve-period 0.1")
    assert all(r.returncode == 2 for r in runs.values())


# --------------------------------------------------------------------------------------------------------------
# the server, over real HTTP


@contextlib.contextmanager
def serving(dashboard: Dashboard, host: str = "127.0.0.1"):
    dashboard.start(host, 0)
    try:
        yield dashboard
    finally:
        dashboard.stop()


def fetch(dashboard: Dashboard, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(dashboard.host, dashboard.port, timeout=10)
    try:
        conn.request(method, path)  # the raw path: no client-side normalisation of "..", unlike urllib
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def api(dashboard: Dashboard, query: str = "") -> dict:
    code, headers, body = fetch(dashboard, "/api/status" + query)
    assert code == 200 and headers["Content-Type"] == "application/json", body
    return json.loads(body)


def test_endpoints():
    status = _snapshot(_peer(PEER_A, round=2, loss=math.nan, theta_hash="aa"), leaderboard=[])
    with serving(Dashboard(lambda run_id: status, run_id="r", period=60, initial=status)) as d:
        assert d.url == f"http://127.0.0.1:{d.port}/" and d.port > 0
        code, headers, page = fetch(d, "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        for needle in (b'id="peers"', b'id="updated"', b'id="leaderboard"', b'src="/static/app.js"'):
            assert needle in page
        assert b"http://" not in page and b"https://" not in page, "nothing may be loaded from elsewhere"
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        for path in ("/static/app.js", "/static/style.css"):
            code, _, body = fetch(d, path)
            assert code == 200 and b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"innerHTML" not in fetch(d, "/static/app.js")[2], "swarm strings go in with textContent only"
        data = api(d)  # valid JSON: the NaN loss became null
        assert data["mode"] == "status" and data["run_id"] == "r" and data["runs"] is None
        assert data["status"]["peers"][0]["loss"] is None and data["history"]["snapshots"] == 1
        assert data["error"] is None and data["updated_at"] is not None
        assert fetch(d, "/healthz")[0] == 200
        for path in ("/nope", "/static/../server.py", "/static/history.py", "/../__init__.py"):
            assert fetch(d, path)[0] == 404, path
        code, _, body = fetch(d, "/", method="HEAD")
        assert code == 200 and body == b""
        assert fetch(d, "/api/status?run=other")[0] == 404
        assert fetch(d, "/api/status?run=bad%20id")[0] == 400


def test_a_failing_poll_is_shown_and_the_server_keeps_serving():
    calls = {"n": 0}

    def flaky(run_id: str) -> dict:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise TimeoutError("the DHT is slow") if calls["n"] == 1 else SwarmError("run 'r' was not found")
        return _snapshot(_peer(PEER_A, round=calls["n"]))

    with serving(Dashboard(flaky, run_id="r", period=1.0)) as d:
        first = wait_until(lambda: (s := api(d))["error"] and s, 10, what="the first error")
        assert first["status"] is None
        assert first["error"]["message"] in ("TimeoutError: the DHT is slow", "run 'r' was not found")
        assert abs(first["error"]["at"] - time.time()) < 10
        later = wait_until(lambda: (s := api(d))["status"] and s, 15, what="a snapshot after the errors")
        assert later["error"]["message"] == "run 'r' was not found", "the last error stays, with its time"
        assert later["updated_at"] > later["error"]["at"]
        assert fetch(d, "/healthz")[0] == 200


def test_bootstrap_mode_lists_runs_and_gathers_the_ones_asked_for():
    runs = [{"run_id": "a", "manifest_hash": "11" * 32, "time": 1.0}]
    gathered: list[str] = []

    def gather(run_id: str) -> dict:
        gathered.append(run_id)
        if run_id == "ghost":
            raise SwarmError("run 'ghost' was not found in the swarm (runs seen: a, b)")
        return _snapshot(_peer(PEER_A), run_id=run_id)

    with serving(Dashboard(gather, list_runs=lambda: list(runs), period=1.0)) as d:
        only = wait_until(lambda: (s := api(d))["status"] and s, 10, what="the only run")
        assert only["mode"] == "bootstrap" and only["run_id"] == "a" and only["runs"] == runs
        runs.append({"run_id": "b", "manifest_hash": "22" * 32, "time": 2.0})
        wait_until(lambda: len(api(d)["runs"]) == 2, 10, what="two runs listed")
        assert api(d)["run_id"] is None, "with several runs the page picks one"
        picked = wait_until(lambda: (s := api(d, "?run=b"))["status"] and s, 10, what="run b")
        assert picked["run_id"] == "b" and picked["status"]["run_id"] == "b"
        ghost = wait_until(lambda: (s := api(d, "?run=ghost"))["error"] and s, 10, what="the ghost's error")
        assert ghost["status"] is None and "not found" in ghost["error"]["message"]
        assert fetch(d, "/api/status?run=../x")[0] == 400
        for i in range(40):  # visitors typing run ids cannot grow the server's memory
            d._fail(f"typo{i}", SwarmError("not found"))
        assert len(d._errors) <= 2 * MAX_WATCHED_RUNS + 1
    assert set(gathered) == {"a", "b", "ghost"}


def test_binding_elsewhere_warns_and_a_busy_port_is_one_line(caplog):
    status = _snapshot()
    with caplog.at_level(logging.WARNING, logger="photon_p2p.dashboard.server"):
        with serving(Dashboard(lambda r: status, run_id="r", initial=status), host="0.0.0.0") as d:
            assert fetch(d, "/healthz")[0] == 200
        assert any("is public" in r.getMessage() and "no authentication" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with serving(Dashboard(lambda r: status, run_id="r", initial=status)) as d:
            assert not caplog.records, "loopback is private: no warning"
            with pytest.raises(ConfigError, match=rf"^--serve 127\.0\.0\.1:{d.port}: cannot listen there"):
                Dashboard(lambda r: status, run_id="r").start("127.0.0.1", d.port)
            port = d.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # stop() closed the listening socket


# --------------------------------------------------------------------------------------------------------------
# a real browser against a live swarm

RUN = "dash"
DASHBOARD_RE = r"dashboard at (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.access(chromium, os.X_OK) and os.access(driver_path, os.X_OK)):
        pytest.skip("chromium and chromedriver not found (make browser installs them with apt-get)")
    from selenium import webdriver  # a dev dependency (pip install -e .[dev]): missing it is an error, not a skip
    from selenium.webdriver.chrome.service import Service

    patch = pytest.MonkeyPatch()
    patch.setenv("SE_OFFLINE", "1")  # selenium-manager must never try to download a driver: we give ours
    profile = tempfile.mkdtemp(prefix="ph-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--window-size=1280,2000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        patch.undo()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A bootstrap with --serve, two peers training run 'dash', and photon-status --serve on that run."""
    work = tmp_path_factory.mktemp("dashboard")
    pool = ProcessPool(work)
    try:
        boot, entry = start_bootstrap(pool, work, "bootstrap", "--serve", "127.0.0.1:0", "--serve-period", "1")
        common = dict(
            run_id=RUN,
            cache=work / "cache",
            initial_peers=[entry],
            local_steps=5,
            max_steps=1_000_000,
            extra=["--eval-every", "10"],
        )
        # niced: two peers training flat out would otherwise keep both cores from photon-status and the browser
        peers = [pool.start(["nice", "-n", "15", *peer_args(name, **common)], name) for name in ("a", "b")]
        ids = [p.wait_for(r"initial-peers /ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+)", 90).group(1) for p in peers]
        peers[0].wait_for(r"(started|joining) run 'dash'", 90)
        status = pool.start(
            console("photon-status")
            + ["--initial-peers", entry, "--run-id", RUN, "--serve", "127.0.0.1:0", "--serve-period", "1"],
            "status",
        )
        yield dict(
            boot=boot,
            boot_url=boot.wait_for(DASHBOARD_RE, 30).group(1),
            peers=peers,
            ids=ids,
            status=status,
            status_url=status.wait_for(DASHBOARD_RE, 60).group(1),
        )
    finally:
        pool.close()


def _rows(driver) -> dict[str, tuple[str, str]]:
    """The peers table as {peer id: (round, step)}, read in one script run inside the page.

    The page re-renders the table every --serve-period (1 s here). Reading it cell by cell over WebDriver costs a
    round trip per cell, and on two loaded cores a whole read took longer than a period: every read met a replaced
    row (stale) and came back partial, and the wait timed out with both peers on the server's JSON. One script sees
    one rendering."""
    rows = driver.execute_script(
        """return Array.from(document.querySelectorAll('#peers tr[data-peer-id]')).map(tr => {
            const cell = col => {
                const td = tr.querySelector(`td[data-col="${col}"]`);
                return td ? td.innerText : "";
            };
            return [tr.getAttribute('data-peer-id'), cell('round'), cell('step')];
        });"""
    )
    return {peer_id: (round_, step) for peer_id, round_, step in rows}


def _run_ids(driver) -> list[str]:
    """The runs listed, read in one script run (the list is re-rendered every period, like the peers table)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#runs li')).map(li => li.getAttribute('data-run-id'));"
    )


def _console_errors(driver) -> list[dict]:
    try:
        entries = driver.get_log("browser")
    except Exception:  # a driver without log support: nothing to check
        return []
    return [e for e in entries if e.get("level") == "SEVERE"]


def _wait(driver, what: str, predicate, timeout: float = 90, swarm: dict | None = None):
    """Wait for ``predicate`` on the page; on a timeout, say which of the swarm's processes are still alive and what
    a dead one printed last (a page that never shows a peer is usually a peer that exited)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: predicate(d), message=what)
    except TimeoutException:
        if swarm is None:
            raise
        procs = [swarm["boot"], *swarm["peers"], swarm["status"]]
        dead = [f"{p.name} exited:\n{p.output()[-3000:]}" for p in procs if not p.alive()]
        seen = {}
        for name in ("boot_url", "status_url"):  # what each server answers now, in short
            try:
                with urllib.request.urlopen(swarm[name] + "api/status", timeout=10) as response:
                    data = json.load(response)
                status = data.get("status") or {}
                seen[name] = dict(
                    runs=data.get("runs"),
                    run_id=data.get("run_id"),
                    error=data.get("error"),
                    peers=[(p.get("peer_id"), p.get("round"), p.get("stage")) for p in status.get("peers", [])],
                    rejected=status.get("rejected_reasons"),
                    updated_at=data.get("updated_at"),
                    now=data.get("now"),
                )
            except Exception as e:  # the diagnosis must not hide the timeout
                seen[name] = repr(e)
        raise AssertionError(
            f"{what}: not within {timeout}s; " + ("\n".join(dead) or "every process alive") + f"; servers: {seen}"
        ) from None


@pytest.mark.slow
def test_status_page_lists_the_peers_and_updates(browser, swarm):  # browser first: skip before starting a swarm
    browser.get(swarm["status_url"])
    first = _wait(
        browser, "both peers listed", lambda d: (rows := _rows(d)).keys() >= set(swarm["ids"]) and rows, swarm=swarm
    )
    _wait(
        browser,
        "the page updates (a peer's round or step changes)",
        lambda d: any(_rows(d).get(pid, first[pid]) != first[pid] for pid in swarm["ids"]),
    )
    from selenium.webdriver.common.by import By

    text = browser.find_element(By.TAG_NAME, "body").text
    assert f"run {RUN}" in text and "micro" in text and "tokens/s" in text
    assert re.search(r"updated \d\d:\d\d:\d\d", browser.find_element(By.ID, "updated").text)
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None, "no poller error"
    assert browser.find_element(By.ID, "peer-count").text == "2"
    assert browser.find_elements(By.CSS_SELECTOR, "#loss-chart path"), "the loss chart is drawn"
    assert _console_errors(browser) == []
    assert all(p.alive() for p in swarm["peers"])


@pytest.mark.slow
def test_bootstrap_page_lists_the_run(browser, swarm):
    from selenium.webdriver.common.by import By

    browser.get(swarm["boot_url"])
    _wait(
        browser,
        "the run listed",
        lambda d: _run_ids(d) == [RUN],
    )
    _wait(browser, "the only run shown, with both peers", lambda d: _rows(d).keys() >= set(swarm["ids"]), swarm=swarm)
    assert browser.find_element(By.ID, "run-title").text == f"run {RUN}"
    browser.get(swarm["boot_url"] + "?run=nope")
    _wait(
        browser, "an unknown run's error", lambda d: "run 'nope' was not found" in d.find_element(By.ID, "error").text
    )
    assert _console_errors(browser) == []


@pytest.mark.slow
def test_ctrl_c_stops_the_status_dashboard(swarm):
    proc = swarm["status"]
    with urllib.request.urlopen(swarm["status_url"] + "healthz", timeout=10) as response:
        assert json.load(response)["ok"] is True
    proc.popen.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, proc.output()[-3000:]
    assert "Traceback" not in proc.stderr
    port = int(swarm["status_url"].rsplit(":", 1)[1].strip("/"))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port is closed"
    assert Path(proc.dir).is_dir()
