// The photon-p2p dashboard: polls /api/status and redraws in place. No libraries, nothing loaded from elsewhere.
// Every string in the payload comes from other peers and is untrusted: it only ever reaches the page through
// textContent or setAttribute, never as markup (and the server's Content-Security-Policy forbids inline scripts).
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const DASH = "-";
  const $ = (id) => document.getElementById(id);
  const run = new URLSearchParams(location.search).get("run");

  // ------------------------------------------------------------------------------------------------------------
  // formatting

  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const fixed = (v, digits) => (num(v) === null ? DASH : v.toFixed(digits));
  const int = (v) => (num(v) === null ? DASH : Math.round(v).toLocaleString("en-US"));
  const str = (v) => (v === null || v === undefined || v === "" ? DASH : String(v));
  function human(v) {
    if (num(v) === null) return DASH;
    for (const [unit, size] of [["B", 1e9], ["M", 1e6], ["k", 1e3]]) {
      if (Math.abs(v) >= size) return (v / size).toFixed(2) + unit;
    }
    return v.toFixed(v < 10 ? 1 : 0);
  }
  const shortId = (id) => { id = String(id); return id.length <= 12 ? id : id.slice(0, 4) + ".." + id.slice(-6); };
  const shortHash = (h) => { h = String(h); return h.length <= 10 ? h : h.slice(0, 10) + "\u2026"; };
  function ago(seconds) {
    if (num(seconds) === null) return DASH;
    seconds = Math.max(0, seconds);
    if (seconds < 120) return seconds.toFixed(0) + "s";
    if (seconds < 7200) return (seconds / 60).toFixed(0) + "m";
    if (seconds < 172800) return (seconds / 3600).toFixed(0) + "h";
    return (seconds / 86400).toFixed(0) + "d";
  }
  const clock = (t) => (num(t) === null ? DASH : new Date(t * 1000).toLocaleTimeString("en-GB"));

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function row(cells, attrs) {
    const tr = document.createElement("tr");
    for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, String(v));
    for (const [value, cls, col, title] of cells) {
      const td = el("td", value, cls);
      if (col) td.dataset.col = col;
      if (title) td.title = String(title);
      tr.append(td);
    }
    return tr;
  }

  // ------------------------------------------------------------------------------------------------------------
  // charts: inline SVG, drawn from scratch on every update

  function niceTicks(lo, hi, count) {
    if (hi - lo < 1e-12) { lo -= 1; hi += 1; }
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];  // from a multiple of step at or below lo to one at or above hi, so the data fits inside
    for (let v = Math.floor(lo / step) * step; v < hi - step * 1e-9; v += step) out.push(v);
    out.push(out.length ? out[out.length - 1] + step : hi);
    return out;
  }
  function extent(values) {
    const vs = values.filter((v) => num(v) !== null);
    return vs.length ? [Math.min(...vs), Math.max(...vs)] : null;
  }
  const scale = (d0, d1, r0, r1) => (v) => (d1 === d0 ? (r0 + r1) / 2 : r0 + ((v - d0) * (r1 - r0)) / (d1 - d0));
  function pathOf(xs, ys, sx, sy) {  // breaks the line where a value is missing
    let d = "";
    let pen = false;
    xs.forEach((x, i) => {
      if (num(ys[i]) === null) { pen = false; return; }
      d += (pen ? "L" : "M") + sx(x).toFixed(1) + " " + sy(ys[i]).toFixed(1);
      pen = true;
    });
    return d;
  }
  function frame(target, w, h, emptyText) {
    target.replaceChildren();
    target.setAttribute("viewBox", `0 0 ${w} ${h}`);
    if (emptyText) target.append(svg("text", { x: w / 2, y: h / 2, class: "empty", "text-anchor": "middle" }, emptyText));
  }
  function yAxis(target, ticks, sy, x, anchor, format) {
    for (const t of ticks) {
      target.append(svg("text", { x, y: sy(t) + 4, class: "tick", "text-anchor": anchor }, format(t)));
    }
  }

  // A line chart of xs against one or two series (left and right axes), with an optional band on the left axis.
  function lineChart(target, { xs, left, right, band, xFormat, width = 960, height = 260, empty }) {
    const pad = { l: 52, r: right ? 52 : 12, t: 10, b: 26 };
    const data = extent([...(left ? left.values : []), ...(band ? [...band.lo, ...band.hi] : [])]);
    const ly = data && left.range ? left.range : data;
    if (!xs.length || (!ly && !(right && extent(right.values)))) { frame(target, width, height, empty); return; }
    frame(target, width, height);
    const [x0, x1] = extent(xs);
    const sx = scale(x0, x1, pad.l, width - pad.r);
    const bottom = height - pad.b;
    for (const t of niceTicks(x0, x1, 6).filter((t) => t >= x0 && t <= x1)) {
      target.append(svg("line", { x1: sx(t), x2: sx(t), y1: pad.t, y2: bottom, class: "grid" }));
      target.append(svg("text", { x: sx(t), y: height - 8, class: "tick", "text-anchor": "middle" }, xFormat(t)));
    }
    if (ly) {
      const ticks = niceTicks(ly[0], ly[1], 4);
      const sy = scale(ticks[0], ticks[ticks.length - 1], bottom, pad.t);
      yAxis(target, ticks, sy, pad.l - 6, "end", left.format);
      if (band) {
        const idx = xs.map((_, i) => i).filter((i) => num(band.lo[i]) !== null && num(band.hi[i]) !== null);
        if (idx.length > 1) {
          const pts = idx.map((i) => `${sx(xs[i]).toFixed(1)},${sy(band.hi[i]).toFixed(1)}`)
            .concat(idx.slice().reverse().map((i) => `${sx(xs[i]).toFixed(1)},${sy(band.lo[i]).toFixed(1)}`));
          target.append(svg("polygon", { points: pts.join(" "), class: band.cls }));
        }
      }
      target.append(svg("path", { d: pathOf(xs, left.values, sx, sy), class: left.cls }));
    }
    const ry = right && extent(right.values);
    if (ry) {
      const ticks = niceTicks(ry[0], ry[1], 4);
      const sy = scale(ticks[0], ticks[ticks.length - 1], bottom, pad.t);
      yAxis(target, ticks, sy, width - pad.r + 6, "start", right.format);
      target.append(svg("path", { d: pathOf(xs, right.values, sx, sy), class: right.cls }));
      xs.forEach((x, i) => {
        if (num(right.values[i]) !== null) target.append(svg("circle", { cx: sx(x), cy: sy(right.values[i]), r: 2.5, class: right.cls }));
      });
    }
  }

  function timelineChart(target, rounds) {
    const W = 960, H = 260, pad = { l: 52, r: 12, t: 10, b: 26 };
    const phases = [["train_s", "b-compute", "compute"], ["matchmaking_s", "b-mm", "matchmaking"], ["allreduce_s", "b-ar", "all-reduce"]];
    const data = rounds.filter((r) => phases.some(([k]) => num(r[k]) !== null)).slice(-60);
    if (!data.length) { frame(target, W, H, "no round summaries yet (peers send one after each round)"); return; }
    frame(target, W, H);
    const total = (r) => phases.reduce((s, [k]) => s + (num(r[k]) || 0), 0);
    const ticks = niceTicks(0, Math.max(...data.map(total)), 4);
    const sy = scale(0, ticks[ticks.length - 1], H - pad.b, pad.t);
    yAxis(target, ticks, sy, pad.l - 6, "end", (t) => t.toFixed(t < 10 ? 1 : 0) + "s");
    const slot = (W - pad.l - pad.r) / data.length;
    const every = Math.ceil(data.length / 12);
    data.forEach((r, i) => {
      const x = pad.l + i * slot + slot * 0.1;
      let base = 0;
      const g = svg("g", { "data-round": r.round });
      for (const [k, cls] of phases) {
        const v = num(r[k]) || 0;
        g.append(svg("rect", { x: x.toFixed(1), y: sy(base + v).toFixed(1), width: (slot * 0.8).toFixed(1),
          height: Math.max(0, sy(base) - sy(base + v)).toFixed(1), class: cls }));
        base += v;
      }
      const outcomes = Object.entries(r.outcomes || {}).map(([k, n]) => `${k} ${n}`).join(", ");
      g.append(svg("title", {}, `round ${r.round}: ` + phases.map(([k, , label]) => `${label} ${fixed(r[k], 2)}s`)
        .join(", ") + ` (${r.summarised} peer${r.summarised === 1 ? "" : "s"}${outcomes ? "; " + outcomes : ""})`));
      target.append(g);
      if (i % every === 0) {
        target.append(svg("text", { x: x + slot * 0.4, y: H - 8, class: "tick", "text-anchor": "middle" }, r.round));
      }
    });
  }

  // ------------------------------------------------------------------------------------------------------------
  // the sections of the page

  function renderRuns(d) {
    const picker = $("run-picker");
    if (d.mode !== "bootstrap") { picker.hidden = true; return; }
    const runs = d.runs || [];
    picker.hidden = Boolean(d.run_id) && runs.length <= 1;
    $("runs-empty").hidden = runs.length > 0;
    $("runs").replaceChildren(...runs.map((r) => {
      const li = el("li");
      li.dataset.runId = r.run_id;
      const a = el("a", r.run_id);
      a.href = "?run=" + encodeURIComponent(r.run_id);
      if (r.run_id === d.run_id) a.className = "current";
      li.append(a, el("span", ` manifest ${shortHash(r.manifest_hash || "")}`, "muted"));
      return li;
    }));
  }

  function renderManifest(s) {
    const m = s.manifest || {};
    const shape = m.model || {};
    const fields = [
      ["model", `${str(m.model_preset)}: ${human(m.parameters)} parameters (${str(shape.n_layers)} layers, d_model ${str(shape.d_model)})`],
      ["tokenizer", `${str(m.tokenizer)}${num(m.tokenizer_vocab) !== null ? ` (${int(m.tokenizer_vocab)} tokens)` : ""}`],
      ["round", num(m.round_seconds) !== null ? `${m.round_seconds}s rounds` : `${str(m.local_steps)} local steps`],
      ["outer optimizer", `${str(m.outer_optimizer)} lr ${str(m.outer_lr)}`],
      ["compression", str(m.compression)],
      ["max steps", int(m.max_steps)],
      ["batch / inner lr", `${str(m.batch_size)} / ${str(m.lr)}`],
      ["manifest", shortHash(str(m.hash))],
      ["created by", m.creator ? shortId(m.creator) : DASH],
      ["software", `photon-p2p ${str(m.software)}`],
    ];
    $("run-id").textContent = str(s.run_id);
    $("manifest").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  }

  function renderPeers(s) {
    const peers = Array.isArray(s.peers) ? s.peers : [];
    $("peer-count").textContent = String(peers.length);
    const stages = new Map();
    for (const p of peers) stages.set(str(p.stage), (stages.get(str(p.stage)) || 0) + 1);
    const clients = peers.filter((p) => p.client_mode === true).length;
    $("stages").textContent = [...stages.entries()].map(([k, n]) => `${n} ${k}`).join(", ") +
      (clients ? `; ${clients} in client mode` : "");
    $("peers-empty").hidden = peers.length > 0;
    $("peers").replaceChildren(...peers.map((p) => {
      const last = p.last_round && typeof p.last_round === "object" ? p.last_round : null;
      return row([
        [shortId(p.peer_id) + (p.client_mode ? " (client)" : ""), "id", "peer", p.peer_id],
        [str(p.stage), "", "stage"],
        [str(p.round), "n", "round"],
        [int(p.step), "n", "step"],
        [int(p.tokens_per_s), "n", "tokens_per_s"],
        [fixed(p.loss, 4), "n", "loss"],
        [fixed(p.val_ppl, 2), "n", "val_ppl"],
        [p.theta_hash ? shortHash(p.theta_hash) : DASH, "id", "theta", p.theta_hash],
        [last ? `${str(last.round)}: ${str(last.outcome)}` : DASH, "", "last_round"],
        [str(p.device), "", "device"],
        [ago(p.last_seen_s), "n", "seen"],
      ], { "data-peer-id": p.peer_id });
    }));
  }

  // time axes of the small charts: seconds (or minutes) before the latest snapshot
  function sinceFormat(pts) {
    const span = pts.length ? pts[pts.length - 1].t - pts[0].t : 0;
    return span < 300 ? (t) => `${Math.round(t)}s` : span < 18000 ? (t) => `${Math.round(t / 60)}m`
      : (t) => `${(t / 3600).toFixed(1)}h`;
  }

  function renderThroughput(s, h) {
    $("throughput").textContent = `${int(s.total_tokens_per_s)} tokens/s`;
    const pts = (h && h.throughput) || [];
    const t0 = pts.length ? pts[pts.length - 1].t : 0;
    lineChart($("throughput-chart"), { xs: pts.map((p) => p.t - t0), width: 320, height: 110,
      left: { values: pts.map((p) => p.tokens_per_s), cls: "l-tput", format: human },
      xFormat: sinceFormat(pts), empty: "collecting..." });
  }

  function agreementOf(s) {
    if (s.theta_agreement && typeof s.theta_agreement === "object") {
      return Object.entries(s.theta_agreement).filter(([, n]) => num(n) !== null).sort((a, b) => b[1] - a[1]);
    }
    const counts = new Map();
    for (const p of s.peers || []) if (p.theta_hash) counts.set(p.theta_hash, (counts.get(p.theta_hash) || 0) + 1);
    return [...counts.entries()].sort((a, b) => b[1] - a[1]);
  }

  function renderTheta(s, h) {
    const box = $("theta");
    const groups = agreementOf(s);
    const peers = (s.peers || []).length;
    const plural = (n) => `${n} peer${n === 1 ? "" : "s"}`;
    if (!groups.length) {
      box.replaceChildren(el("span", DASH), el("span", " (no peer reports a theta hash)", "muted"));
    } else if (groups.length === 1) {
      const [hash, n] = groups[0];
      // theta_agreement counts the peers at the newest round (one still averaging the round before differs)
      const code = el("code", shortHash(hash));
      code.title = hash;
      box.replaceChildren(el("span", "the peers at the newest round agree on theta "), code,
        el("span", ` (${n} of ${plural(peers)})`, "muted"));
    } else {
      const list = el("ul", null, "split");
      for (const [hash, n] of groups.slice(0, 8)) {
        const li = el("li");
        li.append(el("code", shortHash(hash)), el("span", ` ${plural(n)}`));
        list.append(li);
      }
      box.replaceChildren(el("span", `split: ${groups.length} different thetas`, "warn"), list);
    }
    const pts = (h && h.theta) || [];
    const t0 = pts.length ? pts[pts.length - 1].t : 0;
    const share = (p) => {
      const total = (p.hashes || []).reduce((a, [, n]) => a + n, 0) + (p.other || 0);
      return total && p.hashes.length ? (100 * p.hashes[0][1]) / total : null;
    };
    lineChart($("theta-chart"), { xs: pts.map((p) => p.t - t0), width: 320, height: 110,
      left: { values: pts.map(share), cls: "l-theta", format: (v) => `${v.toFixed(0)}%`, range: [0, 100] },
      xFormat: sinceFormat(pts), empty: "no theta hashes reported" });
  }

  function renderRounds(h) {
    const rounds = (h && h.rounds) || [];
    lineChart($("loss-chart"), { xs: rounds.map((r) => r.round),
      left: { values: rounds.map((r) => r.loss_mean), cls: "l-loss", format: (v) => v.toFixed(2) },
      band: { lo: rounds.map((r) => r.loss_min), hi: rounds.map((r) => r.loss_max), cls: "band" },
      right: { values: rounds.map((r) => r.val_ppl), cls: "l-ppl", format: (v) => v.toFixed(v < 100 ? 1 : 0) },
      xFormat: (t) => String(Math.round(t)), empty: "no rounds reported yet" });
    timelineChart($("timeline-chart"), rounds);
  }

  function renderLeaderboard(s, now) {
    const board = Array.isArray(s.leaderboard) ? s.leaderboard : [];
    $("leaderboard-empty").hidden = board.length > 0;
    $("leaderboard").replaceChildren(...board.slice(0, 100).map((c, i) => row([
      [i + 1, "n", "rank"],
      [shortId(c.peer_id), "id", "peer", c.peer_id],
      [human(c.tokens), "n", "tokens"],
      [int(c.rounds_averaged), "n", "rounds_averaged"],
      [int(c.rounds), "n", "rounds"],
      [c.live === true ? "live" : c.live === false ? "left" : DASH, c.live ? "ok" : "muted", "live"],
      [num(c.last_update) !== null ? ago(now - c.last_update) + " ago" : DASH, "n", "last_update"],
    ], { "data-peer-id": c.peer_id })));
  }

  function renderRejected(s) {
    const n = num(s.rejected_records) || 0;
    const reasons = Object.entries(s.rejected_reasons || {}).map(([k, v]) => `${k} (${v})`).join(", ");
    $("rejected").textContent = n ? `dropped ${n} invalid record${n === 1 ? "" : "s"}: ${reasons}` : "";
  }

  function renderError(err, updatedAt) {
    const box = $("error");
    if (!err) { box.hidden = true; return; }
    const recovered = num(updatedAt) !== null && updatedAt > err.at;
    box.hidden = false;
    box.className = recovered ? "error recovered" : "error";
    box.textContent = `${recovered ? "last error (since recovered)" : "error"} at ${clock(err.at)}` +
      `${err.what ? " (" + err.what + ")" : ""}: ${err.message}`;
  }

  function render(d) {
    renderError(d.error, d.updated_at);
    renderRuns(d);
    const s = d.status;
    $("run-view").hidden = !s;
    const updated = $("updated");
    if (!s) {
      $("run-title").textContent = "dashboard";
      updated.textContent = d.run_id ? `waiting for the first snapshot of run ${d.run_id}...`
        : d.mode === "bootstrap" ? "pick a run" : "waiting for the first snapshot...";
      return;
    }
    $("run-title").textContent = `run ${str(s.run_id)}`;
    document.title = `${str(s.run_id)} - photon-p2p dashboard`;
    renderManifest(s);
    renderPeers(s);
    renderThroughput(s, d.history);
    renderTheta(s, d.history);
    renderRounds(d.history);
    renderLeaderboard(s, d.now);
    renderRejected(s);
    updated.textContent = `updated ${clock(d.updated_at)} (${ago(d.now - d.updated_at)} ago; every ${d.period}s)`;
    updated.dataset.at = String(d.updated_at);
  }

  function showError(message) {
    const box = $("error");
    box.hidden = false;
    box.className = "error";
    box.textContent = `error at ${clock(Date.now() / 1000)}: ${message}`;
  }

  async function poll() {
    let delay = 3000;
    try {
      const response = await fetch("/api/status" + (run ? "?run=" + encodeURIComponent(run) : ""), { cache: "no-store" });
      const data = await response.json();
      if (response.ok) {
        render(data);
        delay = Math.min(5, Math.max(1, num(data.period) || 3)) * 1000;
      } else {
        showError(data.error || `HTTP ${response.status}`);
      }
    } catch (e) {
      showError(`cannot reach the dashboard server (${e.message})`);
    }
    setTimeout(poll, delay);
  }

  poll();
})();
