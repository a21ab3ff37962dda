// trajscope dashboard: entry module loaded by TensorBoard's plugin iframe (it calls render()).
// Plain ES modules, no build step, no network beyond the plugin's own routes.
import { getJSON, decode } from "./api.js";
import { LabelMap, SORTS, sortOrder } from "./labelmap.js";
import { lineChart, stackedChart } from "./charts.js";
import { PhasePortrait } from "./phase.js";
import {
  SERIES_COLORS, el, fmt, labelColor, labelTitle, metricShort, metricTitle,
} from "./common.js";

const state = {
  runs: [],
  run: null, // run object from /runs
  layer: null, // layer name
  kind: "label", // or "stable_label"
  sort: "index",
  labels: null, // {labels: Uint8Array N×K node-major, nodes, steps, names, source}
  node: null, // selected node
  stability: null,
  phase: null, // {index, step, steps, metrics: {name: typed array}}
  axes: { x: "drift", y: "spectral_radius", logX: false, logY: false },
  nodeCache: new Map(),
  stepCache: new Map(),
  tokens: { labels: 0, phase: 0, node: 0, stab: 0, runs: 0 },
};
const ui = {};

/** A model that is itself one layer has the module name "". */
function layerLabel(name) {
  return name === "" ? "(model)" : name;
}

export async function render() {
  document.title = "trajscope";
  document.head.append(el("link", { rel: "icon", href: "data:," })); // no favicon request (404)
  const css = el("link", { rel: "stylesheet", href: new URL("./style.css", import.meta.url).href });
  const styled = new Promise((resolve) => {
    css.onload = resolve;
    css.onerror = resolve;
  });
  document.head.append(css);
  await styled; // lay out with the stylesheet, not before
  document.body.append(skeleton());
  await loadRuns();
}

// -- layout ----------------------------------------------------------------------------------

function card(id, title, subtitle, controls, ...body) {
  return el("section", { class: "ts-card", id },
    el("div", { class: "ts-card-head" },
      el("div", { class: "ts-card-titles" }, el("h2", { text: title }), subtitle ? el("span", { class: "ts-sub", text: subtitle }) : null),
      el("div", { class: "ts-controls" }, controls || [])),
    ...body);
}

function select(id, onchange) {
  return el("select", { id, onchange });
}

function skeleton() {
  ui.run = select("ts-run", (e) => selectRun(e.target.value));
  ui.layer = select("ts-layer", (e) => selectLayer(e.target.value));
  ui.meta = el("span", { class: "ts-meta", id: "ts-meta" });
  ui.error = el("div", { class: "ts-error", id: "ts-error", hidden: true });
  ui.warnings = el("ul", { class: "ts-warnings", id: "ts-warnings", hidden: true });
  ui.empty = el("div", { class: "ts-empty", id: "ts-empty", hidden: true });

  ui.sort = el("select", { id: "ts-sort", onchange: (e) => { state.sort = e.target.value; applySort(); } },
    Object.entries(SORTS).map(([k, v]) => el("option", { value: k, text: v.title })));
  ui.kind = el("select", { id: "ts-kind", onchange: (e) => { state.kind = e.target.value; loadLabels(); } },
    el("option", { value: "label", text: "instantaneous" }), el("option", { value: "stable_label", text: "stable" }));
  ui.legend = el("div", { class: "ts-legend", id: "ts-legend" });
  ui.mapHost = el("div", { class: "ts-map-host", id: "ts-map-host" });
  ui.mapStatus = el("div", { class: "ts-status" });
  ui.nodeTitle = el("span", { class: "ts-sub", id: "ts-node-title", text: "" });
  ui.nodeBody = el("div", { class: "ts-node-body", id: "ts-node-body" },
    el("p", { class: "ts-placeholder", text: "Click a node in the label map or in the phase portrait to see its time series." }));
  ui.stabBody = el("div", { class: "ts-stab-body", id: "ts-stab-body" });

  ui.axX = el("select", { id: "ts-axis-x", onchange: (e) => { state.axes.x = e.target.value; drawPhase(); } });
  ui.axY = el("select", { id: "ts-axis-y", onchange: (e) => { state.axes.y = e.target.value; drawPhase(); } });
  ui.logX = el("input", { type: "checkbox", id: "ts-log-x", onchange: (e) => { state.axes.logX = e.target.checked; drawPhase(); } });
  ui.logY = el("input", { type: "checkbox", id: "ts-log-y", onchange: (e) => { state.axes.logY = e.target.checked; drawPhase(); } });
  ui.slider = el("input", { type: "range", id: "ts-step-slider", min: 0, max: 0, value: 0, step: 1 });
  ui.slider.addEventListener("input", () => schedulePhase(Number(ui.slider.value)));
  ui.play = el("button", { class: "ts-btn ts-play", id: "ts-play", title: "play through the steps", text: "▶", onclick: togglePlay });
  ui.stepLabel = el("span", { class: "ts-step-label", id: "ts-step-label" });
  ui.phaseHost = el("div", { class: "ts-phase-host", id: "ts-phase-host" });
  ui.phaseStatus = el("div", { class: "ts-status" });
  ui.tooltip = el("div", { class: "ts-tooltip", id: "ts-tooltip", hidden: true });

  const header = el("header", { class: "ts-bar" },
    el("div", { class: "ts-brand" }, el("span", { class: "ts-logo", text: "trajscope" }), el("span", { class: "ts-tagline", text: "training dynamics, node by node" })),
    el("label", { class: "ts-field" }, "Run", ui.run),
    el("label", { class: "ts-field" }, "Layer", ui.layer),
    ui.meta,
    el("button", { class: "ts-btn", id: "ts-reload", title: "re-read the logdir", text: "Reload", onclick: reloadAll }));

  const mapCard = card("ts-card-map", "Label map", "nodes × analysed steps",
    [el("label", { class: "ts-field" }, "Sort", ui.sort), el("label", { class: "ts-field" }, "Labels", ui.kind)],
    ui.legend, ui.mapStatus, ui.mapHost,
    el("p", { class: "ts-hint", text: "Hover a cell for the node's metrics at that step · click to open its time series." }));
  const nodeCard = card("ts-card-node", "Node", null, [ui.nodeTitle], ui.nodeBody);
  const stabCard = card("ts-card-stab", "Stability", "global sharpness vs the optimizer's threshold · per layer", null, ui.stabBody);
  const phaseCard = card("ts-card-phase", "Phase portrait", "every node at one step",
    [el("label", { class: "ts-field" }, "y", ui.axY, el("span", { class: "ts-check" }, ui.logY, "log")),
      el("label", { class: "ts-field" }, "x", ui.axX, el("span", { class: "ts-check" }, ui.logX, "log"))],
    el("div", { class: "ts-step-row" }, ui.play, ui.slider, ui.stepLabel),
    ui.phaseStatus, ui.phaseHost);

  ui.main = el("main", { class: "ts-grid", id: "ts-main" }, mapCard, nodeCard, stabCard, phaseCard);
  ui.map = new LabelMap(ui.mapHost, { onHover: hoverCell, onLeave: hideTooltip, onClick: (hit) => selectNode(hit.node) });
  ui.phase = new PhasePortrait(ui.phaseHost, { onHover: hoverPoint, onClick: selectNode });
  let pending = 0;
  let lastW = 0;
  new ResizeObserver(() => {
    clearTimeout(pending);
    pending = setTimeout(() => {
      if (Math.abs(ui.main.clientWidth - lastW) < 4) return;
      lastW = ui.main.clientWidth;
      renderStability();
      renderNode();
    }, 120);
  }).observe(ui.main);
  return el("div", { class: "ts-app" }, header, ui.error, ui.warnings, ui.empty, ui.main, ui.tooltip);
}

// -- messages ---------------------------------------------------------------------------------

function showError(msg) {
  ui.error.textContent = msg;
  ui.error.hidden = !msg;
}

// What the analysis warned about (the WARNING lines of its summary, kept in analysis.zarr): a replay of
// another function than the one trained, an optimizer without an update map, ...
function showWarnings(lines) {
  ui.warnings.replaceChildren(...lines.map((t) => el("li", { text: t.replace(/^WARNING:\s*/, "") })));
  ui.warnings.hidden = !lines.length;
}

function status(node, msg, isError = false) {
  node.textContent = msg || "";
  node.hidden = !msg;
  node.classList.toggle("is-error", !!isError);
}

function showEmpty(hasLogdir) {
  ui.main.hidden = true;
  ui.empty.hidden = false;
  ui.empty.replaceChildren(
    el("h2", { text: "No trajscope results in this logdir yet" }),
    el("p", { text: "This tab shows runs analysed by trajscope: per-node labels, curvature and stability. Record a run, analyse it, and point TensorBoard at the folder that holds the run folders:" }),
    el("pre", { text: "with trajscope.Recorder(\"runs/exp1\", model, opt, loss_fn) as rec:  # in your training loop\n    ...\ntrajscope analyze runs/exp1       # writes analysis.zarr and event files\ntensorboard --logdir runs" }),
    el("p", { text: hasLogdir ? "Then press Reload." : "TensorBoard was started without a local --logdir: per-node metrics need the run folders on disk." }),
    el("button", { class: "ts-btn", text: "Reload", onclick: reloadAll }));
  ui.meta.textContent = "";
}

// -- runs and layers --------------------------------------------------------------------------

async function loadRuns() {
  const token = ++state.tokens.runs;
  showError("");
  let data;
  try {
    data = await getJSON("runs");
  } catch (e) {
    showError(e.message);
    return;
  }
  if (token !== state.tokens.runs) return;
  state.runs = data.runs;
  document.body.dataset.runs = String(data.runs.length);
  if (!data.runs.length) {
    showEmpty(data.logdir);
    return;
  }
  ui.empty.hidden = true;
  ui.main.hidden = false;
  const keep = state.run && data.runs.find((r) => r.name === state.run.name);
  ui.run.replaceChildren(...data.runs.map((r) => el("option", { value: r.name, text: r.name })));
  const name = keep ? keep.name : data.runs[0].name;
  ui.run.value = name;
  await selectRun(name);
}

async function selectRun(name) {
  const run = state.runs.find((r) => r.name === name);
  if (!run) return;
  const keepLayer = state.layer;
  state.run = run;
  ui.layer.replaceChildren(...run.layers.map((l) => el("option", { value: l.name, text: l.nodes ? `${layerLabel(l.name)} (${l.nodes})` : layerLabel(l.name) })));
  if (run.results_error) showError(`${run.name}: ${run.results_error}`);
  else showError("");
  showWarnings(run.warnings || []);
  loadStability();
  if (!run.layers.length) {
    status(ui.mapStatus, "This run has no node layers.");
    return;
  }
  const layer = run.layers.find((l) => l.name === keepLayer) ? keepLayer : run.layers[0].name;
  ui.layer.value = layer;
  await selectLayer(layer);
}

async function selectLayer(name) {
  state.layer = name;
  state.node = null;
  state.phase = null;
  stopPlay();
  renderNode();
  await Promise.all([loadLabels(), loadPhase(null)]);
}

async function reloadAll() {
  state.nodeCache.clear();
  state.stepCache.clear();
  await loadRuns();
}

// -- label map --------------------------------------------------------------------------------

async function loadLabels() {
  const token = ++state.tokens.labels;
  const { run, layer } = { run: state.run.name, layer: state.layer };
  status(ui.mapStatus, "loading labels…");
  let d;
  try {
    d = await getJSON("labels", { run, layer, kind: state.kind });
  } catch (e) {
    if (token !== state.tokens.labels) return;
    status(ui.mapStatus, e.message, true);
    ui.mapHost.hidden = true;
    return;
  }
  if (token !== state.tokens.labels) return;
  status(ui.mapStatus, "");
  ui.mapHost.hidden = false;
  state.labels = { labels: decode(d.labels), nodes: d.nodes, steps: d.steps, names: d.label_names, source: d.source };
  ui.map.setData(state.labels, sortOrder(state.sort, state.labels.labels, d.nodes, d.steps.length));
  ui.map.setSelected(state.node);
  markPhaseColumn();
  renderLegend();
  ui.meta.textContent = `${d.nodes} nodes · ${d.steps.length} analysed steps · labels from ${d.source === "events" ? "event files" : "analysis.zarr"}`;
  if (state.node !== null) renderNode();
}

function applySort() {
  if (!state.labels) return;
  const L = state.labels;
  ui.map.setOrder(sortOrder(state.sort, L.labels, L.nodes, L.steps.length));
}

function renderLegend() {
  const L = state.labels;
  const K = L.steps.length;
  const counts = new Array(L.names.length).fill(0);
  let unknown = 0;
  for (let i = 0; i < L.nodes; i++) {
    const c = K ? L.labels[i * K + K - 1] : 255;
    if (c < counts.length) counts[c]++;
    else unknown++;
  }
  const items = L.names.map((n, c) => el("span", { class: "ts-key", title: `${counts[c]} of ${L.nodes} nodes at the last step` },
    el("i", { style: `--c:${labelColor(c)}` }), labelTitle(n), el("b", { text: String(counts[c]) })));
  if (unknown) items.push(el("span", { class: "ts-key" }, el("i", { style: `--c:${labelColor(255)}` }), "not computed", el("b", { text: String(unknown) })));
  ui.legend.replaceChildren(el("span", { class: "ts-legend-title", text: K ? `at step ${L.steps[K - 1]}:` : "" }), ...items);
}

function markPhaseColumn() {
  if (!state.labels || !state.phase) return ui.map.setMarkedColumn(null);
  const col = state.labels.steps.indexOf(state.phase.step);
  ui.map.setMarkedColumn(col >= 0 ? col : null);
}

// -- per-node series (hover and click) ---------------------------------------------------------

function nodeKey(node) {
  return `${state.run.name}\u0000${state.layer}\u0000${node}`;
}

/** /node of the current run/layer, cached (errors too, so a missing store is asked once). */
function nodeSeries(node) {
  const key = nodeKey(node);
  if (!state.nodeCache.has(key)) {
    const p = getJSON("node", { run: state.run.name, layer: state.layer, node }).then((d) => {
      d.index = new Map(d.steps.map((s, i) => [s, i]));
      return d;
    });
    p.catch(() => {});
    state.nodeCache.set(key, p);
    if (state.nodeCache.size > 512) state.nodeCache.delete(state.nodeCache.keys().next().value);
  }
  return state.nodeCache.get(key);
}

let hoverTimer = 0;
function hoverCell(hit) {
  const L = state.labels;
  const code = L.labels[hit.node * L.steps.length + hit.col];
  const head = [el("b", { text: `node ${hit.node}` }), ` · step ${hit.step}`];
  const chip = el("div", { class: "ts-tip-label" }, el("i", { style: `--c:${labelColor(code)}` }), labelTitle(L.names[code]));
  showTooltip(hit.clientX, hit.clientY, [el("div", {}, head), chip, el("div", { class: "ts-tip-muted", text: "…" })]);
  clearTimeout(hoverTimer);
  hoverTimer = setTimeout(async () => {
    let d;
    try {
      d = await nodeSeries(hit.node);
    } catch (e) {
      if (sameHover(hit)) showTooltip(hit.clientX, hit.clientY, [el("div", {}, head), chip, el("div", { class: "ts-tip-muted", text: e.message })]);
      return;
    }
    if (!sameHover(hit)) return;
    const j = d.index.get(hit.step);
    if (j === undefined) return;
    const v = (m) => (d.series[m] ? d.series[m][j] : undefined);
    const rows = [["spectral_radius", "hess_max"], ["motion_radius", "loss_share"], ["rho", "drift"], ["param_norm", "grad_norm"], ["null_dims", "neutral_dims"]]
      .map((pair) => pair.filter((m) => v(m) !== undefined))
      .filter((pair) => pair.length)
      .map((pair) => el("div", { class: "ts-tip-row" }, pair.map((m) => el("span", {}, el("em", { text: metricShort(m) }), " ", fmt(v(m))))));
    const stable = v("stable_label");
    const extra = stable !== undefined && stable !== code ? el("div", { class: "ts-tip-muted", text: `stable label: ${labelTitle(d.label_names[stable])}` }) : null;
    showTooltip(hit.clientX, hit.clientY, [el("div", {}, head), chip, extra, ...rows]);
  }, 40);
}

function sameHover(hit) {
  const h = ui.map.hover;
  return h && h.node === hit.node && h.col === hit.col;
}

function hoverPoint(hit) {
  if (!hit) return hideTooltip();
  const P = state.phase;
  const code = P.metrics.label ? P.metrics.label[hit.node] : 255;
  const x = P.metrics[state.axes.x][hit.node];
  const y = P.metrics[state.axes.y][hit.node];
  showTooltip(hit.clientX, hit.clientY, [
    el("div", {}, el("b", { text: `node ${hit.node}` }), ` · step ${P.step}`),
    el("div", { class: "ts-tip-label" }, el("i", { style: `--c:${labelColor(code)}` }), labelTitle(P.names[code])),
    el("div", { class: "ts-tip-row" }, el("span", {}, el("em", { text: metricShort(state.axes.y) }), " ", fmt(y)), el("span", {}, el("em", { text: metricShort(state.axes.x) }), " ", fmt(x))),
  ]);
}

function showTooltip(x, y, children) {
  const t = ui.tooltip;
  t.replaceChildren(...children.filter(Boolean));
  t.hidden = false;
  const pad = 14;
  const w = t.offsetWidth;
  const h = t.offsetHeight;
  let left = x + pad;
  let top = y + pad;
  if (left + w > window.innerWidth - 4) left = x - w - pad;
  if (top + h > window.innerHeight - 4) top = y - h - pad;
  t.style.left = `${Math.max(4, left)}px`;
  t.style.top = `${Math.max(4, top)}px`;
}

function hideTooltip() {
  ui.tooltip.hidden = true;
}

async function selectNode(node) {
  state.node = node;
  ui.map.setSelected(node);
  ui.phase.setSelected(node);
  await renderNode();
}

async function renderNode() {
  const node = state.node;
  if (node === null || !state.run) {
    ui.nodeTitle.textContent = "";
    ui.nodeBody.dataset.node = "";
    ui.nodeBody.replaceChildren(el("p", { class: "ts-placeholder", text: "Click a node in the label map or in the phase portrait to see its time series." }));
    return;
  }
  const token = ++state.tokens.node;
  ui.nodeTitle.textContent = `${layerLabel(state.layer)} · node ${node}`;
  let d;
  try {
    d = await nodeSeries(node);
  } catch (e) {
    if (token !== state.tokens.node) return;
    ui.nodeBody.dataset.node = String(node);
    ui.nodeBody.replaceChildren(labelStrip(node), el("p", { class: "ts-status is-error", text: e.message }));
    return;
  }
  if (token !== state.tokens.node) return;
  const width = Math.floor((ui.nodeBody.clientWidth - 14) / 2);
  const x = d.steps;
  const S = (m) => d.series[m] || x.map(() => null);
  const marker = state.phase ? state.phase.step : null;
  const opts = { width, height: 132, marker };
  const thr = state.stability && state.stability.global && state.stability.global.series.threshold;
  const charts = [
    lineChart({ ...opts, title: "spectral radius r of the update map", series: [{ name: "r", x, y: S("spectral_radius"), color: SERIES_COLORS[0] }], hlines: [{ y: 1, label: "1", color: "#c0392b" }] }),
    lineChart({ ...opts, title: "λ of the node's curvature block", series: [
      { name: "λmax", x, y: S("hess_max"), color: SERIES_COLORS[4] },
      { name: "λmin", x, y: S("hess_min"), color: SERIES_COLORS[4], dash: true, width: 1.2 },
      ...(thr && sameSteps(state.stability.global.steps, x) ? [{ name: "threshold", x, y: thr, color: "#c0392b", dash: true, width: 1.2 }] : []),
    ] }),
    lineChart({ ...opts, title: "parameter norm ‖θᵢ‖", series: [{ name: "‖θ‖", x, y: S("param_norm"), color: SERIES_COLORS[2] }] }),
    lineChart({ ...opts, title: "decay ratio ρ", series: [{ name: "ρ", x, y: S("rho"), color: SERIES_COLORS[3] }], hlines: [{ y: 1, label: "1", color: "#c0392b" }] }),
    lineChart({ ...opts, title: "direction drift", series: [{ name: "drift", x, y: S("drift"), color: SERIES_COLORS[5] }] }),
    lineChart({ ...opts, title: "gradient norm ‖∇ᵢL‖", series: [{ name: "‖∇L‖", x, y: S("grad_norm"), color: SERIES_COLORS[6] }] }),
  ];
  ui.nodeBody.dataset.node = String(node);
  ui.nodeBody.replaceChildren(labelStrip(node), el("div", { class: "ts-node-charts", id: "ts-node-charts" }, charts));
}

function sameSteps(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/** The node's labels over the steps as a strip of coloured cells, with its label now. */
function labelStrip(node) {
  const L = state.labels;
  if (!L || node >= L.nodes) return null;
  const K = L.steps.length;
  const c = el("canvas", { class: "ts-strip", height: 1, width: Math.max(1, K) });
  const ctx = c.getContext("2d");
  for (let k = 0; k < K; k++) {
    ctx.fillStyle = labelColor(L.labels[node * K + k]);
    ctx.fillRect(k, 0, 1, 1);
  }
  const last = K ? L.labels[node * K + K - 1] : 255;
  const changes = [];
  for (let k = 0; k < K; k++) {
    const code = L.labels[node * K + k];
    if (!k || code !== L.labels[node * K + k - 1]) changes.push(`${labelTitle(L.names[code])} from step ${L.steps[k]}`);
  }
  return el("div", { class: "ts-strip-wrap" },
    el("div", { class: "ts-strip-head" },
      el("span", { class: "ts-tip-label" }, el("i", { style: `--c:${labelColor(last)}` }), labelTitle(L.names[last])),
      el("span", { class: "ts-sub", text: changes.join(" → ") })),
    c);
}

// -- stability --------------------------------------------------------------------------------

async function loadStability() {
  const token = ++state.tokens.stab;
  state.stability = null;
  ui.stabBody.replaceChildren(el("div", { class: "ts-status", text: "loading…" }));
  try {
    const d = await getJSON("stability", { run: state.run.name });
    if (token !== state.tokens.stab) return;
    state.stability = d;
  } catch (e) {
    if (token !== state.tokens.stab) return;
    ui.stabBody.replaceChildren(el("div", { class: "ts-status is-error", text: e.message }));
    return;
  }
  renderStability();
  if (state.node !== null) renderNode();
}

function renderStability() {
  const d = state.stability;
  if (!d) return;
  const W = ui.stabBody.clientWidth || 600;
  const half = Math.floor((W - 14) / 2);
  const out = [];
  const g = d.global;
  if (g && g.steps.length) {
    const series = [];
    const pick = (name, color, dash) => g.series[name] && series.push({ name: name.replace(/_/g, " "), x: g.steps, y: g.series[name], color, dash });
    pick("sharpness", SERIES_COLORS[0]);
    pick("precond_sharpness", SERIES_COLORS[4]);
    pick("threshold", "#c0392b", true);
    if (series.length) out.push(lineChart({ title: "sharpness λmax(H) vs stability threshold", series, width: W, height: 170 }));
    const row = [];
    if (g.series.loss) {
      const pos = g.series.loss.filter((v) => v !== null && v > 0);
      const logY = pos.length === g.series.loss.length && Math.max(...pos) / Math.min(...pos) > 20;
      row.push(lineChart({ title: `loss${logY ? " (log)" : ""}`, series: [{ name: "loss", x: g.steps, y: g.series.loss, color: SERIES_COLORS[6] }], width: half, height: 140, logY }));
    }
    const radius = d.layers.filter((l) => l.max_spectral_radius);
    if (radius.length) {
      row.push(lineChart({
        title: "largest node spectral radius per layer", width: half, height: 140,
        series: radius.map((l, i) => ({ name: layerLabel(l.name), x: l.max_spectral_radius.steps, y: l.max_spectral_radius.values, color: SERIES_COLORS[i % SERIES_COLORS.length] })),
        hlines: [{ y: 1, label: "1", color: "#c0392b" }],
      }));
    }
    if (row.length) out.push(el("div", { class: "ts-row" }, row));
  } else {
    out.push(el("div", { class: "ts-status", text: "No global series (no analysis.zarr and no trajscope/global scalars)." }));
  }
  if (d.layers.length) {
    const names = d.label_names;
    const cols = d.layers.length > 1 ? 2 : 1;
    const w = cols === 2 ? half : W;
    out.push(el("div", { class: "ts-subhead", text: "label fractions per layer" }));
    out.push(el("div", { class: "ts-row ts-wrap" }, d.layers.map((l) => stackedChart({
      title: `${layerLabel(l.name)} (${l.nodes} nodes)`, x: l.steps, width: w, height: 112,
      series: names.map((n, c) => ({ name: n, short: labelTitle(n), y: l.fractions[n], color: labelColor(c) })),
    }))));
  }
  ui.stabBody.replaceChildren(...out);
}

// -- phase portrait ---------------------------------------------------------------------------

let phaseTimer = 0;
function schedulePhase(index) {
  clearTimeout(phaseTimer);
  phaseTimer = setTimeout(() => loadPhase(index), 60);
}

async function loadPhase(index) {
  const token = ++state.tokens.phase;
  const run = state.run.name;
  const layer = state.layer;
  const key = `${run}\u0000${layer}\u0000${index}`;
  let d = state.stepCache.get(key);
  if (!d) {
    try {
      const raw = await getJSON("step", { run, layer, index: index === null ? undefined : index });
      const metrics = {};
      for (const [k, v] of Object.entries(raw.metrics)) metrics[k] = decode(v);
      d = { index: raw.index, step: raw.step, steps: raw.steps, metrics, names: raw.label_names };
      state.stepCache.set(key, d);
      if (state.stepCache.size > 256) state.stepCache.delete(state.stepCache.keys().next().value);
    } catch (e) {
      if (token !== state.tokens.phase) return;
      status(ui.phaseStatus, e.message, true);
      ui.phaseHost.hidden = true;
      return;
    }
  }
  if (token !== state.tokens.phase) return;
  status(ui.phaseStatus, "");
  ui.phaseHost.hidden = false;
  const first = !state.phase;
  state.phase = d;
  if (first) fillAxes(d);
  ui.slider.max = String(d.steps.length - 1);
  ui.slider.value = String(d.index);
  ui.stepLabel.textContent = `step ${d.step}  (${d.index + 1} / ${d.steps.length})`;
  drawPhase();
  markPhaseColumn();
  if (state.node !== null && !first) renderNode();
}

function fillAxes(d) {
  const names = Object.keys(d.metrics).filter((k) => d.metrics[k] instanceof Float32Array);
  for (const [sel, which, fallback] of [[ui.axX, "x", "drift"], [ui.axY, "y", "spectral_radius"]]) {
    sel.replaceChildren(...names.map((n) => el("option", { value: n, text: metricTitle(n) })));
    if (!names.includes(state.axes[which])) state.axes[which] = names.includes(fallback) ? fallback : names[0];
    sel.value = state.axes[which];
  }
}

function drawPhase() {
  const P = state.phase;
  if (!P) return;
  const { x, y, logX, logY } = state.axes;
  if (!P.metrics[x] || !P.metrics[y]) return;
  ui.phase.selected = state.node;
  ui.phase.setData({
    x: P.metrics[x], y: P.metrics[y], labels: P.metrics.label || new Uint8Array(P.metrics[x].length).fill(255),
    xName: x, yName: y, logX, logY,
  });
}

let playTimer = 0;
function togglePlay() {
  if (playTimer) return stopPlay();
  ui.play.textContent = "❚❚";
  playTimer = setInterval(() => {
    const P = state.phase;
    if (!P) return stopPlay();
    const next = P.index + 1;
    if (next >= P.steps.length) return stopPlay();
    loadPhase(next);
  }, 700);
}

function stopPlay() {
  clearInterval(playTimer);
  playTimer = 0;
  if (ui.play) ui.play.textContent = "▶";
}
