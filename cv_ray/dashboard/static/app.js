/* cv_ray run dashboard (cv_ray/dashboard/): one page, three views routed by the URL hash.
 *
 *   #/                          overview: curves, alarms, logged steps, evaluation report
 *   #/step/<stage>/<step>?...   a step's trajectories, sortable and filterable (the filters live in the hash)
 *   #/traj/<stage>/<step>/<i>   one trajectory: turns, code, images, boxes on image 0, reward terms
 *
 * Data arrives through <script> tags (Chrome refuses fetch() of local files from a file:// page):
 * data/run.js calls cvray.run(...), data/metrics/NNNN.js cvray.row(...) once per row,
 * data/steps/<stage>/<step>.js cvray.step(...), data/eval.js cvray.evalReport(...). While the run
 * is going, run.js is read again every few seconds and only what changed is reloaded.
 * Text from the run (model output, questions) is always set as text, never parsed as HTML; the only
 * HTML inserted is what cv_ray wrote escaped (highlighted code, the rendered report).
 */
"use strict";

const REFRESH_MS = 4000;
const COLORS = ["#2f6fed", "#e8590c", "#12915a", "#c2255c", "#7048e8", "#0b7285", "#a07a00", "#5c677d",
                "#d0342c", "#1098ad"];

const cvray = (window.cvray = {
  chunks: {}, steps: {}, evalData: null, _incoming: null, _rowsBuf: null,
  // Called by the data files:
  run(data) { this._incoming = data; },
  row(r) { if (this._rowsBuf) this._rowsBuf.push(r); },
  step(data) { this.steps[data.stage + "/" + data.step] = data; },
  evalReport(data) { this.evalData = data; },
  // For tests and curious users: what each chart drew, by chart id.
  charts: {},
});
// The data files call these through the global object; keep `this` bound.
for (const name of ["run", "row", "step", "evalReport"]) cvray[name] = cvray[name].bind(cvray);

let nonce = 0;
function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src + "?v=" + Date.now() + "-" + (nonce++);
    s.onload = () => { s.remove(); resolve(); };
    s.onerror = () => { s.remove(); reject(new Error("cannot load " + src)); };
    document.head.appendChild(s);
  });
}

// ------------------------------------------------------------------------------------------ data

let runData = null;
let rows = [];

async function loadRun() {
  cvray._incoming = null;
  await loadScript("data/run.js");
  return cvray._incoming;
}

async function loadChunks(run, force) {
  let changed = false;
  for (const chunk of run.metric_chunks) {
    const have = cvray.chunks[chunk.file];
    if (!force && have && have.length === chunk.rows) continue;
    cvray._rowsBuf = [];
    await loadScript(chunk.file);
    cvray.chunks[chunk.file] = cvray._rowsBuf;
    cvray._rowsBuf = null;
    changed = true;
  }
  const files = new Set(run.metric_chunks.map((c) => c.file));
  for (const f of Object.keys(cvray.chunks)) if (!files.has(f)) { delete cvray.chunks[f]; changed = true; }
  rows = run.metric_chunks.flatMap((c) => cvray.chunks[c.file] || []);
  return changed;
}

async function loadStep(stage, step) {
  const key = stage + "/" + step;
  if (!cvray.steps[key]) {
    const entry = runData.steps.find((s) => s.stage === stage && s.step === step);
    if (!entry) return null;
    await loadScript(entry.file);
  }
  return cvray.steps[key] || null;
}

async function loadEval() {
  if (!runData.eval) return null;
  if (!cvray.evalData || cvray._evalStamp !== runData.eval.updated) {
    await loadScript(runData.eval.file);
    cvray._evalStamp = runData.eval.updated;
  }
  return cvray.evalData;
}

// ------------------------------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return el;
}
const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, v);
  for (const c of children.flat(Infinity)) if (c) el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return el;
}
function fmt(v, digits = 3) {
  if (typeof v !== "number") return v === undefined || v === null ? "—" : String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(+v.toPrecision(digits));
}
function pct(v) { return typeof v === "number" ? Math.round(v * 100) + "%" : "—"; }
const STAGE_NAMES = { sft: "SFT", rl: "RL", val: "validation" };
function stageName(stage) { return STAGE_NAMES[stage] || stage; }
function stepHref(stage, step, query) { return "#/step/" + stage + "/" + step + (query ? "?" + query : ""); }
function trajHref(stage, step, i) { return "#/traj/" + stage + "/" + step + "/" + i; }
function lastValue(stage, key) {
  for (let i = rows.length - 1; i >= 0; i--) {
    const r = rows[i];
    if ((stage === null || r.stage === stage) && typeof r[key] === "number") return { value: r[key], step: r.step, stage: r.stage };
  }
  return null;
}

// --------------------------------------------------------------------------------------- charts

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => span / st <= count) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(12));
  return ticks;
}

/* A line chart of `series` ([{key, label, points: [[step, value], ...]}]) over steps. Each drawn path
 * carries its data (data-key, data-points) so that what is on screen can be checked against the run. */
function lineChart(id, title, series, opts = {}) {
  const W = 460, H = 210, m = { l: 52, r: 12, t: 8, b: 26 };
  const all = series.flatMap((se) => se.points);
  const box = h("div", { class: "chart", id: "chart-" + id, "data-chart": id });
  box.appendChild(h("h3", { text: title }));
  cvray.charts[id] = { title, series: series.map((se) => ({ key: se.key, stage: se.stage, points: se.points })) };
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (opts.zero) { y0 = Math.min(0, y0); y1 = Math.max(0, y1); }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) > 0 ? Math.abs(y0) * 0.5 : 1; y0 -= d; y1 += d; }
  else { const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad; }
  const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v) => H - m.b - ((v - y0) / (y1 - y0)) * (H - m.t - m.b);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const grid = s("g", { class: "grid" }), axis = s("g", { class: "axis" });
  for (const t of niceTicks(y0, y1, 4)) {
    grid.appendChild(s("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
    axis.appendChild(s("text", { x: m.l - 6, y: Y(t) + 3, "text-anchor": "end" }, fmt(t, 3)));
  }
  const xt = niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t));
  for (const t of xt) axis.appendChild(s("text", { x: X(t), y: H - m.b + 15, "text-anchor": "middle" }, String(t)));
  axis.appendChild(s("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  axis.appendChild(s("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
  axis.appendChild(s("text", { x: W - m.r, y: H - 2, "text-anchor": "end" }, "step"));
  svg.appendChild(grid);
  svg.appendChild(axis);
  for (const mark of opts.marks || []) {
    if (mark.step < x0 || mark.step > x1) continue;
    svg.appendChild(s("line", { class: "alarm-mark", x1: X(mark.step), x2: X(mark.step), y1: m.t, y2: H - m.b },
                      s("title", {}, mark.label)));
  }
  const legend = h("div", { class: "legend" });
  series.forEach((se, i) => {
    const color = COLORS[i % COLORS.length];
    const d = se.points.map((p, j) => (j ? "L" : "M") + X(p[0]).toFixed(2) + " " + Y(p[1]).toFixed(2)).join(" ");
    svg.appendChild(s("path", { class: "series", d, stroke: color, "data-key": se.key, "data-stage": se.stage,
                                "data-points": JSON.stringify(se.points) }));
    if (se.points.length <= 60) {
      for (const p of se.points) svg.appendChild(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.4, fill: color }));
    }
    const last = se.points[se.points.length - 1];
    legend.appendChild(h("span", {}, h("span", { class: "sw", style: "background:" + color }), se.label,
                         h("span", { class: "last", text: last ? fmt(last[1]) : "" })));
  });
  // Hover: a vertical line at the nearest step and every series' value there.
  const hover = s("line", { class: "hover-line", y1: m.t, y2: H - m.b, visibility: "hidden" });
  svg.appendChild(hover);
  const tip = h("div", { class: "tip" });
  const steps = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
  svg.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const vx = ((ev.clientX - r.left) / r.width) * W;
    if (!steps.length) return;
    const step = steps.reduce((best, st) => (Math.abs(X(st) - vx) < Math.abs(X(best) - vx) ? st : best), steps[0]);
    hover.setAttribute("x1", X(step)); hover.setAttribute("x2", X(step)); hover.setAttribute("visibility", "visible");
    tip.replaceChildren(h("div", {}, h("b", { text: "step " + step })),
      ...series.map((se, i) => {
        const p = se.points.find((q) => q[0] === step);
        return p ? h("div", {}, h("span", { class: "sw", style: "display:inline-block;width:8px;height:8px;margin-right:5px;background:" + COLORS[i % COLORS.length] }), se.label + ": " + fmt(p[1], 4)) : null;
      }));
    tip.style.display = "block";
    const px = (X(step) / W) * r.width;
    tip.style.left = Math.min(px + 14, r.width - 160) + "px";
    tip.style.top = "34px";
  });
  svg.addEventListener("mouseleave", () => { hover.setAttribute("visibility", "hidden"); tip.style.display = "none"; });
  box.appendChild(svg);
  box.appendChild(tip);
  box.appendChild(legend);
  return box;
}

function seriesOf(stage, keys, labels) {
  return keys.map((key) => ({
    key, stage, label: (labels && labels[key]) || key,
    points: rows.filter((r) => r.stage === stage && typeof r[key] === "number").map((r) => [r.step, r[key]]),
  })).filter((se) => se.points.length);
}
function keysLike(stage, re) {
  const keys = new Set();
  for (const r of rows) if (r.stage === stage) for (const k of Object.keys(r)) if (re.test(k) && typeof r[k] === "number") keys.add(k);
  return [...keys].sort();
}
const strip = (prefix) => (keys) => Object.fromEntries(keys.map((k) => [k, k.slice(prefix.length)]));

/* The charts of one stage: [id, title, keys, labels, options]; empty ones are left out. */
function chartSpecs(stage) {
  const terms = Object.keys(runData.reward_weights || {});
  const termKeys = (terms.length ? terms : ["acc", "fmt", "mandatory", "necessity", "exact", "emerge", "usage", "spurious"])
    .map((t) => "reward/" + t);
  const errorKeys = keysLike(stage, /^rollout\/tool_errors\//);
  const stopKeys = keysLike(stage, /^rollout\/stop\//);
  const timeKeys = keysLike(stage, /^time\/.*_s$/);
  const toolMarks = (runData.alarms || []).filter((a) => a.stage === stage)
    .map((a) => ({ step: a.step, label: a.message }));
  const weightLabel = (k) => {
    const w = (runData.reward_weights || {})[k.slice(7)];
    return k.slice(7) + (w === undefined ? "" : " (×" + fmt(w) + ")");
  };
  return [
    ["reward", "Reward (mean total)", ["reward/total"], { "reward/total": "total" }, {}],
    ["terms", "Reward terms (mean, unweighted)", termKeys, Object.fromEntries(termKeys.map((k) => [k, weightLabel(k)])), {}],
    ["accuracy", "Accuracy of the rollouts", ["reward/correct"], { "reward/correct": "correct" }, { zero: true }],
    ["tool-use", "Tool use", ["tool_use/call_rate", "tool_use/valid_call_rate"],
     { "tool_use/call_rate": "calls per trajectory", "tool_use/valid_call_rate": "valid share of calls" },
     { zero: true, marks: toolMarks }],
    ["tool-errors", "Tool errors by class (per step)", errorKeys, strip("rollout/tool_errors/")(errorKeys), { zero: true }],
    ["length", "Response length (tokens, mean)", ["rollout/response_tokens_mean"], { "rollout/response_tokens_mean": "response tokens" }, {}],
    ["turns", "Turns per trajectory", ["rollout/turns_mean"], { "rollout/turns_mean": "turns" }, {}],
    ["stops", "Stop reasons (share)", stopKeys, strip("rollout/stop/")(stopKeys), { zero: true }],
    ["kl", "KL to the reference", ["learner/rl/kl", "learner/rl/approx_kl_old"],
     { "learner/rl/kl": "kl", "learner/rl/approx_kl_old": "approx. KL to the rollout policy" }, {}],
    ["entropy", "Entropy (nats/token)", ["learner/rl/entropy", "sft/entropy"], { "learner/rl/entropy": "entropy", "sft/entropy": "entropy" }, {}],
    ["loss", "Loss", ["learner/rl/loss", "learner/rl/pg_loss", "sft/loss"],
     { "learner/rl/loss": "loss", "learner/rl/pg_loss": "policy-gradient loss", "sft/loss": "NLL" }, {}],
    ["grad-norm", "Gradient norm", ["learner/rl/grad_norm", "sft/grad_norm"], { "learner/rl/grad_norm": "grad norm", "sft/grad_norm": "grad norm" }, {}],
    ["clip", "Clipped ratio share", ["learner/rl/clip_frac_low", "learner/rl/clip_frac_high", "learner/rl/dual_clip_frac"],
     strip("learner/rl/")(["learner/rl/clip_frac_low", "learner/rl/clip_frac_high", "learner/rl/dual_clip_frac"]), { zero: true }],
    ["lr", "Learning rate", ["learner/rl/lr", "sft/lr"], { "learner/rl/lr": "lr", "sft/lr": "lr" }, {}],
    ["time", "Time per phase (s)", timeKeys, strip("time/")(timeKeys), { zero: true }],
    ["throughput", "Tokens per second (learner)", ["learner/rl/tokens_per_s", "sft/tokens_per_s"],
     { "learner/rl/tokens_per_s": "tokens/s", "sft/tokens_per_s": "tokens/s" }, {}],
  ];
}

function stageCharts(stage) {
  const grid = h("div", { class: "charts" });
  for (const [id, title, keys, labels, opts] of chartSpecs(stage)) {
    const series = seriesOf(stage, keys, labels);
    if (series.length) grid.appendChild(lineChart(stage + "-" + id, title, series, opts));
  }
  return grid;
}

function validationCharts() {
  const grid = h("div", { class: "charts" });
  const stages = [...new Set(rows.map((r) => r.stage))];
  const specs = [["val-accuracy", "Validation accuracy (greedy)", "eval/accuracy"], ["val-reward", "Validation reward", "eval/reward"],
                 ["val-tool-use", "Validation: share of trajectories with a tool call", "eval/tool_use_rate"]];
  for (const [id, title, key] of specs) {
    const having = stages.filter((st) => rows.some((r) => r.stage === st && typeof r[key] === "number"));
    const series = having.flatMap((st) => seriesOf(st, [key], { [key]: (having.length > 1 ? stageName(st) + " · " : "") + key.slice(5) }));
    if (series.length) grid.appendChild(lineChart(id, title, series, { zero: true }));
  }
  return grid;
}

// ------------------------------------------------------------------------------------- overview

function renderAlarms() {
  const box = document.getElementById("alarms");
  box.replaceChildren(...(runData.alarms || []).map((a) => h("div", { class: "alarm" + (a.active ? " active" : ""), "data-metric": a.metric },
    h("b", { text: a.active ? "Tool-use collapse" : "Tool-use collapse (recovered at step " + a.until + ")" }),
    a.message + ". ",
    h("a", { href: stepHref(a.stage, nearestStep(a.stage, a.step)), text: "see the trajectories" }))));
}
function nearestStep(stage, step) {
  const steps = runData.steps.filter((e) => e.stage === stage).map((e) => e.step);
  return steps.length ? steps.reduce((b, st) => (Math.abs(st - step) < Math.abs(b - step) ? st : b)) : step;
}

function summaryCards() {
  const cards = [];
  const add = (label, found, sub, asPct) => {
    if (!found) return;
    cards.push(h("div", { class: "card" }, h("div", { class: "k", text: label }),
      h("div", { class: "v", text: asPct ? pct(found.value) : fmt(found.value) }),
      h("div", { class: "s", text: sub || stageName(found.stage) + " step " + found.step })));
  };
  const rl = rows.filter((r) => r.stage === "rl");
  if (rl.length) cards.push(h("div", { class: "card" }, h("div", { class: "k", text: "RL steps logged" }),
    h("div", { class: "v", text: String(rl.length) }), h("div", { class: "s", text: "last: step " + rl[rl.length - 1].step })));
  add("reward (mean)", lastValue("rl", "reward/total"));
  add("rollout accuracy", lastValue("rl", "reward/correct"), null, true);
  add("validation accuracy", lastValue(null, "eval/accuracy"), null, true);
  add("tool calls / trajectory", lastValue("rl", "tool_use/call_rate"));
  add("valid tool calls", lastValue("rl", "tool_use/valid_call_rate"), null, true);
  add("KL", lastValue("rl", "learner/rl/kl"));
  add("SFT loss", lastValue("sft", "sft/loss"));
  return h("div", { class: "cards" }, cards);
}

function stepTable(limit) {
  const entries = [...runData.steps].sort((a, b) => (b.stage === a.stage ? b.step - a.step : a.stage < b.stage ? -1 : 1));
  if (!entries.length) return h("div", { class: "empty", text: "No trajectories logged yet (they appear after each RL step)." });
  const shown = limit ? entries.slice(0, limit) : entries;
  const table = h("table", { class: "data", id: "steps" },
    h("thead", {}, h("tr", {}, ["stage", "step", "trajectories", "mean reward", "correct", "calls / traj.", "tool errors"]
      .map((t, i) => h("th", { class: i > 1 ? "num" : null, text: t })))),
    h("tbody", {}, shown.map((e) => h("tr", { class: "link", onclick: () => { location.hash = stepHref(e.stage, e.step); } },
      h("td", { text: stageName(e.stage) }), h("td", {}, h("a", { href: stepHref(e.stage, e.step), text: "step " + e.step })),
      h("td", { class: "num", text: String(e.n) }), h("td", { class: "num", text: fmt(e.reward) }),
      h("td", { class: "num", text: pct(e.correct) }), h("td", { class: "num", text: fmt(e.calls) }),
      h("td", { class: "num", text: String(e.errors) })))));
  const wrap = h("div", {}, table);
  if (limit && entries.length > limit) {
    wrap.appendChild(h("p", {}, h("a", { href: "#/", onclick: (ev) => { ev.preventDefault(); wrap.replaceWith(stepTable(0)); },
      text: "show all " + entries.length + " steps" })));
  }
  return wrap;
}

function explorer() {
  const keys = [];
  for (const st of [...new Set(rows.map((r) => r.stage))]) {
    const seen = new Set();
    for (const r of rows) if (r.stage === st) for (const k of Object.keys(r)) if (typeof r[k] === "number" && !["step", "time"].includes(k)) seen.add(k);
    for (const k of [...seen].sort()) keys.push([st, k]);
  }
  const out = h("div", { class: "charts" });
  const select = h("select", { id: "explore" }, h("option", { value: "", text: "plot any metric…" }),
    keys.map(([st, k]) => h("option", { value: st + "\u0000" + k, text: stageName(st) + " · " + k })));
  select.addEventListener("change", () => {
    if (!select.value) return;
    const [st, k] = select.value.split("\u0000");
    out.prepend(lineChart("explore-" + st + "-" + k, stageName(st) + " · " + k, seriesOf(st, [k]), {}));
    select.value = "";
  });
  return h("div", { class: "explorer" }, h("p", {}, select, h("span", { class: "muted", text: "  " + keys.length + " metrics" })), out);
}

async function renderOverview(view) {
  const stages = [...new Set(rows.map((r) => r.stage))];
  const parts = [summaryCards()];
  const nav = h("div", { class: "section-nav" });
  parts.push(nav);
  const section = (id, title, body) => {
    nav.appendChild(h("a", { href: "#/", onclick: (ev) => { ev.preventDefault(); document.getElementById(id).scrollIntoView(); }, text: title }));
    parts.push(h("h2", { id, text: title }), body);
  };
  for (const st of ["rl", ...stages.filter((x) => x !== "rl" && x !== "sft"), "sft"]) {
    if (stages.includes(st)) section("sec-" + st, stageName(st), stageCharts(st));
  }
  if (rows.some((r) => typeof r["eval/accuracy"] === "number")) section("sec-val", "Validation", validationCharts());
  section("sec-steps", "Trajectories by step", stepTable(25));
  const report = await loadEval();
  if (report) {
    section("sec-eval", "Evaluation", h("div", { class: "report", id: "eval-report" },
      h("p", {}, report.report ? h("a", { href: report.report, text: "report.md" }) : null, "  ",
        h("a", { href: report.dir + "/metrics.json", text: "metrics.json" })),
      (() => { const d = h("div"); d.innerHTML = report.html; return d; })(),  // escaped by cv_ray (markdown.py)
      h("div", { class: "plots" }, report.plots.map((p) => h("a", { href: p }, h("img", { src: p, alt: p.split("/").pop() }))))));
  }
  if (!rows.length) parts.splice(1, 0, h("div", { class: "empty", text: "No metrics yet: the first step is running." }));
  section("sec-all", "All metrics", explorer());
  view.replaceChildren(...parts);
}

// ------------------------------------------------------------------------------------------ step

const SORTS = {
  index: (x) => x.index, reward: (x) => x.reward, correct: (x) => (x.correct ? 1 : 0), stop: (x) => x.stop_reason,
  turns: (x) => x.num_turns, calls: (x) => x.num_calls, errors: (x) => x.error_classes.length, tokens: (x) => x.tokens.response,
  uid: (x) => x.uid,
};

function parseQuery(q) { return Object.fromEntries(new URLSearchParams(q || "")); }

function applyFilters(samples, f) {
  return samples.filter((x) =>
    (!f.correct || (f.correct === "yes") === x.correct) &&
    (!f.stop || x.stop_reason === f.stop) &&
    (!f.error || (f.error === "none" ? x.error_classes.length === 0 : f.error === "any" ? x.error_classes.length > 0 : x.error_classes.includes(f.error))) &&
    (f.min === undefined || f.min === "" || x.reward >= +f.min) &&
    (f.max === undefined || f.max === "" || x.reward <= +f.max) &&
    (!f.q || (x.uid + " " + x.question).toLowerCase().includes(f.q.toLowerCase())));
}

async function renderStep(view, stage, step, query) {
  const data = await loadStep(stage, step);
  const f = parseQuery(query);
  const entries = runData.steps.filter((e) => e.stage === stage).map((e) => e.step).sort((a, b) => a - b);
  const at = entries.indexOf(step);
  const crumbs = h("div", { class: "crumbs" }, h("a", { href: "#/", text: "overview" }), " › ", stageName(stage) + " step " + step,
    h("span", { class: "pager" },
      at > 0 ? h("a", { href: stepHref(stage, entries[at - 1], query), text: "← step " + entries[at - 1] }) : null,
      at >= 0 && at < entries.length - 1 ? h("a", { href: stepHref(stage, entries[at + 1], query), text: "step " + entries[at + 1] + " →" }) : null));
  if (!data) { view.replaceChildren(crumbs, h("div", { class: "empty", text: "No trajectories were logged for this step." })); return; }
  const samples = data.samples;
  const setQuery = (patch) => {
    const next = { ...f, ...patch };
    for (const k of Object.keys(next)) if (next[k] === "" || next[k] === undefined) delete next[k];
    location.hash = stepHref(stage, step, new URLSearchParams(next).toString());
  };
  const select = (name, label, options) => h("label", {}, label, h("select", { name, onchange: (ev) => setQuery({ [name]: ev.target.value }) },
    options.map(([v, t]) => h("option", { value: v, text: t, selected: (f[name] || "") === v }))));
  const stops = [...new Set(samples.map((x) => x.stop_reason))].sort();
  const classes = [...new Set(samples.flatMap((x) => x.error_classes))].sort();
  const numberInput = (name, label) => h("label", {}, label, h("input", { type: "number", step: "any", name, value: f[name] || "",
    onchange: (ev) => setQuery({ [name]: ev.target.value }) }));
  const list = sortSamples(applyFilters(samples, f), f.sort || "index", f.dir === "asc" || (!f.dir && (f.sort || "index") === "index"));
  const filters = h("div", { class: "filters" },
    select("correct", "answer", [["", "all"], ["yes", "correct"], ["no", "wrong"]]),
    select("stop", "stop reason", [["", "all"], ...stops.map((x) => [x, x])]),
    select("error", "tool errors", [["", "all"], ["none", "none"], ["any", "any"], ...classes.map((x) => [x, x])]),
    numberInput("min", "reward ≥"), numberInput("max", "reward ≤"),
    h("label", {}, "search", h("input", { type: "search", name: "q", value: f.q || "", placeholder: "uid or question",
      onchange: (ev) => setQuery({ q: ev.target.value }) })),
    h("span", { class: "count", id: "count", text: list.length + " of " + samples.length + " trajectories" }));
  const cols = [["index", "#", "num"], ["uid", "task"], [null, "images"], ["reward", "reward", "num"], ["correct", "answer"],
                ["stop", "stop reason"], ["turns", "turns", "num"], ["calls", "calls", "num"], ["errors", "tool errors"],
                [null, "ops"], ["tokens", "tokens", "num"]];
  const sortKey = f.sort || "index";
  const asc = f.dir === "asc" || (!f.dir && sortKey === "index");
  const head = h("tr", {}, cols.map(([key, label, cls]) => h("th", {
    class: [cls, key ? "sortable" : null, key === sortKey ? "sorted" : null, key === sortKey && asc ? "asc" : null].filter(Boolean).join(" ") || null,
    "data-sort": key, text: label,
    onclick: key ? () => setQuery({ sort: key, dir: key === sortKey && !asc ? "asc" : "desc" }) : null,
  })));
  const body = h("tbody", {}, list.map((x) => h("tr", { class: "link", "data-index": x.index, onclick: () => { location.hash = trajHref(stage, step, x.index); } },
    h("td", { class: "num", text: String(x.index) }),
    h("td", { class: "mono", text: x.uid + "#" + x.sample_index }),
    h("td", { class: "thumbs" }, x.images.map((im, k) => [k ? h("span", { class: "arrow", text: "→" }) : null,
      h("img", { src: im.thumb, alt: "image " + k, loading: "lazy" })])),
    h("td", { class: "num", text: fmt(x.reward) }),
    h("td", {}, h("span", { class: "badge " + (x.correct ? "good" : "bad"), text: x.correct ? "correct" : "wrong" })),
    h("td", { text: x.stop_reason }),
    h("td", { class: "num", text: String(x.num_turns) }),
    h("td", { class: "num", text: String(x.num_calls) }),
    h("td", {}, x.error_classes.map((c) => h("span", { class: "badge bad", text: c }))),
    h("td", {}, x.ops.map((o) => h("span", { class: "chip", text: o }))),
    h("td", { class: "num", text: String(x.tokens.response) }))));
  view.replaceChildren(crumbs, h("h2", { text: stageName(stage) + " step " + step + ": " + samples.length + " trajectories" }), filters,
    list.length ? h("table", { class: "data", id: "trajectories" }, h("thead", {}, head), body)
                : h("div", { class: "empty", text: "No trajectory matches these filters." }));
}

function sortSamples(list, key, asc) {
  const get = SORTS[key] || SORTS.index;
  return [...list].sort((a, b) => {
    const va = get(a), vb = get(b);
    const c = va < vb ? -1 : va > vb ? 1 : a.index - b.index;
    return asc ? c : -c;
  });
}

// ------------------------------------------------------------------------------------ trajectory

const BOX_COLORS = ["#e8590c", "#7048e8", "#c2255c", "#0b7285", "#a07a00"];

function originFigure(x) {
  const im = x.images[0];
  const scale = Math.min(480 / Math.max(im.width, im.height), 6);  // small images are shown enlarged, pixel for pixel
  const wrap = h("div", { class: "origin" }, h("img", { src: im.src, alt: "image 0", width: Math.round(im.width * scale),
    height: Math.round(im.height * scale), style: scale > 1 ? "image-rendering:pixelated" : null }));
  const svg = s("svg", { viewBox: `0 0 ${im.width} ${im.height}`, preserveAspectRatio: "none", id: "origin-boxes" });
  const unit = 1 / scale;  // one screen pixel in image pixels
  const rect = (b, color, label, cls, dashed, below) => {
    svg.appendChild(s("rect", { class: cls, x: b[0], y: b[1], width: b[2] - b[0], height: b[3] - b[1], fill: "none", stroke: color,
                                "stroke-width": 2.5 * unit, "stroke-dasharray": dashed ? `${7 * unit} ${4 * unit}` : null,
                                "data-box": JSON.stringify(b) }));
    svg.appendChild(s("text", { x: b[0] + 4 * unit, y: below ? b[3] - 5 * unit : b[1] + 14 * unit, fill: color,
                                style: `font-size:${12 * unit}px;stroke-width:${3 * unit}px` }, label));
  };
  if (x.answer_box) rect(x.answer_box, "#12915a", "answer region", "answer-box", true, true);
  const legend = [];
  let n = 0;
  x.turns.forEach((t) => t.calls.forEach((c) => c.ops.forEach((op) => {
    if (op.op === "crop" && op.box_on_origin) {
      const color = BOX_COLORS[n++ % BOX_COLORS.length];
      rect(op.box_on_origin, color, "turn " + c.turn + " crop", "crop-box", false, false);
      legend.push(h("span", { class: "chip", style: "border-color:" + color + ";color:" + color,
        text: "turn " + c.turn + ": crop [" + op.box_on_origin.map((v) => Math.round(v)).join(", ") + "] on image 0" + (op.verified ? "" : " (unverified)") }));
    }
  })));
  wrap.appendChild(svg);
  return h("div", {}, wrap, h("div", { class: "muted", style: "margin-top:4px", text: "image 0 · " + im.width + "×" + im.height +
    (x.answer_box ? " · dashed green: the answer region" : "") }), legend.length ? h("div", { style: "margin-top:4px" }, legend) : null);
}

function rewardTable(x) {
  const weights = runData.reward_weights || {};
  const names = Object.keys(x.terms);
  const contribs = names.map((k) => (weights[k] === undefined ? null : weights[k] * x.terms[k]));
  const maxAbs = Math.max(1e-9, ...contribs.filter((c) => c !== null).map(Math.abs));
  const table = h("table", { class: "terms", id: "reward-terms" },
    h("tr", {}, h("th", { text: "term" }), h("th", { class: "num", text: "value" }), h("th", { class: "num", text: "weight" }),
      h("th", { class: "num", text: "contribution" }), h("th", {})),
    names.map((k, i) => h("tr", { "data-term": k }, h("td", { text: k }), h("td", { class: "num", text: fmt(x.terms[k], 4) }),
      h("td", { class: "num", text: weights[k] === undefined ? "—" : fmt(weights[k]) }),
      h("td", { class: "num", text: contribs[i] === null ? "—" : fmt(contribs[i], 4) }),
      h("td", {}, contribs[i] ? h("span", { class: "bar" + (contribs[i] < 0 ? " neg" : ""), style: "width:" + Math.round(60 * Math.abs(contribs[i]) / maxAbs) + "px" }) : null))),
    h("tr", { class: "total" }, h("td", { text: "total" }), h("td", {}), h("td", {}), h("td", { class: "num", text: fmt(x.reward, 4) }), h("td", {})));
  const stats = Object.entries(x.stats).map(([k, v]) => [k, fmt(v, 4)]);
  return h("div", {}, table, stats.length ? kv(stats) : null);
}

function kv(pairs) { return h("div", { class: "kv" }, pairs.flatMap(([k, v]) => [h("div", { text: k }), h("div", { text: String(v) })])); }

function callImage(x, index, label) {
  if (index === null || index === undefined || !x.images[index]) return null;
  const im = x.images[index];
  const scale = Math.min(320 / Math.max(im.width, im.height), 4);
  return h("figure", {}, h("img", { src: im.src, alt: label, width: Math.round(im.width * scale), height: Math.round(im.height * scale),
    style: scale > 1 ? "image-rendering:pixelated" : null, "data-image": index, loading: "lazy" }),
    h("figcaption", { text: label + " · image " + index + " · " + im.width + "×" + im.height }));
}

function opChip(op) {
  const params = Object.entries(op.params).map(([k, v]) => k + "=" + (Array.isArray(v) ? "[" + v.map((n) => (typeof n === "number" ? +n.toFixed(1) : n)).join(", ") + "]" : typeof v === "number" ? fmt(v) : JSON.stringify(v))).join(" ");
  // changed: false = the sandbox saw no pixel change; null = not reported (core ops always change the image).
  const cls = "chip" + (!op.verified ? " unverified" : op.changed === false ? " unchanged" : "");
  const note = !op.verified ? " ⚠ unverified" : op.changed === false ? " (no change)" : " ✓";
  return h("span", { class: cls, title: op.via ? "via " + op.via : null, text: op.op + (params ? " " + params : "") + note });
}

function renderCall(x, c, k) {
  const status = c.ok ? h("span", { class: "badge good", text: "ran" }) : h("span", { class: "badge bad", text: c.error_class || "failed" });
  const parts = [h("div", { class: "call-head" }, h("b", { text: "tool call " + (k + 1) }), status,
    c.parsed ? h("span", { class: "muted", text: "on image " + c.image_index + (c.output_index !== null ? " → image " + c.output_index : "") + " · " + fmt(c.seconds) + " s" }) : null)];
  if (c.code) { const pre = h("pre", { class: "code" }); pre.innerHTML = c.code_html; parts.push(pre); }  // escaped by cv_ray (highlight.py)
  const io = h("div", { class: "io" }, callImage(x, c.parsed ? c.image_index : null, "read"),
    c.output_index !== null ? h("span", { class: "arrow", text: "→" }) : null, callImage(x, c.output_index, "returned"));
  if (io.childNodes.length) parts.push(io);
  if (!c.ok && c.error) parts.push(h("div", { class: "error", text: c.error }));
  if (!c.parsed) parts.push(h("div", { class: "error", text: "the call could not be parsed (" + (c.error_class || "?") + "): no code ran" }));
  if (c.ops.length) parts.push(h("div", {}, h("span", { class: "muted", text: "ops the sandbox recognised: " }), c.ops.map(opChip)));
  else if (c.ok) parts.push(h("div", { class: "muted", text: "no op recognised" }));
  if (c.stdout) parts.push(h("details", { class: "raw" }, h("summary", { text: "printed output" }), h("pre", { class: "code", text: c.stdout })));
  return h("div", { class: "call", "data-call": k }, parts);
}

function renderTurn(x, t) {
  const body = h("div", { class: "body" });
  for (const seg of t.segments) {
    if (seg.kind === "answer") body.appendChild(h("div", { class: "answer", text: "answer: " + seg.text.replace(/^<answer>|<\/answer>$/g, "").trim() }));
    else if (seg.kind === "think") body.appendChild(h("div", { class: "prose think", text: seg.text.replace(/^<think>|<\/think>$/g, "").trim() }));
    else if (seg.kind === "call") body.appendChild(h("details", { class: "raw" }, h("summary", { text: "tool call as written" }), h("pre", { class: "code", text: seg.text })));
    else if (seg.text.trim()) body.appendChild(h("div", { class: "prose", text: seg.text.trim() }));
  }
  if (!t.segments.length) body.appendChild(h("div", { class: "muted", text: "(no text kept for this turn)" }));
  t.calls.forEach((c, k) => body.appendChild(renderCall(x, c, k)));
  return h("section", { class: "turn", "data-turn": t.index }, h("h3", { text: "Turn " + t.index + (t.calls.length ? " · " + t.calls.length + " tool call" + (t.calls.length > 1 ? "s" : "") : "") }), body);
}

async function renderTrajectory(view, stage, step, index) {
  const data = await loadStep(stage, step);
  const x = data && data.samples.find((y) => y.index === index);
  const crumbs = h("div", { class: "crumbs" }, h("a", { href: "#/", text: "overview" }), " › ",
    h("a", { href: stepHref(stage, step), text: stageName(stage) + " step " + step }), " › trajectory " + index,
    data ? h("span", { class: "pager" },
      index > 0 ? h("a", { href: trajHref(stage, step, index - 1), text: "← previous" }) : null,
      index < data.samples.length - 1 ? h("a", { href: trajHref(stage, step, index + 1), text: "next →" }) : null) : null);
  if (!x) { view.replaceChildren(crumbs, h("div", { class: "empty", text: "This trajectory was not logged." })); return; }
  const tokens = x.tokens;
  const m = x.metrics || {};
  const head = h("div", { class: "traj-head" },
    h("div", { class: "panel" }, originFigure(x)),
    h("div", { class: "panel" },
      h("div", {}, h("span", { class: "big", id: "reward", text: fmt(x.reward, 4) }), "  ",
        h("span", { class: "badge " + (x.correct ? "good" : "bad"), text: x.correct ? "correct" : "wrong" }), " ",
        h("span", { class: "badge", text: "stop: " + x.stop_reason }), x.judge_failed ? h("span", { class: "badge warn", text: "judge failed" }) : null),
      kv([["task", x.uid + " · sample " + x.sample_index], ["question", x.question], ["truth", x.answer],
          ["required ops", x.required_ops.join(", ") || "none"], ["source", x.data_source + " · " + x.task_type],
          ["tokens", "prompt " + tokens.prompt + " · response " + tokens.response + " (sampled " + tokens.sampled + ", inserted " + tokens.inserted + ")"],
          ["time", "generation " + fmt(m.generation_s) + " s · tools " + fmt(m.tool_s) + " s"]]),
      h("h3", { style: "margin-top:14px", text: "Reward, term by term" }), rewardTable(x)));
  view.replaceChildren(crumbs, head, ...x.turns.map((t) => renderTurn(x, t)));
}

// ----------------------------------------------------------------------------------------- shell

function renderHeader() {
  document.getElementById("run-name").textContent = runData.name;
  const st = document.getElementById("status");
  st.className = "pill " + runData.status;
  st.textContent = runData.status + " · updated " + new Date(runData.updated * 1000).toLocaleTimeString();
  document.title = runData.name + " · cv_ray";
  const links = document.getElementById("run-links");
  links.replaceChildren(...Object.entries(runData.files || {}).map(([name, href]) => h("a", { href, text: name })));
  renderAlarms();
}

let rendering = Promise.resolve();
function render() {
  rendering = rendering.then(async () => {
    const view = document.getElementById("view");
    const [path, query] = location.hash.replace(/^#/, "").split("?");
    const parts = path.split("/").filter(Boolean);
    cvray.charts = {};
    document.body.dataset.rendered = "";
    if (parts[0] === "step" && parts.length === 3) await renderStep(view, parts[1], +parts[2], query);
    else if (parts[0] === "traj" && parts.length === 4) await renderTrajectory(view, parts[1], +parts[2], +parts[3]);
    else await renderOverview(view);
    document.body.dataset.rendered = parts[0] || "overview";
  }).catch((err) => {  // shown on the page and in the console (the browser test fails on it); later renders still run
    document.getElementById("view").replaceChildren(h("div", { class: "error", text: "The dashboard could not show this page: " + err.message }));
    document.body.dataset.rendered = "error";
    console.error(err);
  });
  return rendering;
}

async function refresh() {
  const next = await loadRun();
  if (!next || (runData && next.updated === runData.updated)) return;
  const reset = !runData || next.epoch !== runData.epoch;
  if (reset) { cvray.steps = {}; cvray.chunks = {}; }
  const changed = await loadChunks(next, reset);
  const stepsChanged = !runData || JSON.stringify(next.steps) !== JSON.stringify(runData.steps);
  const evalChanged = !runData || JSON.stringify(next.eval) !== JSON.stringify(runData.eval);
  runData = next;
  cvray.run_data = next;
  renderHeader();
  const onOverview = !/^#\/(step|traj)\//.test(location.hash);
  if (reset || (onOverview && (changed || stepsChanged || evalChanged))) {
    const y = window.scrollY;
    await render();
    window.scrollTo(0, y);
  }
}

async function main() {
  await refresh();
  window.addEventListener("hashchange", () => { render(); window.scrollTo(0, 0); });
  const tick = async () => {
    if (runData && runData.status === "finished") return;  // a finished run does not change any more
    try { await refresh(); } finally { setTimeout(tick, REFRESH_MS); }
  };
  setTimeout(tick, REFRESH_MS);
}

main();
