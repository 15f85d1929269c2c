// The swarm dashboard: polls api/dashboard and draws SVG charts and the miners table.
// No libraries and no innerHTML: every peer-supplied string is set as text.
"use strict";

const POLL_MS = 3000;
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 640, H = 240, PAD = { left: 52, right: 12, top: 10, bottom: 26 };
const PALETTE = ["#2f6fde", "#e07b22", "#1f9254", "#c83232", "#7c4dbd", "#0f8b8d", "#b7791f", "#d6458a"];
const openDetails = new Set(); // peer ids whose evidence row is open
let lastData = null;

// --- formatting ---------------------------------------------------------------------------
function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 1e9) return (value / 1e9).toFixed(1) + "G";
  if (abs >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (abs >= 1e4) return (value / 1e3).toFixed(1) + "k";
  if (Number.isInteger(value)) return String(value);
  if (abs >= 100) return value.toFixed(0);
  return String(+value.toPrecision(digits));
}
// an axis label with as many decimals as the tick step needs (10.85 and 10.9, not 10.9 twice)
function fmtTick(value, step) {
  if (Math.abs(value) >= 1e4) return fmt(value);
  return value.toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step)))));
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
function ago(t, now) {
  if (!t) return "never";
  const s = Math.max(0, now - t);
  return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}
function short(id) { return id ? (id.length > 12 ? id.slice(0, 6) + "…" + id.slice(-4) : id) : "–"; }

// --- DOM helpers --------------------------------------------------------------------------
function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}
function setText(id, text) { document.getElementById(id).textContent = text; }

// --- charts -------------------------------------------------------------------------------
function niceTicks(lo, hi, count = 4) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

// the y values a point puts on the chart: a band's low and high, a line's or a dot's y
function values(layer, p) { return layer.kind === "band" ? [p[1], p[2]] : [p[1]]; }

// layers: [{kind: "line"|"band"|"dots", points: [[t, y(, r)]...] (band: [[t, low, high]]), color, main, title}]
// options: {zero: the y axis starts at 0, integer: only whole-number y ticks}
function drawChart(id, layers, yLabel, options = {}) {
  const svg = document.getElementById(id);
  svg.replaceChildren();
  for (const layer of layers) layer.points = layer.points.filter(p => Number.isFinite(p[0]) && values(layer, p).every(Number.isFinite));
  const all = layers.flatMap(l => l.points);
  svg.dataset.points = String(layers.filter(l => l.kind !== "band").reduce((n, l) => n + l.points.length, 0));
  if (all.length === 0) {
    svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "waiting for data…"));
    return;
  }
  let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  if (x1 - x0 < 1) { x0 -= 30; x1 += 30; }
  const ys = layers.flatMap(l => l.points.flatMap(p => values(l, p)));
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  if (options.zero || (Math.min(...ys) >= 0 && y0 < 0)) y0 = 0;
  if (options.integer) { y1 = Math.ceil(y1); }
  const sx = t => PAD.left + (t - x0) / (x1 - x0) * (W - PAD.left - PAD.right);
  const sy = v => H - PAD.bottom - (v - y0) / (y1 - y0) * (H - PAD.top - PAD.bottom);

  const ticks = niceTicks(y0, y1);
  const step = ticks.length > 1 ? ticks[1] - ticks[0] : 1;
  for (const t of ticks) {
    if (t < y0 || t > y1 || (options.integer && !Number.isInteger(t))) continue;
    svg.appendChild(svgEl("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.appendChild(svgEl("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmtTick(t, step)));
  }
  const xTicks = 4;
  for (let i = 0; i <= xTicks; i++) {
    const t = x0 + (x1 - x0) * i / xTicks;
    svg.appendChild(svgEl("text", { x: sx(t), y: H - 8, "text-anchor": i === 0 ? "start" : i === xTicks ? "end" : "middle" }, clock(t)));
  }
  svg.appendChild(svgEl("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom, class: "axis" }));
  svg.appendChild(svgEl("text", { x: 12, y: H / 2, transform: `rotate(-90 12 ${H / 2})`, "text-anchor": "middle" }, yLabel));

  for (const layer of layers) {
    const pts = layer.points;
    if (pts.length === 0) continue;
    if (layer.kind === "band") {
      const upper = pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[2]).toFixed(1)}`);
      const lower = pts.slice().reverse().map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
      svg.appendChild(svgEl("polygon", { points: upper.concat(lower).join(" "), class: "band", fill: layer.color }));
    } else if (layer.kind === "line") {
      const line = svgEl("polyline", { points: pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
                                        class: "series" + (layer.main ? " main" : ""), stroke: layer.color });
      line.appendChild(svgEl("title", {}, layer.title));
      svg.appendChild(line);
      if (pts.length === 1) svg.appendChild(svgEl("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: layer.color }));
    } else {
      for (const p of pts) {
        const dot = svgEl("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: p[2] || 3, fill: layer.color, "fill-opacity": 0.7 });
        dot.appendChild(svgEl("title", {}, p[3] || ""));
        svg.appendChild(dot);
      }
    }
  }
}

function legend(id, items) {
  const box = document.getElementById(id);
  box.replaceChildren(...items.map(([label, color]) => {
    const item = el("span");
    const swatch = el("span", { class: "swatch" });
    swatch.dataset.color = color;
    item.append(swatch, document.createTextNode(label));
    return item;
  }));
  // CSP allows no inline style attributes; colour the swatches through the CSSOM instead
  for (const swatch of box.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
}

function minerChart(id, legendId, chart, yLabel) {
  const layers = [{ kind: "band", color: "#6b7380", points: chart.low.map((p, i) => [p[0], p[1], chart.high[i][1]]) }];
  const items = [];
  chart.miners.forEach((m, i) => {
    const color = PALETTE[i % PALETTE.length];
    layers.push({ kind: "line", points: m.points, color, title: m.label });
    items.push([m.label, color]);
  });
  layers.push({ kind: "line", points: chart.median, color: "#1d2430", main: true, title: "median" });
  items.push(["median of all miners (band: min–max)", "#1d2430"]);
  drawChart(id, layers, yLabel);
  legend(legendId, chart.median.length ? items : []);
}

function roundsCharts(rounds) {
  const label = r => `epoch ${r.epoch} (${r.kind}): ${r.group_size} peers, ${r.duration_s.toFixed(2)} s`;
  drawChart("chart-rounds", [{ kind: "dots", points: rounds.map(r => [r.time, r.group_size, 4, label(r)]), color: "#2f6fde" }],
            "peers", { zero: true, integer: true });
  drawChart("chart-durations", [{ kind: "dots", points: rounds.map(r => [r.time, r.duration_s, 4, label(r)]), color: "#e07b22" }],
            "seconds", { zero: true });
  const largest = Math.max(0, ...rounds.map(r => r.group_size));
  legend("legend-rounds", rounds.length ? [[`${rounds.length} rounds, up to ${largest} peers`, "#2f6fde"]] : []);
  const slowest = Math.max(0, ...rounds.map(r => r.duration_s));
  legend("legend-durations", rounds.length ? [[`slowest ${slowest.toFixed(2)} s`, "#e07b22"]] : []);
}

// --- facts and table ----------------------------------------------------------------------
function renderFacts(d) {
  const v = d.validator, s = d.swarm;
  setText("run-id", `run ${d.run_id}`);
  setText("fact-epoch", fmt(s.epoch));
  setText("fact-miners", fmt(s.live_miners));
  setText("fact-peers", fmt(s.live_peers));
  setText("fact-tokens", fmt(s.tokens_per_s));
  const evals = d.charts.eval_loss;
  setText("fact-eval", evals.length ? `${fmt(evals[evals.length - 1][1], 4)} @ epoch ${evals[evals.length - 1][2]}` : "–");
  setText("fact-model", v.parameters ? `${fmt(v.parameters)} params (${v.preset})` : "–");
  setText("fact-sync", !v.running ? "validator not running" : v.synced_at ? `epoch ${v.epoch}, ${ago(v.synced_at, d.now)}` : "waiting for a state");
  setText("fact-checkpoint", s.newest_checkpoint === null ? "none yet" : `epoch ${s.newest_checkpoint} (${s.miners_with_it} miners)`);
  setText("fact-weights", v.weights_set_at ? `${ago(v.weights_set_at, d.now)} (round ${v.scoring_rounds})` : "not yet");
}

function statusOf(m) {
  if (m.banned) return ["banned", `banned: named by ${m.named_by} peer(s)`];
  if (m.offences.length) return ["named", `named ${m.offences.length}× (ban over)`];
  if (m.verified === null || m.verified === undefined) return ["unverified", "not scored yet"];
  if (m.weight > 0) return ["ok", "ok"];
  return ["unverified", "no weight"];
}

function minerRow(m, now) {
  const [cls, label] = statusOf(m);
  const tr = el("tr", { class: "miner" });
  tr.dataset.peer = m.peer_id;
  const cells = [
    el("td", { class: "mono", title: m.hotkey }, short(m.hotkey)),
    el("td", { class: "mono", title: m.peer_id }, short(m.peer_id)),
    el("td", {}, m.device),
    el("td", { class: "num" }, m.local_epoch === null ? "–" : `${m.local_epoch} / ${m.global_epoch}`),
    el("td", { class: "num" }, fmt(m.loss, 4)),
    el("td", { class: "num" }, fmt(m.tokens_per_s)),
    el("td", { class: "num samples" }, `${fmt(m.claimed)} / ${fmt(m.verified)}`),
    el("td", { class: "checks" }),
    el("td", { class: "num" }, fmt(m.score)),
    el("td", { class: "num" }, fmt(m.weight)),
    el("td", { class: "num" }, m.checkpoint_epoch === null ? "–" : `epoch ${m.checkpoint_epoch}`),
    el("td", { class: `status ${cls}`, title: `last seen ${ago(m.last_seen, now)}` }, label),
  ];
  for (const check of m.checks.slice(-3)) {
    cells[7].appendChild(el("span", { class: `check ${check.verdict}`, title: check.verdict },
      check.cosine === null ? "n/a" : check.cosine.toFixed(2)));
  }
  if (!m.checks.length) cells[7].textContent = "none yet";
  tr.append(...cells);
  tr.addEventListener("click", () => {
    if (openDetails.has(m.peer_id)) openDetails.delete(m.peer_id); else openDetails.add(m.peer_id);
    renderTable(lastData);
  });
  return tr;
}

function detailsRow(m, now) {
  const td = el("td", { colspan: "12" });
  td.appendChild(el("div", {}, `samples trained ${fmt(m.samples)}, preset ${m.preset}, last seen ${ago(m.last_seen, now)}`));
  const list = el("ul");
  for (const reason of m.reasons) list.appendChild(el("li", {}, reason));
  for (const o of m.offences) {
    const until = o.banned_until > now ? `banned for ${Math.round(o.banned_until - now)} s more` : "ban over";
    list.appendChild(el("li", {}, `offence (${o.role}) named by ${short(o.caught_by)} ${ago(o.time, now)}, ${until}: ${o.reason}`));
  }
  if (!list.children.length) list.appendChild(el("li", {}, "no evidence yet: the validator has not scored this miner"));
  td.appendChild(list);
  const tr = el("tr", { class: "details" });
  tr.appendChild(td);
  return tr;
}

function renderTable(d) {
  if (!d) return;
  const needle = document.getElementById("filter").value.trim().toLowerCase();
  const body = document.querySelector("#miners tbody");
  const rows = [];
  let shown = 0;
  for (const m of d.miners) {
    const haystack = [m.hotkey, m.peer_id, m.device, statusOf(m)[1]].join(" ").toLowerCase();
    if (needle && !haystack.includes(needle)) continue;
    shown++;
    rows.push(minerRow(m, d.now));
    if (openDetails.has(m.peer_id)) rows.push(detailsRow(m, d.now));
  }
  body.replaceChildren(...rows);
  setText("miner-count", needle ? `${shown} of ${d.miners.length}` : `${d.miners.length}`);
}

function render(d) {
  lastData = d;
  renderFacts(d);
  drawChart("chart-eval", [{ kind: "line", points: d.charts.eval_loss.map(p => [p[0], p[1]]), color: "#2f6fde", main: true, title: "held-out loss" }], "loss");
  legend("legend-eval", d.charts.eval_loss.length ? [[`${d.charts.eval_loss.length} evaluations`, "#2f6fde"]] : []);
  minerChart("chart-loss", "legend-loss", d.charts.train_loss, "loss");
  const total = d.charts.tokens_per_s.total;
  drawChart("chart-swarm", [{ kind: "line", points: total, color: "#1f9254", main: true, title: "swarm tokens/s" }], "tokens/s", { zero: true });
  legend("legend-swarm", total.length ? [[`sum over all live miners, now ${fmt(d.swarm.tokens_per_s)}`, "#1f9254"]] : []);
  minerChart("chart-tokens", "legend-tokens", d.charts.tokens_per_s, "tokens/s");
  roundsCharts(d.charts.rounds);
  renderTable(d);
}

// --- polling ------------------------------------------------------------------------------
async function poll() {
  const badge = document.getElementById("connection");
  try {
    const response = await fetch("api/dashboard", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    badge.dataset.state = "live";
    badge.textContent = `live · updated ${clock(Date.now() / 1000)}`;
  } catch (error) {
    badge.dataset.state = "lost";
    badge.textContent = `cannot reach the validator (${error.message}); retrying`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", () => renderTable(lastData));
  poll();
});
