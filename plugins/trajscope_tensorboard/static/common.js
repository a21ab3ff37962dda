// Shared look: label colours, metric names, number formatting, tiny DOM helper.

/** docs/spec.md §7 label codes 0..3 -> colour; anything else ("not computed" = 255) is grey. */
export const LABEL_COLORS = ["#1a9e77", "#7b6fc4", "#e6a700", "#e0412f"];
export const UNKNOWN_COLOR = "#d5d9de";
export const SERIES_COLORS = ["#1f6fd1", "#e0412f", "#1a9e77", "#e6a700", "#7b6fc4", "#d9488f", "#4d4d4d", "#17a2b8"];

export function labelColor(code) {
  return code < LABEL_COLORS.length ? LABEL_COLORS[code] : UNKNOWN_COLOR;
}

export function labelTitle(name) {
  return name ? name.replace(/_/g, " ") : "not computed";
}

export const METRICS = {
  spectral_radius: { title: "spectral radius r", short: "r" },
  hess_max: { title: "λmax of the node block", short: "λmax" },
  hess_min: { title: "λmin of the node block", short: "λmin" },
  param_norm: { title: "parameter norm ‖θᵢ‖", short: "‖θ‖" },
  rho: { title: "decay ratio ρ", short: "ρ" },
  drift: { title: "direction drift", short: "drift" },
  grad_norm: { title: "gradient norm ‖∇ᵢL‖", short: "‖∇L‖" },
  null_dims: { title: "fixed directions", short: "null" },
  neutral_dims: { title: "neutral directions", short: "neutral" },
  motion_radius: { title: "|μ| along the node's motion", short: "|μu|" },
  loss_share: { title: "share of the loss decrease", short: "share" },
};

export function metricTitle(key) {
  return (METRICS[key] && METRICS[key].title) || key.replace(/_/g, " ");
}

export function metricShort(key) {
  return (METRICS[key] && METRICS[key].short) || key;
}

/** Compact number: 4 significant digits, exponent for very large/small, "–" for missing. */
export function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (!Number.isFinite(x)) return x > 0 ? "∞" : "-∞";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e5 || a < 1e-3) return x.toExponential(2);
  return String(Number(x.toPrecision(4)));
}

/** el("div", {class: "x", text: "hi"}, child, ...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) node.append(c);
  }
  return node;
}

export function clamp(v, lo, hi) {
  return Math.max(lo, Math.min(hi, v));
}

/** "Nice" tick values covering [lo, hi]. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const err = raw / mag;
  const step = (err >= 7.07 ? 10 : err >= 3.16 ? 5 : err >= 1.41 ? 2 : 1) * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** Powers of ten covering [lo, hi] (both > 0); falls back to nice ticks on a short range. */
export function logTicks(lo, hi) {
  const a = Math.floor(Math.log10(lo));
  const b = Math.ceil(Math.log10(hi));
  if (b - a < 1) return niceTicks(lo, hi, 3);
  const every = Math.max(1, Math.ceil((b - a) / 6));
  const out = [];
  for (let e = a; e <= b; e += every) {
    const v = 10 ** e;
    if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v);
  }
  return out.length ? out : [lo, hi];
}

/** Finite [min, max] of several arrays (nulls/NaN skipped); null when there is none. */
export function extent(arrays, positiveOnly = false) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const arr of arrays) {
    if (!arr) continue;
    for (let i = 0; i < arr.length; i++) {
      const v = arr[i];
      if (v === null || !Number.isFinite(v) || (positiveOnly && v <= 0)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  return lo <= hi ? [lo, hi] : null;
}

/** A scale (linear or log10) from a data domain to a pixel range, with padding and ticks. */
export function makeScale(domain, range, { log = false, pad = 0.06, nice = true } = {}) {
  let [lo, hi] = domain;
  if (log) {
    let a = Math.log10(lo);
    let b = Math.log10(hi);
    if (b - a < 1e-9) {
      a -= 0.5;
      b += 0.5;
    }
    const p = (b - a) * pad;
    a -= p;
    b += p;
    const f = (v) => (v > 0 ? range[0] + ((Math.log10(v) - a) / (b - a)) * (range[1] - range[0]) : NaN);
    f.ticks = () => logTicks(10 ** a, 10 ** b);
    f.log = true;
    f.domain = [10 ** a, 10 ** b];
    f.invert = (px) => 10 ** (a + ((px - range[0]) / (range[1] - range[0])) * (b - a));
    return f;
  }
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(lo))) {
    const d = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= d;
    hi += d;
  } else {
    const p = (hi - lo) * pad;
    lo -= p;
    hi += p;
  }
  const f = (v) => range[0] + ((v - lo) / (hi - lo)) * (range[1] - range[0]);
  f.ticks = (n = 5) => niceTicks(lo, hi, n);
  f.domain = [lo, hi];
  f.invert = (px) => lo + ((px - range[0]) / (range[1] - range[0])) * (hi - lo);
  return f;
}

/** Tick labels with as many digits as the tick spacing needs (r ≈ 1 ± 1e-5 must not read "1 1 1"). */
export function tickFormatter(ticks, log = false) {
  if (log || ticks.length < 2) return fmt;
  const step = Math.abs(ticks[1] - ticks[0]);
  const big = Math.max(...ticks.map((v) => Math.abs(v)));
  if (!(step > 0) || !Number.isFinite(big)) return fmt;
  if (big >= 1e5 || big < 1e-3) {
    const digits = clamp(Math.ceil(Math.log10(big / step) - 1e-9), 0, 12);
    return (v) => (v === 0 ? "0" : v.toExponential(digits).replace(/\.?0+e/, "e"));
  }
  const dec = clamp(Math.ceil(-Math.log10(step) - 1e-9), 0, 12);
  return (v) => String(Number(v.toFixed(dec)));
}
