// bpfscope agent UI: one page per view, each drawn from the agent's read-only JSON API. No framework
// and no build step; every value from the API is placed with textContent or as an SVG attribute, never
// as markup. A bearer token, when the agent requires one, comes from the page's fragment (#token=...),
// which browsers never send to a server, and is kept for the tab's session only.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PAGES = ["health", "disks", "services", "requests", "profiles", "security"];
const VERDICT_COLOURS = { ok: "#2f9e55", warn: "#d99a00", PROBLEM: "#d63a3a", "n/a": "#9aa0ab" };

(function keepToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem("bpfscope-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + "#/health");
  }
})();

async function api(path, params = {}) {
  const query = new URLSearchParams({ minutes: minutes(), ...params });
  for (const [k, v] of [...query.entries()]) if (v === "" || v === undefined) query.delete(k);
  const token = sessionStorage.getItem("bpfscope-token");
  const response = await fetch(`${path}?${query}`, {
    headers: token ? { Authorization: `Bearer ${token}` } : {},
  });
  if (!response.ok) {
    const body = await response.text();
    throw new Error(`${path}: ${response.status} ${body}`);
  }
  return path.endsWith("flamegraph") ? response.text() : response.json();
}

function minutes() { return document.getElementById("minutes").value; }

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.setAttribute("class", v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function clock(ts) { return new Date(ts * 1000).toLocaleTimeString([], { hour12: false }); }
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function showError(error) {
  const p = document.getElementById("error");
  p.hidden = !error;
  p.textContent = error ? String(error.message || error) : "";
}

// --- Health: the check's rows, each with its history as a sparkline --------------------------------
function sparkline(history) {
  const w = 160, h = 28;
  const values = history.map((p) => p[1]).filter((v) => v !== null);
  const svg = el("svg:svg", { width: w, height: h, class: "spark" });
  if (!values.length) return svg;
  const lo = Math.min(...values), hi = Math.max(...values);
  const t0 = history[0][0], t1 = history[history.length - 1][0];
  const x = (t) => (t1 > t0 ? ((t - t0) / (t1 - t0)) * (w - 4) + 2 : w / 2);
  const y = (v) => (hi > lo ? h - 3 - ((v - lo) / (hi - lo)) * (h - 6) : h / 2);
  const points = history.filter((p) => p[1] !== null).map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
  svg.append(el("svg:polyline", { points: points.join(" "), fill: "none", stroke: "#4d6a99", "stroke-width": 1.2 }));
  for (const [t, v, verdict] of history) {
    if (v !== null && verdict !== "ok") {
      svg.append(el("svg:circle", { cx: x(t), cy: y(v), r: 2.2, fill: VERDICT_COLOURS[verdict] || "#999" }));
    }
  }
  return svg;
}

async function health() {
  const data = await api("/api/health");
  const summary = document.getElementById("summary");
  summary.textContent = data.summary ? `${clock(data.summary.ts)}  ${data.summary.summary}` : "No check window stored yet.";
  summary.className = "summary " + (data.summary && data.summary.problem ? "problem" : "ok");
  fill(document.querySelector("#health-table tbody"), data.rows.map((r) => el("tr", { "data-resource": r.resource, "data-metric": r.metric },
    el("td", { text: r.resource }),
    el("td", { text: r.metric }),
    el("td", { class: "num", text: r.text }),
    el("td", {}, el("span", { class: `verdict verdict-${r.verdict === "n/a" ? "na" : r.verdict}`, text: r.verdict })),
    el("td", {}, sparkline(r.history)),
    el("td", { class: "detail", text: r.detail, title: r.threshold }),
  )));
}

// --- Disks: a heatmap of device latency per disk ----------------------------------------------------
function heatmap(name, windows) {
  const exps = windows.flatMap((w) => Object.keys(w[2]).map(Number));
  const lo = Math.min(...exps), hi = Math.max(...exps);
  const cell = { w: Math.max(3, Math.min(14, Math.floor(760 / windows.length))), h: 12 };
  const left = 70, top = 6, rows = hi - lo + 1;
  const width = left + windows.length * cell.w + 10, height = top + rows * cell.h + 24;
  const max = Math.max(...windows.flatMap((w) => Object.values(w[2])));
  const svg = el("svg:svg", { width, height, role: "img", "aria-label": `${name} latency heatmap` });
  for (let k = lo; k <= hi; k++) {
    const ns = 2 ** k, label = ns >= 1e6 ? `${(ns / 1e6).toFixed(ns >= 1e7 ? 0 : 1)} ms` : `${Math.round(ns / 1e3)} us`;
    if ((k - lo) % 2 === 0) svg.append(el("svg:text", { x: 4, y: top + (hi - k) * cell.h + 10, text: label }));
  }
  windows.forEach(([ts, , buckets], i) => {
    for (const [k, count] of Object.entries(buckets)) {
      const shade = Math.log1p(count) / Math.log1p(max);
      svg.append(el("svg:rect", {
        x: left + i * cell.w, y: top + (hi - Number(k)) * cell.h, width: cell.w - 1, height: cell.h - 1,
        fill: `rgba(214, 58, 58, ${(0.12 + 0.88 * shade).toFixed(3)})`, "data-count": count,
      }, el("svg:title", { text: `${clock(ts)}: ${count} requests at ${2 ** Number(k)} ns or more` })));
    }
  });
  svg.append(el("svg:text", { x: left, y: height - 6, text: clock(windows[0][0]) }));
  svg.append(el("svg:text", { x: width - 70, y: height - 6, text: clock(windows[windows.length - 1][0]) }));
  return el("div", { class: "heatmap", "data-disk": name }, el("h3", { text: `${name}: device time per request` }), svg);
}

async function disks() {
  const data = await api("/api/disks");
  const names = Object.keys(data.disks).sort();
  const box = document.getElementById("heatmaps");
  box.replaceChildren(...(names.length ? names.map((n) => heatmap(n, data.disks[n])) : [el("p", { text: "No disk I/O timed yet." })]));
}

// --- Service map ---------------------------------------------------------------------------------------
async function services() {
  const data = await api("/api/services");
  const svg = document.getElementById("map");
  svg.replaceChildren(el("svg:defs", {}, el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
    el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#4d6a99" }))));
  const cx = 450, cy = 210, radius = 160;
  const place = {};
  data.nodes.forEach((name, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, data.nodes.length) - Math.PI / 2;
    place[name] = [cx + radius * Math.cos(a), cy + radius * Math.sin(a)];
  });
  for (const e of data.edges) {
    const [x1, y1] = place[e.source], [x2, y2] = place[e.target];
    const len = Math.hypot(x2 - x1, y2 - y1) || 1, pad = 24;
    const line = el("svg:line", {
      x1: x1 + ((x2 - x1) / len) * pad, y1: y1 + ((y2 - y1) / len) * pad,
      x2: x2 - ((x2 - x1) / len) * pad, y2: y2 - ((y2 - y1) / len) * pad,
      stroke: e.errors ? "#d63a3a" : "#4d6a99", "stroke-width": 1 + Math.min(4, Math.log10(1 + e.rate)),
      "marker-end": "url(#arrow)", class: "edge", "data-source": e.source, "data-target": e.target,
    });
    svg.append(line, el("svg:text", { x: (x1 + x2) / 2 + 6, y: (y1 + y2) / 2 - 4,
      text: `${e.rate.toFixed(1)}/s, ${e.errors} err, p99 ${e.p99_ms.toFixed(1)} ms` }));
  }
  for (const name of data.nodes) {
    const [x, y] = place[name];
    svg.append(el("svg:circle", { cx: x, cy: y, r: 20, fill: "#e8eefb", stroke: "#4d6a99", class: "node", "data-name": name }),
      el("svg:text", { x: x - 18, y: y + 34, text: name }));
  }
  fill(document.querySelector("#edges tbody"), data.edges.map((e) => el("tr", { class: "edge-row", "data-source": e.source, "data-target": e.target, "data-requests": e.requests },
    el("td", { text: e.source }), el("td", { text: e.target }), el("td", { class: "num", text: e.rate.toFixed(2) }),
    el("td", { class: "num", text: e.errors }), el("td", { class: "num", text: e.p50_ms.toFixed(2) }),
    el("td", { class: "num", text: e.p99_ms.toFixed(2) }))));
}

// --- Requests, with filters ---------------------------------------------------------------------------
async function requests() {
  const form = new FormData(document.getElementById("filters"));
  const data = await api("/api/requests", Object.fromEntries(form.entries()));
  document.getElementById("request-count").textContent = `${data.requests.length} requests (newest first, 200 at most)`;
  fill(document.querySelector("#request-table tbody"), data.requests.map((r) => el("tr", { class: "request" },
    el("td", { text: clock(r.ts) }), el("td", { text: `${r.comm}[${r.pid}]` }), el("td", { text: r.trace_role }),
    el("td", { text: `${r.remote_addr}:${r.remote_port}` }), el("td", { text: r.req_method, class: "method" }),
    el("td", { text: r.req_path, class: "path" }), el("td", { class: "num status", text: r.resp_status }),
    el("td", { class: "num", text: (r.latency / 1e6).toFixed(3) }), el("td", { class: "num", text: `${r.req_bytes}/${r.resp_bytes}` }))));
}

// --- Flame graphs: a time range, and a baseline to compare with ---------------------------------------
let windowsData = [];
function localInput(ts) {
  const d = new Date(ts * 1000 - new Date().getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}
function fromInput(value) { return value ? new Date(value).getTime() / 1000 : ""; }

async function profiles() {
  const data = await api("/api/profile/windows");
  windowsData = data.windows;
  const svg = document.getElementById("windows");
  svg.replaceChildren();
  const max = Math.max(1, ...windowsData.map((w) => w.samples));
  const bar = Math.max(2, Math.min(20, Math.floor(880 / Math.max(1, windowsData.length))));
  windowsData.forEach((w, i) => {
    const h = 4 + (56 * w.samples) / max;
    const rect = el("svg:rect", { x: 10 + i * bar, y: 64 - h, width: bar - 1, height: h, fill: "#4d6a99", class: "window" },
      el("svg:title", { text: `${clock(w.ts)}: ${w.samples} samples` }));
    rect.addEventListener("click", (event) => pickWindow(w, event.shiftKey));
    svg.append(rect);
  });
  const form = document.getElementById("ranges");
  if (windowsData.length && !form.start.value) {
    const last = windowsData[windowsData.length - 1];
    form.start.value = localInput(windowsData[0].ts - windowsData[0].interval_s);
    form.end.value = localInput(last.ts + 1);
  }
}

function pickWindow(w, extend) {
  const form = document.getElementById("ranges");
  const [start, end] = form.diff.checked ? ["base_start", "base_end"] : ["start", "end"];
  if (!extend) form[start].value = localInput(w.ts - w.interval_s);
  form[end].value = localInput(w.ts + 1);
}

async function showFlame(event) {
  if (event) event.preventDefault();
  const form = document.getElementById("ranges");
  const params = { start: fromInput(form.start.value), end: fromInput(form.end.value), pid: form.pid.value };
  if (form.diff.checked) Object.assign(params, { base_start: fromInput(form.base_start.value), base_end: fromInput(form.base_end.value) });
  try {
    const frame = document.getElementById("flame");
    frame.addEventListener("load", () => done("flame"), { once: true });
    frame.srcdoc = await api("/api/profile/flamegraph", params);
    showError(null);
  } catch (error) {
    showError(error);
  }
}

// --- Security events with their lineage -----------------------------------------------------------------
function who(p) { return p ? `${p.binary.split("/").pop()}[${p.pid}]` : "?"; }
// The pod (named by the Kubernetes API where the agent reaches it) or the container, before the command.
function where(p) {
  if (p.pod && p.pod.name) return `[${p.pod.namespace}/${p.pod.name}] `;
  if (p.container && p.container.id) return `[${p.container.runtime || "container"} ${p.container.id.slice(0, 12)}] `;
  return "";
}
async function security() {
  const form = new FormData(document.getElementById("security-filters"));
  const data = await api("/api/security", Object.fromEntries(form.entries()));
  fill(document.querySelector("#security-table tbody"), data.events.map((e) => {
    const p = e.process || {};
    const full = [...(e.ancestors || [])].reverse().concat(e.parent ? [e.parent] : [], [p]).map(who);
    // The nearest five; the whole chain is in the cell's title.
    const chain = (full.length > 5 ? ["…", ...full.slice(-5)] : full).join(" → ");
    const what = e.kind === "process_tracepoint" ? `${e.event} (${e.action})` : e.kind.replace("process_", "");
    return el("tr", { class: `event ${e.kind}` },
      el("td", { text: clock(e.ts) }), el("td", { text: what }),
      el("td", { class: "args", text: `${where(p)}${p.binary || ""} ${p.arguments || ""}`.trim() }),
      el("td", { text: e.policy_name || "" }), el("td", { class: "lineage", text: chain, title: full.join(" → ") }));
  }));
}

// --- Routing -------------------------------------------------------------------------------------------
// Each finished drawing counts here (data-rendered), so a reader (or a test) knows new data is shown.
let rendered = 0;
function done(kind) { document.body.dataset[kind] = String(++rendered); }
const VIEWS = { health, disks, services, requests, profiles, security };
async function route() {
  const page = (location.hash.match(/^#\/(\w+)/) || [])[1] || "health";
  const name = PAGES.includes(page) ? page : "health";
  for (const p of PAGES) document.getElementById(p).hidden = p !== name;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  document.body.dataset.loading = name;
  try {
    await VIEWS[name]();
    showError(null);
  } catch (error) {
    showError(error);
  }
  document.body.dataset.page = name;
  delete document.body.dataset.loading;
  done("rendered");
}

async function status() {
  try {
    const s = await api("/api/status");
    document.getElementById("node").textContent = `${s.node}: ${s.collectors.map((c) => `${c.collector} ${c.state}`).join(", ")}`;
  } catch (error) {
    showError(error);
  }
}

window.addEventListener("hashchange", route);
document.getElementById("minutes").addEventListener("change", route);
document.getElementById("filters").addEventListener("submit", (e) => { e.preventDefault(); route(); });
document.getElementById("security-filters").addEventListener("submit", (e) => { e.preventDefault(); route(); });
document.getElementById("ranges").addEventListener("submit", showFlame);
status();
route();
