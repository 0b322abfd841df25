"""Model search over the bundled-weight backbones on the offline task suite (issue 11).

    flock /work/coord/heavy.lock python benchmarks/bench_model_search.py --phase fits --minutes 19
    flock /work/coord/heavy.lock python benchmarks/bench_model_search.py --phase search --minutes 19
    python benchmarks/bench_model_search.py --phase report

Phase `fits`: for each task (task-major, so a partial run covers whole tasks) and backbone, extract
the train and test features at T (the `h2t-edge eval` caches in --work-dir; the seconds of each
fresh extraction are kept in WORK/extract_seconds.json) and fit LINEAR and HEAD2TOE (quick grid,
seed 0) through `h2t_edge.suite.evaluate.run_eval` (records in WORK/evals.json). Phase `search`: the
search's proxies on the train features of every backbone (timed; WORK/proxies.json). Phase
`report`: strategies, picks, regrets, rank correlations and the search time against fitting every
backbone, into benchmarks/results/model_search.{json,md}. Every phase is resumable and stops
starting new work after --minutes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from h2t_edge.core.machine import measured_on
from runtime.io import atomic_write_json, atomic_write_text, read_json

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2_100")
# natural and structured tasks alternate, so that a partial run still covers both groups
TASK_ORDER = ("dspr_loc", "digits", "count2d", "fashion_mnist", "distance2d", "animal_mnist", "dspr_orient")
RESULTS = Path(__file__).parent / "results" / "model_search"


def _tasks(names: list[str] | None) -> list[str]:
    from h2t_edge.suite.tasks.registry import list_tasks

    installed = [s.name for s in list_tasks(include_optional=False) if s.missing() is None]
    order = [t for t in TASK_ORDER if t in installed] + [t for t in installed if t not in TASK_ORDER]
    return [t for t in order if not names or t in names]


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def phase_fits(tasks: list[str], work: Path, target_size: int, deadline: float) -> None:
    from h2t_edge.suite.evaluate import backbone_export, feature_caches, run_eval
    from h2t_edge.suite.tasks.registry import build_task

    times_path = work / "extract_seconds.json"
    times = read_json(times_path, "extraction times") if times_path.exists() else {}
    for task in tasks:
        for backbone in BACKBONES:
            if time.time() > deadline:
                _log("time is up; rerun to continue")
                return
            key = f"{task}/{backbone}/T{target_size}"
            data = build_task(task, None, 0)
            onnx = backbone_export(work, backbone, target_size, "bundled", _log)
            start = time.perf_counter()
            feature_caches(work, backbone, target_size, onnx, data, 32, _log)
            seconds = time.perf_counter() - start
            if key not in times and seconds > 5:  # a fresh (or resumed: then marked) extraction
                times[key] = {"seconds": seconds, "images": len(data.train) + len(data.test),
                              "train_images": len(data.train)}
                atomic_write_json(times_path, times)
            run_eval([task], work / "evals", methods=("LINEAR", "HEAD2TOE"), backbones=(backbone,), seeds=(0,),
                     protocol="quick", target_sizes=(target_size,), work_dir=work, log=_log)


def _task_features(work: Path, task: str, backbone: str, target_size: int):
    """The train/test caches of `phase_fits` (extracted there; built here on first use)."""
    from h2t_edge.suite.evaluate import backbone_export, feature_caches
    from h2t_edge.suite.tasks.registry import build_task

    onnx = backbone_export(work, backbone, target_size, "bundled", _log)
    return onnx, feature_caches(work, backbone, target_size, onnx, build_task(task, None, 0), 32, _log)


def phase_search(tasks: list[str], work: Path, target_size: int, deadline: float,
                 proxies: tuple[str, ...] | None = None, latency: bool = True) -> None:
    """Proxies of every backbone on every task's training features (timed), and each backbone's
    batch-1 latency on ONNX Runtime (the graph the search extracts with). Only what is missing is
    computed; each cell is merged into WORK/proxies.json as it ends."""
    from h2t_edge.suite.evaluate import load_results
    from h2t_edge.research.model_search import PROXIES, measure_latency, proxy_scores

    proxies = tuple(proxies or PROXIES)
    path = work / "proxies.json"
    # only cells whose fits are done: the fits phase times the extraction, which must not be cached before it
    fitted = {(r["task"], r["backbone"]) for r in load_results(work / "evals.json") if r["method"] == "HEAD2TOE"}
    for task in tasks:
        for backbone in BACKBONES:
            key = f"{task}/{backbone}/T{target_size}"
            store = _read(path, {"proxies": {}, "latency": {}})
            cell = store["proxies"].get(key, {"scores": {}, "seconds": {}})
            todo = [p for p in proxies if p not in cell["scores"]]
            if (task, backbone) not in fitted or (not todo and (not latency or backbone in store["latency"])):
                continue
            if time.time() > deadline:
                _log("time is up; rerun to continue")
                return
            onnx, feats = _task_features(work, task, backbone, target_size)
            if todo:
                x, y = feats.train.arrays()
                scores, seconds = proxy_scores(x, y, feats.pre_logits(), todo)
                _log(f"{key}: " + ", ".join(f"{p} {100 * v:.1f}% ({seconds[p]:.1f} s)" for p, v in scores.items()))
            lat = None
            if latency and backbone not in store["latency"]:
                lat = measure_latency(onnx, "onnxruntime", "fp32", warmup=10, repeat=50)
                _log(f"{backbone}: batch-1 p50 {lat.get('p50_ms')} ms")
            store = _read(path, {"proxies": {}, "latency": {}})  # merge: another piece may have written
            cell = store["proxies"].setdefault(key, {"scores": {}, "seconds": {}})
            if todo:
                cell["scores"].update(scores)
                cell["seconds"].update(seconds)
            if lat is not None:
                store["latency"][backbone] = lat
            atomic_write_json(path, store)


def _spearman_kendall(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """Rank correlations (ties averaged; tau-b); None where either side is constant."""
    from scipy.stats import kendalltau, spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None, None
    return float(spearmanr(a, b).statistic), float(kendalltau(a, b).statistic)


def _read(path: Path, empty):
    return read_json(path, path.stem) if path.exists() else empty


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def build_report(tasks: list[str], work: Path, target_size: int) -> dict:
    """Everything the results files show, from WORK's records (only tasks with every piece)."""
    from exporters.backbones import get_backbone_spec
    from h2t_edge.suite.evaluate import load_results
    from h2t_edge.research.model_search import AGNOSTIC, PROXIES, Candidate, add_regrets, strategies

    records = {(r["task"], r["backbone"], r["method"]): r for r in load_results(work / "evals.json")
               if r["protocol"] == "quick" and r["seed"] == 0}
    store = _read(work / "proxies.json", {"proxies": {}, "latency": {}})
    times = _read(work / "extract_seconds.json", {})
    predictors = [AGNOSTIC, *PROXIES]
    out_tasks, missing = [], []
    for task in tasks:
        keys = [f"{task}/{b}/T{target_size}" for b in BACKBONES]
        available = tuple(p for p in PROXIES if all(p in store["proxies"].get(k, {}).get("scores", {}) for k in keys))
        if not available or not all(
                (task, b, m) in records for b in BACKBONES for m in ("LINEAR", "HEAD2TOE")):
            missing.append(task)
            continue
        rows, cands = [], []
        for b, key in zip(BACKBONES, keys):
            spec = get_backbone_spec(b)
            h2t, lin = records[(task, b, "HEAD2TOE")], records[(task, b, "LINEAR")]
            t = times.get(key)
            train_extract = None if t is None else t["seconds"] * t["train_images"] / t["images"]
            rows.append({"backbone": b, "imagenet_top1": spec.imagenet_top1, **store["proxies"][key],
                         "latency_ms": store["latency"].get(b, {}).get("p50_ms"),
                         "linear_test": lin["test_accuracy"], "head2toe_test": h2t["test_accuracy"],
                         "head2toe_cv": h2t["cv_accuracy"], "head2toe_fit_seconds": h2t["fit_seconds"],
                         "linear_fit_seconds": lin["fit_seconds"], "train_extract_seconds": train_extract})
            cands.append(Candidate(b, "bundled", spec.imagenet_top1, spec.imagenet_top1_source,
                                   scores=store["proxies"][key]["scores"]))
        picks = strategies(cands, available, budget=2)
        oracle = add_regrets(picks, {r["backbone"]: r["head2toe_test"] for r in rows})
        correlations = {}
        for target in ("head2toe_test", "linear_test"):
            truth = [r[target] for r in rows]
            for p in predictors:
                if p != AGNOSTIC and p not in available:
                    correlations[f"{p}|{target}"] = {"spearman": None, "kendall": None}
                    continue
                pred = [r["imagenet_top1"] if p == AGNOSTIC else r["scores"][p] for r in rows]
                rho, tau = _spearman_kendall(pred, truth)
                correlations[f"{p}|{target}"] = {"spearman": rho, "kendall": tau}
        extract = sum(r["train_extract_seconds"] or 0.0 for r in rows)
        search_s = extract + sum(sum(r["seconds"].values()) for r in rows)
        fit_all_s = extract + sum(r["head2toe_fit_seconds"] for r in rows)
        hybrid = next(x for x in picks if x["strategy"] == f"hybrid_{'linear' if 'linear' in available else available[0]}")
        hybrid_s = search_s + sum(r["head2toe_fit_seconds"] for r in rows if r["backbone"] in hybrid["picks"])
        out_tasks.append({"task": task, "proxies": list(available), "hybrid_timed": hybrid["strategy"],
                          "backbones": rows, "strategies": picks, "oracle": oracle,
                          "best": max(rows, key=lambda r: r["head2toe_test"])["backbone"],
                          "correlations": correlations,
                          "seconds": {"train_extraction": extract, "proxies": search_s - extract, "search": search_s,
                                      "search_plus_hybrid_fits": hybrid_s, "fit_every_backbone": fit_all_s}})
    summary = {"tasks": [t["task"] for t in out_tasks], "missing_tasks": missing, "correlations": {},
               "regret": {}, "seconds": {}}
    for p in predictors:
        for target in ("head2toe_test", "linear_test"):
            vals = [t["correlations"][f"{p}|{target}"] for t in out_tasks]
            summary["correlations"][f"{p}|{target}"] = {
                "spearman": _mean(v["spearman"] for v in vals), "kendall": _mean(v["kendall"] for v in vals),
                "defined_on": sum(v["spearman"] is not None for v in vals)}
    if out_tasks:
        names = dict.fromkeys(f"{r['strategy']}@{r['budget']}" for t in out_tasks for r in t["strategies"])
        for name in names:
            regrets = [r["regret"] for t in out_tasks for r in t["strategies"] if f"{r['strategy']}@{r['budget']}" == name]
            summary["regret"][name] = {"mean": _mean(regrets), "max": max(regrets), "tasks": len(regrets),
                                       "zero_on": sum(r == 0 for r in regrets)}
        for k in out_tasks[0]["seconds"]:
            summary["seconds"][k] = float(sum(t["seconds"][k] for t in out_tasks))
    return {"meta": {"backbones": list(BACKBONES), "target_size": target_size, "grid": "quick", "seed": 0,
                     "proxies": {p: PROXIES[p][0] for p in PROXIES}, "knn_k": 1, "linear_folds": 3,
                     "latency": "ONNX Runtime CPU, batch 1, p50 of 50 runs, backbone with all taps at T",
                     **measured_on(), "cpu_count": os.cpu_count()},
            "summary": summary, "tasks": out_tasks}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _corr(v) -> str:
    return "–" if v is None else f"{v:+.2f}"


def report_markdown(data: dict) -> str:
    from h2t_edge.research.model_search import AGNOSTIC, PROXIES

    s, meta = data["summary"], data["meta"]
    labels = {AGNOSTIC: "ImageNet top-1 (task-agnostic)", **{p: PROXIES[p][0] for p in PROXIES}}
    lines = ["# Model search: which backbone to transfer (HEAD2TOE on the offline task suite)", "",
             f"Backbones: {', '.join(meta['backbones'])}; T = {meta['target_size']}; HEAD2TOE and LINEAR with the "
             f"quick grid (3-fold CV, 500 steps), seed 0, test accuracy on each task's test set. Proxies on the "
             f"1,000 training images only: kNN = 1-NN leave-one-out accuracy (cosine); linear = 3-fold CV accuracy "
             f"of a standardised logistic regression (C = 1, L-BFGS); 'all layers' = the same on every tap's "
             f"pooled features (what HEAD2TOE selects from); NC1 = within-class variability collapse of the "
             f"pre-logits (neural-collapse seed paper, Eq. 4; lower is better, ranked by 1 / (1 + NC1)). Latency: {meta['latency']}. {meta['cpu_count']} CPU "
             f"cores, {meta['date']}.", "",
             f"Tasks covered: {', '.join(s['tasks']) or 'none'}."
             + "".join(f" {t['task']}: proxies {', '.join(t['proxies'])} only." for t in data["tasks"]
                       if len(t["proxies"]) < len(PROXIES))
             + (f" Not covered (not finished in the time of the session): {', '.join(s['missing_tasks'])}."
                if s["missing_tasks"] else ""), ""]
    lines += ["## Rank correlation of each predictor with the backbones' accuracy", "",
              "Mean over tasks of the per-task correlation across the 4 backbones (with 4 backbones one task's "
              "Spearman moves in steps of 0.2, so read the means, not single tasks).", "",
              "| predictor | Spearman vs HEAD2TOE | Kendall vs HEAD2TOE | Spearman vs LINEAR | Kendall vs LINEAR |",
              "|---|---:|---:|---:|---:|"]
    for p, label in labels.items():
        h, lin = s["correlations"][f"{p}|head2toe_test"], s["correlations"][f"{p}|linear_test"]
        lines.append(f"| {label} | {_corr(h['spearman'])} | {_corr(h['kendall'])} | {_corr(lin['spearman'])} "
                     f"| {_corr(lin['kendall'])} |")
    lines += ["", "## Regret of each strategy (HEAD2TOE test accuracy, points)", "",
              "Regret = best HEAD2TOE test accuracy over the 4 backbones minus the best among the strategy's picks; "
              "B = how many backbones the strategy fits. Hybrid (the paper's): the top ImageNet backbone plus the "
              "proxy's best other one.", "",
              "| strategy | B | " + " | ".join(s["tasks"]) + " | mean | max | zero regret on |",
              "|---|---:|" + "---:|" * (len(s["tasks"]) + 3)]
    for name, sm in s["regret"].items():
        strategy, budget = name.split("@")
        cells = []
        for t in data["tasks"]:
            r = next((r for r in t["strategies"] if f"{r['strategy']}@{r['budget']}" == name), None)
            short = "" if r is None else "/".join(x.replace("efficientnet_", "").replace("_100", "") for x in r["picks"])
            cells.append("–" if r is None else f"{_pct(r['regret'])} ({short})")
        lines.append(f"| {strategy} | {budget} | " + " | ".join(cells)
                     + f" | **{_pct(sm['mean'])}** | {_pct(sm['max'])} | {sm['zero_on']}/{sm['tasks']} |")
    lines += ["", "## Per task and backbone (%)", "",
              "| task | backbone | ImageNet top-1 | kNN | linear | kNN all | linear all | NC1 (not %) | LINEAR test "
              "| HEAD2TOE test | HEAD2TOE fit s | p50 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in data["tasks"]:
        for r in t["backbones"]:
            sc = r["scores"]
            best = "**" if r["backbone"] == t["best"] else ""
            lines.append(f"| {t['task']} | {r['backbone']} | {r['imagenet_top1']:.1f} | {_pct(sc.get('knn'))} | "
                         f"{_pct(sc.get('linear'))} | {_pct(sc.get('knn_all'))} | {_pct(sc.get('linear_all'))} | "
                         + ("–" if sc.get("nc1") is None else f"{1 / sc['nc1'] - 1:.2f}") + " | "
                         f"{_pct(r['linear_test'])} | {best}{_pct(r['head2toe_test'])}{best} | "
                         f"{r['head2toe_fit_seconds']:.0f} | "
                         + ("–" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}") + " |")
    lines += ["", "## Search time against fitting every backbone (seconds, 2-core CPU)", "",
              "search = extraction of the training images + the task's proxies, for every backbone; fit every "
              "backbone = the same extraction + a quick-grid HEAD2TOE fit per backbone; search + hybrid = the "
              "search plus the HEAD2TOE fits of the hybrid picks (linear proxy where it ran, else kNN). Fit "
              "seconds come from the fits phase, run under the shared lock but with other jobs running "
              "outside it on some cells, so they vary 3-8x between like cells. These are quick-grid fits; a "
              "paper-grid HEAD2TOE fit takes 5.5-7 min at T = 512 (vtab_lite0.json, paper solver), so there "
              "the search is a smaller share. Train extraction time is the measured "
              "train+test extraction scaled by the share of training images.", "",
              "| task | extraction | proxies | search | search + hybrid fits | fit every backbone | search / fit all |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t in data["tasks"] + ([{"task": "**all**", "seconds": s["seconds"]}] if data["tasks"] else []):
        x = t["seconds"]
        lines.append(f"| {t['task']} | {x['train_extraction']:.0f} | {x['proxies']:.0f} | {x['search']:.0f} | "
                     f"{x['search_plus_hybrid_fits']:.0f} | {x['fit_every_backbone']:.0f} | "
                     f"{x['search'] / x['fit_every_backbone']:.2f} |")
    lines += ["", "## Does the multi-layer proxy predict HEAD2TOE better?", "", verdict(data), ""]
    return "\n".join(lines)


def verdict(data: dict) -> str:
    """The answer, computed from the numbers (mean Spearman and mean regret, multi-layer vs pre-logits)."""
    from h2t_edge.research.model_search import PAPER_PROXIES, PROXIES

    s = data["summary"]
    if not data["tasks"]:
        return "No task finished yet."

    def rho(p):
        return s["correlations"][f"{p}|head2toe_test"]["spearman"]

    pre = list(PAPER_PROXIES)  # the paper's pre-logits proxies (NC1 is a further pre-logits score, not the paper's)
    multi = [p for p in PROXIES if PROXIES[p][1] == "all"]
    reg = {p: s["regret"].get(f"{p}@1", {}).get("mean") for p in PROXIES}
    # each measure compares the best of each family on that measure (a user would keep the better proxy)
    rho_pre = max(pre, key=lambda p: -2 if rho(p) is None else rho(p))
    rho_multi = max(multi, key=lambda p: -2 if rho(p) is None else rho(p))
    reg_pre = min(pre, key=lambda p: 2 if reg[p] is None else reg[p])
    reg_multi = min(multi, key=lambda p: 2 if reg[p] is None else reg[p])
    # a difference must clear a margin to count: 0.1 in mean Spearman, 0.5 points of mean regret
    d_rho = (rho(rho_multi) or -2) - (rho(rho_pre) or -2)
    d_reg = (reg[reg_multi] - reg[reg_pre]) if None not in (reg[reg_multi], reg[reg_pre]) else 0.0
    better = (d_rho >= 0.1) + (d_reg <= -0.005)
    worse = (d_rho <= -0.1) + (d_reg >= 0.005)
    if better and not worse:
        answer = ("So on these tasks the multi-layer proxies predict HEAD2TOE accuracy better than the paper's "
                  "pre-logits proxies" + (" (the regrets are level within 0.5 points; the rank correlation decides)"
                                          if abs(d_reg) < 0.005 else "") + ".")
    elif worse and not better:
        answer = ("So on these tasks the multi-layer proxies do not predict HEAD2TOE accuracy better than the "
                  "paper's pre-logits proxies: they are worse.")
    elif not better and not worse:
        answer = ("The two are level (within 0.1 in mean Spearman and 0.5 points of mean regret), so these tasks do "
                  "not show that the multi-layer proxies predict HEAD2TOE accuracy better than the paper's "
                  "pre-logits proxies.")
    else:
        answer = ("The two measures disagree, so these tasks do not show that the multi-layer proxies predict "
                  "HEAD2TOE accuracy better than the paper's pre-logits proxies.")
    return (f"On {len(data['tasks'])} task(s), best of each family on each measure: mean Spearman correlation with "
            f"HEAD2TOE test accuracy {_corr(rho(rho_multi))} ({PROXIES[rho_multi][0]}) against {_corr(rho(rho_pre))} "
            f"({PROXIES[rho_pre][0]}); mean regret of the B = 1 pick {_pct(reg[reg_multi])} points "
            f"({PROXIES[reg_multi][0]}) against {_pct(reg[reg_pre])} ({PROXIES[reg_pre][0]}). " + answer
            + " With 4 backbones and few tasks this is weak evidence either way.")


def phase_report(tasks: list[str], work: Path, target_size: int) -> dict:
    data = build_report(tasks, work, target_size)
    atomic_write_json(RESULTS.with_suffix(".json"), data)
    atomic_write_text(RESULTS.with_suffix(".md"), report_markdown(data) + "\n")
    print(f"wrote {RESULTS.with_suffix('.json')} and {RESULTS.with_suffix('.md')} "
          f"({len(data['tasks'])} tasks; missing: {data['summary']['missing_tasks']})")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("fits", "search", "all", "report"), required=True,
                        help="'all': proxies of the fitted cells, then more fits, then their proxies (one lock)")
    parser.add_argument("--task", action="append", help="only these tasks (repeatable); default: every installed one")
    parser.add_argument("--work-dir", default="/work/scratch/search/suite")
    parser.add_argument("--target-size", "-T", type=int, default=512)
    parser.add_argument("--proxies", default=None, help="search phase: comma-separated subset (default: all)")
    parser.add_argument("--no-latency", action="store_true", help="search phase: skip the latency measurement")
    parser.add_argument("--minutes", type=float, default=19.0, help="start no new cell after this long")
    parser.add_argument("--stop-at", default=None, metavar="HH:MM",
                        help="also start no new cell after this UTC time (today)")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes
    if args.stop_at:
        hours, minutes = (int(v) for v in args.stop_at.split(":"))
        now = time.gmtime()
        stop = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hours, minutes, 0, 0, 0, 0)) - time.timezone
        deadline = min(deadline, stop)
    tasks = _tasks(args.task)
    if args.phase == "fits":
        phase_fits(tasks, work, args.target_size, deadline)
    elif args.phase == "search":
        phase_search(tasks, work, args.target_size, deadline,
                     tuple(args.proxies.split(",")) if args.proxies else None, not args.no_latency)
    elif args.phase == "all":
        phase_search(tasks, work, args.target_size, deadline)
        phase_report(tasks, work, args.target_size)  # a partial report first, in case the piece is cut short
        phase_fits(tasks, work, args.target_size, deadline)
        phase_search(tasks, work, args.target_size, deadline)
        phase_report(tasks, work, args.target_size)
    else:
        phase_report(tasks, work, args.target_size)


if __name__ == "__main__":
    main()
