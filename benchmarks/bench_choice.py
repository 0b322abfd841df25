"""The deploy-aware choice's threshold (issue 29, item 4): how large a latency saving must be before
`train` trades CV accuracy for it (`SearchGrid.min_saving`). No fitting and no timing: it reads the
recorded suite runs and writes benchmarks/results/choice.{json,md}.

    python benchmarks/bench_choice.py

1. Measurement spread. benchmarks/results/deploy_aware.json measured the `train` choice of every
   suite task under three rules in one run; where two rules chose the same graph (same method,
   same estimated latency) the graph was measured twice. |p50_a - p50_b| / backbone p50 per
   backend is how far one graph's batch-1 latency moves between two measurements on one machine:
   a saving below it cannot be seen by the user, so it cannot pay for accuracy.
2. The choice, re-made. From benchmarks/results/fit_speed.json's `default` engine (the path solver
   with the deploy-aware choice; 7 tasks x 3 seeds), the `train` choice among HEAD2TOE,
   HEAD2TOE+LINEAR and LINEAR (`train.protocol.choose`) under min_saving 0 (the rule before) and
   the default, against the best CV accuracy: the mean test accuracy each rule gives up. Only the
   choice among the three methods is re-made: each method's own row was chosen with min_saving 0
   when the suite ran (its CV tables are not recorded).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2t_edge.core.machine import measured_on  # noqa: E402
from h2t_edge.selection import SearchGrid  # noqa: E402
from h2t_edge.train.protocol import Candidate, choose  # noqa: E402
from runtime.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RULES = ("path", "default", "budget-1.02")  # deploy_aware's rule names, in fit_speed's engine names


def measurement_spread(deploy: dict, suite: list[dict]) -> list[dict]:
    """One row per graph measured twice: task, backend, rules, ms, spread (/ backbone p50)."""
    chosen = {(r["task"], r["engine"]): (r["guard"], round(r["methods"][r["guard"]]["latency"], 6))
              for r in suite if r["seed"] == 0 and r["engine"] in RULES}
    p50 = {(r["graph"], r["backend"]): r["p50_ms"] for r in deploy["rows"]}
    rows = []
    for backend in sorted({r["backend"] for r in deploy["rows"]}):
        backbone = p50[("backbone (logits)", backend)]
        for task in sorted({t for t, _ in chosen}):
            for i, a in enumerate(RULES):
                for b in RULES[i + 1:]:
                    same = chosen.get((task, a)) is not None and chosen.get((task, a)) == chosen.get((task, b))
                    ga, gb = (f"{task} {a}", backend), (f"{task} {b}", backend)
                    if same and ga in p50 and gb in p50:
                        rows.append({"task": task, "backend": backend, "rules": [a, b], "graph": chosen[(task, a)][0],
                                     "ms": [p50[ga], p50[gb]], "spread": abs(p50[ga] - p50[gb]) / backbone,
                                     "full": min(p50[ga], p50[gb]) >= 0.5 * backbone})
    return rows


def rechoose(suite: list[dict], min_savings: list[float]) -> list[dict]:
    """Per task and seed: the test accuracy of the best-CV choice and of the cheapest rule at each min_saving."""
    out = []
    for r in suite:
        if r["engine"] != "default":
            continue
        cands = [Candidate(m, 512, v["cv_accuracy"], v["cv_se"], v["n_features"], r["candidates"], {}, 0.0, "",
                           test_accuracy=v["test_accuracy"], latency=v["latency"]) for m, v in r["methods"].items()]
        best = choose(cands, "accuracy")
        row = {"task": r["task"], "seed": r["seed"], "best_cv": {"method": best.method, "test": best.test_accuracy,
                                                                  "latency": best.latency}}
        for s in min_savings:
            c = choose(cands, "cheapest", None, s)
            row[f"min_saving={s:g}"] = {"method": c.method, "test": c.test_accuracy, "latency": c.latency}
        out.append(row)
    return out


def main() -> None:
    deploy, speed = read_json(RESULTS / "deploy_aware.json", "deploy"), read_json(RESULTS / "fit_speed.json", "fit")
    spread = measurement_spread(deploy, speed["suite"])
    default = SearchGrid().min_saving
    rules = [0.0, default]
    cells = rechoose(speed["suite"], rules)
    summary = {}
    for s in rules:
        key = f"min_saving={s:g}"
        cost = [c["best_cv"]["test"] - c[key]["test"] for c in cells]
        summary[key] = {"mean_test_cost": statistics.fmean(cost), "max_test_cost": max(cost),
                        "mean_latency": statistics.fmean(c[key]["latency"] for c in cells),
                        "changed_from_best_cv": sum(c[key]["method"] != c["best_cv"]["method"] for c in cells)}
    summary["best_cv"] = {"mean_latency": statistics.fmean(c["best_cv"]["latency"] for c in cells)}
    result = {"format": "h2t-edge/bench-choice", "version": 1, "min_saving": default,
              "spread": {"pairs": spread, "median": statistics.median(p["spread"] for p in spread),
                         "max": max(p["spread"] for p in spread),
                         # graphs that run the whole backbone (a graph cut early runs in a fraction of it)
                         "median_full": statistics.median(p["spread"] for p in spread if p["full"])},
              "cells": cells, "summary": summary, "sources": ["deploy_aware.json", "fit_speed.json"],
              **measured_on()}
    atomic_write_json(RESULTS / "choice.json", result)
    atomic_write_text(RESULTS / "choice.md", markdown(result))


def markdown(r: dict) -> str:
    lines = ["# The deploy-aware choice's threshold", "",
             "Generated by `benchmarks/bench_choice.py` from deploy_aware.json and fit_speed.json (no new timing).", "",
             "## One graph measured twice (batch-1 p50, same run)", "",
             "| task | backend | rules | graph | ms | spread / backbone |", "|---|---|---|---|---|---:|"]
    lines += [f"| {p['task']} | {p['backend']} | {' = '.join(p['rules'])} | {p['graph']} | "
              f"{p['ms'][0]:.2f} / {p['ms'][1]:.2f} | {100 * p['spread']:.1f}% |" for p in r["spread"]["pairs"]]
    lines += ["", f"Median spread {100 * r['spread']['median']:.1f}% of the backbone's latency, "
                  f"{100 * r['spread']['median_full']:.1f}% over graphs that run the whole backbone, max "
                  f"{100 * r['spread']['max']:.1f}%. Default `min_saving` {r['min_saving']:g}, about twice the "
                  "typical spread of a whole-backbone graph: a smaller saving is within what one graph's own "
                  "measurements move on this machine (and within the error of the bytes model that estimates it).",
              "",
              "## The choice among HEAD2TOE, HEAD2TOE+LINEAR and LINEAR, re-made (7 tasks x 3 seeds)", "",
              "| rule | mean test cost vs best CV (points) | max cost | mean est. latency | choices changed |",
              "|---|---:|---:|---:|---:|"]
    for key, s in r["summary"].items():
        if key == "best_cv":
            lines.append(f"| best CV | 0 | 0 | {s['mean_latency']:.3f}x | 0 |")
        else:
            lines.append(f"| cheapest, {key} | {100 * s['mean_test_cost']:+.2f} | {100 * s['max_test_cost']:+.1f} | "
                         f"{s['mean_latency']:.3f}x | {s['changed_from_best_cv']} |")
    lines += ["", f"Machine: {r.get('machine', '?')}; {r.get('date', '')}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
