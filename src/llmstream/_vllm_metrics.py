from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoadReport:
    running: float
    waiting: float
    kv_cache: float | None
