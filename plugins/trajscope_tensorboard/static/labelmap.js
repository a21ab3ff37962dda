// The label map: nodes (rows) × analysed steps (columns) coloured by label, in one canvas.
// The K×N cells are written once into an ImageData (one pixel per cell) and scaled up with
// smoothing off, so a layer of thousands of nodes × hundreds of steps draws in milliseconds.
import { LABEL_COLORS, UNKNOWN_COLOR, clamp } from "./common.js";

const M = { l: 52, r: 10, t: 6, b: 34 };
const MAX_H = 460; // px for the cells before the map scrolls
const MAX_CANVAS = 16000; // browsers cap canvas sizes; beyond, rows share pixels

function rgba32(hex) {
  const v = parseInt(hex.slice(1), 16);
  // ImageData bytes are R,G,B,A: as a little-endian uint32 that is 0xAABBGGRR.
  return ((0xff << 24) | ((v & 0xff) << 16) | (v & 0xff00) | ((v >> 16) & 0xff)) >>> 0;
}

const PALETTE = new Uint32Array(256).fill(rgba32(UNKNOWN_COLOR));
LABEL_COLORS.forEach((c, i) => (PALETTE[i] = rgba32(c)));

/** Row orders: each returns a permutation (row -> node). */
export const SORTS = {
  index: { title: "node index" },
  final: { title: "final label" },
  source: { title: "first step as source" },
  collapse: { title: "time to collapse" },
};

export function sortOrder(kind, labels, nodes, steps) {
  const K = steps;
  const idx = Array.from({ length: nodes }, (_, i) => i);
  const firstOf = (code) => (i) => {
    const row = labels.subarray(i * K, (i + 1) * K);
    const c = row.indexOf(code);
    return c < 0 ? Infinity : c;
  };
  let key = null;
  if (kind === "final") key = (i) => (K ? -labels[i * K + K - 1] : 0); // source, plateau, degenerate, healthy
  else if (kind === "source") key = firstOf(3);
  else if (kind === "collapse") key = firstOf(1);
  if (key) {
    const keys = idx.map(key);
    idx.sort((a, b) => (keys[a] === keys[b] ? a - b : keys[a] < keys[b] ? -1 : 1));
  }
  return Int32Array.from(idx);
}

export class LabelMap {
  /** handlers: {onHover({node, col, clientX, clientY}), onLeave(), onClick({node, col})} */
  constructor(host, handlers) {
    this.host = host;
    this.handlers = handlers;
    this.scroll = document.createElement("div");
    this.scroll.className = "ts-map-scroll";
    this.canvas = document.createElement("canvas");
    this.canvas.id = "ts-labelmap";
    this.canvas.className = "ts-labelmap";
    this.scroll.append(this.canvas);
    host.append(this.scroll);
    this.cells = document.createElement("canvas"); // K×N, one pixel per cell
    this.base = document.createElement("canvas"); // cells + axes, at display size
    this.data = null;
    this.selected = null;
    this.marked = null;
    this.hover = null;
    this.canvas.addEventListener("mousemove", (e) => this._move(e));
    this.canvas.addEventListener("mouseleave", () => {
      this.hover = null;
      this._overlay();
      this.handlers.onLeave && this.handlers.onLeave();
    });
    this.canvas.addEventListener("click", (e) => {
      const hit = this._hit(e);
      if (hit) this.handlers.onClick && this.handlers.onClick(hit);
    });
    let pending = 0;
    this._width = 0;
    new ResizeObserver(() => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => {
        if (this.data && Math.abs(this.host.clientWidth - this._width) > 2) this._layout();
      });
    }).observe(host);
  }

  /** d: {labels: Uint8Array node-major (N×K), nodes: N, steps: [K]} */
  setData(d, order) {
    this.data = d;
    this.hover = null;
    this.selected = null;
    this.marked = null;
    this.canvas.dataset.rows = String(d.nodes);
    this.canvas.dataset.cols = String(d.steps.length);
    this.setOrder(order || Int32Array.from({ length: d.nodes }, (_, i) => i));
  }

  setOrder(perm) {
    this.perm = perm;
    this.rowOf = new Int32Array(perm.length);
    perm.forEach((node, r) => (this.rowOf[node] = r));
    this._cells();
    this._layout();
  }

  setSelected(node) {
    this.selected = node;
    this.canvas.dataset.selected = node === null ? "" : String(node);
    this._overlay();
  }

  setMarkedColumn(col) {
    this.marked = col;
    this._overlay();
  }

  _cells() {
    const { labels, nodes: N, steps } = this.data;
    const K = steps.length;
    this.cells.width = Math.max(1, K);
    this.cells.height = Math.max(1, N);
    if (!K || !N) return;
    const ctx = this.cells.getContext("2d");
    const img = ctx.createImageData(K, N);
    const px = new Uint32Array(img.data.buffer);
    for (let r = 0; r < N; r++) {
      const src = this.perm[r] * K;
      const dst = r * K;
      for (let c = 0; c < K; c++) px[dst + c] = PALETTE[labels[src + c]];
    }
    ctx.putImageData(img, 0, 0);
  }

  _layout() {
    const { nodes: N, steps } = this.data;
    const K = steps.length;
    this._width = this.host.clientWidth;
    const availW = Math.max(120, this.host.clientWidth - M.l - M.r - 4);
    let cw = availW / Math.max(1, K);
    cw = cw >= 3 ? Math.min(64, Math.floor(cw)) : Math.max(1, cw);
    let ch = clamp(Math.floor(MAX_H / Math.max(1, N)), 1, 20);
    if (N * ch > MAX_CANVAS) ch = MAX_CANVAS / N;
    this.cw = cw;
    this.ch = ch;
    this.W = Math.ceil(M.l + K * cw + M.r);
    this.H = Math.ceil(M.t + N * ch + M.b);
    const dpr = window.devicePixelRatio || 1;
    for (const c of [this.canvas, this.base]) {
      c.width = Math.round(this.W * dpr);
      c.height = Math.round(this.H * dpr);
    }
    Object.assign(this.canvas.dataset, { cellW: String(cw), cellH: String(ch), left: String(M.l), top: String(M.t) });
    this.canvas.style.width = `${this.W}px`;
    this.canvas.style.height = `${this.H}px`;
    this._drawBase(dpr);
    this._overlay();
  }

  _drawBase(dpr) {
    const { nodes: N, steps } = this.data;
    const K = steps.length;
    const ctx = this.base.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.W, this.H);
    const { cw, ch } = this;
    if (K && N) {
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(this.cells, 0, 0, K, N, M.l, M.t, K * cw, N * ch);
    }
    // White gaps between big cells: a grid reads better than a solid block.
    ctx.fillStyle = "rgba(255,255,255,0.9)";
    if (cw >= 7) for (let c = 1; c < K; c++) ctx.fillRect(M.l + c * cw - 0.5, M.t, 1, N * ch);
    if (ch >= 7) for (let r = 1; r < N; r++) ctx.fillRect(M.l, M.t + r * ch - 0.5, K * cw, 1);
    ctx.fillStyle = "#5f6368";
    ctx.font = "11px Roboto, system-ui, sans-serif";
    // Rows: node ids when there is room, otherwise an axis title.
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    if (ch >= 9) {
      for (let r = 0; r < N; r++) ctx.fillText(String(this.perm[r]), M.l - 6, M.t + (r + 0.5) * ch);
    } else {
      ctx.save();
      ctx.translate(14, M.t + (N * ch) / 2);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center";
      ctx.fillText(`${N} nodes`, 0, 0);
      ctx.restore();
    }
    // Columns: a few step values.
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const every = Math.max(1, Math.ceil(54 / cw));
    const y0 = M.t + N * ch;
    for (let c = 0; c < K; c += every) {
      const x = M.l + (c + 0.5) * cw;
      ctx.fillRect(x - 0.5, y0, 1, 4);
      ctx.fillText(String(steps[c]), x, y0 + 6);
    }
    ctx.textAlign = "right";
    ctx.fillText("step", M.l - 6, y0 + 6);
  }

  _overlay() {
    if (!this.data) return;
    const ctx = this.canvas.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.drawImage(this.base, 0, 0);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const { cw, ch } = this;
    const K = this.data.steps.length;
    const N = this.data.nodes;
    if (this.marked !== null && this.marked < K) {
      ctx.strokeStyle = "rgba(32,33,36,0.65)";
      ctx.setLineDash([3, 3]);
      ctx.lineWidth = 1;
      ctx.strokeRect(M.l + this.marked * cw + 0.5, M.t + 0.5, Math.max(1, cw - 1), N * ch - 1);
      ctx.setLineDash([]);
    }
    if (this.selected !== null && this.selected < N) {
      const r = this.rowOf[this.selected];
      ctx.strokeStyle = "#202124";
      ctx.lineWidth = 2;
      ctx.strokeRect(M.l - 1, M.t + r * ch - 1, K * cw + 2, Math.max(2, ch) + 2);
      if (ch >= 9) { // the selected node's id in bold on a highlight
        ctx.fillStyle = "#202124";
        ctx.fillRect(2, M.t + r * ch, M.l - 5, ch);
        ctx.fillStyle = "#fff";
        ctx.font = "bold 11px Roboto, system-ui, sans-serif";
        ctx.textAlign = "right";
        ctx.textBaseline = "middle";
        ctx.fillText(String(this.selected), M.l - 6, M.t + (r + 0.5) * ch);
      }
    }
    if (this.hover) {
      const r = this.rowOf[this.hover.node];
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#202124";
      ctx.strokeRect(M.l + this.hover.col * cw - 1, M.t + r * ch - 1, cw + 2, ch + 2);
      if (cw >= 5 && ch >= 5) {
        ctx.lineWidth = 1;
        ctx.strokeStyle = "#fff";
        ctx.strokeRect(M.l + this.hover.col * cw + 0.5, M.t + r * ch + 0.5, cw - 1, ch - 1);
      }
    }
  }

  _hit(e) {
    if (!this.data) return null;
    const rect = this.canvas.getBoundingClientRect();
    const x = e.clientX - rect.left - M.l;
    const y = e.clientY - rect.top - M.t;
    const col = Math.floor(x / this.cw);
    const row = Math.floor(y / this.ch);
    if (x < 0 || y < 0 || col >= this.data.steps.length || row >= this.data.nodes) return null;
    return { node: this.perm[row], col, step: this.data.steps[col], clientX: e.clientX, clientY: e.clientY };
  }

  _move(e) {
    const hit = this._hit(e);
    const same = hit && this.hover && hit.node === this.hover.node && hit.col === this.hover.col;
    this.hover = hit;
    this.canvas.style.cursor = hit ? "pointer" : "default";
    if (!same) this._overlay();
    if (hit) this.handlers.onHover && this.handlers.onHover(hit);
    else this.handlers.onLeave && this.handlers.onLeave();
  }
}

