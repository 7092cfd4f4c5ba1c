"""A benchmark script's report files: the printed Markdown table and its JSON twin, written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from utils.core.atomic import atomic_write_json, atomic_write_text


def write_report(out: str | Path, text: str, res: dict) -> None:
    """``<out>.md`` (``text``) and ``<out>.json`` (``res``; numpy / torch scalars as floats), parents created."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, out.with_suffix(".md"))
    atomic_write_json(json.loads(json.dumps(res, default=float)), out.with_suffix(".json"))
