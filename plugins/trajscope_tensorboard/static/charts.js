// Small SVG charts: line charts with reference lines and a hover read-out, and stacked areas.
import { el, extent, fmt, makeScale, tickFormatter } from "./common.js";

const NS = "http://www.w3.org/2000/svg";
const M = { l: 48, r: 12, t: 8, b: 24 };

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  for (const c of children) if (c) node.append(c);
  return node;
}

function text(x, y, str, attrs = {}) {
  const t = s("text", { x, y, ...attrs });
  t.textContent = str;
  return t;
}

function axes(svg, xs, ys, w, h, m, { xLabel = "step", ticksY = 4 } = {}) {
  const g = s("g", { class: "ts-axes" });
  const yt = ys.ticks(ticksY);
  const yf = tickFormatter(yt, ys.log);
  for (const v of yt) {
    const y = ys(v);
    if (!(y >= m.t - 0.5 && y <= h - m.b + 0.5)) continue;
    g.append(s("line", { x1: m.l, x2: w - m.r, y1: y, y2: y, class: "ts-grid" }));
    g.append(text(m.l - 6, y + 3.5, yf(v), { "text-anchor": "end" }));
  }
  const nx = Math.max(2, Math.floor((w - m.l - m.r) / 70));
  for (const v of xs.ticks(nx)) {
    const x = xs(v);
    if (!(x >= m.l - 0.5 && x <= w - m.r + 0.5) || !Number.isInteger(v)) continue;
    g.append(s("line", { x1: x, x2: x, y1: h - m.b, y2: h - m.b + 4, class: "ts-tick" }));
    g.append(text(x, h - m.b + 15, fmt(v), { "text-anchor": "middle" }));
  }
  g.append(s("line", { x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b, class: "ts-axis" }));
  g.append(s("line", { x1: m.l, x2: m.l, y1: m.t, y2: h - m.b, class: "ts-axis" }));
  // The x-axis title sits left of the origin, under the y ticks, where no tick label goes.
  if (xLabel) g.append(text(m.l - 6, h - m.b + 15, xLabel, { "text-anchor": "end", class: "ts-axis-label" }));
  svg.append(g);
}

/** Left margin that fits the widest y tick label (~6.3 px per character at 10.5 px). */
function leftMargin(ys, n) {
  const ticks = ys.ticks(n);
  const f = tickFormatter(ticks, ys.log);
  const chars = Math.max(...ticks.map((v) => f(v).length));
  return Math.max(M.l, Math.ceil(chars * 6.3 + 14));
}

function pathOf(x, y, xs, ys, log) {
  let d = "";
  let pen = false;
  for (let i = 0; i < x.length; i++) {
    const v = y[i];
    if (v === null || !Number.isFinite(v) || (log && v <= 0)) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${xs(x[i]).toFixed(1)},${ys(v).toFixed(1)}`;
    pen = true;
  }
  return d;
}

function header(title, series) {
  const readout = el("span", { class: "ts-chart-readout" });
  const legend = series.length > 1
    ? el("span", { class: "ts-chart-legend" }, series.map((sr) =>
      el("span", { class: "ts-key" }, el("i", { class: sr.dash ? "dash" : "", style: `--c:${sr.color}` }), sr.name)))
    : null;
  return { node: el("div", { class: "ts-chart-head" }, el("span", { class: "ts-chart-title", text: title }), legend, readout), readout };
}

/** Nearest index of `value` in sorted `xs`. */
function nearest(xs, value) {
  let lo = 0;
  let hi = xs.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < value) lo = mid;
    else hi = mid;
  }
  return Math.abs(xs[lo] - value) <= Math.abs(xs[hi] - value) ? lo : hi;
}

/**
 * A line chart.
 * opts: {title, series: [{name, x, y, color, dash?, width?}], hlines: [{y, label, color}],
 *        width, height, logY, xLabel, marker (x value to mark), yDomain, onPick(x)}
 */
export function lineChart(opts) {
  const { title, series, hlines = [], width = 320, height = 150, xLabel = "step", marker = null } = opts;
  const w = Math.max(160, width);
  const h = height;
  const wrap = el("div", { class: "ts-chart" });
  const head = header(title, series);
  wrap.append(head.node);
  const ys_ = series.map((sr) => sr.y);
  let log = !!opts.logY;
  let yd = opts.yDomain || extent(ys_.concat(hlines.map((l) => [l.y])), log);
  if (log && !yd) {
    log = false;
    yd = extent(ys_);
  }
  const xd = extent(series.map((sr) => sr.x));
  const svg = s("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "ts-svg" });
  wrap.append(svg);
  if (!yd || !xd) {
    svg.append(text(w / 2, h / 2, "no finite values", { "text-anchor": "middle", class: "ts-empty-text" }));
    return wrap;
  }
  const m = { ...M };
  const ys = makeScale(yd, [h - m.b, m.t], { log, pad: 0.08 });
  m.l = leftMargin(ys, 4);
  const xs = makeScale(xd, [m.l, w - m.r], { pad: 0.02 });
  axes(svg, xs, ys, w, h, m, { xLabel });
  const clipId = `clip${Math.random().toString(36).slice(2)}`;
  svg.append(s("clipPath", { id: clipId }, s("rect", { x: m.l, y: m.t, width: w - m.l - m.r, height: h - m.t - m.b })));
  const plot = s("g", { "clip-path": `url(#${clipId})` });
  svg.append(plot);
  for (const l of hlines) {
    const y = ys(l.y);
    if (!Number.isFinite(y)) continue;
    plot.append(s("line", { x1: m.l, x2: w - m.r, y1: y, y2: y, class: "ts-ref", stroke: l.color || "#c0392b" }));
    if (l.label) plot.append(text(w - m.r - 3, y - 3, l.label, { "text-anchor": "end", class: "ts-ref-label", fill: l.color || "#c0392b" }));
  }
  if (marker !== null && marker !== undefined) {
    const x = xs(marker);
    plot.append(s("line", { x1: x, x2: x, y1: m.t, y2: h - m.b, class: "ts-marker" }));
  }
  for (const sr of series) {
    plot.append(s("path", {
      d: pathOf(sr.x, sr.y, xs, ys, log), fill: "none", stroke: sr.color, "stroke-width": sr.width || 1.7,
      "stroke-dasharray": sr.dash ? "5 3" : null, "stroke-linejoin": "round",
    }));
    if (sr.x.length <= 60) {
      for (let i = 0; i < sr.x.length; i++) {
        const v = sr.y[i];
        if (v === null || !Number.isFinite(v) || (log && v <= 0)) continue;
        plot.append(s("circle", { cx: xs(sr.x[i]), cy: ys(v), r: 2.1, fill: sr.color }));
      }
    }
  }
  // Hover read-out: nearest step of the first series, values of every series there.
  const guide = s("line", { y1: m.t, y2: h - m.b, class: "ts-guide", visibility: "hidden" });
  svg.append(guide);
  const xs0 = series[0].x;
  svg.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const px = ev.clientX - r.left;
    if (px < m.l || px > w - m.r || !xs0.length) return;
    const i = nearest(xs0, xs.invert(px));
    const xv = xs0[i];
    guide.setAttribute("x1", xs(xv));
    guide.setAttribute("x2", xs(xv));
    guide.setAttribute("visibility", "visible");
    const parts = series.map((sr) => {
      const j = sr.x === xs0 ? i : sr.x.indexOf(xv);
      return `${series.length > 1 ? sr.name + " " : ""}${fmt(j >= 0 ? sr.y[j] : null)}`;
    });
    head.readout.textContent = `${xLabel} ${xv}: ${parts.join(" · ")}`;
  });
  svg.addEventListener("mouseleave", () => {
    guide.setAttribute("visibility", "hidden");
    head.readout.textContent = "";
  });
  return wrap;
}

/**
 * Stacked areas of fractions (label fractions over steps).
 * opts: {title, x, series: [{name, y, color}], width, height}
 */
export function stackedChart(opts) {
  const { title, x, series, width = 320, height = 130 } = opts;
  const w = Math.max(160, width);
  const h = height;
  const wrap = el("div", { class: "ts-chart" });
  const head = header(title, []);
  wrap.append(head.node);
  const svg = s("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "ts-svg" });
  wrap.append(svg);
  if (!x.length) {
    svg.append(text(w / 2, h / 2, "no analysed steps", { "text-anchor": "middle", class: "ts-empty-text" }));
    return wrap;
  }
  const m = { ...M };
  const xs = makeScale(x.length > 1 ? [x[0], x[x.length - 1]] : [x[0] - 0.5, x[0] + 0.5], [m.l, w - m.r], { pad: 0 });
  const ys = makeScale([0, 1], [h - m.b, m.t], { pad: 0 });
  ys.ticks = () => [0, 0.5, 1];
  axes(svg, xs, ys, w, h, m, {});
  const base = new Float64Array(x.length);
  for (const sr of series) {
    const top = Array.from(x, (_, i) => base[i] + (sr.y[i] || 0));
    let d = "";
    for (let i = 0; i < x.length; i++) d += `${i ? "L" : "M"}${xs(x[i]).toFixed(1)},${ys(top[i]).toFixed(1)}`;
    for (let i = x.length - 1; i >= 0; i--) d += `L${xs(x[i]).toFixed(1)},${ys(base[i]).toFixed(1)}`;
    svg.append(s("path", { d: d + "Z", fill: sr.color, "fill-opacity": 0.88, stroke: "#fff", "stroke-width": 0.5 }));
    top.forEach((v, i) => (base[i] = v));
  }
  const guide = s("line", { y1: m.t, y2: h - m.b, class: "ts-guide", visibility: "hidden" });
  svg.append(guide);
  svg.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const i = nearest(x, xs.invert(ev.clientX - r.left));
    guide.setAttribute("x1", xs(x[i]));
    guide.setAttribute("x2", xs(x[i]));
    guide.setAttribute("visibility", "visible");
    head.readout.textContent = `step ${x[i]}: ` + series.map((sr) => `${sr.short || sr.name} ${Math.round((sr.y[i] || 0) * 100)}%`).join(" · ");
  });
  svg.addEventListener("mouseleave", () => {
    guide.setAttribute("visibility", "hidden");
    head.readout.textContent = "";
  });
  return wrap;
}
