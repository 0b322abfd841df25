"""Transfer tasks built on disk as class folders, so they load like any dataset.

`registry` holds the offline VTAB-1k-style suite (`h2t-edge tasks` lists it); `dsprites` is the
generated location / orientation task the demo uses.
"""

from h2t_edge.suite.tasks.dsprites import build_dsprites_task
from h2t_edge.suite.tasks.registry import TaskData, TaskSpec, build_task, get_task, list_tasks, register_task

__all__ = ["build_dsprites_task", "TaskData", "TaskSpec", "build_task", "get_task", "list_tasks", "register_task"]
