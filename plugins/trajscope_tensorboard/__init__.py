"""TensorBoard dashboard plugin for trajscope (``tensorboard --logdir runs/`` -> *trajscope* tab).

Registered through the ``tensorboard_plugins`` entry point as
:class:`trajscope_tensorboard.loader.TrajscopeLoader`. Importing this package is cheap
(no numpy, zarr or torch): TensorBoard imports every entry point at start-up.
"""

__version__ = "0.1.0"
PLUGIN_NAME = "trajscope"
