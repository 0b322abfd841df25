"""The one-command protocol (`h2t-edge train`): export, extract, fit over target sizes with the
LINEAR guard, choose, compile, test, report.html; and the demo.

`protocol` runs it, `report` writes report.json/report.html, `demo` runs every step on a generated
task.
"""

from h2t_edge.train.protocol import (
    Candidate,
    Selection,
    TrainError,
    TrainReport,
    choose,
    fit_caches,
    fit_target_sizes,
    fit_task,
    open_caches,
    summary_table,
    train,
)

__all__ = ["Candidate", "Selection", "TrainError", "TrainReport", "choose", "fit_caches", "fit_target_sizes",
           "fit_task", "open_caches", "summary_table", "train"]
