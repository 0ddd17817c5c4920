"""Progress of one registration: named stages, one overall fraction, wall time per stage."""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str, float, str], None]


class Stages:
    """Turns per-stage progress into one overall fraction and records each stage's wall time."""

    WEIGHTS = {
        "load": 1,
        "affine": 3,
        "network": 3,
        "refine": 6,
        "field": 2,
        "warp": 1,
        "inverse": 6,
    }

    def __init__(self, progress: Progress | None, stages: list[str]):
        self.progress = progress or (lambda *_: None)
        self._plan(stages)
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def _plan(self, stages: list[str]) -> None:
        self.total = sum(self.WEIGHTS[s] for s in stages)
        self.start: dict[str, float] = {}
        offset = 0.0
        for stage in stages:
            self.start[stage] = offset
            offset += self.WEIGHTS[stage] / self.total

    def skip(self, stage: str) -> None:
        """Leave out a stage that turned out not to run (call before any later stage starts)."""
        self._plan([s for s in self.start if s != stage])

    def enter(self, stage: str, message: str) -> None:
        self._close()
        self._current = (stage, time.perf_counter())
        self.progress(stage, self.start[stage], message)

    def update(self, stage: str, fraction: float, message: str) -> None:
        done = self.start[stage] + fraction * self.WEIGHTS[stage] / self.total
        self.progress(stage, min(done, 1.0), message)

    def _close(self) -> None:
        if self._current is not None:
            stage, began = self._current
            self.timings[stage] = round(
                self.timings.get(stage, 0.0) + time.perf_counter() - began, 3
            )
            self._current = None

    def finish(self) -> dict[str, float]:
        self._close()
        return self.timings
