"""Entry point of the plugin: a TBLoader that keeps every step and loads the plugin lazily.

TensorBoard imports entry points before it starts and dies if one fails to import, so this
module imports only TensorBoard's own ``base_plugin``; the plugin module (numpy, zarr,
trajscope.io.results) is imported in :meth:`TrajscopeLoader.load`, where TensorBoard logs a
failure and carries on without the tab.
"""

from __future__ import annotations

from tensorboard.plugins import base_plugin

from trajscope_tensorboard import PLUGIN_NAME


def _parse_samples(value: object) -> dict[str, int]:
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, int] = {}
    for token in str(value or "").split(","):
        if "=" in token:
            k, v = token.strip().split("=", 1)
            out[k] = int(v)
    return out


class TrajscopeLoader(base_plugin.TBLoader):
    """Loads :class:`trajscope_tensorboard.plugin.TrajscopePlugin`."""

    def fix_flags(self, flags) -> None:
        """Keep every label tensor: the defaults keep 10 (Python) / 100 (Rust) steps per tag.

        ``0`` means "all". A value the user gave for ``trajscope`` explicitly is respected.
        """
        if not hasattr(flags, "samples_per_plugin"):
            return
        samples = _parse_samples(flags.samples_per_plugin)
        samples.setdefault(PLUGIN_NAME, 0)
        flags.samples_per_plugin = samples

    def load(self, context: base_plugin.TBContext):
        from trajscope_tensorboard.plugin import TrajscopePlugin

        return TrajscopePlugin(context)
