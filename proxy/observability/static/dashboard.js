// Frugal live dashboard: polls the JSON snapshot, turns cumulative counts into rates from the
// difference between two polls, and draws small canvas charts. No dependencies, no build step.
// Every number drawn is also written into the DOM (text and data-* attributes), so tests and
// screen readers see what the charts show.
"use strict";

(() => {
  const body = document.body;
  const DATA_URL = body.dataset.dataUrl || "/dashboard/data";
  const POLL_MS = Number(body.dataset.pollMs) || 2000;
  const HISTORY = 150; // points kept per series: 5 minutes at one poll per 2 s
  const MIN_SPAN = 30; // charts span at least this many polls, so a fresh page is not a sliver

  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim() || "#888";
  const PALETTE = ["--c0", "--c1", "--c2", "--c3", "--c4", "--c5"].map(color);
  const C = {
    line: color("--line"),
    muted: color("--muted"),
    good: color("--good"),
    bad: color("--bad"),
  };

  const state = {
    prev: null,
    polls: 0,
    failures: 0,
    throughput: [], // {rps, hitRps, errRps}
    latency: [], // {p50, p95, p99}
    engines: new Map(), // engine -> [{running, waiting}]
  };

  // ---- formatting ------------------------------------------------------------------------

  const DASH = "–";

  function fmtRate(x) {
    if (x == null || !Number.isFinite(x)) return DASH;
    if (x >= 10000) return (x / 1000).toFixed(0) + "k";
    if (x >= 1000) return (x / 1000).toFixed(1) + "k";
    if (x >= 100) return x.toFixed(0);
    if (x >= 10) return x.toFixed(1);
    return x.toFixed(2);
  }

  function fmtCount(x) {
    if (x == null || !Number.isFinite(x)) return DASH;
    if (x >= 1e6) return (x / 1e6).toFixed(1) + "M";
    if (x >= 1e4) return (x / 1e3).toFixed(1) + "k";
    return String(Math.round(x));
  }

  function fmtSeconds(s) {
    if (s == null || !Number.isFinite(s)) return DASH;
    if (s === 0) return "0";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 0.01) return (s * 1000).toFixed(2) + " ms";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 100) return s.toFixed(2) + " s";
    return s.toFixed(0) + " s";
  }

  function fmtPct(r) {
    if (r == null || !Number.isFinite(r)) return DASH;
    return (r * 100).toFixed(r >= 0.995 || r === 0 ? 0 : 1) + "%";
  }

  function fmtUsd(x) {
    if (x == null || !Number.isFinite(x)) return DASH;
    if (x === 0) return "$0";
    if (x >= 100) return "$" + x.toFixed(0);
    if (x >= 0.1) return "$" + x.toFixed(2);
    if (x >= 0.01) return "$" + x.toFixed(3);
    return "$" + x.toPrecision(2);
  }

  function fmtAgo(s) {
    return s >= 90 ? `-${Math.round(s / 60)} min` : `-${Math.round(s)} s`;
  }

  function fmtDuration(s) {
    if (s == null || !Number.isFinite(s)) return DASH;
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  }

  // ---- DOM helpers -----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null) continue;
      if (k === "class") node.className = v;
      else if (k === "style") node.setAttribute("style", v);
      else node.setAttribute(k, String(v));
    }
    for (const child of children) {
      if (child == null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setMetric(name, value, text) {
    for (const node of document.querySelectorAll(`[data-metric="${name}"]`)) {
      node.textContent = text;
      node.dataset.value = value == null || !Number.isFinite(value) ? "" : String(value);
    }
  }

  const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + b, 0);
  const sortedKeys = (obj) => Object.keys(obj || {}).sort();
  const push = (list, item) => {
    list.push(item);
    if (list.length > HISTORY) list.shift();
  };

  function cacheHits(byCache) {
    let hits = 0;
    for (const [outcome, n] of Object.entries(byCache || {})) if (outcome.startsWith("hit")) hits += n;
    return hits;
  }

  // ---- charts ----------------------------------------------------------------------------

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= v) return m * exp;
    return 10 * exp;
  }

  function prepareCanvas(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(10, canvas.clientWidth), h = Math.max(10, canvas.clientHeight);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    return { ctx, w, h };
  }

  // series: [{key, label, color, values: [number|null]}]; values right-aligned (newest right).
  function drawLines(canvas, series, fmt, opts = {}) {
    const { ctx, w, h } = prepareCanvas(canvas);
    const pad = { l: opts.padLeft || 52, r: 10, t: 8, b: 18 };
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    let max = 0;
    for (const s of series) for (const v of s.values) if (v != null && v > max) max = v;
    const top = niceMax(max);

    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = pad.t + ph - (ph * i) / 4;
      ctx.strokeStyle = C.line;
      ctx.beginPath();
      ctx.moveTo(pad.l, Math.round(y) + 0.5);
      ctx.lineTo(w - pad.r, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillStyle = C.muted;
      ctx.textAlign = "right";
      ctx.fillText(fmt((top * i) / 4), pad.l - 6, y);
    }
    const n = Math.max(1, ...series.map((s) => s.values.length));
    const span = Math.min(HISTORY, Math.max(MIN_SPAN, n));
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(fmtAgo(((span - 1) * POLL_MS) / 1000), pad.l, h - 3);
    ctx.textAlign = "right";
    ctx.fillText("now", w - pad.r, h - 3);

    // Newest point at the right edge; older points to the left, one slot per poll.
    const x = (i, len) => pad.l + (pw * (span - len + i)) / (span - 1);
    const y = (v) => pad.t + ph - (ph * v) / top;
    for (const s of series) {
      const n = s.values.length;
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.beginPath();
      let drawing = false, last = null;
      s.values.forEach((v, i) => {
        if (v == null) {
          drawing = false;
          return;
        }
        if (drawing) ctx.lineTo(x(i, n), y(v));
        else ctx.moveTo(x(i, n), y(v));
        drawing = true;
        last = [x(i, n), y(v)];
      });
      ctx.stroke();
      if (last) {
        ctx.fillStyle = s.color;
        ctx.beginPath();
        ctx.arc(last[0], last[1], 3, 0, 2 * Math.PI);
        ctx.fill();
      }
      const lastValue = [...s.values].reverse().find((v) => v != null);
      canvas.setAttribute(`data-last-${s.key}`, lastValue == null ? "" : String(lastValue));
    }
    canvas.dataset.points = String(Math.max(0, ...series.map((s) => s.values.length)));
    canvas.dataset.max = String(top);

    const legend = document.querySelector(`.legend[data-for="${canvas.id}"]`);
    if (legend) {
      legend.replaceChildren(
        ...series.map((s) => {
          const lastValue = [...s.values].reverse().find((v) => v != null);
          return el("span", { "data-series": s.key }, el("i", { style: `background:${s.color}` }),
            s.label, " ", el("b", {}, fmt(lastValue)));
        }),
      );
    }
  }

  function drawSpark(canvas, points) {
    const { ctx, w, h } = prepareCanvas(canvas);
    let max = 0;
    for (const p of points) max = Math.max(max, p.running, p.waiting);
    const top = niceMax(max);
    const span = Math.min(HISTORY, Math.max(MIN_SPAN, points.length));
    const x = (i) => w - ((points.length - 1 - i) * w) / (span - 1);
    const y = (v) => h - 2 - ((h - 4) * v) / top;
    for (const [key, col] of [["running", PALETTE[0]], ["waiting", PALETTE[1]]]) {
      ctx.strokeStyle = col;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p[key])) : ctx.moveTo(x(i), y(p[key]))));
      ctx.stroke();
    }
    ctx.fillStyle = C.muted;
    ctx.font = "10px system-ui, sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(`max ${fmtCount(top)}`, 2, 1);
  }

  // ---- panels ----------------------------------------------------------------------------

  function renderThroughput() {
    const t = state.throughput;
    drawLines(document.getElementById("chart-throughput"), [
      { key: "rps", label: "all", color: PALETTE[0], values: t.map((p) => p.rps) },
      { key: "hit-rps", label: "from cache", color: C.good, values: t.map((p) => p.hitRps) },
      { key: "err-rps", label: "errors", color: C.bad, values: t.map((p) => p.errRps) },
    ], fmtRate, { padLeft: 40 });
  }

  function renderLatency() {
    const l = state.latency;
    drawLines(document.getElementById("chart-latency"), [
      { key: "p50", label: "p50", color: PALETTE[0], values: l.map((p) => p.p50) },
      { key: "p95", label: "p95", color: PALETTE[1], values: l.map((p) => p.p95) },
      { key: "p99", label: "p99", color: PALETTE[4], values: l.map((p) => p.p99) },
    ], fmtSeconds, { padLeft: 56 });
  }

  function renderLatencyTable(latency) {
    for (const row of document.querySelectorAll("#latency-table tbody tr")) {
      const qs = (latency || {})[row.dataset.kind] || {};
      for (const cell of row.querySelectorAll("td")) {
        const v = qs[cell.dataset.q];
        cell.textContent = fmtSeconds(v);
        cell.dataset.value = v == null ? "" : String(v);
      }
    }
  }

  function renderOutcomes(requests) {
    const total = requests.total || 0;
    if (!total) return;
    const rows = sortedKeys(requests.by_cache).map((k) => [k, requests.by_cache[k]]);
    rows.push(["errors (HTTP 5xx)", requests.errors]);
    document.querySelector("#outcomes-table tbody").replaceChildren(
      ...rows.map(([name, n]) => el("tr", { "data-outcome": name, "data-count": n },
        el("td", {}, name), el("td", {}, fmtCount(n)), el("td", {}, fmtPct(n / total)))),
    );
  }

  function renderCache(cache) {
    const root = document.getElementById("cache-bars");
    const kinds = sortedKeys(cache);
    if (!kinds.length) return;
    root.replaceChildren(
      ...kinds.map((kind, i) => {
        const c = cache[kind];
        const rate = c.hit_rate == null ? 0 : c.hit_rate;
        return el("div", { class: "bar-row", "data-kind": kind, "data-hit-rate": c.hit_rate ?? "",
          "data-hits": c.hits, "data-lookups": c.lookups },
        el("span", { class: "bar-name" }, kind),
        el("div", { class: "bar-track" },
          el("div", { class: "bar-fill", style: `width:${(rate * 100).toFixed(1)}%;background:${kind === "exact" ? PALETTE[0] : PALETTE[2 + (i % 3)]}` })),
        el("span", { class: "bar-val" }, fmtPct(c.hit_rate)),
        el("span", { class: "bar-sub" }, `${fmtCount(c.hits)} hits of ${fmtCount(c.lookups)} lookups`));
      }),
    );
  }

  function engineColor(names, name) {
    return PALETTE[Math.max(0, names.indexOf(name)) % PALETTE.length];
  }

  function renderRoutes(routes, engineNames) {
    const byEngine = (routes || {}).by_engine || {};
    const total = sum(byEngine);
    if (!total) return;
    const names = sortedKeys(byEngine);
    document.getElementById("route-mix").replaceChildren(
      ...names.map((name) => el("div", {
        "data-engine": name,
        title: `${name}: ${byEngine[name]}`,
        style: `width:${((100 * byEngine[name]) / total).toFixed(2)}%;background:${engineColor(engineNames, name)}`,
      })),
    );
    document.getElementById("route-legend").replaceChildren(
      ...names.map((name) => el("li", { "data-engine": name, "data-count": byEngine[name],
        "data-share": byEngine[name] / total },
      el("i", { style: `background:${engineColor(engineNames, name)}` }),
      el("span", {}, name),
      el("b", {}, fmtCount(byEngine[name])),
      el("span", { class: "pct" }, fmtPct(byEngine[name] / total)))),
    );
    const reasons = (routes || {}).by_reason || {};
    document.getElementById("route-reasons").replaceChildren(
      ...sortedKeys(reasons).sort((a, b) => reasons[b] - reasons[a]).map((reason) =>
        el("span", { class: "chip", "data-reason": reason }, reason, " ", el("b", {}, fmtCount(reasons[reason])))),
    );
  }

  function renderEngines(engines) {
    const names = sortedKeys(engines);
    if (!names.length) return;
    const root = document.getElementById("engines");
    const cards = names.map((name) => {
      const e = engines[name];
      const history = state.engines.get(name) || [];
      const replicaNames = sortedKeys(e.replicas);
      const spark = el("canvas", { class: "spark", "aria-label": `${name} running and waiting` });
      const card = el("div", { class: "engine", "data-engine": name, "data-running": e.running,
        "data-waiting": e.waiting, "data-queue": e.queue_length,
        "data-healthy-replicas": e.healthy_replicas, "data-replicas": replicaNames.length },
      el("div", { class: "engine-head" },
        el("span", { class: "engine-name" }, name),
        el("span", { class: "engine-sum" },
          el("b", {}, fmtCount(e.healthy_replicas)), `/${replicaNames.length} healthy`)),
      el("div", { class: "legend" },
        el("span", {}, el("i", { style: `background:${PALETTE[0]}` }), "running ", el("b", {}, fmtCount(e.running))),
        el("span", {}, el("i", { style: `background:${PALETTE[1]}` }), "waiting ", el("b", {}, fmtCount(e.waiting))),
        el("span", {}, "proxy queue ", el("b", {}, fmtCount(e.queue_length)))),
      spark,
      replicaNames.length ? el("div", { class: "table-wrap" }, el("table", { class: "replicas" },
        el("thead", {}, el("tr", {}, ...["replica", "health", "breaker", "run", "wait", "KV cache"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...replicaNames.map((rn) => {
          const r = e.replicas[rn];
          const health = r.healthy == null ? "unknown" : r.healthy ? "up" : "down";
          const kv = Math.max(0, Math.min(1, r.kv_usage || 0));
          return el("tr", { "data-replica": rn, "data-healthy": String(r.healthy),
            "data-breaker": r.breaker || "", "data-running": r.running, "data-waiting": r.waiting },
          el("td", { class: "replica-name", title: rn }, rn.replace(/^https?:\/\//, "")),
          el("td", {}, el("span", { class: `dot ${health}` }), health),
          el("td", { class: `breaker-${r.breaker || "none"}` }, r.breaker ? r.breaker.replace("_", "-") : DASH),
          el("td", {}, fmtCount(r.running)),
          el("td", {}, fmtCount(r.waiting)),
          el("td", {}, el("span", { class: "kv" }, el("span", { style: `width:${(kv * 100).toFixed(0)}%` })), fmtPct(r.kv_usage)));
        })))) : null);
      return { card, spark, history };
    });
    root.replaceChildren(...cards.map((c) => c.card));
    for (const c of cards) drawSpark(c.spark, c.history);
  }

  // Shadow checks: the audited disagreement rate, its Wilson bounds, the tuned cut-off.
  function audited(t) {
    const parts = [];
    if (t.audits) parts.push(`${fmtPct(t.audit_rate)} [${fmtPct(t.audit_low)}–${fmtPct(t.audit_high)}] of ${fmtCount(t.audits)}`);
    if (t.cache_cutoff != null) parts.push(`cut-off ${t.cache_cutoff.toFixed(2)}`);
    if (t.strong_share != null) parts.push(`strong ${fmtPct(t.strong_share)}`);
    return parts.length ? parts.join(" · ") : "–";
  }

  function renderTiers(tiers) {
    const names = sortedKeys(tiers);
    if (!names.length) return;
    document.querySelector("#tiers-table tbody").replaceChildren(
      ...names.map((name) => {
        const t = tiers[name];
        const limit = t.budget_limit_usd;
        const budget = limit
          ? el("span", { class: "budget" },
            el("span", { class: "kv" }, el("span", { style: `width:${Math.min(100, (100 * t.budget_spent_usd) / limit).toFixed(0)}%` })),
            `${fmtUsd(t.budget_spent_usd)} / ${fmtUsd(limit)}`)
          : fmtUsd(t.budget_spent_usd);
        return el("tr", { "data-tier": name, "data-requests": t.requests, "data-cost": t.cost_usd,
          "data-saved-cache": t.saved_cache_usd, "data-saved-routing": t.saved_routing_usd },
        el("td", {}, name),
        el("td", {}, fmtCount(t.requests)),
        el("td", {}, fmtUsd(t.cost_usd)),
        el("td", {}, fmtUsd(t.saved_cache_usd)),
        el("td", {}, fmtUsd(t.saved_routing_usd)),
        el("td", {}, budget),
        el("td", { "data-audits": t.audits ?? "", "data-audit-rate": t.audit_rate ?? "" }, audited(t)));
      }),
    );
  }

  function renderRollout(rollout) {
    const names = sortedKeys(rollout);
    const panel = document.getElementById("rollout-panel");
    panel.hidden = !names.length;
    if (!names.length) return;
    const rows = [];
    const states = [];
    const ms = (v) => (v == null ? DASH : fmtSeconds(v / 1000));
    for (const name of names) {
      const r = rollout[name];
      states.push(`${name}: ${r.status}` + (r.status === "canary" ? ` at ${fmtPct(r.share)}` : "") +
        (r.reason ? ` (${r.reason})` : ""));
      for (const [version, v] of Object.entries(r.versions)) {
        const f = v.figures || {};
        const lat = f.latency_ms || {};
        rows.push(el("tr", { "data-engine": name, "data-version": version, "data-role": v.role,
          "data-requests": f.requests ?? 0, "data-errors": f.errors ?? 0 },
        el("td", {}, name),
        el("td", {}, version),
        el("td", {}, v.role),
        el("td", {}, fmtRate(f.request_rate_per_s ?? null)),
        el("td", {}, fmtPct(f.error_rate ?? null)),
        el("td", {}, ms(lat.p50)),
        el("td", {}, ms(lat.p95)),
        el("td", {}, ms(lat.p99)),
        el("td", {}, f.tokens_per_answer == null ? DASH : f.tokens_per_answer.toFixed(1)),
        el("td", {}, fmtUsd(f.cost_usd ?? 0)),
        el("td", {}, fmtPct(f.shadow_agreement ?? null))));
      }
    }
    document.querySelector("#rollout-table tbody").replaceChildren(...rows);
    document.getElementById("rollout-state").textContent = states.join(" · ");
  }

  // ---- update loop -----------------------------------------------------------------------

  function rates(prev, snap) {
    if (!prev) return { rps: null, hitRps: null, errRps: null, tokOutRps: null };
    const dt = snap.time - prev.time;
    // A counter going down means the proxy restarted: skip that interval rather than plot < 0.
    const rate = (now, before) => (dt > 0 && now >= before ? (now - before) / dt : null);
    return {
      rps: rate(snap.requests.total, prev.requests.total),
      hitRps: rate(cacheHits(snap.requests.by_cache), cacheHits(prev.requests.by_cache)),
      // the snapshot's own count (5xx), so the chart and the error rate agree with the alert
      errRps: rate(snap.requests.errors, prev.requests.errors),
      tokOutRps: rate(snap.tokens.out, prev.tokens.out),
    };
  }

  function update(snap) {
    const r = rates(state.prev, snap);
    state.prev = snap;
    state.polls += 1;
    push(state.throughput, { rps: r.rps, hitRps: r.hitRps, errRps: r.errRps });
    const lat = (snap.latency || {}).total || {};
    push(state.latency, { p50: lat.p50 ?? null, p95: lat.p95 ?? null, p99: lat.p99 ?? null });

    const req = snap.requests;
    const total = req.total || 0;
    const hitShare = total ? cacheHits(req.by_cache) / total : null;
    const errShare = total ? req.errors / total : null;
    setMetric("throughput_rps", r.rps, fmtRate(r.rps));
    setMetric("tokens_out_rps", r.tokOutRps, fmtRate(r.tokOutRps));
    setMetric("latency_p95_s", lat.p95, fmtSeconds(lat.p95));
    setMetric("cache_hit_rate", hitShare, fmtPct(hitShare));
    setMetric("error_rate", errShare, fmtPct(errShare));
    const saved = snap.totals.saved_cache_usd + snap.totals.saved_routing_usd;
    setMetric("saved_usd", saved, fmtUsd(saved));
    setMetric("cost_usd", snap.totals.cost_usd, fmtUsd(snap.totals.cost_usd));
    setMetric("requests_total", total, fmtCount(total));
    setMetric("in_flight", req.in_flight, fmtCount(req.in_flight));
    setMetric("cache_errors", snap.cache_errors, fmtCount(snap.cache_errors));
    setMetric("rejected_admission", snap.rejections.admission, fmtCount(snap.rejections.admission));
    setMetric("rejected_policy", snap.rejections.policy, fmtCount(snap.rejections.policy));
    setMetric("upstream_retries", snap.rejections.upstream_retries, fmtCount(snap.rejections.upstream_retries));
    const errNode = document.querySelector('[data-metric="error_rate"]');
    errNode.classList.toggle("bad", errShare != null && errShare >= 0.05);

    const window_s = (snap.latency || {}).window_s;
    if (window_s) {
      document.getElementById("window").textContent = String(Math.round(window_s));
      for (const node of document.querySelectorAll(".window-s")) node.textContent = String(Math.round(window_s));
    }
    document.getElementById("uptime").textContent = fmtDuration(snap.uptime_s);
    document.getElementById("updated").textContent = new Date(snap.time * 1000).toLocaleTimeString();

    const engineNames = [...new Set([...sortedKeys(snap.engines), ...sortedKeys((snap.routes || {}).by_engine)])].sort();
    renderThroughput();
    renderLatency();
    renderLatencyTable(snap.latency);
    renderOutcomes(req);
    renderCache(snap.cache);
    renderRoutes(snap.routes, engineNames);
    for (const [name, e] of Object.entries(snap.engines || {})) {
      const history = state.engines.get(name) || [];
      push(history, { running: e.running || 0, waiting: e.waiting || 0 });
      state.engines.set(name, history);
    }
    renderEngines(snap.engines);
    renderTiers(snap.tiers);
    renderRollout(snap.rollout);
    body.dataset.polls = String(state.polls);
  }

  function setStatus(kind, text) {
    const pill = document.getElementById("status");
    pill.className = `pill pill-${kind}`;
    pill.dataset.state = kind;
    pill.textContent = text;
  }

  async function tick() {
    try {
      const response = await fetch(DATA_URL, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      update(await response.json());
      state.failures = 0;
      setStatus("live", "live");
    } catch (err) {
      state.failures += 1;
      setStatus("down", `offline · retrying (${state.failures})`);
      body.dataset.lastError = String(err);
    } finally {
      setTimeout(tick, POLL_MS);
    }
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (!state.prev) return;
      renderThroughput();
      renderLatency();
      renderEngines(state.prev.engines);
    }, 150);
  });

  tick();
})();
