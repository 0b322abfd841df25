"""TASK_DIR/report.json and TASK_DIR/report.html for `h2t-edge train`.

report.json holds every number; report.html is one self-contained file (no network, no external
files: the figures are matplotlib PNGs inlined as base64) drawn from the same dictionary:

- features selected per layer across depth (paper Figure 4 style) for the chosen model and, when
  another candidate was chosen, for the best HEAD2TOE;
- CV accuracy against the fraction F for each target size T and lambda (best lr and steps);
- HEAD2TOE against LINEAR and HEAD2TOE+LINEAR (CV and test accuracy per T);
- the chosen model's test confusion matrix;
- NC1 (neural collapse) per layer beside that model's selection (`h2t_edge.diagnose`);
- timings and the chosen settings.

Every number shown in a table carries `data-key="<path>"`, the dotted path of its value in
report.json, so a reader (or a test) can check one against the other.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from h2t_edge.selection.names import HEAD2TOE, LINEAR
from runtime.io import atomic_write_json, atomic_write_text

REPORT_FORMAT = "h2t-edge/train-report"
_KIND_COLOURS = {"expand": "#4c72b0", "depthwise": "#55a868", "block": "#dd8452", "other": "#8172b3"}


def build_report(task_dir: Path, selection, train_caches: dict, settings: dict, timings: dict,
                 confusion: np.ndarray | None) -> dict:
    """The report.json dictionary (plain JSON types)."""
    from h2t_edge.core.artifacts import TaskHead

    candidates = {c.key: {k: v for k, v in asdict(c).items() if k != "path"}
                  | {"path": str(Path(c.path).relative_to(task_dir)) if Path(c.path).is_relative_to(task_dir)
                     else c.path}
                  for c in selection.candidates}
    curves = []
    for key, rows in selection.cv_rows.items():
        c = selection.by_key()[key]
        if c.method == LINEAR:
            continue
        best: dict = {}
        for r in rows:  # best over lr and steps for each (lambda, F)
            k = (r["l21"], r["fraction"])
            if k not in best or r["val_acc_mean"] > best[k]["val_acc_mean"]:
                best[k] = r
        curves += [{"candidate": key, "method": c.method, "target_size": c.target_size, "l21": l21,
                    "fraction": f, "n_features": r["n_features"], "cv_accuracy": r["val_acc_mean"]}
                   for (l21, f), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
    # every CV row with an estimated deployed latency (the path solver's), for the accuracy / cost trade
    trade = [{"candidate": key, "taps": r.get("taps"), "fraction": r["fraction"], "l21": r["l21"],
              "n_features": r["n_features"], "cv_accuracy": r["val_acc_mean"], "latency": r["latency"]}
             for key, rows in selection.cv_rows.items() for r in rows if r.get("latency") is not None]
    shown = [selection.chosen]
    h2t = [c for c in selection.candidates if c.method == HEAD2TOE]
    if selection.chosen.method != HEAD2TOE and h2t:
        shown.append(min(h2t, key=lambda c: (-round(c.cv_accuracy, 9), c.target_size)))
    layers = {}
    for c in shown:
        head = TaskHead.load(c.path)
        per_tap = {name: len(v) for name, v in head.per_tap_indices().items()}
        layers[c.key] = [{"index": i, "tap": t["name"], "kind": t["kind"], "features": t["features"],
                          "selected": per_tap.get(t["name"], 0)} for i, t in enumerate(head.layout["taps"])]
    return {
        "format": REPORT_FORMAT, "version": 1, "task": task_dir.name, "nc1": _nc1_section(shown, train_caches),
        "chosen": {"key": selection.chosen.key, **candidates[selection.chosen.key]},
        "candidates": candidates, "cv_curves": curves, "layers": layers, "trade": trade,
        "rungs": {f"T{r['target_size']}": r for r in selection.rungs},  # successive halving
        "confusion": None if confusion is None else {"classes": settings["classes"],
                                                     "matrix": np.asarray(confusion).tolist()},
        "timings": {k: float(v) for k, v in timings.items()}, "settings": settings,
    }


def _nc1_section(shown, train_caches: dict) -> dict | None:
    """NC1 per tap on the training features beside the selection of the HEAD2TOE-family model shown
    (the chosen one, or the best HEAD2TOE when LINEAR was chosen); None when there is none."""
    from h2t_edge.research.diagnose import diagnose

    c = next((c for c in shown if c.method != LINEAR), None)
    if c is None or c.target_size not in train_caches:
        return None
    d = diagnose(train_caches[c.target_size], c.path)
    section = d.to_dict()
    del section["format"], section["version"], section["cache"]  # the cache path is this machine's
    return {"candidate": c.key, **section}


def figure_nc1(report: dict) -> str:
    """NC1 across depth beside the shown model's selected share (`h2t_edge.diagnose`'s figure)."""
    from h2t_edge.research.diagnose import Diagnosis, figure_diagnosis

    d = Diagnosis.from_dict({"cache": "", **report["nc1"]})
    _pyplot()
    return _png(figure_diagnosis(d))


def write_report(task_dir: Path, selection, train_caches: dict, settings: dict, timings: dict,
                 confusion: np.ndarray | None, precision: dict | None = None) -> dict:
    """Write TASK_DIR/report.json and TASK_DIR/report.html; returns the report dictionary.
    precision: `train.protocol.compare_with_fp32`'s record (fp32 beside the deployed precision)."""
    report = build_report(Path(task_dir), selection, train_caches, settings, timings, confusion)
    report["precision"] = precision
    atomic_write_json(Path(task_dir) / "report.json", report)
    atomic_write_text(Path(task_dir) / "report.html", render_html(report))
    return report


# ----------------------------------------------------------------------------- figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_kind(tap: str) -> str:
    """Group taps by role for colour: expansion / depthwise activations, block outputs, the rest."""
    if tap.endswith(".bn1") or tap.endswith("conv_pw"):
        return "expand"
    if tap.endswith(".bn2") or tap.endswith("conv_dw"):
        return "depthwise"
    if tap.startswith("blocks.") and tap.count(".") == 2:
        return "block"
    return "other"


def figure_layers(report: dict) -> str:
    """Share of the selected features that each layer contributes, in depth order."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    panels = list(report["layers"].items())
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels) + 0.6), squeeze=False)
    for ax, (key, rows) in zip(axes[:, 0], panels):
        total = max(1, sum(r["selected"] for r in rows))
        shares = [100 * r["selected"] / total for r in rows]
        ax.bar([r["index"] for r in rows], shares, color=[_KIND_COLOURS[_layer_kind(r["tap"])] for r in rows])
        ax.set_xlim(-1, len(rows))
        ax.set_ylabel("% of selected")
        ax.set_title(f"{key}: {total:,} features selected, by layer (input → output)", fontsize=10)
        ticks = list(range(0, len(rows), max(1, len(rows) // 12)))
        ax.set_xticks(ticks, [rows[i]["tap"] for i in ticks], rotation=30, ha="right", fontsize=7)
    axes[0, 0].legend(handles=[Patch(color=c, label=k) for k, c in _KIND_COLOURS.items()], fontsize=8,
                      loc="upper left")
    fig.tight_layout()
    return _png(fig)


def figure_cv_curves(report: dict) -> str:
    """CV accuracy against F: one panel per T, one line per (method, lambda)."""
    plt = _pyplot()
    sizes = sorted({c["target_size"] for c in report["cv_curves"]})
    linear = [c for c in report["candidates"].values() if c["method"] == LINEAR]
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(4.2 * max(1, len(sizes)), 3.4), squeeze=False,
                             sharey=True)
    for ax, t in zip(axes[0], sizes):
        lines: dict = {}
        for c in report["cv_curves"]:
            if c["target_size"] == t:
                lines.setdefault((c["method"], c["l21"]), []).append(c)
        for (method, l21), pts in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            ax.plot([p["fraction"] for p in pts], [100 * p["cv_accuracy"] for p in pts],
                    marker="o", markersize=3, linestyle="-" if method == HEAD2TOE else "--",
                    label=f"{method}, λ={l21:g}")
        for lin in linear:
            ax.axhline(100 * lin["cv_accuracy"], color="black", linewidth=0.8, linestyle=":", label=LINEAR)
        ax.set_xscale("log")
        ax.set_xlabel("fraction F of features kept")
        ax.set_title(f"T = {t}", fontsize=10)
    axes[0, 0].set_ylabel("CV accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def figure_methods(report: dict) -> str:
    """CV (and test) accuracy of every candidate."""
    plt = _pyplot()
    cands = sorted(report["candidates"].values(), key=lambda c: (c["method"] != LINEAR, c["target_size"], c["method"]))
    keys = [c["method"] if c["method"] == LINEAR else f"{c['method']}\nT={c['target_size']}" for c in cands]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(cands) + 1), 3.6))
    x = np.arange(len(cands))
    has_test = any(c["test_accuracy"] is not None for c in cands)
    width = 0.4 if has_test else 0.7
    cv = ax.bar(x - (width / 2 if has_test else 0), [100 * c["cv_accuracy"] for c in cands], width,
                yerr=[100 * c["cv_se"] for c in cands], capsize=3, label="CV (± SE)", color="#4c72b0")
    ax.bar_label(cv, fmt="%.1f", fontsize=7, padding=2)
    if has_test:
        test = ax.bar(x + width / 2, [100 * (c["test_accuracy"] or 0) for c in cands], width, label="test",
                      color="#dd8452")
        ax.bar_label(test, fmt="%.1f", fontsize=7, padding=2)
    chosen = report["chosen"]["key"]
    ax.set_xticks(x, [k + (" *" if c["method"] == LINEAR and chosen == LINEAR or
                          f"{c['method']}@T{c['target_size']}" == chosen else "") for k, c in zip(keys, cands)],
                  fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("HEAD2TOE against LINEAR and HEAD2TOE+LINEAR (* chosen by CV)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def figure_trade(report: dict) -> str:
    """CV accuracy against estimated deployed latency: every CV row (small), every candidate (large),
    the chosen one starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    keys = list(dict.fromkeys(r["candidate"] for r in report["trade"]))
    colours = plt.get_cmap("tab10")
    for i, key in enumerate(keys):
        rows = [r for r in report["trade"] if r["candidate"] == key]
        ax.scatter([r["latency"] for r in rows], [100 * r["cv_accuracy"] for r in rows], s=10, alpha=0.45,
                   color=colours(i % 10), label=f"{key} CV rows")
    chosen = report["chosen"]["key"]
    for i, (key, c) in enumerate(sorted(report["candidates"].items())):
        if c.get("latency") is None:
            continue
        ax.errorbar(c["latency"], 100 * c["cv_accuracy"], yerr=100 * c["cv_se"], fmt="o", ms=7, capsize=3,
                    color="black" if key == chosen else "grey", zorder=3)
        ax.annotate(key + (" (chosen)" if key == chosen else ""), (c["latency"], 100 * c["cv_accuracy"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    rule = report["chosen"]["config"].get("chosen", {}).get("rule", "accuracy")
    ax.set_xlabel("estimated deployed batch-1 latency / plain backbone")
    ax.set_ylabel("CV accuracy (%)")
    ax.set_title(f"Accuracy against deployed cost (rule: {rule}; candidates ± 1 SE)", fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def figure_confusion(report: dict) -> str:
    plt = _pyplot()
    matrix = np.asarray(report["confusion"]["matrix"])
    classes = report["confusion"]["classes"]
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(12, max(4.5, 1.5 + 0.45 * n)), min(11, max(4.0, 1.2 + 0.42 * n))))
    ax.imshow(matrix, cmap="Blues")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix: {report['chosen']['key']}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- HTML


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _cell(key: str, text: str) -> str:
    return f'<td data-key="{html.escape(key)}">{html.escape(text)}</td>'


def render_html(report: dict) -> str:
    """One self-contained HTML page for the report dictionary."""
    chosen = report["chosen"]
    rows = []
    for key, c in sorted(report["candidates"].items(),
                         key=lambda kv: (kv[1]["method"] != LINEAR, kv[1]["target_size"], kv[1]["method"])):
        base = f"candidates.{key}"
        rows.append("<tr" + (' class="chosen"' if key == chosen["key"] else "") + f"><td>{html.escape(key)}</td>"
                    + _cell(f"{base}.cv_accuracy", _pct(c["cv_accuracy"])) + _cell(f"{base}.cv_se", _pct(c["cv_se"]))
                    + _cell(f"{base}.test_accuracy", _pct(c["test_accuracy"]))
                    + _cell(f"{base}.n_features", str(c["n_features"])) + _cell(f"{base}.candidates", str(c["candidates"]))
                    + _cell(f"{base}.latency", "–" if c.get("latency") is None else f"{c['latency']:.3f}")
                    + f"<td>{'–' if c.get('taps') is None else len(c['taps'])}</td>"
                    + _cell(f"{base}.fit_seconds", f"{c['fit_seconds']:.1f}") + "</tr>")
    config = chosen["config"]
    settings_rows = [(f"chosen.config.{k}", k, json_text(v)) for k, v in config.items()
                     if k not in ("grid", "chosen")]
    settings = report["settings"]
    settings_rows += [(f"settings.{k}", k, json_text(settings[k])) for k in
                      ("backbone", "weights", "target_sizes", "guard", "train_images", "test_images", "dataset", "test")]
    settings_rows += [(f"settings.grid.{k}", k, json_text(settings["grid"][k])) for k in ("solver", "device")
                      if k in settings.get("grid", {})]
    if settings.get("unreadable_images"):  # skipped with --on-error skip
        settings_rows.append(("settings.unreadable_images", "unreadable_images (skipped)",
                              json_text(settings["unreadable_images"])))
    try:
        import matplotlib  # noqa: F401  (the figures need it; the tables do not)
    except ImportError:
        figures, note = [], ("<p><b>No figures:</b> matplotlib is not installed "
                             "(<code>pip install 'h2t-edge[train]'</code>); report.json has every number.</p>")
    else:
        note = ""
        figures = [("Features selected per layer", "layers", figure_layers(report)),
                   ("CV accuracy against F, per target size and lambda", "cv-curves", figure_cv_curves(report)),
                   ("HEAD2TOE, LINEAR and HEAD2TOE+LINEAR", "methods", figure_methods(report))]
        if report.get("trade"):
            figures.append(("CV accuracy against deployed latency", "trade", figure_trade(report)))
        if report["confusion"] is not None:
            figures.append(("Test confusion matrix", "confusion", figure_confusion(report)))
        if report.get("nc1") is not None:
            figures.append(("Neural collapse (NC1) per layer against the selection", "nc1", figure_nc1(report)))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>h2t-edge train report: {html.escape(report['task'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}tr.chosen{background:#e8f0fe;"
        "font-weight:bold}img{max-width:100%;display:block;margin:0.5em 0 1.5em}</style></head><body>",
        f"<h1>Task {html.escape(report['task'])}</h1>",
        f'<p>Chosen model: <b data-key="chosen.key">{html.escape(chosen["key"])}</b>, CV accuracy '
        f'<b data-key="chosen.cv_accuracy">{_pct(chosen["cv_accuracy"])}</b>% '
        + (f'test accuracy <b data-key="chosen.test_accuracy">{_pct(chosen["test_accuracy"])}</b>%, '
           if chosen["test_accuracy"] is not None else "")
        + f'<span data-key="chosen.n_features">{chosen["n_features"]}</span> features of '
        f'<span data-key="chosen.candidates">{chosen["candidates"]}</span>.</p>',
        "<p>Candidates are cross-validated on the same folds. By default the cheapest deployed graph (estimated "
        "batch-1 latency / plain backbone, from the taps it reads) among those within one standard error of the "
        "best mean CV accuracy wins (<code>--max-accuracy</code>: the best CV accuracy); LINEAR competes, so the "
        "chosen model is never a standard error below LINEAR <i>in CV</i>. HEAD2TOE+LINEAR always keeps the "
        "pre-logits (LINEAR's features) and adds HEAD2TOE's best-ranked others; it is not in the paper.</p>",
        note,
        "<h2>Candidates</h2><table><tr><th>candidate</th><th>CV acc %</th><th>CV SE %</th><th>test acc %</th>"
        "<th>features</th><th>of</th><th>latency x</th><th>taps</th><th>fit s</th></tr>", *rows, "</table>",
    ]
    parts += _rungs_section(report.get("rungs"))
    for title, ident, png in figures:
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img id="fig-{ident}" alt="{html.escape(title)}" src="data:image/png;base64,{png}">']
    if report.get("nc1") is not None:
        rho = report["nc1"]["spearman_nc1_vs_share"]
        parts += ["<p>NC1 = tr(&Sigma;<sub>W</sub> &Sigma;<sub>B</sub><sup>+</sup>) / K of each layer's training "
                  "features (lower: classes more collapsed). Spearman rank correlation between a layer's NC1 and its "
                  f"share of the selected features of {html.escape(report['nc1']['candidate'])}: "
                  f'<b data-key="nc1.spearman_nc1_vs_share">{"–" if rho is None else f"{rho:+.2f}"}</b> '
                  "(negative: the more collapsed layers are the more selected).</p>"]
    parts += _precision_section(report.get("precision"))
    parts += ["<h2>Timings (s)</h2><table>"]
    parts += [f"<tr><td>{html.escape(k)}</td>{_cell(f'timings.{k}', f'{v:.1f}')}</tr>"
              for k, v in report["timings"].items()]
    parts += ["</table><h2>Settings</h2><table>"]
    parts += [f"<tr><td>{html.escape(label)}</td>{_cell(key, text)}</tr>" for key, label, text in settings_rows]
    parts += ["</table></body></html>"]
    return "\n".join(parts) + "\n"


def _rungs_section(rungs: dict[str, dict] | None) -> list[str]:
    """The successive-halving table: each T's rung and whether it advanced to the full fit."""
    if not rungs:
        return []
    rows = ["<h2>Successive halving over T</h2>",
            "<p>Every target size first gets a cheap rung (HEAD2TOE, one path point, small F). The full fit runs for "
            "the best rung and every T within the margin (<code>SearchGrid.halving</code> standard errors) of it; "
            "the others are not candidates.</p>",
            "<table><tr><th>T</th><th>rung CV acc %</th><th>CV SE %</th><th>F</th><th>features</th><th>rung s</th>"
            "<th>full fit</th></tr>"]
    for name, r in rungs.items():
        base = f"rungs.{name}"
        rows.append("<tr" + (' class="chosen"' if r["advanced"] else "") + f"><td>{r['target_size']}</td>"
                    + _cell(f"{base}.cv_accuracy", _pct(r["cv_accuracy"])) + _cell(f"{base}.cv_se", _pct(r["cv_se"]))
                    + _cell(f"{base}.fraction", f"{r['fraction']:g}") + _cell(f"{base}.n_features", str(r["n_features"]))
                    + _cell(f"{base}.seconds", f"{r['seconds']:.1f}")
                    + _cell(f"{base}.advanced", "advanced" if r["advanced"] else "stopped") + "</tr>")
    return rows + ["</table>"]


def _precision_section(precision: dict | None) -> list[str]:
    """fp32 and the deployed precision side by side (`train --precision`)."""
    if not precision:
        return []
    rows = ["<h2>Precision: fp32 beside " + html.escape(precision["precision"]) + " on "
            + html.escape(precision["backend"]) + "</h2>",
            "<p>The deployed model was fitted on features of the extraction graph at the deployed precision; the fp32 "
            "row fits the same target size on fp32 features. Latency: the compiled task graph at batch 1 on "
            f"{html.escape(precision['backend'])}, p50, measured on {html.escape(precision.get('machine', '?'))}."
            "</p>", "<table><tr><th>precision</th><th>chosen</th><th>CV acc %</th><th>CV SE %</th><th>test acc %</th>"
            "<th>features</th><th>batch-1 ms</th></tr>"]
    for name, r in precision["rows"].items():
        base = f"precision.rows.{name}"
        rows.append(f"<tr><td>{html.escape(name)}</td>{_cell(f'{base}.chosen', r['chosen'])}"
                    + _cell(f"{base}.cv_accuracy", _pct(r["cv_accuracy"])) + _cell(f"{base}.cv_se", _pct(r["cv_se"]))
                    + _cell(f"{base}.test_accuracy", _pct(r["test_accuracy"]))
                    + _cell(f"{base}.n_features", str(r["n_features"]))
                    + _cell(f"{base}.latency_ms_p50", f"{r['latency_ms_p50']:.2f}") + "</tr>")
    return rows + ["</table>"]


def json_text(value) -> str:
    """How a setting is shown: numbers and strings as they are, lists comma-separated."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(json_text(v) for v in value)
    return "–" if value is None else str(value)
