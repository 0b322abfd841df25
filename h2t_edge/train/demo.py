"""`h2t-edge demo`: the whole path on the embedded default, needing no files from the user.

Generates a dSprites-style location task (16 x-position bins, 1000 train + 1000 test images),
exports the bundled EfficientNet-Lite0, extracts features, fits HEAD2TOE and LINEAR with
cross-validation, compiles the HEAD2TOE task graph and predicts the test set with it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporters import DEFAULT_BACKBONE
from h2t_edge.core.progress import StageBars
from h2t_edge.selection.names import HEAD2TOE, LINEAR
from h2t_edge.steps.compile import compile_step
from h2t_edge.steps.export import export_step
from h2t_edge.steps.extract import extract_features
from h2t_edge.steps.fit import accuracy, fit_step
from runtime.io import atomic_write_json, atomic_write_text


@dataclass
class DemoReport:
    linear_accuracy: float
    head2toe_accuracy: float
    head2toe_graph_accuracy: float
    features_kept: int
    candidate_features: int
    linear_features: int
    head_bytes: int
    backbone_bytes: int
    graph_bytes: int
    backbone_onnx_bytes: int
    backbone_fraction_dropped: float
    chosen: dict
    seconds: dict = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            ("LINEAR test accuracy", f"{100 * self.linear_accuracy:.1f}%"),
            ("HEAD2TOE test accuracy", f"{100 * self.head2toe_accuracy:.1f}%"),
            ("HEAD2TOE compiled-graph accuracy", f"{100 * self.head2toe_graph_accuracy:.1f}%"),
            ("features kept / candidates", f"{self.features_kept} / {self.candidate_features} "
                                           f"({100 * self.features_kept / self.candidate_features:.2f}%)"),
            ("HEAD2TOE choice (CV)", ", ".join(f"{k}={v}" for k, v in self.chosen.items())),
            ("head bytes / backbone bytes", f"{self.head_bytes:,} / {self.backbone_bytes:,} "
                                            f"({100 * self.head_bytes / self.backbone_bytes:.2f}%)"),
            ("task graph / backbone ONNX", f"{self.graph_bytes:,} / {self.backbone_onnx_bytes:,} bytes"),
            ("backbone parameters dropped", f"{100 * self.backbone_fraction_dropped:.1f}%"),
        ]
        rows += [(f"time: {step}", f"{sec:.1f} s") for step, sec in self.seconds.items()]
        width = max(len(r[0]) for r in rows)
        lines = [f"| {'':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
        return "\n".join(lines)


def run_demo(
    workdir: str | Path = "h2t-demo", *, target_size: int = 512, grid=None, batch_size: int = 32,
    seed: int = 0, show_progress: bool = True, n_train: int = 1000, n_test: int = 1000,
) -> DemoReport:
    from h2t_edge.selection import SearchGrid
    from h2t_edge.suite.tasks.dsprites import build_dsprites_task
    from runtime.predictor import Predictor

    grid = grid or SearchGrid.quick()
    work = Path(workdir)
    bars = StageBars(show_progress)
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[step] = time.perf_counter() - start
        return result

    splits = timed("generate data", build_dsprites_task, work / "data", factor="x", n_train=n_train,
                   n_test=n_test, bins=16, seed=seed, progress=bars.stage("generate"))
    exported = timed("export", export_step, DEFAULT_BACKBONE, work / "backbone.onnx", target_size)
    caches = {}
    for split in ("train", "test"):
        caches[split] = timed(f"extract {split}", extract_features, exported.path, splits[split],
                              work / "features" / split, batch_size=batch_size,
                              progress=bars.stage(f"extract {split}"))
    fit = timed("fit (CV, both methods)", fit_step, work / "features" / "train", work / "task",
                task="dspr_loc", grid=grid, progress=bars)
    compiled = timed("compile", compile_step, work / "task" / "head2toe", work / "dspr_loc.onnx")
    predictor = Predictor.load(compiled.path)
    test = splits["test"]
    predictions = timed("predict test (compiled graph)", predictor.predict_paths, list(test.paths),
                        batch_size=batch_size)
    bars.close()
    graph_acc = float(np.mean([p.index == y for p, y in zip(predictions, test.labels)]))
    h2t, lin = fit.heads[HEAD2TOE], fit.heads[LINEAR]
    k, c = h2t.weight.shape
    report = DemoReport(
        linear_accuracy=accuracy(lin, caches["test"]),
        head2toe_accuracy=accuracy(h2t, caches["test"]),
        head2toe_graph_accuracy=graph_acc,
        features_kept=int(k),
        candidate_features=h2t.layout.total_features,
        linear_features=int(len(lin.features)),
        # float32 weights and bias plus one int32 index per kept feature
        head_bytes=int((k * c + c) * 4 + k * 4),
        backbone_bytes=int(compiled.summary.backbone_parameters_total * 4),
        graph_bytes=compiled.bytes,
        backbone_onnx_bytes=exported.bytes,
        backbone_fraction_dropped=compiled.summary.backbone_fraction_dropped,
        chosen={key: h2t.config[key] for key in ("fraction", "l21", "lr", "steps") if key in h2t.config},
        seconds=seconds,
    )
    atomic_write_json(work / "demo_report.json", asdict(report))
    atomic_write_text(work / "demo_report.md", report.table() + "\n")
    return report
