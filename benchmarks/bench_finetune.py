"""LINEAR, HEAD2TOE, Layer-FT and SCL-FT side by side on the offline task suite (EfficientNet-Lite0),
and whether NC1's per-layer ordering agrees with HEAD2TOE's selection.

    OMP_NUM_THREADS=2 flock /work/coord/heavy.lock python benchmarks/bench_finetune.py \\
        --seeds 0,1 --epochs 10 --budget-minutes 18

Per task and seed (1,000 training images, the fixed test set):
- LINEAR and HEAD2TOE: `fit_linear` / `fit_head2toe` on the T=512 features of `h2t-edge eval`'s
  caches (extracted on first use), hyperparameters by CV on the `--grid` (quick: 3 folds, 500 steps);
- LAYER-FT and SCL-FT: `--layer` (default: the paper's best choice, first block of the last stage,
  blocks.6.0) + head, trained with the paper's optimiser and schedule for `--epochs` epochs (the
  paper runs 200; fewer here only to fit the CPU budget), on prefix activations computed once;
- NC1 of every tap on the training features beside HEAD2TOE's selected share per tap, with their
  Spearman correlation, and the block NC1 points to (lowest NC1 among the tunable blocks' outputs).

Fit seconds: training only, on the threads $OMP_NUM_THREADS allows (2 here), excluding feature
extraction (LINEAR, HEAD2TOE) and the prefix pass (FT; recorded apart). Bytes per task: what a task
stores beside the shared frozen backbone, fp32: the head (+ int64 gather indices for HEAD2TOE; +
the tuned block's weights and normalisation statistics for FT).

Resumable: every finished (task, seed, method) is appended to benchmarks/results/finetune.json at
once, and a rerun skips it; --budget-minutes stops starting new fits so that one locked piece
stays short. Writes finetune.{json,md} and nc1/<task>-seed<s>.{json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from exporters.backbones import load_backbone
from exporters.export import feature_layout, select_taps
from exporters.finetune_graph import FineTunedModel, paper_layer, summarize, tuning_units
from h2t_edge.research.diagnose import build_diagnosis, nc1, nc1_per_tap, write_diagnosis
from h2t_edge.core.machine import measured_on
from h2t_edge.suite.evaluate import best_cv_accuracy, grid_for, holdout_accuracy, task_features
from h2t_edge.research.finetune import FineTuneConfig, finetuned_logits, prefix_activations, train_finetuned
from h2t_edge.selection import fit_head2toe, fit_linear
from h2t_edge.suite.tasks.registry import build_task, list_tasks
from runtime.io import atomic_write_json, atomic_write_text, read_json

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "finetune"
METHODS = ("LINEAR", "HEAD2TOE", "LAYER-FT", "SCL-FT")
BACKBONE, T = "efficientnet_lite0", 512
DEFAULT_ORDER = ("digits", "dspr_loc", "fashion_mnist", "count2d", "animal_mnist", "distance2d", "dspr_orient")


def _load() -> list[dict]:
    path = OUT.with_suffix(".json")
    return read_json(path, "finetune benchmark results")["records"] if path.exists() else []


def _save(records: list[dict], settings: dict) -> None:
    atomic_write_json(OUT.with_suffix(".json"), {"format": "h2t-edge/bench-finetune", "version": 1,
                                                 "settings": settings, "records": records})


def feature_caches(task: str, seed: int, args) -> tuple:
    return task_features(task, T, backbone=BACKBONE, seed=seed, work_dir=args.work_dir, data_dir=args.data_dir,
                         log=print)


def _linear_and_head2toe(task, seed, method, args, layout, bb) -> dict:
    x, y, xt, yt, n_classes = feature_caches(task, seed, args)
    grid = grid_for(args.grid, seed)
    if method == "LINEAR":
        pre = next(t for t in layout["taps"] if t["name"] == layout["pre_logits"])
        cols = slice(pre["offset"], pre["offset"] + pre["features"])
        result = fit_linear(x[:, cols], y, n_classes, grid)
        return {"test_accuracy": holdout_accuracy(result, xt[:, cols], yt), "cv_accuracy": best_cv_accuracy(result),
                "fit_seconds": result.fit_seconds, "task_bytes": 4 * (result.head.weight.size + result.head.bias.size),
                "n_features": int(pre["features"]), "penultimate_nc1": nc1(x[:, cols], y), "config": result.config}
    result = fit_head2toe(x, y, n_classes, grid)
    k = len(result.head.features)
    values = nc1_per_tap(x, y, layout)
    diagnosis = build_diagnosis(layout, values, examples=len(y), classes=n_classes, source=f"{task} seed {seed}",
                                selected=result.head.features, task=task)
    write_diagnosis(diagnosis, RESULTS / "nc1" / f"{task}-seed{seed}")
    units = [u for u in tuning_units(bb) if u in values]
    shares = {t.name: t.selected_share for t in diagnosis.taps}
    return {"test_accuracy": holdout_accuracy(result, xt, yt), "cv_accuracy": best_cv_accuracy(result),
            "fit_seconds": result.fit_seconds, "task_bytes": 4 * (result.head.weight.size + result.head.bias.size) + 8 * k,
            "n_features": k, "penultimate_nc1": values[layout["pre_logits"]], "config": result.config,
            "nc1": {"spearman_nc1_vs_share": diagnosis.spearman_nc1_vs_share,
                    "spearman_nc1_vs_fraction": diagnosis.spearman_nc1_vs_fraction,
                    "lowest_nc1_tap": min(values, key=values.get), "most_selected_tap": max(shares, key=shares.get),
                    "nc1_block": min(units, key=values.get), "prelogits_nc1": values[layout["pre_logits"]]}}


def _prefix(task, seed, split, model, bb, args) -> np.ndarray:
    """Prefix activations of one split, kept as .npy in the work dir (resumable pieces reuse them)."""
    path = Path(args.work_dir) / "prefix" / f"{BACKBONE}-{model.layer}" / f"{task}-{split}.npy"
    if path.exists():
        return np.load(path)
    data = build_task(task, args.data_dir, seed)
    start = time.perf_counter()
    acts = prefix_activations(model, data.train if split.startswith("train") else data.test, bb.preprocess)
    print(f"  prefix pass {task}/{split}: {len(acts)} images in {time.perf_counter() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, acts)
    os.replace(tmp, path)
    return acts


def _finetune(task, seed, method, args, bb) -> dict:
    layer = args.layer if args.layer not in ("last-stage", "middle") else paper_layer(bb, args.layer)
    model = FineTunedModel(bb, layer, method)
    data = build_task(task, args.data_dir, seed)
    acts = _prefix(task, seed, f"train-seed{seed}", model, bb, args)
    test_acts = _prefix(task, seed, "test", model, bb, args)
    config = FineTuneConfig(epochs=args.epochs, seed=seed)
    trained = train_finetuned(model, acts, data.train.labels, len(data.train.classes), config)
    logits = finetuned_logits(model, test_acts, trained["weight"], trained["bias"])
    import torch

    with torch.no_grad():
        feats = np.concatenate([model.from_prefix(torch.from_numpy(acts[i:i + 256])).numpy()
                                for i in range(0, len(acts), 256)])
    summary = summarize(model, bb, trained["weight"])
    return {"test_accuracy": float((logits.argmax(1) == data.test.labels).mean()),
            "fit_seconds": trained["seconds"], "task_bytes": summary.task_bytes,
            "tuned_parameters": summary.tuned_parameters, "tuned_fraction": summary.tuned_fraction,
            "penultimate_nc1": nc1(feats, data.train.labels), "final_train_accuracy": trained["history"][-1]["train_acc"],
            "config": {"layer": layer, **dataclasses.asdict(config)}}


def run(args) -> None:
    records = _load()
    done = {(r["task"], r["seed"], r["method"]) for r in records}
    settings = {"backbone": BACKBONE, "target_size": T, "grid": args.grid, "epochs": args.epochs,
                "layer": args.layer, "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    bb = load_backbone(BACKBONE)
    layout = feature_layout(bb, select_taps(bb), T)
    start = time.perf_counter()
    # task-major: each task gets all its seeds before the next task starts (the test-set features
    # and prefix activations are shared by the seeds of a task)
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                if (task, seed, method) in done:
                    continue
                if time.perf_counter() - start > 60 * args.budget_minutes:
                    print(f"budget of {args.budget_minutes} min spent; rerun to continue", flush=True)
                    return
                t0 = time.perf_counter()
                if method in ("LINEAR", "HEAD2TOE"):
                    record = _linear_and_head2toe(task, seed, method, args, layout, bb)
                else:
                    record = _finetune(task, seed, method, args, bb)
                record.update(task=task, seed=seed, method=method, load=os.getloadavg()[0], **measured_on())
                records.append(record)
                _save(records, settings)
                print(f"{task} seed {seed} {method}: test {100 * record['test_accuracy']:.1f}%, fit "
                      f"{record['fit_seconds']:.0f} s, {record['task_bytes'] / 1e3:.1f} kB/task "
                      f"(wall {time.perf_counter() - t0:.0f} s)", flush=True)


def report() -> str:
    data = read_json(OUT.with_suffix(".json"), "finetune benchmark results")
    records, s = data["records"], data["settings"]
    tasks = [t.name for t in list_tasks() if any(r["task"] == t.name for r in records)]
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    by = {}
    for r in records:
        by.setdefault((r["task"], r["method"]), []).append(r)

    def cell(task, method, field, fmt):
        rs = by.get((task, method), [])
        if not rs:
            return "–"
        v = np.asarray([r[field] for r in rs], dtype=float)
        text = fmt(np.median(v))
        if field == "test_accuracy" and len(v) > 1:
            text += f" ± {100 * (v.max() - v.min()) / 2:.1f}"
        return text + ("" if len(v) == len({r["seed"] for r in records}) else f" (n={len(v)})")

    seeds = sorted({r["seed"] for r in records})
    lines = ["# One-layer fine-tuning against frozen-backbone heads (EfficientNet-Lite0, offline task suite)", "",
             f"Seeds {seeds}; 1,000 training images per task and seed, the fixed test set. LINEAR and HEAD2TOE: "
             f"T={s['target_size']}, `{s['grid']}` CV grid. LAYER-FT / SCL-FT: block `{s['layer']}` "
             f"(= {next((r['config']['layer'] for r in records if 'layer' in r.get('config', {})), '?')}) + head, "
             f"SGD momentum 0.9, weight decay 1e-4, cosine lr 0.1 -> 1e-4, batch 64, **{s['epochs']} epochs** "
             + ("(the paper's), " if s["epochs"] == 200 else "(the paper trains 200; scaled down for the CPU budget), ")
             + "no augmentation, frozen prefix cached. "
             f"Fit seconds: training only, {s['threads']} threads (2 cores), under the shared heavy-job lock. "
             "Bytes per task: stored beside the shared frozen backbone (fp32 head; + int64 gather indices for "
             "HEAD2TOE; + tuned block weights and BN statistics for FT).", "",
             "## Test accuracy (%): median over seeds ± half the range", "",
             "| method | " + " | ".join(tasks) + " | **mean** |", "|---|" + "---:|" * (len(tasks) + 1)]
    complete = [t for t in tasks if all((t, m) in by for m in methods)]
    lines.insert(-2, f"Mean: over the tasks every method has run on ({', '.join(complete) or 'none'}).\n")
    for m in methods:
        means = [np.median([r["test_accuracy"] for r in by[(t, m)]]) for t in complete]
        mean = f"**{100 * np.mean(means):.1f}**" if means else "–"
        lines.append(f"| {m} | " + " | ".join(cell(t, m, "test_accuracy", lambda v: f"{100 * v:.1f}") for t in tasks)
                     + f" | {mean} |")
    for title, field, fmt in (("Fit seconds (median over seeds)", "fit_seconds", lambda v: f"{v:.0f}"),
                              ("Bytes per task (kB)", "task_bytes", lambda v: f"{v / 1e3:.1f}"),
                              ("Penultimate-layer NC1 on the training features (lower: more collapsed)",
                               "penultimate_nc1", lambda v: f"{v:.2f}")):
        lines += ["", f"## {title}", "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += [f"| {m} | " + " | ".join(cell(t, m, field, fmt) for t in tasks) + " |" for m in methods]
    nc = [r for r in records if r["method"] == "HEAD2TOE" and "nc1" in r]
    if nc:
        lines += ["", "## NC1 per layer against HEAD2TOE's selection", "",
                  "Spearman rank correlation over the 51 taps between NC1 (training features) and the share of "
                  "HEAD2TOE's selected features in each tap (negative = the more collapsed layers are the more "
                  "selected, as the paper's transferability finding predicts); also against the fraction of "
                  "each tap selected. Per-tap values and plots: `benchmarks/results/nc1/<task>-seed<s>.{json,png}`.",
                  "", "| task | seed | Spearman(NC1, share) | Spearman(NC1, fraction) | lowest-NC1 tap | "
                  "most-selected tap | block NC1 points to | pre-logits NC1 |",
                  "|---|---:|---:|---:|---|---|---|---:|"]
        for r in sorted(nc, key=lambda r: (tasks.index(r["task"]), r["seed"])):
            n = r["nc1"]
            lines.append(f"| {r['task']} | {r['seed']} | {n['spearman_nc1_vs_share']:+.2f} | "
                         f"{n['spearman_nc1_vs_fraction']:+.2f} | {n['lowest_nc1_tap']} | {n['most_selected_tap']} | "
                         f"{n['nc1_block']} | {n['prelogits_nc1']:.2f} |")
        rho = np.asarray([r["nc1"]["spearman_nc1_vs_share"] for r in nc])
        lines += ["", f"Mean Spearman(NC1, share) over {len(rho)} task-seeds: {rho.mean():+.2f} "
                  f"(negative in {int((rho < 0).sum())} of {len(rho)})."]
    done = {(r["task"], r["seed"]) for r in records}
    lines += ["", "Cells run: " + ", ".join(f"{t}/seed{sd}: " + "+".join(
        r["method"] for r in records if r["task"] == t and r["seed"] == sd) for t, sd in sorted(done)) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    global OUT, RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_ORDER),
                        help="comma-separated, run in this order (default: the suite, natural and structured "
                             "alternating, so a partial run covers both groups)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=10, help="FT epochs (paper: 200)")
    parser.add_argument("--layer", default="last-stage", help="'last-stage', 'middle' or a block name")
    parser.add_argument("--grid", choices=("quick", "paper"), default="quick")
    parser.add_argument("--work-dir", default="h2t-eval")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--budget-minutes", type=float, default=18.0)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", default=str(OUT), help="results path without suffix")
    args = parser.parse_args()
    OUT = Path(args.out)
    RESULTS = OUT.parent
    args.tasks, args.methods = args.tasks.split(","), args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        run(args)
    atomic_write_text(OUT.with_suffix(".md"), report())
    print(f"wrote {OUT.with_suffix('.md')}")


if __name__ == "__main__":
    main()
