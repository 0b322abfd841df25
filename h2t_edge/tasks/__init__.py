"""Generated transfer tasks, built on disk as class folders so they load like any dataset."""

from .dsprites import build_dsprites_task

__all__ = ["build_dsprites_task"]
