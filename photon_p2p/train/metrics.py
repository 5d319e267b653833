"""The JSONL metrics file: one JSON object per line, flushed as written so a crash loses at most one record."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from photon_p2p.errors import ConfigError


class MetricsWriter:
    """Appends records to ``path`` (or does nothing when ``path`` is None). Non-finite floats become null."""

    def __init__(self, path: str | None):
        self._file = None
        if path:
            p = Path(path)
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                self._file = p.open("a", encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"--metrics-file {path}: cannot open for writing ({e.strerror})") from None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
