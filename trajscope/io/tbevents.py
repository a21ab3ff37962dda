"""TensorBoard event files of docs/spec.md §9, written into the run folder beside ``analysis.zarr``.

Tags (``<module>`` is the module's qualified name, kept as is):

- scalars ``trajscope/global/<name>`` for loss, sharpness, threshold (and any extra finite
  global value the pipeline hands over, e.g. ``precond_sharpness``);
- scalars ``trajscope/<module>/frac/<label name>``: fraction of the layer's nodes per label;
- histograms over nodes ``trajscope/<module>/<metric>`` for :data:`HIST_METRICS`,
  pre-binned with numpy (the writer's own binning is slow), non-finite values skipped;
- one uint8 tensor per layer and step ``trajscope/<module>/labels`` (plugin ``trajscope``,
  data class TENSOR, content JSON ``{"version": 1, "labels": [...], "module": ..., "nodes": N}``)
  for the dashboard in ``plugins/`` (TensorBoard only hands DATA_CLASS_TENSOR series to plugins);
- a custom-scalars layout (once per writer) overlaying sharpness and threshold.

Every writer (every ``trajscope analyze`` of a run) opens a new event file. TensorBoard reads a
run's event files in the order of their names, and a later file's events win for a step written
twice (a re-analysis). The standard name ``events.out.tfevents.<second>.<host>.<pid>.<counter>``
sorts in creation order only while the seconds differ: within one second the pid and the
per-process counter compare as text (``….10`` sorts before ``….9``; a suffix cannot help, it
comes after them). So a writer first waits, when it must, until the clock is past the second of
every event file already in the run folder (at most about a second, and only for a re-analysis
started within a second of the previous one).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from trajscope.io.results import LABELS

__all__ = [
    "EventWriter",
    "HIST_METRICS",
    "PLUGIN_NAME",
    "LABELS_CONTENT_VERSION",
    "MAX_BINS",
    "histogram_bins",
    "event_file_second",
]

PLUGIN_NAME = "trajscope"
LABELS_CONTENT_VERSION = 1
HIST_METRICS = ("hess_max", "spectral_radius", "rho", "drift", "grad_norm", "param_norm", "motion_radius", "loss_share")
MAX_BINS = 30
#: The longest wait for a later second before a new event file (a newer file beyond that: clock skew).
MAX_ORDER_WAIT_S = 2.0
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def event_file_second(name: str) -> int | None:
    """The creation second in a standard event file name, or None for another name."""
    m = _EVENT_FILE.match(name)
    return int(m.group(1)) if m else None


def _wait_for_a_later_second(run_dir: Path) -> None:
    """Return once ``time.time()`` is in a later second than every event file in ``run_dir``.

    Then the file the writer opens next sorts after all of them (see the module doc).
    """
    try:
        names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    except OSError:
        return
    latest = max((s for s in map(event_file_second, names) if s is not None), default=None)
    if latest is None:
        return
    if latest + 1 - time.time() > MAX_ORDER_WAIT_S:
        warnings.warn(
            f"{run_dir} holds an event file from the future (second {latest}; clock skew?): the new "
            f"one sorts before it, so TensorBoard may show steps out of order",
            stacklevel=3,
        )
        return
    while int(time.time()) <= latest:
        time.sleep(max(0.0, latest + 1 - time.time()) + 1e-3)


def histogram_bins(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Finite values -> (bucket right edges, counts) for ``add_histogram_raw``; None if none.

    ``np.histogram`` with ~sqrt(n) equal bins (at most :data:`MAX_BINS`); a constant input
    gets numpy's unit-wide range around the value.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    bins = int(min(MAX_BINS, max(1, np.ceil(np.sqrt(v.size)))))
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            counts, edges = np.histogram(v, bins=bins)
            if np.isfinite(edges).all():
                return edges[1:], counts
        except ValueError:  # a diverging run: max - min overflows or the range is below float resolution
            pass
    # One bucket holding everything: still a valid histogram (and min/max are exact).
    return np.array([v.max()]), np.array([v.size])


class EventWriter:
    """Appends one analysed checkpoint at a time to a TensorBoard event file in ``run_dir``."""

    def __init__(self, run_dir: str | Path, layers: Sequence[str]) -> None:
        """Open a new event file in ``run_dir`` and write the custom-scalars layout.

        The new file sorts after every event file already in ``run_dir`` (see the module doc:
        it may wait up to about a second for that).

        Args:
            run_dir: the run folder (``tensorboard --logdir PARENT`` shows it by folder name).
            layers: node-layer module names, in layer order (used for the layout).
        """
        self.run_dir = Path(run_dir)
        self.layers = list(layers)
        _wait_for_a_later_second(self.run_dir)
        # flush_secs small: a long analysis shows up in TensorBoard while it runs.
        self._writer = SummaryWriter(log_dir=str(self.run_dir), flush_secs=10)
        self._label_meta: dict[str, bytes] = {}
        self._writer.add_custom_scalars(self._layout())

    def _layout(self) -> dict:
        # Layout tags are regular expressions: escape module names (they contain dots).
        g = "trajscope/global/"
        layout = {
            "trajscope": {
                "sharpness vs stability threshold": [
                    "Multiline",
                    [f"^{re.escape(g)}(precond_)?sharpness$", f"^{re.escape(g)}threshold$"],
                ],
                "loss": ["Multiline", [f"^{re.escape(g)}loss$"]],
            },
        }
        if self.layers:
            layout["trajscope label fractions"] = {
                f"{m} label fractions": ["Multiline", [f"^{re.escape(f'trajscope/{m}/frac/')}.*$"]] for m in self.layers
            }
        return layout

    def _labels_summary(self, module: str, labels: np.ndarray) -> summary_pb2.Summary:
        content = self._label_meta.get(module)
        if content is None:
            content = json.dumps(
                {
                    "version": LABELS_CONTENT_VERSION,
                    "labels": list(LABELS),
                    "module": module,
                    "nodes": int(labels.shape[0]),
                }
            ).encode()
            self._label_meta[module] = content
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content),
            data_class=summary_pb2.DATA_CLASS_TENSOR,
        )
        return summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag=f"trajscope/{module}/labels", metadata=metadata, tensor=tensor_util.make_tensor_proto(labels)
                )
            ]
        )

    def write(
        self, step: int, global_values: Mapping[str, float], nodes: Mapping[str, Mapping[str, np.ndarray]]
    ) -> None:
        """Write every tag of one analysed checkpoint at ``step``.

        Args:
            step: the training step (TensorBoard's x axis).
            global_values: name -> scalar; non-finite or missing values are not written.
            nodes: module -> metric -> (N,) array; metrics a layer lacks are skipped.
        """
        w = self._writer
        step = int(step)
        for name, value in global_values.items():
            if value is not None and np.isfinite(float(value)):
                w.add_scalar(f"trajscope/global/{name}", float(value), step)
        for module, metrics in nodes.items():
            if "label" in metrics:
                labels = np.asarray(metrics["label"]).astype(np.uint8, copy=False).ravel()
                n = max(1, labels.size)
                counts = np.bincount(labels, minlength=len(LABELS))
                for code, name in enumerate(LABELS):
                    w.add_scalar(f"trajscope/{module}/frac/{name}", float(counts[code]) / n, step)
                w.file_writer.add_summary(self._labels_summary(module, labels), global_step=step)
            for metric in HIST_METRICS:
                if metric not in metrics:
                    continue
                v = np.asarray(metrics[metric], dtype=np.float64).ravel()
                binned = histogram_bins(v)
                if binned is None:  # all NaN/Inf (e.g. no batch -> no curvature): no histogram
                    continue
                limits, counts = binned
                f = v[np.isfinite(v)]
                with np.errstate(over="ignore"):  # a diverging run may overflow the sums: inf is data
                    total, squares = float(f.sum()), float(f @ f)
                w.add_histogram_raw(
                    f"trajscope/{module}/{metric}",
                    min=float(f.min()),
                    max=float(f.max()),
                    num=int(f.size),
                    sum=total,
                    sum_squares=squares,
                    bucket_limits=limits.tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=step,
                )

    def flush(self) -> None:
        """Push buffered events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        self._writer.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
