"use strict";
// The modelpod console: polls the JSON endpoints under /console/api/ and draws plain SVG charts.
// No framework, no build step. Every poller survives fetch errors and server restarts: it backs
// off, shows the page as offline, and starts the history again when the server comes back.
(() => {
  const API = "/console/api/";
  const WINDOW_S = 300;
  const MIN_WINDOW_S = 60;
  const MAX_POINTS = 900;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const CHARTS = [
    { id: "throughput", title: "Throughput", key: "requests_per_s", unit: "req/s" },
    { id: "latency-p50", title: "Latency p50", key: "latency_p50_s", unit: "ms", scale: 1000 },
    { id: "latency-p99", title: "Latency p99", key: "latency_p99_s", unit: "ms", scale: 1000 },
    { id: "errors", title: "Errors", key: "errors_per_s", unit: "err/s" },
    { id: "batch", title: "Batch size", key: "batch_rows", unit: "rows" },
    { id: "queue", title: "Queue depth", key: "queue_depth", unit: "requests" },
  ];
  const state = { started: null, points: [], series: {}, lastT: 0, errorsT: 0, errors: [], models: [],
                  routes: [], sections: [], offline: false, example: null, colors: {} };
  const $ = (id) => document.getElementById(id);

  // -- small DOM helpers ---------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v; else if (k === "text") el.textContent = v; else el.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
    return el;
  }
  function svg(tag, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    return el;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
    return v.toFixed(digits === undefined ? (a >= 100 ? 0 : a >= 10 ? 1 : 2) : digits);
  }
  function bytes(n) {
    if (!n) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${fmt(n, i ? 1 : 0)} ${units[i]}`;
  }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
  function color(id) {
    if (!(id in state.colors)) state.colors[id] = COLORS[Object.keys(state.colors).length % COLORS.length];
    return state.colors[id];
  }

  // -- fetching ------------------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, message, body) { super(message); this.status = status; this.body = body; }
  }
  async function api(path, opts) {
    const resp = await fetch(API + path, Object.assign({ credentials: "same-origin", cache: "no-store" }, opts || {}));
    const text = await resp.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text.slice(0, 500) }; }
    if (resp.status === 401 && !(opts && opts.method === "POST")) {
      window.location.assign("/console");  // the token changed, or the session is gone: log in again
    }
    if (!resp.ok) throw new HttpError(resp.status, (body && body.error) || resp.statusText, body);
    return { body, resp };
  }
  function setOffline(offline, why) {
    const conn = $("conn");
    if (offline) {
      conn.dataset.state = "offline";
      conn.textContent = "offline, retrying";
      conn.title = String(why || "");
    } else if (state.offline || conn.dataset.state !== "live") {
      conn.dataset.state = "live";
      conn.textContent = "live";
      conn.title = "";
    }
    state.offline = offline;
  }
  function poll(fn, every) {
    let delay = every;
    const tick = async () => {
      try {
        await fn();
        setOffline(false);
        delay = every;
      } catch (e) {
        if (e instanceof HttpError) { delay = every; notice(`${e.status}: ${e.message}`); }
        else { setOffline(true, e); delay = Math.min(Math.max(delay * 2, 500), 5000); }
      }
      window.setTimeout(tick, delay);
    };
    tick();
  }
  function notice(text) {
    const el = $("notice");
    el.textContent = text || "";
    el.hidden = !text;
  }
  function restarted(started) {
    if (state.started !== null && started !== state.started) {
      state.points = []; state.lastT = 0; state.errorsT = 0; state.errors = [];
      notice(`The server restarted at ${clock(started)}; the charts start again.`);
    }
    state.started = started;
  }

  // -- overview: server, models, routes ------------------------------------------------------------
  async function overview() {
    const { body } = await api("overview");
    restarted(body.server.started);
    const s = body.server;
    $("server").textContent = `v${s.version} · pid ${s.pid} · ${s.ready ? "ready" : "not ready"}${s.draining ? " · draining" : ""}`;
    $("logout").hidden = !(body.console && body.console.auth === "token");
    state.models = body.models;
    state.routes = body.routes;
    renderModels();
    renderRoutes();
    fillTryModels();
    if (body.sections.join() !== state.sections.join()) {
      state.sections = body.sections;
      $("sections").replaceChildren(...state.sections.map((n) => h("section", { id: `section-${n}` }, h("h2", { text: n }))));
    }
  }
  function renderModels() {
    const rows = state.models.map((m) => h("tr", { "data-model": m.label },
      h("td", { text: m.name }), h("td", { text: m.version || "–" }),
      h("td", {}, h("span", { class: `state ${m.state}`, text: m.state }), m.reason ? h("div", { class: "sub", text: m.reason }) : null),
      h("td", { text: (m.aliases || []).join(", ") }),
      h("td", { text: m.served ? [m.platform, m.task, m.table ? "table" : null].filter(Boolean).join(" · ") : "in the store" }),
      h("td", { class: "sub", text: (m.inputs || []).map((t) => `${t.name} ${t.datatype}[${t.shape.join(",")}]`).join(", ") }),
      h("td", { class: "num", text: m.served ? bytes(m.memory_bytes) : "–" }),
      h("td", { class: "num", text: m.served ? String(m.queue_depth) : "–" }),
      h("td", { class: "num", text: m.served ? String(m.inflight) : "–" })));
    $("models-table").tBodies[0].replaceChildren(...rows);
  }
  function renderRoutes() {
    $("routes").hidden = state.routes.length === 0;
    const body = $("routes-body");
    const seen = new Set();
    for (const r of state.routes) {
      seen.add(r.name);
      let box = body.querySelector(`[data-route="${CSS.escape(r.name)}"]`);
      if (!box) {
        box = h("div", { "data-route": r.name }, h("h3"), h("div", { class: "bar" }), h("div", { class: "legend" }),
          h("table", { class: "report" }));
        body.append(box);
      }
      const status = String(r.status || "");
      box.querySelector("h3").replaceChildren(r.name, " ", h("span", { class: `state ${status.split(/[:,]/)[0]}`, text: status }),
        h("span", { class: "sub", text: ` policy ${r.policy || "weighted"} · baseline ${r.baseline}${r.shadow && r.shadow.length ? ` · shadow ${r.shadow.join(", ")}` : ""}${rollout(r.rollout)}` }));
      const shares = Object.entries(r.share || {});
      box.querySelector(".bar").replaceChildren(...shares.map(([v, s]) =>
        h("span", { title: `${v} ${fmt(100 * s, 1)}%`, "data-share": s, style: null }, "")));
      box.querySelectorAll(".bar span").forEach((el, i) => {
        el.style.width = `${100 * shares[i][1]}%`; el.style.background = COLORS[i % COLORS.length];
      });
      box.querySelector(".legend").replaceChildren(...shares.map(([v, s], i) => h("span", {},
        swatch(COLORS[i % COLORS.length]), `${v} ${fmt(100 * s, 1)}%`)));
    }
    for (const box of [...body.children]) if (!seen.has(box.dataset.route)) box.remove();
  }
  function rollout(ro) {
    if (!ro) return "";
    const step = ro.step === null || ro.step === undefined ? "" : ` at ${ro.step}%`;
    return ` · rollout to ${ro.candidate} ${ro.state}${step}${ro.reason ? ` (${ro.reason})` : ""}`;
  }
  function swatch(c) { const s = h("span", { class: "swatch" }); s.style.background = c; return s; }
  async function reports() {
    for (const r of state.routes) {
      const { body } = await api(`routes/${encodeURIComponent(r.name)}/report`);
      const box = $("routes-body").querySelector(`[data-route="${CSS.escape(r.name)}"]`);
      if (!box) continue;
      const head = h("tr", {}, ...["variant", "role", "share", "requests", "errors", "p50 ms", "p99 ms", "reward", "vs baseline"]
        .map((t) => h("th", { text: t })));
      const rows = body.variants.map((v) => {
        const rw = v.reward || {};
        const ci = rw.ci ? ` [${fmt(rw.ci[0])}, ${fmt(rw.ci[1])}]` : "";
        const vs = v.vs_baseline ? `Δerr ${fmt(v.vs_baseline.error_rate_delta)} (p ${fmt(v.vs_baseline.error_rate_p_value)}) · Δreward ${fmt(v.vs_baseline.reward_delta)} (p ${fmt(v.vs_baseline.reward_p_value)})`
          : v.shadow ? `agreement ${fmt(v.shadow.agreement)} of ${v.shadow.compared}` : "";
        return h("tr", {}, h("td", { text: v.variant }), h("td", { text: v.role }),
          h("td", { class: "num", text: v.share === null ? "–" : `${fmt(100 * v.share, 1)}%` }),
          h("td", { class: "num", text: v.requests }), h("td", { class: "num", text: v.errors }),
          h("td", { class: "num", text: fmt(v.latency_ms.p50) }), h("td", { class: "num", text: fmt(v.latency_ms.p99) }),
          h("td", { text: rw.n ? `${fmt(rw.mean)}${ci} n=${rw.n}` : "–" }), h("td", { class: "sub", text: vs }));
      });
      box.querySelector("table").replaceChildren(h("thead", {}, head), h("tbody", {}, ...rows));
    }
  }

  // -- live charts ---------------------------------------------------------------------------------
  function buildCharts() {
    $("charts").replaceChildren(...CHARTS.map((c) => h("figure", { class: "chart", id: `chart-${c.id}`, "data-points": "0" },
      h("figcaption", {}, c.title, " ", h("span", { class: "sub", text: c.unit })),
      svg("svg", { viewBox: "0 0 360 150", role: "img", "aria-label": c.title }), h("div", { class: "legend" }))));
  }
  async function metrics() {
    const { body } = await api(`metrics?since=${state.lastT}`);
    restarted(body.started);
    Object.assign(state.series, body.series);
    for (const p of body.points) if (p.t > state.lastT) { state.points.push(p); state.lastT = p.t; }
    if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
    for (const c of CHARTS) drawChart(c);
  }
  function drawChart(c) {
    const fig = $(`chart-${c.id}`);
    const W = 360, H = 150, L = 40, R = 6, T = 8, B = 18;
    const now = state.points.length ? state.points[state.points.length - 1].t : Date.now() / 1000;
    // The last five minutes, or less while the history is shorter (at least one minute).
    const first = state.points.length ? state.points[0].t : now;
    const span = Math.min(WINDOW_S, Math.max(MIN_WINDOW_S, now - first));
    const t0 = now - span;
    const pts = state.points.filter((p) => p.t >= t0);
    const scale = c.scale || 1;
    const ids = Object.keys(state.series).filter((id) => pts.some((p) => p.series[id] && p.series[id][c.key] !== null && p.series[id][c.key] !== undefined));
    let max = 0;
    for (const p of pts) for (const id of ids) { const v = p.series[id] && p.series[id][c.key]; if (v !== null && v !== undefined) max = Math.max(max, v * scale); }
    const top = max > 0 ? niceCeil(max) : 1;
    const x = (t) => L + (W - L - R) * (t - t0) / span;
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const out = [];
    for (const f of [0, 0.5, 1]) {
      out.push(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(top * f), y2: y(top * f) }));
      const label = svg("text", { x: L - 4, y: y(top * f) + 3, "text-anchor": "end" }); label.textContent = fmt(top * f);
      out.push(label);
    }
    const ago = span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)} s`;
    for (const [tx, text] of [[L, ago], [W - R, "now"]]) {
      const label = svg("text", { x: tx, y: H - 4, "text-anchor": tx === L ? "start" : "end" }); label.textContent = text;
      out.push(label);
    }
    const legend = [];
    let latestTotal = 0;
    for (const id of ids) {
      let seg = [];
      const segs = [seg];
      let latest = null;
      for (const p of pts) {
        const v = p.series[id] ? p.series[id][c.key] : null;
        if (v === null || v === undefined) { if (seg.length) { seg = []; segs.push(seg); } continue; }
        seg.push(`${x(p.t).toFixed(1)},${y(v * scale).toFixed(1)}`);
        latest = v * scale;
      }
      for (const s of segs) {
        if (s.length === 1) s.push(s[0]);
        if (s.length) out.push(svg("polyline", { points: s.join(" "), stroke: color(id), "data-series": id }));
      }
      if (latest !== null) latestTotal += latest;
      legend.push(h("span", { "data-series": id }, swatch(color(id)), `${id} ${fmt(latest)}`));
    }
    fig.querySelector("svg").replaceChildren(...out);
    fig.querySelector(".legend").replaceChildren(...(legend.length ? legend : [h("span", { class: "sub", text: "no data yet" })]));
    fig.dataset.points = String(pts.length);
    fig.dataset.max = String(max);
    fig.dataset.latest = String(latestTotal);
  }
  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // -- recent errors -------------------------------------------------------------------------------
  async function errors() {
    const { body } = await api(`errors?since=${state.errorsT}&limit=200`);
    for (const e of body.errors) { state.errors.push(e); state.errorsT = Math.max(state.errorsT, e.t); }
    if (state.errors.length > 200) state.errors.splice(0, state.errors.length - 200);
    const rows = state.errors.slice(-50).reverse().map((e) => {
      const fields = Object.entries(e.fields || {}).map(([k, v]) => `${k}=${v}`).join(" ");
      return h("tr", { class: e.level === "error" ? "bad" : "" }, h("td", { text: clock(e.t) }), h("td", { text: e.level }),
        h("td", { text: e.series || e.logger || "" }), h("td", {}, e.message, fields ? h("div", { class: "sub", text: fields }) : null));
    });
    $("errors-table").tBodies[0].replaceChildren(...rows);
    $("errors-table").hidden = rows.length === 0;
    $("errors-empty").hidden = rows.length !== 0;
  }

  // -- optional sections (drift, replicas) ---------------------------------------------------------
  async function sections() {
    if (!state.sections.length) return;
    const { body } = await api("sections");
    for (const [name, table] of Object.entries(body)) {
      const box = $(`section-${name}`);
      if (!box) continue;
      const parts = [h("h2", { text: table.title || name })];
      if (table.error) parts.push(h("p", { class: "bad", text: table.error }));
      if (table.note) parts.push(h("p", { class: "sub", text: table.note }));
      parts.push(h("table", {}, h("thead", {}, h("tr", {}, ...(table.columns || []).map((c) => h("th", { text: c })))),
        h("tbody", {}, ...(table.rows || []).map((r) => h("tr", {}, ...r.map((v) =>
          h("td", { class: typeof v === "number" ? "num" : "", text: typeof v === "number" ? fmt(v, 3) : (v === null ? "–" : String(v)) })))))));
      box.replaceChildren(...parts);
    }
  }

  // -- try it --------------------------------------------------------------------------------------
  function fillTryModels() {
    const select = $("try-model");
    const names = [...state.routes.map((r) => r.name), ...new Set(state.models.filter((m) => m.served).map((m) => m.name))];
    const unique = [...new Set(names)];
    if (unique.join("\n") === [...select.options].map((o) => o.value).join("\n")) return;
    const current = select.value;
    select.replaceChildren(...unique.map((n) => h("option", { value: n, text: n })));
    if (unique.includes(current)) select.value = current;
    if (!state.example || state.example.model !== select.value) loadExample();
  }
  async function loadExample() {
    const name = $("try-model").value;
    if (!name) return;
    try {
      const { body } = await api(`models/${encodeURIComponent(name)}/example`);
      if ($("try-model").value !== name) return;  // another model was picked meanwhile
      state.example = body;
      const image = body.kind === "image";
      $("try-kind").textContent = image ? `${body.task}: upload an image` : `${body.kind} model · request from its ${body.source}`;
      $("try-signature").textContent = "inputs: " + body.inputs.map((t) => `${t.name} ${t.datatype}[${t.shape.join(",")}]`).join(", ");
      $("try-json").hidden = image;
      $("try-image").hidden = !image;
      $("try-annotate-label").hidden = body.task !== "detect";
      if (!image) $("try-json").value = JSON.stringify(body.request, null, 2);
    } catch (e) {
      $("try-status").textContent = `cannot load an example: ${e.message}`;
    }
  }
  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }
  async function send(ev) {
    ev.preventDefault();
    const ex = state.example;
    const status = $("try-status");
    const out = $("try-output");
    const img = $("try-annotated");
    img.hidden = true;
    out.textContent = "";
    if (!ex) { status.textContent = "pick a model"; return; }
    let request;
    if (ex.kind === "image") {
      const file = $("try-file").files[0];
      if (!file) { status.textContent = "choose an image first"; return; }
      const spec = ex.inputs[0];
      request = { inputs: [{ name: spec.name, datatype: spec.datatype, shape: [1], data: [await readFile(file)] }] };
      if (ex.task === "detect" && $("try-annotate").checked) request.parameters = { annotate: true };
    } else {
      try { request = JSON.parse($("try-json").value); } catch (e) { status.textContent = `not JSON: ${e.message}`; status.className = "bad"; return; }
    }
    status.className = "";
    status.textContent = "sending…";
    const began = performance.now();
    try {
      const { body, resp } = await api(`models/${encodeURIComponent(ex.model)}/infer`, {
        method: "POST", body: JSON.stringify(request),
        headers: { "content-type": "application/json", "x-modelpod-console": "1" } });
      const ms = performance.now() - began;
      status.className = "good";
      status.textContent = `${resp.status} · answered by ${resp.headers.get("modelpod-variant") || body.model_name} · ${fmt(ms, 0)} ms`;
      for (const o of body.outputs || []) {
        if (o.name === "annotated" && o.data && o.data.length) {
          img.src = `data:image/png;base64,${o.data[0]}`;
          img.hidden = false;
          o.data = o.data.map((d) => `<PNG, ${Math.round(d.length * 3 / 4)} bytes>`);
        }
      }
      out.textContent = JSON.stringify(body, null, 2);
    } catch (e) {
      status.className = "bad";
      status.textContent = e instanceof HttpError ? `${e.status}: ${e.message}` : `the server did not answer: ${e.message}`;
    }
  }

  // -- start ---------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    buildCharts();
    $("try-form").addEventListener("submit", send);
    $("try-model").addEventListener("change", loadExample);
    poll(overview, 3000);
    poll(metrics, 1000);
    poll(errors, 3000);
    poll(sections, 5000);
    poll(reports, 5000);
  });
})();
