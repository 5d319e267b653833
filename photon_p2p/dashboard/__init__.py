"""The web dashboard behind ``photon-status --serve`` and ``photon-bootstrap --serve``: one page, no framework.

- ``history.py``: ``History``, pure accumulation of successive ``photon_p2p.status.gather()`` snapshots into the
  time series the page draws (loss and validation perplexity per round, swarm tokens/s over time, each round's
  compute / matchmaking / all-reduce time, theta-hash agreement over time), in bounded memory. No I/O, no threads.
- ``server.py``: ``Dashboard``, a stdlib ``ThreadingHTTPServer`` plus a poller thread that calls a gather function
  every period and feeds one ``History`` per run; ``parse_serve`` for the ``--serve [HOST:]PORT`` flags; and
  ``serve_until_stopped``, the loop photon-status runs while it serves. Endpoints: ``GET /`` (the page),
  ``GET /api/status`` (latest snapshot + history as JSON), ``GET /healthz``.
- ``static/``: ``index.html``, ``app.js`` (vanilla JS, charts drawn as inline SVG) and ``style.css``. Nothing is
  loaded from elsewhere (the machines may be offline), and every string that comes from the swarm is untrusted: the
  page inserts it with ``textContent`` only, and the server forbids inline scripts (Content-Security-Policy).

Everything here imports only the standard library, so a command's flags can be validated without hivemind or torch.
"""
