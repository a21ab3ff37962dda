// Phase portrait: every node of a layer at one step as a point, coloured by label.
import { extent, labelColor, makeScale, metricTitle, tickFormatter } from "./common.js";

const M = { l: 56, r: 14, t: 12, b: 40 };
const UNIT_LINE = new Set(["spectral_radius", "rho"]); // quantities whose stability boundary is 1

export class PhasePortrait {
  /** handlers: {onHover({node, clientX, clientY} | null), onClick(node)} */
  constructor(host, handlers) {
    this.host = host;
    this.handlers = handlers;
    this.canvas = document.createElement("canvas");
    this.canvas.id = "ts-phase";
    this.canvas.className = "ts-phase";
    host.append(this.canvas);
    this.state = null;
    this.selected = null;
    this.canvas.addEventListener("mousemove", (e) => {
      const node = this._nearest(e);
      this.canvas.style.cursor = node === null ? "default" : "pointer";
      this.handlers.onHover && this.handlers.onHover(node === null ? null : { node, clientX: e.clientX, clientY: e.clientY });
    });
    this.canvas.addEventListener("mouseleave", () => this.handlers.onHover && this.handlers.onHover(null));
    this.canvas.addEventListener("click", (e) => {
      const node = this._nearest(e);
      if (node !== null && this.handlers.onClick) this.handlers.onClick(node);
    });
    let pending = 0;
    new ResizeObserver(() => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => this.draw());
    }).observe(host);
  }

  /** st: {x: Float32Array, y: Float32Array, labels: Uint8Array, xName, yName, logX, logY} */
  setData(st) {
    this.state = st;
    this.draw();
  }

  setSelected(node) {
    this.selected = node;
    this.draw();
  }

  draw() {
    const st = this.state;
    if (!st) return;
    const W = Math.max(240, this.host.clientWidth);
    const H = Math.round(Math.min(380, Math.max(240, W * 0.62)));
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(W * dpr);
    this.canvas.height = Math.round(H * dpr);
    this.canvas.style.width = `${W}px`;
    this.canvas.style.height = `${H}px`;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.font = "11px Roboto, system-ui, sans-serif";
    const { x, y, labels } = st;
    const ok = (v, log) => Number.isFinite(v) && (!log || v > 0);
    const xd = extent([x], st.logX);
    const yd = extent([y], st.logY);
    let hidden = 0;
    for (let i = 0; i < x.length; i++) if (!ok(x[i], st.logX) || !ok(y[i], st.logY)) hidden++;
    this.canvas.dataset.points = String(x.length - hidden);
    if (!xd || !yd) {
      ctx.fillStyle = "#80868b";
      ctx.textAlign = "center";
      ctx.fillText("no finite values for these axes at this step", W / 2, H / 2);
      this.sx = null;
      return;
    }
    // Keep the stability boundary 1 in view for r and ρ.
    if (UNIT_LINE.has(st.yName) && !st.logY) yd[0] = Math.min(yd[0], 1), (yd[1] = Math.max(yd[1], 1));
    const sy = makeScale(yd, [H - M.b, M.t], { log: st.logY });
    const yt = sy.ticks(5);
    const yf = tickFormatter(yt, st.logY);
    // Left margin: room for the widest y tick label and the rotated axis title.
    const left = Math.max(M.l, Math.ceil(Math.max(...yt.map((v) => ctx.measureText(yf(v)).width)) + 34));
    const sx = makeScale(xd, [left, W - M.r], { log: st.logX });
    this.sx = sx;
    this.sy = sy;
    // Grid and ticks.
    ctx.strokeStyle = "#eceff1";
    ctx.fillStyle = "#5f6368";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of yt) {
      const py = Math.round(sy(v)) + 0.5;
      if (py < M.t || py > H - M.b) continue;
      ctx.beginPath();
      ctx.moveTo(left, py);
      ctx.lineTo(W - M.r, py);
      ctx.stroke();
      ctx.fillText(yf(v), left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xt = sx.ticks(Math.max(3, Math.floor((W - left) / 80)));
    const xf = tickFormatter(xt, st.logX);
    for (const v of xt) {
      const px = Math.round(sx(v)) + 0.5;
      if (px < left || px > W - M.r) continue;
      ctx.beginPath();
      ctx.moveTo(px, M.t);
      ctx.lineTo(px, H - M.b);
      ctx.stroke();
      ctx.fillText(xf(v), px, H - M.b + 5);
    }
    ctx.strokeStyle = "#9aa0a6";
    ctx.beginPath();
    ctx.moveTo(left + 0.5, M.t);
    ctx.lineTo(left + 0.5, H - M.b + 0.5);
    ctx.lineTo(W - M.r, H - M.b + 0.5);
    ctx.stroke();
    ctx.fillStyle = "#3c4043";
    ctx.fillText(metricTitle(st.xName) + (st.logX ? " (log)" : ""), (left + W - M.r) / 2, H - 18);
    ctx.save();
    ctx.translate(14, (M.t + H - M.b) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = "middle";
    ctx.fillText(metricTitle(st.yName) + (st.logY ? " (log)" : ""), 0, 0);
    ctx.restore();
    // Stability boundary.
    ctx.strokeStyle = "#c0392b";
    ctx.setLineDash([5, 4]);
    if (UNIT_LINE.has(st.yName) && ok(1, st.logY)) {
      const py = sy(1);
      ctx.beginPath();
      ctx.moveTo(left, py);
      ctx.lineTo(W - M.r, py);
      ctx.stroke();
    }
    if (UNIT_LINE.has(st.xName) && ok(1, st.logX)) {
      const px = sx(1);
      ctx.beginPath();
      ctx.moveTo(px, M.t);
      ctx.lineTo(px, H - M.b);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    // Points: sinks first, then plateaus, then sources on top.
    const r = x.length > 2000 ? 2 : x.length > 300 ? 3 : 4.5;
    const rank = (i) => (labels[i] > 3 ? -1 : labels[i]);
    const order = Array.from(x.keys()).sort((a, b) => rank(a) - rank(b) || a - b);
    ctx.globalAlpha = 0.85;
    for (const i of order) {
      if (!ok(x[i], st.logX) || !ok(y[i], st.logY)) continue;
      ctx.fillStyle = labelColor(labels[i]);
      ctx.beginPath();
      ctx.arc(sx(x[i]), sy(y[i]), r, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    const sel = this.selected;
    if (sel !== null && sel < x.length && ok(x[sel], st.logX) && ok(y[sel], st.logY)) {
      ctx.strokeStyle = "#202124";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(sx(x[sel]), sy(y[sel]), r + 3.5, 0, 2 * Math.PI);
      ctx.stroke();
    }
    if (hidden) {
      ctx.fillStyle = "#80868b";
      ctx.textAlign = "right";
      ctx.textBaseline = "top";
      ctx.fillText(`${hidden} node${hidden > 1 ? "s" : ""} without finite values not shown`, W - M.r, 0);
    }
  }

  _nearest(e) {
    const st = this.state;
    if (!st || !this.sx) return null;
    const rect = this.canvas.getBoundingClientRect();
    const px = e.clientX - rect.left;
    const py = e.clientY - rect.top;
    let best = null;
    let bestD = 64; // 8 px radius
    for (let i = 0; i < st.x.length; i++) {
      const qx = this.sx(st.x[i]);
      const qy = this.sy(st.y[i]);
      if (!Number.isFinite(qx) || !Number.isFinite(qy)) continue;
      const d = (qx - px) ** 2 + (qy - py) ** 2;
      if (d < bestD) {
        bestD = d;
        best = i;
      }
    }
    return best;
  }
}
