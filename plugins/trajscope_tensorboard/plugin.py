"""The trajscope TensorBoard plugin: label map, stability and phase-portrait views.

Where the data comes from, and why:

* **Labels** (the label map, label fractions) come from the ``trajscope/<module>/labels``
  uint8 tensors in the event files, read through ``context.data_provider`` as docs/spec.md §9
  intends. That is TensorBoard's own data path: it works with both loaders (Python and the
  Rust data server), honours ``--samples_per_plugin`` (the loader sets ``trajscope=0``:
  keep every step), and marks the tab active when such tensors exist.
* **Per-node metrics** (ρ, drift, spectral radius, λ_max/λ_min of the block, norms, null
  and neutral dimensions) and the global series come from ``analysis.zarr`` in the run
  folder, read with :mod:`trajscope.io.results` and located as ``<logdir>/<run name>``. The
  data provider has no per-node float series (histograms lose which node is which), and
  writing K×N×10 floats as event tensors would duplicate the store through TensorBoard's
  slow record path. The store only exposes committed rows, so a running analysis is safe
  to read. When the store is missing (or the logdir is remote) the label map still works
  and the metric views say what is missing; the reverse fallback (labels from the store
  when a run has no label tensors yet) is used too and reported as ``"source"``.

Routes under ``/data/plugin/trajscope/`` answer JSON; failures are ``{"error": "..."}``
with a 4xx code (5xx only for a bug, still without a stack trace). Big arrays travel as
base64 of little-endian typed arrays (labels: uint8, node-major), small series as JSON
lists with ``null`` for non-finite values.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider as tb_provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from trajscope_tensorboard import PLUGIN_NAME

logger = logging.getLogger(__name__)

#: docs/spec.md §7 label codes; used when neither the tensors nor the store name them.
DEFAULT_LABELS = ("healthy_sink", "degenerate_sink", "plateau", "source")
TAG_PREFIX = "trajscope/"
LABELS_SUFFIX = "/labels"
_ALL = 1 << 30  # "downsample" is mandatory in the data-provider API: ask for everything
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}


class RequestError(Exception):
    """A bad request: answered as ``{"error": message}`` with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _json_response(request, obj: Any, code: int = 200):
    body = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return http_util.Respond(request, body, "application/json", code=code)


def _is_trajscope_error(exc: BaseException) -> bool:
    try:
        from trajscope.errors import TrajscopeError
    except ImportError:
        return False
    return isinstance(exc, TrajscopeError)


def _route(fn: Callable) -> Callable:
    """Wrap a handler: RequestError -> its 4xx, a bad store -> 409, a bug -> 500; always JSON."""

    @functools.wraps(fn)
    def handler(self, request):
        try:
            return fn(self, request)
        except RequestError as e:
            return _json_response(request, {"error": e.message}, e.code)
        except Exception as e:  # noqa: BLE001 - the browser gets one line, the log the trace
            if _is_trajscope_error(e):  # damaged store, other format version: the user's to fix
                return _json_response(request, {"error": str(e)}, 409)
            logger.exception("trajscope plugin: %s failed", request.path)
            line = (f"{type(e).__name__}: {e}".splitlines() or [""])[0]
            return _json_response(request, {"error": f"internal error in the trajscope plugin: {line}"}, 500)

    return wrappers.Request.application(handler)


def _b64(a: np.ndarray, dtype: str) -> dict:
    arr = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def _jlist(a: np.ndarray) -> list:
    """Numbers -> JSON list, non-finite -> null (browsers' JSON.parse rejects NaN)."""
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return a.tolist()
    return [x if math.isfinite(x) else None for x in a.astype(np.float64).tolist()]


def _results_module():
    try:
        from trajscope.io import results
    except ImportError:
        return None
    return results


class TrajscopePlugin(base_plugin.TBPlugin):
    """Serves the trajscope dashboard (an ES-module iframe) and its JSON routes."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        logdir = context.logdir or ""
        self._logdir = os.path.realpath(os.path.expanduser(logdir)) if logdir and "://" not in logdir else ""
        self._static = self._load_static()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    # -- TensorBoard interface -------------------------------------------------------------
    def get_plugin_apps(self) -> dict[str, Callable]:
        return {
            "/runs": self.serve_runs,
            "/labels": self.serve_labels,
            "/node": self.serve_node,
            "/step": self.serve_step,
            "/stability": self.serve_stability,
            "/static/*": self.serve_static,
        }

    def is_active(self) -> bool:
        # TensorBoard already marks the tab active when trajscope tensors exist (the
        # data_plugin_names check); without any there is nothing to show.
        return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="trajscope")

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _load_static() -> dict[str, tuple[bytes, str]]:
        """Every shipped static file, read once: the static route serves only these names."""
        out: dict[str, tuple[bytes, str]] = {}
        folder = resources.files("trajscope_tensorboard") / "static"
        for entry in folder.iterdir():
            ext = os.path.splitext(entry.name)[1]
            if entry.is_file() and ext in _STATIC_TYPES:
                out[entry.name] = (entry.read_bytes(), _STATIC_TYPES[ext])
        return out

    @staticmethod
    def _arg(request, name: str, required: bool = True) -> str | None:
        value = request.args.get(name)
        if value is None and required:
            raise RequestError(400, f"missing query parameter {name!r}")
        return value

    @staticmethod
    def _int_arg(request, name: str) -> int:
        raw = TrajscopePlugin._arg(request, name)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise RequestError(400, f"query parameter {name!r} must be an integer, got {raw!r}") from None

    def _ctx(self, request) -> tuple[Any, str]:
        if self._provider is None:
            raise RequestError(503, "TensorBoard gave the trajscope plugin no data provider")
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _run_names(self, request) -> list[str]:
        ctx, eid = self._ctx(request)
        return sorted(r.run_name for r in self._provider.list_runs(ctx, experiment_id=eid))

    def _label_series(self, request) -> dict[str, dict[str, Any]]:
        """run -> module -> TensorTimeSeries of the label tensors."""
        ctx, eid = self._ctx(request)
        listing = self._provider.list_tensors(ctx, experiment_id=eid, plugin_name=PLUGIN_NAME)
        out: dict[str, dict[str, Any]] = {}
        for run, tags in listing.items():
            for tag, series in tags.items():
                if (
                    tag.startswith(TAG_PREFIX)
                    and tag.endswith(LABELS_SUFFIX)
                    and len(tag) >= len(TAG_PREFIX) + len(LABELS_SUFFIX)
                ):  # "trajscope//labels": module ""
                    out.setdefault(run, {})[tag[len(TAG_PREFIX) : -len(LABELS_SUFFIX)]] = series
        return out

    def _run_dir(self, run: str) -> str | None:
        """The run's folder on disk (inside the logdir), or None when it cannot be known."""
        if not self._logdir:
            return None
        path = os.path.realpath(os.path.join(self._logdir, run))
        if path != self._logdir and not path.startswith(self._logdir + os.sep):
            return None
        return path

    def _results(self, run: str, required: bool = True):
        """trajscope.io.results.Results of the run, cached until the store commits again."""
        mod = _results_module()
        path = self._run_dir(run)
        store = os.path.join(path, "analysis.zarr") if path else None
        if mod is None or store is None or not os.path.isfile(os.path.join(store, "zarr.json")):
            if not required:
                return None
            if mod is None:
                why = "the trajscope package is not installed in TensorBoard's environment"
            elif store is None:
                why = "the run folder is not on local disk (remote or multi-path logdir)"
            else:
                why = f"no analysis.zarr in run folder {run!r}: run `trajscope analyze` on it"
            raise RequestError(404, f"per-node metrics unavailable: {why}")
        st = os.stat(os.path.join(store, "zarr.json"))  # rewritten (atomically) by every commit
        key = ("results", store, st.st_mtime_ns, st.st_ino, st.st_size)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = mod.open_results(store)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > 32:
                    self._cache.popitem(last=False)
        return hit

    def _check_run(self, request, run: str) -> None:
        runs = self._run_names(request)
        if run not in runs:
            known = ", ".join(repr(r) for r in runs[:20]) or "none (empty logdir)"
            raise RequestError(404, f"unknown run {run!r}; runs: {known}")

    def _check_layer(self, run: str, layer: str, layers: list[str]) -> None:
        if layer not in layers:
            raise RequestError(
                404, f"unknown layer {layer!r} in run {run!r}; layers: {', '.join(repr(x) for x in layers) or 'none'}"
            )

    def _layers_of(self, request, run: str) -> tuple[list[str], dict[str, Any], Any]:
        series = self._label_series(request).get(run, {})
        res = self._results(run, required=False)
        names = list(res.layers) if res is not None else []
        names += sorted(m for m in series if m not in names)
        return names, series, res

    @staticmethod
    def _content(series) -> dict:
        try:
            return json.loads(series.plugin_content or b"{}")
        except (ValueError, TypeError):
            return {}

    def _label_names(self, series, res) -> list[str]:
        if series is not None:
            names = self._content(series).get("labels")
            if names:
                return list(names)
        if res is not None:
            return list(res.label_names)
        return list(DEFAULT_LABELS)

    def _event_labels(self, request, run: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Label tensors of one run/layer -> (steps (K,), labels (K, N) uint8)."""
        ctx, eid = self._ctx(request)
        tag = f"{TAG_PREFIX}{layer}{LABELS_SUFFIX}"
        data = self._provider.read_tensors(
            ctx,
            experiment_id=eid,
            plugin_name=PLUGIN_NAME,
            downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[tag]),
        )
        by_step: dict[int, np.ndarray] = {}
        for datum in data.get(run, {}).get(tag, []):
            by_step[int(datum.step)] = np.asarray(datum.numpy).reshape(-1)  # re-analysis: last wins
        steps = np.array(sorted(by_step), dtype=np.int64)
        n = max((a.size for a in by_step.values()), default=0)
        labels = np.full((steps.size, n), 255, np.uint8)
        for k, s in enumerate(steps):
            a = by_step[int(s)]
            labels[k, : a.size] = a.astype(np.uint8, copy=False)
        return steps, labels

    def _labels(self, request, run: str, layer: str, known: tuple | None = None) -> dict:
        """The label matrix of a layer, from the event tensors, else from the store.

        ``known``: the run's ``_layers_of`` answer when the caller already has it.
        """
        names, series, res = known or self._layers_of(request, run)
        self._check_layer(run, layer, names)
        if layer in series:
            steps, labels = self._event_labels(request, run, layer)
            source = "events"
        elif res is not None and layer in res.layers:
            steps, labels = res.steps, res.node(layer, "label")
            source = "analysis.zarr"
        else:  # pragma: no cover - _check_layer guarantees one of the two
            raise RequestError(404, f"no labels for layer {layer!r} in run {run!r}")
        return {
            "steps": steps,
            "labels": labels,
            "source": source,
            "label_names": self._label_names(series.get(layer), res),
        }

    # -- routes ----------------------------------------------------------------------------
    @_route
    def serve_runs(self, request):
        """Runs with trajscope data: their layers, node counts and what is available."""
        label_series = self._label_series(request)
        out = []
        for run in self._run_names(request):
            series = label_series.get(run, {})
            error = None
            try:
                res = self._results(run, required=False)
            except RequestError:
                res = None
            except Exception as e:  # a damaged or foreign store: say so, keep listing
                res, error = None, str(e).splitlines()[0] if str(e) else type(e).__name__
            if not series and res is None and error is None:
                continue
            names = list(res.layers) if res is not None else []
            names += sorted(m for m in series if m not in names)
            layers = []
            for m in names:
                nodes = res.layers.get(m) if res is not None else None
                if nodes is None and m in series:
                    nodes = self._content(series[m]).get("nodes")
                layers.append(
                    {"name": m, "nodes": nodes, "labels": m in series, "metrics": res is not None and m in res.layers}
                )
            warnings = [str(w) for w in res.attrs.get("warnings", [])] if res is not None else []
            out.append(
                {
                    "name": run,
                    "layers": layers,
                    "results": res is not None,
                    "results_error": error,
                    "warnings": warnings,
                    "steps": int(len(res)) if res is not None else None,
                    "max_step": max((int(s.max_step) for s in series.values()), default=None),
                }
            )
        return _json_response(request, {"runs": out, "label_names": list(DEFAULT_LABELS), "logdir": bool(self._logdir)})

    @_route
    def serve_labels(self, request):
        """Label map: ``labels`` is base64 uint8, node-major (row i = node i over the steps)."""
        run, layer = self._arg(request, "run"), self._arg(request, "layer")
        self._check_run(request, run)
        kind = request.args.get("kind", "label")
        if kind not in ("label", "stable_label"):
            raise RequestError(400, "kind must be 'label' or 'stable_label'")
        if kind == "stable_label":  # only the store has stable labels
            res = self._results(run)
            self._check_layer(run, layer, list(res.layers))
            d = {
                "steps": res.steps,
                "labels": res.node(layer, "stable_label"),
                "source": "analysis.zarr",
                "label_names": list(res.label_names),
            }
        else:
            d = self._labels(request, run, layer)
        k, n = d["labels"].shape
        return _json_response(
            request,
            {
                "run": run,
                "layer": layer,
                "kind": kind,
                "source": d["source"],
                "label_names": d["label_names"],
                "steps": d["steps"].tolist(),
                "nodes": int(n),
                "labels": _b64(np.ascontiguousarray(d["labels"].T), "uint8"),
            },
        )

    @_route
    def serve_node(self, request):
        """Time series of every metric of one node (from analysis.zarr)."""
        run, layer = self._arg(request, "run"), self._arg(request, "layer")
        node = self._int_arg(request, "node")
        self._check_run(request, run)
        names, _, _ = self._layers_of(request, run)
        self._check_layer(run, layer, names)
        res = self._results(run)
        if layer not in res.layers:
            raise RequestError(404, f"layer {layer!r} is not in analysis.zarr of run {run!r}")
        n = res.layers[layer]
        if not 0 <= node < n:
            raise RequestError(400, f"node {node} out of range: layer {layer!r} has {n} nodes")
        metrics = {m: _jlist(res.node_series(layer, m, node)) for m in res.metrics(layer)}
        return _json_response(
            request,
            {
                "run": run,
                "layer": layer,
                "node": node,
                "steps": res.steps.tolist(),
                "label_names": list(res.label_names),
                "series": metrics,
            },
        )

    @_route
    def serve_step(self, request):
        """Every node of a layer at one analysed step (phase portrait): base64 typed arrays."""
        run, layer = self._arg(request, "run"), self._arg(request, "layer")
        self._check_run(request, run)
        res = self._results(run)
        self._check_layer(run, layer, list(res.layers))
        if len(res) == 0:
            raise RequestError(404, f"run {run!r} has no analysed steps yet")
        if request.args.get("step") is not None:
            step = self._int_arg(request, "step")
            hits = np.flatnonzero(res.steps == step)
            if hits.size == 0:
                raise RequestError(404, f"step {step} was not analysed in run {run!r}")
            index = int(hits[0])
        else:
            index = self._int_arg(request, "index") if request.args.get("index") is not None else len(res) - 1
            if not -len(res) <= index < len(res):
                raise RequestError(400, f"index {index} out of range: {len(res)} analysed steps")
            index %= len(res)
        arrays = {}
        for m in res.metrics(layer):
            a = res.node(layer, m, index)
            kind = "uint8" if a.dtype == np.uint8 else "int32" if a.dtype.kind in "iu" else "float32"
            arrays[m] = _b64(a, kind)
        return _json_response(
            request,
            {
                "run": run,
                "layer": layer,
                "index": index,
                "step": int(res.steps[index]),
                "steps": res.steps.tolist(),
                "nodes": res.layers[layer],
                "label_names": list(res.label_names),
                "metrics": arrays,
            },
        )

    @_route
    def serve_stability(self, request):
        """Global sharpness vs threshold, per layer the largest spectral radius and label fractions."""
        run = self._arg(request, "run")
        self._check_run(request, run)
        known = self._layers_of(request, run)
        names, series, res = known
        out: dict[str, Any] = {"run": run, "global": None, "layers": []}
        if res is not None:
            out["global"] = {
                "steps": res.steps.tolist(),
                "source": "analysis.zarr",
                "series": {g: _jlist(res.global_series(g)) for g in res.global_names},
            }
        else:
            out["global"] = self._global_from_scalars(request, run)
        label_names = self._label_names(next(iter(series.values()), None), res)
        out["label_names"] = label_names
        for m in names:
            d = self._labels(request, run, m, known)
            labels = d["labels"]
            n = max(1, labels.shape[1])
            frac = {name: _jlist((labels == code).sum(axis=1) / n) for code, name in enumerate(label_names)}
            entry: dict[str, Any] = {
                "name": m,
                "steps": d["steps"].tolist(),
                "fractions": frac,
                "nodes": int(labels.shape[1]),
                "max_spectral_radius": None,
            }
            if res is not None and m in res.layers:
                r = res.node(m, "spectral_radius").astype(np.float64)
                finite = np.isfinite(r)
                mx = (
                    np.where(finite.any(axis=1), np.max(np.where(finite, r, -np.inf), axis=1), np.nan)
                    if r.size
                    else np.zeros(0)
                )
                entry["max_spectral_radius"] = {"steps": res.steps.tolist(), "values": _jlist(mx)}
            out["layers"].append(entry)
        return _json_response(request, out)

    def _global_from_scalars(self, request, run: str) -> dict | None:
        ctx, eid = self._ctx(request)
        prefix = f"{TAG_PREFIX}global/"
        listing = self._provider.list_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", run_tag_filter=tb_provider.RunTagFilter(runs=[run])
        )
        tags = [t for t in listing.get(run, {}) if t.startswith(prefix)]
        if not tags:
            return None
        data = self._provider.read_scalars(
            ctx,
            experiment_id=eid,
            plugin_name="scalars",
            downsample=_ALL,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=tags),
        )
        steps = sorted({int(p.step) for t in tags for p in data.get(run, {}).get(t, [])})
        index = {s: i for i, s in enumerate(steps)}
        series = {}
        for t in tags:
            vals = [None] * len(steps)
            for p in data.get(run, {}).get(t, []):
                vals[index[int(p.step)]] = p.value if math.isfinite(p.value) else None
            series[t[len(prefix) :]] = vals
        return {"steps": steps, "source": "events", "series": series}

    @_route
    def serve_static(self, request):
        """The shipped ES modules and CSS, by exact name only (no paths, no traversal)."""
        marker = f"/plugin/{PLUGIN_NAME}/static/"
        path = request.path
        name = path[path.find(marker) + len(marker) :] if marker in path else ""
        hit = self._static.get(name)
        if hit is None:
            raise RequestError(404, f"no static file {name!r}")
        body, mimetype = hit
        return http_util.Respond(request, body, mimetype)
