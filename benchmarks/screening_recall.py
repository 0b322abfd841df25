"""How much of the exact group-lasso ranking a cheap per-fold screen keeps (one CV fold).

    python benchmarks/screening_recall.py --task dspr_loc --target-size 8192

Trains the exact l21 heads (500 steps, lr {0.1, 0.01}, lambda {1e-3, 1e-5}) on fold 0's training
rows over every candidate, ranks features by ||W_i||, and reports for each screening statistic
(the strong-rule gradient norm that `SearchGrid.max_candidates` uses, and an ANOVA F statistic)
the share of the exact top-k (k = F x D) that falls inside the statistic's top B.
Writes benchmarks/results/screening_recall.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from h2t_edge.selection import kernels, screening, stratified_folds
from h2t_edge.suite.evaluate import task_features
from runtime.io import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "screening_recall.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dspr_loc")
    parser.add_argument("--target-size", type=int, default=8192)
    parser.add_argument("--work-dir", default="h2t-eval")
    args = parser.parse_args()
    x, y, _, _, n_classes = task_features(args.task, args.target_size, work_dir=args.work_dir, log=print)
    train = stratified_folds(y, 5, 0) != 0
    xt, yt = x[train], y[train]
    onehot = np.eye(n_classes, dtype=np.float32)[yt]
    grad = screening.strong_rule_scores(torch.from_numpy(xt), torch.from_numpy(onehot),
                                     torch.ones(1, len(yt)))[0].numpy()
    counts = onehot.sum(0)
    means = (onehot.T @ xt) / counts[:, None]
    between = (counts[:, None] * (means - xt.mean(0)) ** 2).sum(0) / (n_classes - 1)
    within = ((xt - means[yt]) ** 2).sum(0) / (len(yt) - n_classes)
    statistics = {"strong_rule": grad, "anova_f": between / np.maximum(within, 1e-30)}
    out = {"task": args.task, "target_size": args.target_size, "candidates": int(x.shape[1]), "recall": {}}
    for lr in (0.1, 0.01):
        start = time.perf_counter()
        weight, _ = kernels.train_heads(xt, yt, n_classes, np.ones((2, len(yt)), bool), [lr, lr], 500,
                                       penalty="l21", coefs=[1e-3, 1e-5])
        print(f"exact heads lr={lr}: {time.perf_counter() - start:.0f} s")
        for j, lam in enumerate((1e-3, 1e-5)):
            exact = np.argsort(-torch.linalg.vector_norm(weight[j], dim=1).numpy(), kind="stable")
            for name, stat in statistics.items():
                screened = np.argsort(-stat, kind="stable")
                for budget in (8192, 16384, 32768, 65536):
                    inside = np.zeros(x.shape[1], bool)
                    inside[screened[:budget]] = True
                    for fraction in (0.0005, 0.001, 0.005, 0.01, 0.02, 0.05):
                        k = int(x.shape[1] * fraction)
                        out["recall"][f"lr={lr} l21={lam} {name} B={budget} F={fraction}"] = \
                            float(inside[exact[:k]].mean())
    atomic_write_json(RESULTS, out)
    print(json.dumps(out["recall"], indent=1))


if __name__ == "__main__":
    main()
