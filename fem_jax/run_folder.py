"""A run folder: where one run's files live, its metrics rows, its reports, and whether a
command may continue it (see fem_jax.loop for what each file holds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import config as config_lib
from .config import Config
from .io import atomic_write_jsonl, atomic_write_text


class RunFolder:
    """The run folder's own files; on several processes only process 0 writes them."""

    def __init__(self, path: Path, prefix: str, is_main: bool):
        self.path, self.prefix, self.is_main = Path(path), prefix, is_main

    def round_dir(self, k: int) -> Path:
        return self.path / f"{self.prefix}_{k}"

    def write_text(self, path: Path, text: str) -> None:
        if self.is_main:
            atomic_write_text(path, text)

    def write_jsonl(self, path: Path, rows) -> None:
        if self.is_main:
            atomic_write_jsonl(path, rows)

    def metrics_file(self, k: int) -> Path:
        return self.round_dir(k) / "metrics.json"

    def read_metrics(self, k: int) -> dict | None:
        """Round k's metrics row, None when absent; ValueError naming a damaged file."""
        p = self.metrics_file(k)
        if not p.exists():
            return None
        try:
            row = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: damaged ({type(e).__name__}: {e}); delete it to recompute round {k} "
                             f"from its checkpoint, if still kept") from None
        if not isinstance(row, dict) or row.get("round") != k:
            raise ValueError(f"{p}: not the metrics of round {k}")
        return row

    def rows(self, last: int) -> list[dict]:
        """The metrics rows of rounds 0..last that exist."""
        return [row for k in range(0, last + 1) if (row := self.read_metrics(k)) is not None]

    def write_reports(self, rows: list[dict], title: str) -> None:
        """metrics.jsonl, summary.md and curves.png from the rows (process 0)."""
        if not self.is_main:
            return
        from .report import write_summary

        self.write_jsonl(self.path / "metrics.jsonl", rows)
        write_summary(rows, self.path, title=title)


def default_out(config_path: Path, overrides: dict[str, Any]) -> Path:
    """runs/<config stem>, plus the overrides that make it another experiment (fields of
    config.EXTENDABLE are left out: changing them continues the same run folder)."""
    import hashlib
    import re

    parts = []
    for key, value in overrides.items():
        if key in config_lib.EXTENDABLE:
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        parts.append(f"{key.split('.')[-1]}={re.sub(r'[^A-Za-z0-9._=+-]+', '_', str(text))}")
    name = config_path.stem + ("+" + "+".join(parts) if parts else "")
    if len(name) > 80:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:70]}+{digest}"
    return Path("runs") / name


def check_out(cfg: Config, out: Path) -> tuple[Config | None, list[tuple[str, Any, Any]]]:
    """(the config the folder was made with or None, the extendable changes). A change
    that could invalidate finished work raises ValueError naming the field and both values."""
    existing = Path(out) / "config.yaml"
    if not existing.exists():
        return None, []
    import yaml

    try:
        old = config_lib.from_dict(yaml.safe_load(existing.read_text()) or {}, str(existing))
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{existing}: unreadable ({' '.join(str(e).split())}); use a new --out") from None
    diffs = config_lib.differences(old, cfg)
    fixed = [d for d in diffs if d[0] not in config_lib.EXTENDABLE]
    if fixed:
        key, a, b = fixed[0]
        more = f" (and {len(fixed) - 1} more: {', '.join(d[0] for d in fixed[1:])})" if len(fixed) > 1 else ""
        raise ValueError(f"{out} was made with {key}={a!r}; this command asks for {key}={b!r}{more}: that would "
                         "change finished rounds. Use a new --out, or the folder's settings")
    return old, diffs
