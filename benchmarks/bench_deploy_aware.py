"""Deploy-aware selection, measured: deployed latency of each rule's choice, a device that gains ten
tasks with `--taps-from`, and `deploy`'s pruned device graph. Writes benchmarks/results/
deploy_aware.{json,md}. Run after `bench_fit_speed.py suite` (it reads that run's records, chosen
columns and caches), alone on the machine:

    python benchmarks/bench_deploy_aware.py [--work-dir h2t-fit-speed]

1. Per suite task (seed 0): the task graph of the `train` choice (guard) under each rule of
   fit_speed.json (`path`: best CV accuracy, today's choice before issue 22; `default`: the
   cheapest estimated latency within one standard error; `budget-1.02`: `--latency-budget 1.02`),
   compiled from the chosen columns (latency does not depend on the weights: random ones).
2. A device that starts with dspr_loc's default choice and gains nine tasks one by one, each fitted
   with `--taps-from` the device (`TapPlan.of(..., allowed_taps=device taps)`, the default rule):
   the multi-task graph after each addition, each task's test accuracy against its own unrestricted
   default choice, and the bytes each head adds.
3. `deploy` of those ten tasks: its backbone.onnx, pruned to the taps the heads read.

Every graph is measured batch 1 on ONNX Runtime CPU and OpenVINO f32 against the plain backbone, in
one run (`bench_deploy.measure_all`: each case in its own process, two interleaved rounds, the
better kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json  # noqa: E402
from h2t_edge.core.machine import measured_on

OUT = ROOT / "benchmarks" / "results" / "deploy_aware"
RULES = ("path", "default", "budget-1.02")
RULE_LABEL = {"path": "best CV (before)", "default": "default (1-SE cheapest)", "budget-1.02": "--latency-budget 1.02"}
FIRST = ("dspr_loc", 0)
ADDED = (("digits", 0), ("count2d", 0), ("dspr_orient", 0), ("distance2d", 0), ("fashion_mnist", 0),
         ("animal_mnist", 0), ("dspr_loc", 1), ("count2d", 1), ("distance2d", 1))


def _features(work: Path, record: dict) -> np.ndarray:
    return np.load(work / "heads" / f"{record['task']}-seed{record['seed']}-{record['engine']}-{record['guard']}.npy")


def prepare(work: Path, out: Path, log) -> tuple[dict[str, Path], dict]:
    from exporters.backbones import load_backbone
    from exporters.compile import HeadSpec, compile_multitask_graph, compile_task_graph
    from exporters.export import export_plain
    from h2t_edge.core.artifacts import TaskHead
    from h2t_edge.selection import SearchGrid, fit_head2toe_variants
    from h2t_edge.selection.grid import choose_cheapest, chosen_row, standard_error
    from h2t_edge.selection.methods import get_method
    from h2t_edge.selection.names import LINEAR
    from h2t_edge.selection.taps import TapPlan
    from h2t_edge.steps.deploy import package_shared_step
    from h2t_edge.suite.evaluate import backbone_export, feature_caches, holdout_accuracy
    from h2t_edge.suite.tasks.registry import build_task
    from runtime.io import file_sha256

    suite = read_json(ROOT / "benchmarks" / "results" / "fit_speed.json", "fit speed results")["suite"]
    records = {(r["task"], r["seed"], r["engine"]): r for r in suite}
    bb = load_backbone("efficientnet_lite0", weights="bundled")
    export = backbone_export(work, "efficientnet_lite0", 512, "bundled", log)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {"backbone (logits)": out / "plain.onnx"}
    if not graphs["backbone (logits)"].is_file():
        atomic_write_bytes(graphs["backbone (logits)"], export_plain(bb).SerializeToString())
    graphs["extraction graph (all taps)"] = export
    rng = np.random.default_rng(0)
    info: dict = {"rules": [], "device": [], "shared": {}}

    def compile_single(label: str, features: np.ndarray, layout: dict, classes: int) -> Path:
        path = out / ("".join(c if c.isalnum() else "_" for c in label.lower())[:80] + ".onnx")
        if not path.is_file():
            model, _ = compile_task_graph(bb, layout, features, rng.normal(size=(len(features), classes)).astype(
                np.float32), np.zeros(classes, np.float32))
            atomic_write_bytes(path, model.SerializeToString())
        return path

    # 1. each rule's choice per task (seed 0)
    tasks = list(dict.fromkeys(r["task"] for r in suite))
    layout = None
    for task in tasks:
        data = build_task(task, None, 0)
        feats = feature_caches(work, "efficientnet_lite0", 512, export, data, 32, log)
        layout = feats.train.layout
        plan = TapPlan.of(layout)
        for rule in RULES:
            record = records.get((task, 0, rule))
            if record is None:
                continue
            features = _features(work, record)
            label = f"{task} {rule}"
            graphs[label] = compile_single(label, features, layout, len(data.train.classes))
            chosen = record["methods"][record["guard"]]
            info["rules"].append({"graph": label, "task": task, "rule": rule, "method": record["guard"],
                                  "test_accuracy": chosen["test_accuracy"], "latency_estimate": plan.latency(features),
                                  "taps": len(plan.taps_read(features)), "features": int(len(features))})

    # 2. a device gains nine tasks with --taps-from
    plan = TapPlan.of(layout)
    device: list[str] = []  # the first task's taps
    sha = file_sha256(export)
    heads_dir = out / "heads"
    specs: list[HeadSpec] = []
    task_dirs: list[Path] = []
    grid = SearchGrid.paper()
    for i, (task, seed) in enumerate([FIRST, *ADDED]):
        name = f"{task}-s{seed}"
        data = build_task(task, None, seed)
        feats = feature_caches(work, "efficientnet_lite0", 512, export, data, 32, log)
        x, y, xt, yt = feats.arrays()
        pre = feats.pre_logits()
        head_dir = heads_dir / name
        if not (head_dir / "task.json").is_file():
            start = time.perf_counter()
            g = dataclasses.replace(grid, seed=seed)
            fits = fit_head2toe_variants(x, y, len(data.train.classes), g, keep=np.arange(x.shape[1])[pre],
                                         taps=TapPlan.of(layout, allowed_taps=device) if i else plan)
            linear = get_method(LINEAR).fit(x[:, pre], y, len(data.train.classes), g)
            linear.head.features = linear.head.features + pre.start
            rows = []
            for method, fit in [*fits.items(), (LINEAR, linear)]:
                row = chosen_row(fit.cv_table, fit.config)
                rows.append((method, fit, row["val_acc_mean"], standard_error(row, g.folds)))
            method, fit, _, _ = choose_cheapest(rows, lambda r: r[2], lambda r: r[3],
                                                lambda r: plan.latency(r[1].head.features), lambda r: len(r[1].head.features))
            TaskHead(task=name, method=method, classes=list(data.train.classes), features=fit.head.features,
                     weight=fit.head.weight, bias=fit.head.bias, layout=layout,
                     backbone={"name": "efficientnet_lite0", "weights": "bundled", "onnx_sha256": sha},
                     config={"test_accuracy": holdout_accuracy(fit, xt, yt), "fit_seconds": time.perf_counter() - start},
                     ).save(head_dir)
        head = TaskHead.load(head_dir)
        if i == 0:
            device = plan.taps_read(head.features)
            log(f"device starts with {name}: {len(device)} taps")
        assert set(plan.taps_read(head.features)) <= set(device) | {layout["pre_logits"]}, name
        task_dirs.append(head_dir)
        specs.append(HeadSpec(name, head.features, head.weight, head.bias))
        own = records.get((task, seed, "default"))
        label = f"multi-task graph, {i + 1} task{'s' if i else ''}"
        path = out / f"device_{i + 1}.onnx"
        if not path.is_file():
            model, _ = compile_multitask_graph(bb, layout, specs)
            atomic_write_bytes(path, model.SerializeToString())
        graphs[label] = path
        info["device"].append({"graph": label, "task": name, "method": head.method,
                               "test_accuracy": head.config["test_accuracy"],
                               "own_default_test_accuracy": None if own is None else own["methods"][own["guard"]][
                                   "test_accuracy"],
                               "head_bytes": int(head.weight.nbytes + head.bias.nbytes + head.features.nbytes),
                               "taps": len(plan.taps_read(head.features)), "fit_seconds": head.config["fit_seconds"]})
        log(f"added {name} ({head.method}, {len(head.features)} features): test {100 * head.config['test_accuracy']:.1f}%")

    # 3. deploy's device graph for the ten tasks
    shared = package_shared_step(task_dirs, out / "deploy", backbone_onnx=export)
    graphs["deploy device graph (10 tasks)"] = out / "deploy" / "backbone.onnx"
    info["shared"] = {"taps": len(shared.taps), "backbone_bytes": shared.backbone_bytes, "heads": shared.heads}
    info["device_taps"] = len(device)
    info["plain_bytes"] = graphs["backbone (logits)"].stat().st_size
    return graphs, info


def markdown(result: dict) -> str:
    rows = {(r["graph"], r["backend"]): r for r in result["rows"]}
    backends = sorted({r["backend"] for r in result["rows"]})
    plain = {b: rows[("backbone (logits)", b)]["p50_ms"] for b in backends if ("backbone (logits)", b) in rows}

    def ratio(graph: str, backend: str) -> str:
        r = rows.get((graph, backend))
        return "–" if r is None or "p50_ms" not in r else f"{r['p50_ms']:.2f} ms ({r['p50_ms'] / plain[backend]:.2f}x)"

    info = result["info"]
    lines = ["# Deploy-aware selection: deployed latency", "",
             f"EfficientNet-Lite0, T = 512, {result['machine']}, {result['date']}. Batch-1 p50 latency and its "
             "ratio to the plain backbone on the same backend, one run (each case in its own process, two "
             "interleaved rounds, the better kept). Test accuracies from benchmarks/results/fit_speed.json (seed 0).",
             "", "## The `train` choice under each rule", "",
             "| task | rule | chosen | test % | taps | estimated | " + " | ".join(backends) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(backends)]
    for r in info["rules"]:
        lines.append(f"| {r['task']} | {RULE_LABEL[r['rule']]} | {r['method']} | {100 * r['test_accuracy']:.1f} | "
                     f"{r['taps']} | {r['latency_estimate']:.3f}x | "
                     + " | ".join(ratio(r["graph"], b) for b in backends) + " |")
    for backend in backends:
        for rule in RULES:
            values = [rows[(r["graph"], backend)]["p50_ms"] / plain[backend] for r in info["rules"]
                      if r["rule"] == rule and "p50_ms" in rows.get((r["graph"], backend), {})]
            if values:
                lines.append(f"\n{backend}, {RULE_LABEL[rule]}: median {np.median(values):.3f}x, max "
                             f"{max(values):.3f}x over {len(values)} tasks" + ("" if rule != "default" else ""))
    lines += ["", "## A device gains nine tasks with `--taps-from`", "",
              f"The device starts with dspr_loc's default choice ({info['device_taps']} taps); each later task is "
              "fitted with the default rule on those taps only (plus the pre-logits) and joins the multi-task graph. "
              "own default: the task's test accuracy with its own, unrestricted default choice.", "",
              "| graph | task added | method | test % | own default test % | head bytes | % of backbone bytes | "
              + " | ".join(backends) + " |", "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(backends)]
    for r in info["device"]:
        own = "–" if r["own_default_test_accuracy"] is None else f"{100 * r['own_default_test_accuracy']:.1f}"
        lines.append(f"| {r['graph']} | {r['task']} | {r['method']} | {100 * r['test_accuracy']:.1f} | {own} | "
                     f"{r['head_bytes']:,} | {100 * r['head_bytes'] / info['plain_bytes']:.2f}% | "
                     + " | ".join(ratio(r["graph"], b) for b in backends) + " |")
    lines += ["", "## `deploy`'s device graph", "",
              f"The ten heads above in a `deploy` folder: backbone.onnx pruned to the {info['shared']['taps']} taps "
              f"they read ({info['shared']['backbone_bytes']:,} bytes).", "",
              "| graph | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
    for graph in ("backbone (logits)", "extraction graph (all taps)", "deploy device graph (10 tasks)"):
        lines.append(f"| {graph} | " + " | ".join(ratio(graph, b) for b in backends) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench_deploy import measure_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="h2t-fit-speed", help="bench_fit_speed.py's --work-dir")
    parser.add_argument("--out", default="h2t-deploy-aware", help="graphs and heads written here")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    if not args.report_only:
        graphs, info = prepare(Path(args.work_dir), Path(args.out), log)
        log(f"measuring {len(graphs)} graphs")
        rows = measure_all(graphs, 1, args.repeat, 2)
        atomic_write_json(OUT.with_suffix(".json"), {
            "format": "h2t-edge/bench-deploy-aware", "version": 1, "rows": rows, "info": info,
            **measured_on()})
    atomic_write_text(OUT.with_suffix(".md"), markdown(read_json(OUT.with_suffix(".json"), "deploy-aware results")))
    print(f"wrote {OUT.with_suffix('.md')}")


if __name__ == "__main__":
    main()
