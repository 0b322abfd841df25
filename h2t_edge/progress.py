"""Progress bars for long steps: one tqdm bar per stage, on stderr, quiet when asked."""

from __future__ import annotations

from collections.abc import Callable


class StageBars:
    """A `(stage, done, total)` callback that keeps one tqdm bar per stage name."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, leave=False, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            del self._bars[stage]

    def stage(self, name: str) -> Callable[[int, int], None]:
        """A `(done, total)` callback for one named stage."""
        return lambda done, total: self(name, done, total)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
