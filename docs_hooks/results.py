"""MkDocs hook: every result on the site is rendered from benchmarks/results/*.json at build time.

A page asks for a figure with a line `<!-- results NAME -->`; `FIGURES` maps NAME to a function of
the results that returns a `Figure`. Below each table the page says which file it came from, when
it was measured and on which machine (the `h2t_edge.core.machine.measured_on` record; results
written before that record existed say what they recorded, or "machine not recorded").

README.md carries the rendering itself between `<!-- results NAME -->` and `<!-- end results -->`
(GitHub shows it as is); `python docs_hooks/results.py` rewrites those regions and
tests/docs/test_site.py fails while one differs from the data. Text outside these regions holds
no result figure (the same test greps for them).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from h2t_edge.core.machine import describe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# A marker line, optionally followed by its rendering (README.md) up to the end marker.
MARKER = re.compile(r"<!-- results ([\w-]+) -->\n(?:(?:(?!<!-- results ).)*?<!-- end results -->\n)?", re.DOTALL)
END = "<!-- end results -->"


@dataclass(frozen=True)
class Figure:
    header: list[str]
    rows: list[list[str]]
    sources: tuple[str, ...]  # file names under benchmarks/results
    note: str = ""  # what the numbers are (protocol, units); any figure in it comes from the data too


@cache
def load(name: str):
    return json.loads((RESULTS / name).read_text())


def _records(data) -> list[dict]:
    """The places a result file keeps its date and machine: itself, `meta`, and its records."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    places = [data, data.get("meta") or {}]
    for value in data.values():
        if isinstance(value, list):
            places += [r for r in value if isinstance(r, dict)]
    return places


def measured(name: str) -> str:
    """'file: date, machine' for one result file, from what it recorded."""
    places = _records(load(name))
    dates = sorted({str(p["date"]) for p in places if p.get("date")})
    when = "date not recorded" if not dates else dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    cpu = next((p["cpu"] for p in places if isinstance(p.get("cpu"), dict)), None)
    text = next((p["machine"].rstrip(".") for p in places if isinstance(p.get("machine"), str)), None)
    cores = next((p[k] for p in places for k in ("cpu_count", "cpus") if isinstance(p.get(k), int)), None)
    if cpu:
        machine = describe(cpu)
    elif text or cores:
        machine = ", ".join(filter(None, [text, cores and f"{cores} cores"])) + "; CPU model and ISA not recorded"
    else:
        machine = "machine not recorded"
    return f"`benchmarks/results/{name}`: {when}, {machine}"


def render(figure: Figure) -> str:
    lines = ["| " + " | ".join(figure.header) + " |", "|" + "---|" * len(figure.header)]
    lines += ["| " + " | ".join(row) + " |" for row in figure.rows]
    caption = [figure.note] if figure.note else []
    if figure.sources:
        caption.append("Measured: " + "; ".join(measured(s) for s in figure.sources) + ".")
    return "\n".join(lines) + "\n\n<small>" + " ".join(caption) + "</small>\n"


def expand(markdown: str) -> str:
    """`markdown` with every results marker followed by its current rendering and the end marker."""
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name not in FIGURES:
            raise KeyError(f"unknown results figure {name!r}; known: {', '.join(sorted(FIGURES))}")
        return f"<!-- results {name} -->\n{render(FIGURES[name]())}{END}\n"
    return MARKER.sub(one, markdown)


def strip_generated(markdown: str) -> str:
    """`markdown` without the rendered regions (what a person typed)."""
    return MARKER.sub("", markdown)


def on_page_markdown(markdown: str, **_) -> str:  # the MkDocs hook
    return expand(markdown)


# --- numbers -------------------------------------------------------------------------------------

def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def mean_se(values: list[float], scale: float = 100.0) -> str:
    """'mean ± standard error' of `values` (x scale), one decimal."""
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {scale * statistics.stdev(values) / len(values) ** 0.5:.1f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


# --- figures -------------------------------------------------------------------------------------

TASKS = ("fashion_mnist", "animal_mnist", "digits", "dspr_loc", "dspr_orient", "count2d", "distance2d")


def _suite(engine: str) -> dict[str, list[dict]]:
    """fit_speed.json's suite records of one engine, per task (all seeds)."""
    out: dict[str, list[dict]] = {}
    for record in load("fit_speed.json")["suite"]:
        if record["engine"] == engine:
            out.setdefault(record["task"], []).append(record)
    return out


def _test(records: list[dict], method: str | None = None) -> list[float]:
    """Test accuracies of `method` in `records` (None: the method the record's rule chose)."""
    return [r["methods"][method or r["guard"]]["test_accuracy"] for r in records]


def _p50(graph: str, backend: str) -> float | None:
    """deploy_aware.json: a graph's batch-1 p50 as a ratio to the plain backbone on `backend`."""
    rows = {(r["graph"], r["backend"]): r for r in load("deploy_aware.json")["rows"]}
    row, plain = rows.get((graph, backend)), rows[("backbone (logits)", backend)]
    return None if row is None or "p50_ms" not in row else row["p50_ms"] / plain["p50_ms"]


def _p50_cell(graph: str, backend: str) -> str:
    value = _p50(graph, backend)
    return "–" if value is None else ratio(value)


def headline() -> Figure:
    path, default = _suite("path"), _suite("default")
    rows = [[task, mean_se(_test(path[task], "LINEAR")), mean_se(_test(path[task], "HEAD2TOE")),
             mean_se(_test(default[task])), _p50_cell(f"{task} default", "onnxruntime")]
            for task in TASKS if task in path and task in default]
    return Figure(["task", "LINEAR test %", "HEAD2TOE test %", "`train` default test %",
                   "deployed latency / backbone"], rows, ("fit_speed.json", "deploy_aware.json"),
                  "EfficientNet-Lite0, T = 512, 1,000 training images; test accuracy mean ± standard error over "
                  "seeds; latency: the `train` default's task graph at batch 1 on ONNX Runtime CPU (seed 0).")


def fit_speed() -> Figure:
    paper, path = _suite("paper"), _suite("path")

    def seconds(records):
        return mean_se([r["fit_seconds"] for r in records], scale=1.0)
    rows = [[task, seconds(paper[task]), seconds(path[task]), mean_se(_test(paper[task], "HEAD2TOE")),
             mean_se(_test(path[task], "HEAD2TOE"))] for task in TASKS if task in paper and task in path]
    return Figure(["task", "fit s, paper solver (500 steps)", "fit s, path solver", "HEAD2TOE test %, paper solver",
                   "HEAD2TOE test %, path solver"], rows, ("fit_speed.json",),
                  "Both HEAD2TOE variants on the same caches and folds, mean ± standard error over seeds.")


def train_timings() -> Figure:
    record = load("fit_speed.json")["train"][0]
    rows = [[step, f"{seconds:.0f}"] for step, seconds in record["timings"].items()]
    rows.append(["whole command", f"{record['wall_seconds']:.0f}"])
    chosen = record["candidates"][record["chosen"]]
    return Figure(["`train` step", "seconds"], rows, ("fit_speed.json",),
                  f"`h2t-edge train` on {record['task']} ({record['train_images']:,} training images, target sizes "
                  f"{', '.join(map(str, record['target_sizes']))}, {record['solver']} solver): it chose "
                  f"{record['chosen']} with {chosen['n_features']:,} features, test {pct(chosen['test_accuracy'])}% "
                  f"(LINEAR {pct(record['candidates']['LINEAR']['test_accuracy'])}%).")


RULES = {"path": "best CV accuracy (`--max-accuracy`)", "default": "default: cheapest within 1 SE",
         "budget-1.02": "`--latency-budget 1.02`"}
BACKENDS = {"onnxruntime": "ONNX Runtime CPU", "openvino": "OpenVINO CPU f32"}


def deploy_aware_rules() -> Figure:
    rules = load("deploy_aware.json")["info"]["rules"]
    rows = []
    for rule, label in RULES.items():
        cells = [label]
        for backend in BACKENDS:
            values = [v for v in (_p50(r["graph"], backend) for r in rules if r["rule"] == rule) if v is not None]
            cells.append(f"{ratio(statistics.median(values))} / {ratio(max(values))}" if values else "–")
        cells.append(pct(statistics.fmean(r["test_accuracy"] for r in rules if r["rule"] == rule)))
        rows.append(cells)
    return Figure(["choice rule"] + [f"{b}: median / max latency" for b in BACKENDS.values()] + ["mean test %"],
                  rows, ("deploy_aware.json",),
                  "The `train` choice for each suite task (seed 0): batch-1 p50 of its task graph as a ratio to "
                  "the plain backbone, and its test accuracy.")


def deploy_aware_device() -> Figure:
    info = load("deploy_aware.json")["info"]
    rows = [[r["graph"], r["task"], r["method"], pct(r["test_accuracy"]),
             "–" if r["own_default_test_accuracy"] is None else pct(r["own_default_test_accuracy"]),
             f"{r['head_bytes']:,}"] + [_p50_cell(r["graph"], b) for b in BACKENDS] for r in info["device"]]
    rows += [[graph, "", "", "", "", ""] + [_p50_cell(graph, b) for b in BACKENDS]
             for graph in ("deploy device graph (10 tasks)", "extraction graph (all taps)")]
    return Figure(["graph", "task added", "method", "test %", "test % on its own taps", "head bytes"]
                  + [f"{b} latency" for b in BACKENDS.values()], rows, ("deploy_aware.json",),
                  "A device starts with one task; each later task is fitted with `--taps-from` on the device's taps "
                  "and joins it. Latency: batch-1 p50 as a ratio to the plain backbone.")


def deploy_graphs() -> Figure:
    rows = {(r["graph"], r["backend"]): r for r in load("deploy.json")["rows"]}
    graphs = list(dict.fromkeys(g for g, _ in rows))
    out = []
    for graph in graphs:
        cells = [graph]
        for backend in BACKENDS:
            r = rows.get((graph, backend))
            cells += ["–", "–"] if r is None else [f"{r['p50_ms']:.2f} ms ({ratio(r['latency_vs_backbone'])})",
                                                   ratio(r["throughput_vs_backbone"])]
        out.append(cells)
    header = ["graph (EfficientNet-Lite0, T = 512)"]
    for backend in BACKENDS.values():
        header += [f"{backend} batch-1 p50", f"{backend} batch-32 throughput"]
    return Figure(header, out, ("deploy.json",),
                  "Ratios are to the plain backbone on the same backend. The HEAD2TOE rows at a fixed F and the "
                  "extra tasks of the 10-task graph are random selections; these graphs predate the deploy-aware "
                  "choice (`deploy_aware.json` measures that).")


def backends() -> Figure:
    data = load("backends_efficientnet_lite0.json")
    rows = [[r["graph"], r["backend"], r["precision"], f"{r['p50_ms']:.2f}", f"{r['images_per_s']:.0f}",
             "–" if r.get("speedup_vs_ort_fp32") is None else ratio(r["speedup_vs_ort_fp32"])] for r in data["rows"]]
    return Figure(["graph", "backend", "precision", "batch-1 p50 ms", f"images/s at batch {data['meta']['batch']}",
                   "throughput vs ONNX Runtime fp32"], rows, ("backends_efficientnet_lite0.json",),
                  "`h2t-edge bench` on the demo task (EfficientNet-Lite0).")


def trust_load() -> Figure:
    data = load("trust.json")
    rows = [[f"{name} ({r['graph_bytes'] / 1e6:.0f} MB)", f"{r['median_ms']['checked']:.1f}",
             f"{r['median_ms']['unchecked']:.1f}", ratio(r["ratio_checked_to_unchecked"]),
             ratio(r["fastest_ratio_checked_to_unchecked"]) if "fastest_ratio_checked_to_unchecked" in r else "–",
             ratio(r["ratio_verify_first_to_unchecked"]) if "ratio_verify_first_to_unchecked" in r else "–",
             f"{r['median_ms']['blake3_only']:.1f}", f"{r['median_ms']['read_only']:.1f}"]
            for name, r in data["runs"].items()]
    repeat = next(iter(data["runs"].values()))["repeat"]
    return Figure(["graph", "checked ms", "unchecked ms", "checked / unchecked", "fastest / fastest",
                   "verify first / unchecked",
                   "BLAKE3 alone ms", "read alone ms"],
                  rows, ("trust.json",), f"`Predictor.load` medians of {repeat} rounds of shuffled loads; checked: "
                  "the graph parsed while its digest is computed, run only once it matches (the default); verify "
                  "first: the digest finishes before the parse. The demo graph is EfficientNet-Lite0 at T = 512, "
                  "the large one a head over every feature.")


def serving() -> Figure:
    data = load("serving.json")
    runs = {(r["path"], r["concurrency"]): r for r in data["serving"] if r["model"] == "dsprites_x"}

    def cell(r):
        return f"{r['throughput_per_s']:.0f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f})"
    rows = [[str(c), cell(runs[("triton-grpc", c)]), cell(runs[("in-process", c)])]
            for c in sorted({c for _, c in runs}) if ("triton-grpc", c) in runs and ("in-process", c) in runs]
    return Figure(["concurrency", "Triton (`h2t-edge serve`), gRPC", "in-process `Predictor`"], rows, ("serving.json",),
                  "EfficientNet-Lite0 task graph, batch-1 requests: requests/s (p50 / p99 ms); clients and server "
                  "share the machine.")


STRATEGIES = {"imagenet_top1@1": "ImageNet top-1", "knn@1": "kNN on pre-logits", "linear@1": "linear on pre-logits",
              "nc1@1": "NC1 of pre-logits", "knn_all@1": "kNN on all layers", "linear_all@1": "linear on all layers",
              "hybrid_linear@2": "hybrid: ImageNet + linear pre-logits (2 fits)",
              "hybrid_linear_all@2": "hybrid: ImageNet + linear all layers (2 fits)"}


def model_search() -> Figure:
    regret = load("model_search.json")["summary"]["regret"]
    rows = [[label, pct(regret[k]["mean"]), pct(regret[k]["max"]), f"{regret[k]['zero_on']}/{regret[k]['tasks']}"]
            for k, label in STRATEGIES.items() if k in regret]
    return Figure(["strategy", "mean regret, points", "max regret", "zero regret on"], rows, ("model_search.json",),
                  "Regret: the best HEAD2TOE test accuracy over the bundled-weight backbones minus that of the "
                  "strategy's pick, over the suite tasks (quick grid, seed 0).")


def finetune() -> Figure:
    data = load("finetune.json")
    cells: dict[tuple[str, str], list[float]] = {}
    for r in data["records"]:
        cells.setdefault((r["method"], r["task"]), []).append(r["test_accuracy"])
    methods = list(dict.fromkeys(m for m, _ in cells))
    tasks = [t for t in TASKS if any((m, t) in cells for m in methods)]
    rows = [[m] + [pct(statistics.median(cells[(m, t)])) if (m, t) in cells else "–" for t in tasks] for m in methods]
    s = data["settings"]
    return Figure(["method"] + tasks, rows, ("finetune.json",),
                  f"Test accuracy %, median over seeds; {s['backbone']}, T = {s['target_size']}, {s['grid']} grid, "
                  f"fine-tuning for {s['epochs']} epochs ({s['layer']} block).")


def finetune_200ep() -> Figure:
    data = load("finetune_200ep.json")
    rows = [[r["task"], r["method"], pct(r["test_accuracy"]), f"{r['fit_seconds']:.0f}", f"{r['task_bytes']:,}",
             f"{r['penultimate_nc1']:.3f}"] for r in data["records"]]
    return Figure(["task", "method", "test %", "fit s", "bytes per task", "penultimate NC1"], rows,
                  ("finetune_200ep.json",), f"The paper's {data['settings']['epochs']} epochs, seed 0.")


def backbones() -> Figure:
    rows = [[r["backbone"], str(r["input_size"][-1]), r["weights"], str(r["taps"]), f"{r['features_t512']:,}",
             f"{r['features_t8192']:,}", f"{r['parameters'] / 1e6:.1f} M", f"{r['onnx_bytes'] / 1e6:.1f}",
             f"{r['images_per_second']:.1f}"] for r in load("backbones.json")["rows"]]
    return Figure(["backbone", "input", "weights", "taps", "features T=512", "features T=8192", "parameters",
                   "ONNX MB", "images/s"], rows, ("backbones.json",),
                  "All taps at T = 512, ONNX Runtime CPU, batch 32, preprocessing not included. "
                  + load("backbones.json").get("note", ""))


def screening() -> Figure:
    rows = [["all (exact)" if r["budget"] == 0 else f"top {r['budget']:,} per fold", f"{r['fit_seconds']:.0f}",
             pct(r["cv_accuracy"]), pct(r["test_accuracy"])] for r in load("screening.json")]
    return Figure(["group lasso over", "fit + CV s", "CV %", "test %"], rows, ("screening.json",),
                  "dspr_loc at T = 8192, quick grid. The exact run shared the cores with another fit.")


def soak() -> Figure:
    d = load("soak.json")
    rows = [[f"{d['requests']:,}", f"{d['images']:,}", f"{d['requests_per_second']:.1f}", str(d["failures"]),
             str(d["inexact"]), f"{d['rss_mib']['growth_after_warmup']:.1f} (bound {d['rss_bound_mib']})"]]
    return Figure(["requests", "images", "requests/s", "unexpected errors", "inexact answers",
                   "memory growth after warm-up, MiB"], rows, ("soak.json",),
                  f"One `Predictor`, {d['threads']} threads, {d['seconds']:.0f} s of mixed requests "
                  "(`benchmarks/soak.py`).")


def index() -> Figure:
    rows = [[f"`{p.name}`", measured(p.name).split(": ", 1)[1]] for p in sorted(RESULTS.glob("*.json"))]
    return Figure(["result", "measured"], rows, (), "Every result file, with the date and machine it records.")


PRECISION_ROWS = ("fp32", "fp16 (after)", "bf16 (after)", "int8 (after)", "int8 (fitted)")


def precision() -> Figure:
    """precision.json: test accuracy per task and backend, mean ± SE over seeds, and the paired gap."""
    records = load("precision.json")["accuracy"]
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["task"], r["backend"]), []).append(r)
    rows = []
    for (task, backend), rs in cells.items():
        rows.append([task, backend, str(len(rs))]
                    + [mean_se([r[k] for r in rs]) if all(k in r for r in rs) else "–" for k in PRECISION_ROWS]
                    + [mean_se([r["int8 (fitted)"] - r["fp32"] for r in rs])])
    for backend in sorted({b for _, b in cells}):
        per_task = [rs for (_, b), rs in cells.items() if b == backend]
        rows.append([f"mean over {len(per_task)} tasks", backend, ""]
                    + [mean_se([statistics.fmean(r[k] for r in rs) for rs in per_task])
                       if all(k in r for rs in per_task for r in rs) else "–" for k in PRECISION_ROWS]
                    + [mean_se([statistics.fmean(r["int8 (fitted)"] - r["fp32"] for r in rs) for rs in per_task])])
    return Figure(["task", "backend", "seeds", *PRECISION_ROWS, "gap (fitted - fp32)"], rows, ("precision.json",),
                  "Test accuracy %, HEAD2TOE at T = 512, mean ± SE over seeds. *after*: the fp32-fitted head on the "
                  "features of the graph at that precision (`build-engine` of an fp32 task graph); *fitted*: "
                  "`train --precision int8` (the head fitted on the int8 graph's own features).")


def precision_latency() -> Figure:
    rows = [[r["task"], r["backend"], r["precision"], f"{r['p50_ms']:.2f}", ratio(r["latency_ratio"]),
             f"{r['images_per_s']:.0f}", ratio(r["throughput_ratio"])] for r in load("precision.json")["latency"]]
    return Figure(["task", "backend", "precision", "batch-1 p50 ms", "vs fp32", "images/s at batch 32", "vs fp32"],
                  rows, ("precision.json",), "The compiled task graph of the int8-fitted head, cut from the "
                  "extraction graph at each precision (`exporters.attach`).")


def calibration() -> Figure:
    data = load("calibration.json")
    rows = [[r["task"], r["method"], str(r["images"]), f"{r['cosine']:.4f}", f"{r['rel_error_median']:.3f}",
             f"{r['rel_error_max']:.3f}", f"{r['calibration_seconds']:.0f}"] for r in data["rows"]]
    choice = data["choice"]
    return Figure(["task", "method", "images", "mean cosine to fp32", "median rel. error", "worst rel. error",
                   "calibration s"], rows, ("calibration.json",),
                  f"Pooled tap features of held-out training images, int8 against fp32. Chosen: {choice['method']} on "
                  f"{choice['images']} images, the best mean cosine over the tasks.")


def choice() -> Figure:
    """choice.json: one graph measured twice (the spread that sets SearchGrid.min_saving)."""
    r = load("choice.json")
    rows = [[p["task"], BACKENDS.get(p["backend"], p["backend"]), " = ".join(p["rules"]), p["graph"],
             f"{p['ms'][0]:.2f} / {p['ms'][1]:.2f}", f"{100 * p['spread']:.1f}%"] for p in r["spread"]["pairs"]]
    return Figure(["task", "backend", "rules", "graph", "batch-1 ms", "spread / backbone"], rows, ("choice.json",),
                  f"Median spread {100 * r['spread']['median']:.1f}% of the backbone's latency over these pairs (max "
                  f"{100 * r['spread']['max']:.1f}%); default `min_saving` {r['min_saving']:g}.")


def scale() -> Figure:
    """scale.json: `train` defaults on Fashion-MNIST at growing n."""
    sizes = sorted(load("scale.json")["sizes"].values(), key=lambda r: r["n_train"])
    rows = [[f"{r['n_train']:,}", f"{r['wall_seconds']:.0f}",
             f"{sum(v for k, v in r['timings'].items() if k.startswith('extract')):.0f}",
             f"{r['timings'].get('fit', 0):.0f}", f"{r['peak_anon_gib']:.2f}", f"{r['peak_file_gib']:.2f}",
             r["chosen"], pct(r["test_accuracy"])] for r in sizes]
    return Figure(["training images", "wall s", "extract s", "fit s", "peak anon GiB", "peak file GiB", "chosen",
                   "test %"], rows, ("scale.json",),
                  "`h2t-edge train` defaults, EfficientNet-Lite0, T 512 / 2048 / 8192, 1,000 test images; RssAnon and "
                  "RssFile (the memory-mapped cache) sampled every 0.2 s.")


def halving() -> Figure:
    """halving.json: `train` defaults (successive halving over T, the stop along F) against
    --full-search, same features, per task over seeds."""
    records = load("halving.json")["records"]
    by = {(r["task"], r["seed"], r["variant"]): r for r in records}
    done = [(by[(t, s, "default")], by[(t, s, "full")]) for (t, s, v) in sorted(by)
            if v == "default" and (t, s, "full") in by]
    rows, per_seed = [], {}
    for task in [t for t in TASKS if any(d["task"] == t for d, _ in done)]:
        pairs = [(d, f) for d, f in done if d["task"] == task]
        diffs = [d["chosen_test_accuracy"] - f["chosen_test_accuracy"] for d, f in pairs]
        for (d, _), diff in zip(pairs, diffs):
            per_seed.setdefault(d["seed"], []).append(diff)
        fit_d = statistics.fmean(d["timings"]["fit"] for d, _ in pairs)
        fit_f = statistics.fmean(f["timings"]["fit"] for _, f in pairs)
        rows.append([task, str(len(pairs)), mean_se(diffs), f"{sum(d['chosen'] != f['chosen'] for d, f in pairs)}",
                     f"{fit_d:.0f}", f"{fit_f:.0f}", ratio(fit_d / fit_f)])
    seed_means = [statistics.fmean(v) for v in per_seed.values()]
    total_d = sum(d["timings"]["fit"] for d, _ in done)
    total_f = sum(f["timings"]["fit"] for _, f in done)
    return Figure(["task", "seeds", "test points, default - full", "choice changed", "default fit s", "full fit s",
                   "fit ratio"], rows, ("halving.json",),
                  f"`train` with its defaults against `train --full-search` on the same 1,000 training images and "
                  f"cached features, tested on the task's fixed 1,000 images; mean over seeds ± standard error. "
                  f"Suite mean {mean_se(seed_means)} points over {len(seed_means)} seed(s) "
                  f"({len(done)} task-seeds); fit seconds {ratio(total_d / total_f)} in all.")



def retrain_forms() -> Figure:
    """retrain_forms.json: the HEAD2TOE fit with every head in the primal form against the default
    (wide heads in the dual form), same features, one process."""
    rows = []
    for e in load("retrain_forms.json")["entries"]:
        p, d = e["forms"]["primal"], e["forms"]["auto"]
        cv = [sum(v for k, v in f["stages"].items() if k.startswith("retrain cv")) for f in (p, d)]
        agree = list(e["agreement"].values())
        rows.append([e["task"], str(e["target_size"]), f"{e['candidates']:,}", f"{p['seconds']:.0f}",
                     f"{d['seconds']:.0f}", ratio(d["seconds"] / p["seconds"]), f"{cv[0]:.0f} / {cv[1]:.0f}",
                     f"{max(a['cv_max_diff'] for a in agree):.4f}",
                     "yes" if all(a["same_choice"] and a["same_columns"] for a in agree) else "no"])
    return Figure(["task", "T", "candidates", "primal fit s", "default fit s", "ratio", "CV retraining s",
                   "largest CV difference", "same heads chosen"], rows, ("retrain_forms.json",),
                  "The HEAD2TOE fit of `train` at one T (HEAD2TOE and HEAD2TOE+LINEAR, tap budgets, 5 folds) on the "
                  "same 1,000-image features, twice in one process: every head in the primal form, and the default, "
                  "which retrains wide heads in the dual form. CV retraining s: primal / default.")

FIGURES: dict[str, Callable[[], Figure]] = {f.__name__.replace("_", "-"): f for f in (
    headline, fit_speed, train_timings, deploy_aware_rules, deploy_aware_device, deploy_graphs, backends,
    trust_load, serving, model_search, finetune, finetune_200ep, backbones, screening, soak, index, precision,
    precision_latency, calibration, choice, scale, halving, retrain_forms)}


def main(paths: list[str]) -> None:
    """Rewrite the rendered regions of the given files (default: README.md)."""
    for path in map(Path, paths or [ROOT / "README.md"]):
        path.write_text(expand(path.read_text()))


if __name__ == "__main__":
    main(sys.argv[1:])
