"""Progress for long steps, on stderr, quiet when asked.

On a terminal each stage gets a live tqdm bar. Anywhere else (a log file, CI, a pipe) a bar would
write one carriage-return-joined update per step, so a stage prints a few plain lines instead:
when it starts, at every `LOG_STEP_PERCENT` of its work that is at least `LOG_MIN_SECONDS` after
the previous line, and when it ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# The progress callbacks long steps take. Defined here only: every step imports them.
Progress = Callable[[str, int, int], None]  # (stage, done, total): a step with several stages
StageProgress = Callable[[int, int], None]  # (done, total): one stage (e.g. `StageBars.stage("extract")`)

LOG_STEP_PERCENT = 25
LOG_MIN_SECONDS = 5.0


class StageBars:
    """A `(stage, done, total)` callback that keeps one progress display per stage name.

    `stream` defaults to stderr; `live` defaults to whether that stream is a terminal.
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, live: bool | None = None):
        self.enabled = enabled
        self.stream = stream
        self.live = live
        self._bars: dict[str, object] = {}

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _is_live(self) -> bool:
        if self.live is not None:
            return self.live
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = (_LiveBar if self._is_live() else _LogLines)(stage, total, self._out())
        bar.update(done, total)
        if done >= total:
            bar.close()
            del self._bars[stage]

    def stage(self, name: str) -> StageProgress:
        """A `(done, total)` callback for one named stage."""
        return lambda done, total: self(name, done, total)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class _LiveBar:
    def __init__(self, stage: str, total: int, stream: TextIO):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=stage, leave=False, dynamic_ncols=True, file=stream)

    def update(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class _LogLines:
    """A few plain lines per stage: start, every LOG_STEP_PERCENT (rate-limited), end."""

    def __init__(self, stage: str, total: int, stream: TextIO):
        self.stage = stage
        self.stream = stream
        self.start = self.last_time = time.monotonic()
        self.last_step = -1
        self.done = 0
        self.total = total
        self.finished = False

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.stage}: {text}\n")
        self.stream.flush()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        if done >= total:
            self._line(f"{done}/{total} done in {now - self.start:.1f} s")
            self.finished = True
            return
        if self.last_step < 0:
            self.last_step = 0
            self._line(f"{done}/{total}")
            return
        step = (100 * done // max(total, 1)) // LOG_STEP_PERCENT
        if step > self.last_step and now - self.last_time >= LOG_MIN_SECONDS:
            self.last_step, self.last_time = step, now
            self._line(f"{done}/{total} ({100 * done // max(total, 1)}%, {now - self.start:.0f} s)")

    def close(self) -> None:
        if not self.finished:
            self._line(f"stopped at {self.done}/{self.total} after {time.monotonic() - self.start:.1f} s")
            self.finished = True
