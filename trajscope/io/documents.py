"""The JSON side of a store: reading the Zarr v3 group and array documents (``zarr.json``) and
the commit marker, and turning attributes into plain JSON values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trajscope.errors import TrajscopeError


def _commit_attrs(path: Path) -> dict[str, Any]:
    """The commit marker's attributes, read from disk now."""
    if not (path / "commit" / "zarr.json").exists():
        raise TrajscopeError(f"{path} has no commit marker: the store is damaged (re-record the run)")
    return _read_group_attrs(path / "commit")


def _read_group_attrs(folder: Path) -> dict[str, Any]:
    """The attributes of the group document ``folder/zarr.json``, read from disk now."""
    try:
        return dict(json.loads((folder / "zarr.json").read_text())["attributes"])
    except (OSError, ValueError, KeyError) as e:
        raise TrajscopeError(
            f"{folder}: cannot be opened, its zarr.json is unreadable ({type(e).__name__}: {e}); the store is damaged"
        ) from None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)
