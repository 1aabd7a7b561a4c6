"""Reading datalist JSON files (the reference layout: {"training": [...]}) for every stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_datalist(path: str | Path, key: str = "training") -> list[dict[str, Any]]:
    """Entries of a datalist JSON ({key: [...]} or a bare list); relative paths resolve from its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no datalist at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"{path}: no {key!r} list; found keys {sorted(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{path}: the datalist must be a list of entries")
    if not data:
        raise ValueError(f"{path}: the datalist is empty (no entries); give at least one entry")
    entries = []
    for i, e in enumerate(data):
        e = {"image": e} if isinstance(e, str) else dict(e)
        for k in ("image", "label", "latent"):
            if isinstance(e.get(k), str):
                p = Path(e[k])
                e[k] = str(p if p.is_absolute() else path.parent / p)
        e.setdefault("_where", f"{path} entry {i}")
        entries.append(e)
    return entries
