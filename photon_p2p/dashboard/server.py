"""The dashboard's web server: a stdlib ``ThreadingHTTPServer`` and a poller thread, both daemon threads.

The poller calls ``gather(run_id)`` (in practice ``photon_p2p.status.gather`` over the command's DHT client) every
``period`` seconds and folds each snapshot into that run's ``History``. A failed poll is recorded (message and time,
shown on the page) and never stops the server; the page keeps showing the last good snapshot. The HTTP handlers
only read what the poller stored, so a slow DHT never holds up a page load.

Two modes: one fixed run (photon-status), or the runs announced in the DHT (photon-bootstrap, ``list_runs``): the
page picks one with ``?run=ID``, and the poller gathers the runs pages asked for in the last minutes (at most
``MAX_WATCHED_RUNS``), or the only run there is.

Endpoints: ``GET /`` the page, ``GET /static/{app.js,style.css}``, ``GET /api/status[?run=ID]`` the latest snapshot
and the history as JSON, ``GET /healthz`` (200 while the poller runs). There is no authentication: the page shows
only what anyone on the DHT can read, and the default bind address is loopback; another address gets a warning.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import socketserver
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from photon_p2p.config import RUN_ID_PATTERN
from photon_p2p.dashboard.history import History
from photon_p2p.errors import ConfigError, SwarmError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PERIOD = 5.0
MAX_WATCHED_RUNS = 8  # bootstrap mode: runs gathered each period, so a visitor cannot make us read the whole DHT
WATCH_TTL = 180.0  # seconds a run stays watched after a page last asked for it
MIN_POLL_GAP = 1.0  # a page asking for a new run wakes the poller early, but never more often than this
MAX_LISTED_RUNS = 200
HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$|^\[[0-9A-Fa-f:.]+\]$")
STATIC = {  # URL path -> (file in static/, content type); nothing else is ever read from disk
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# no inline scripts or styles at all: even if a swarm string ever reached the DOM as markup, it could not run
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SERVE_HINT = "expected [HOST:]PORT with a port from 0 to 65535, e.g. 8080 or 127.0.0.1:8080 ([::1]:8080 for IPv6)"

Gather = Callable[[str], dict[str, Any]]


def parse_serve(value: str, flag: str = "--serve") -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to 127.0.0.1, port 0 picks a free one. IPv6 in brackets."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535) or not HOST_RE.match(host):
        raise ConfigError(f"{flag} {value!r}: {SERVE_HINT}")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public address


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _block_signals() -> None:
    """Called first in each of our threads: SIGINT/SIGTERM then go to the main thread, where the command handles
    them. A signal landing in a worker thread would only interrupt its system calls (see swarm.dht.signals_deferred
    for the torch hang that causes); Python runs the handlers in the main thread anyway."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity (the browser's JSON.parse rejects them): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _describe(error: BaseException) -> str:
    message = str(error)[:500]
    if isinstance(error, SwarmError) and message:
        return message  # already written for users
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class Dashboard:
    """Serves one run (``run_id``) or the runs ``list_runs()`` returns (dicts with run_id, manifest_hash, time)."""

    def __init__(
        self,
        gather: Gather,
        *,
        run_id: str | None = None,
        list_runs: Callable[[], list[dict[str, Any]]] | None = None,
        period: float = DEFAULT_PERIOD,
        initial: dict[str, Any] | None = None,
    ):
        if (run_id is None) == (list_runs is None):
            raise ValueError("give either run_id or list_runs")
        self.gather, self.run_id, self.list_runs, self.period = gather, run_id, list_runs, period
        self._pages = {
            path: (resources.files(__package__).joinpath("static", name).read_bytes(), ctype)
            for path, (name, ctype) in STATIC.items()
        }
        self._lock = threading.Lock()
        self._histories: OrderedDict[str, History] = OrderedDict()
        self._latest: dict[str, dict[str, Any]] = {}
        self._errors: dict[str, dict[str, Any]] = {}  # by run id; "" for listing the runs
        self._watched: OrderedDict[str, float] = OrderedDict()  # run id -> when a page last asked for it
        self._runs: list[dict[str, Any]] | None = None
        self._stop, self._wake = threading.Event(), threading.Event()
        self._httpd: _Server | None = None
        self._threads: list[threading.Thread] = []
        self.last_poll: float | None = None
        self.host, self.port = DEFAULT_HOST, 0
        self._initial = initial is not None
        if initial is not None and run_id is not None:
            self._record(run_id, initial)

    @property
    def url(self) -> str:
        return url_of(self.host, self.port)

    # ----------------------------------------------------------------------------------------------------------
    # polling

    def _record(self, run_id: str, status: dict[str, Any]) -> None:
        with self._lock:
            history = self._histories.get(run_id)
            if history is None:
                history = self._histories[run_id] = History()
                while len(self._histories) > MAX_WATCHED_RUNS + 1:
                    dropped, _ = self._histories.popitem(last=False)
                    self._latest.pop(dropped, None)
            self._histories.move_to_end(run_id)
            history.add(status)
            self._latest[run_id] = status

    def _fail(self, key: str, error: BaseException) -> None:
        message = _describe(error)
        with self._lock:
            repeated = self._errors.get(key, {}).get("message") == message
            self._errors[key] = {"message": message, "at": time.time(), "what": key or "listing runs"}
            if len(self._errors) > 2 * MAX_WATCHED_RUNS + 1:  # run ids typed by visitors: keep the newest errors
                del self._errors[min((k for k in self._errors if k), key=lambda k: self._errors[k]["at"])]
        if not repeated:  # once per distinct problem: a DHT that stays down must not flood the log
            # a run a visitor typed into ?run= is their problem, not the operator's: only debug-logged
            level = logging.WARNING if not key or key == self.run_id else logging.DEBUG
            logger.log(level, "dashboard: %s failed: %s", f"reading run {key!r}" if key else "listing runs", message)

    def _targets(self) -> list[str]:
        if self.run_id is not None:
            return [self.run_id]
        assert self.list_runs is not None
        try:
            runs = self.list_runs()[:MAX_LISTED_RUNS]
            with self._lock:
                self._runs = runs
        except Exception as e:  # the page keeps the last list it had
            self._fail("", e)
        with self._lock:
            expired = time.monotonic() - WATCH_TTL
            for run_id in [r for r, at in self._watched.items() if at < expired]:
                del self._watched[run_id]
            targets = list(self._watched)
            listed = [r["run_id"] for r in self._runs or []]
        if len(listed) == 1 and listed[0] not in targets:
            targets.append(listed[0])
        return targets

    def poll_once(self) -> None:
        """One round of reads: every target run's status into its history, failures recorded."""
        for run_id in self._targets():
            try:
                status = self.gather(run_id)
            except Exception as e:
                self._fail(run_id, e)
                continue
            self._record(run_id, status)
        self.last_poll = time.time()

    def _poll_loop(self) -> None:
        _block_signals()
        if self._initial:  # the command has just gathered once: the next read is due one period from now
            self._wake.wait(self.period)
            self._wake.clear()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception as e:  # a bug in a gather function: shown on the page, and we keep polling
                self._fail(self.run_id or "", e)
            remaining = self.period - (time.monotonic() - started)
            if remaining > 0:
                self._wake.wait(remaining)
            self._wake.clear()
            gap = MIN_POLL_GAP - (time.monotonic() - started)
            if gap > 0:
                self._stop.wait(gap)

    # ----------------------------------------------------------------------------------------------------------
    # what the handlers answer (they run in the server's threads; they only read what the poller stored)

    def api_status(self, run: str | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if run is not None and not RUN_ID_PATTERN.match(run):
                return 400, {"error": "run: use 1-64 letters, digits, '-' or '_'"}
            if self.run_id is not None:
                if run is not None and run != self.run_id:
                    return 404, {"error": f"this dashboard shows run {self.run_id!r} only"}
                selected: str | None = self.run_id
            elif run is not None:
                if run not in self._watched and run not in self._latest:
                    self._wake.set()  # read it now rather than at the next period
                self._watched[run] = time.monotonic()
                self._watched.move_to_end(run)
                while len(self._watched) > MAX_WATCHED_RUNS:
                    self._watched.popitem(last=False)
                selected = run
            else:
                listed = [r["run_id"] for r in self._runs or []]
                selected = listed[0] if len(listed) == 1 else None
            history = self._histories.get(selected) if selected else None
            errors = [e for e in (self._errors.get(selected) if selected else None, self._errors.get("")) if e]
            payload = {
                "mode": "status" if self.run_id is not None else "bootstrap",
                "now": time.time(),
                "period": self.period,
                "runs": None if self._runs is None else list(self._runs),
                "run_id": selected,
                "status": self._latest.get(selected) if selected else None,
                "updated_at": history.updated_at if history else None,
                "history": history.to_dict() if history else None,
                "error": max(errors, key=lambda e: e["at"]) if errors else None,
                "last_poll": self.last_poll,
            }
        return 200, payload

    def health(self) -> tuple[int, dict[str, Any]]:
        polling = any(t.name == "photon-dashboard-poll" and t.is_alive() for t in self._threads)
        return (200 if polling else 503), {"ok": polling, "last_poll": self.last_poll}

    # ----------------------------------------------------------------------------------------------------------
    # life cycle

    def start(self, host: str = DEFAULT_HOST, port: int = 0, *, flag: str = "--serve") -> Dashboard:
        """Listen and start both threads; a port that cannot be bound is a one-line ConfigError naming ``flag``."""
        server_class = _Server6 if ":" in host else _Server
        try:
            self._httpd = server_class((host, port), _Handler)
        except (OSError, OverflowError) as e:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"{flag} {where}: cannot listen there ({getattr(e, 'strerror', None) or e})") from None
        self._httpd.dashboard = self
        self.host, self.port = host, self._httpd.server_address[1]
        if not is_loopback(host):
            logger.warning(
                "the dashboard at %s is public: anyone who can reach this machine can open it (there is "
                "no authentication; it shows what the DHT already tells everyone)",
                self.url,
            )
        httpd = self._httpd

        def serve() -> None:
            _block_signals()
            httpd.serve_forever(poll_interval=0.5)

        self._threads = [
            threading.Thread(target=serve, name="photon-dashboard-http", daemon=True),
            threading.Thread(target=self._poll_loop, name="photon-dashboard-poll", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and polling (a poll still waiting for the DHT is left to finish on its own: daemon thread)."""
        self._stop.set()
        self._wake.set()
        if self._httpd is not None:
            if self._threads and self._threads[0].is_alive():
                self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for thread in self._threads:
            thread.join(timeout=2.0)


def serve_until_stopped(
    dashboard: Dashboard, host: str, port: int, *, out: TextIO, alive: Callable[[], bool], dead: str
) -> None:
    """Start the dashboard, print where it is, and serve until Ctrl-C/SIGTERM (KeyboardInterrupt, re-raised) or
    until ``alive()`` turns false (SwarmError ``dead``); the dashboard is stopped either way."""
    dashboard.start(host, port)
    try:
        print(f"dashboard at {dashboard.url} (Ctrl-C to stop)", file=out, flush=True)
        while alive():
            time.sleep(0.5)
        raise SwarmError(dead)
    finally:
        dashboard.stop()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a hung browser connection must not keep the command from exiting
    dashboard: Dashboard

    def server_bind(self) -> None:
        # HTTPServer's version looks up the host's FQDN, which on an offline machine can wait for DNS to time out
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "photon-dashboard"
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return self.server_version  # not the Python version

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        dashboard = self.server.dashboard
        if url.path in dashboard._pages:
            body, ctype = dashboard._pages[url.path]
            self._send(200, body, ctype, head)
        elif url.path == "/api/status":
            runs = parse_qs(url.query).get("run")
            self._send_json(*dashboard.api_status(runs[0] if runs else None), head=head)
        elif url.path == "/healthz":
            self._send_json(*dashboard.health(), head=head)
        elif url.path == "/favicon.ico":  # browsers ask for it; a 404 would show up as a console error
            self._send(204, b"", None, head)
        else:
            self._send_json(404, {"error": "not found"}, head=head)

    def _send_json(self, code: int, payload: dict[str, Any], *, head: bool) -> None:
        body = json.dumps(_finite(payload), allow_nan=False, separators=(",", ":")).encode()
        self._send(code, body, "application/json", head)

    def _send(self, code: int, body: bytes, ctype: str | None, head: bool) -> None:
        self.send_response(code)
        if ctype is not None:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)
