"""`h2t-edge train` with its defaults as the data grows (issue 29): Fashion-MNIST (the Debian package
`dataset-fashion-mnist`) at 1k, 5k, 20k and 50k training images, 1,000 test images.

    flock /tmp/h2t-bench.lock python benchmarks/bench_scale.py [--sizes 1000,5000] [--work-dir h2t-scale]

Each size runs `h2t-edge train` in its own process, watched from here: wall time split by step
(the task's report.json timings), the peak anonymous memory (RssAnon: what the fit allocates) and,
beside it, the peak file-backed resident memory (RssFile: the memory-mapped feature cache's pages,
which the kernel can drop), sampled from /proc every 0.2 s, and the chosen model's test accuracy.
Results go to benchmarks/results/scale.json as each size ends (a rerun skips finished sizes), with
scale.md and scale.png (seconds and GiB against n) rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2t_edge.core.machine import measured_on  # noqa: E402
from runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "scale"
SIZES = (1000, 5000, 20000, 50000)
GIB = float(1 << 30)


def _status_kib(pid: int) -> dict[str, int]:
    """RssAnon and RssFile of a process in KiB (empty once it has ended)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines())
            if k in ("RssAnon", "RssFile")}


def run_size(n: int, work: Path, log) -> dict:
    """One `h2t-edge train` with its defaults on n Fashion-MNIST training images."""
    from h2t_edge.suite.tasks.registry import build_task

    data = build_task("fashion_mnist", work / "data", 0, n_train=n, n_val=0, n_test=1000)
    manifest = data.train.to_manifest(work / f"train-{n}.jsonl")
    test_dir = Path(data.test.paths[0]).parent.parent  # class folders
    task_dir = work / f"task-{n}"
    cmd = [sys.executable, "-m", "h2t_edge.cli", "train", str(manifest), "-o", str(task_dir), "--test", str(test_dir),
           "--cache-dir", str(work / "cache"), "-q"]
    log(f"n={n}: {' '.join(cmd)}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for key, kib in _status_kib(proc.pid).items():
            peak[key] = max(peak[key], kib)
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train at n={n} failed (exit {proc.returncode}); see its output above")
    report = read_json(task_dir / "report.json", "train report")
    return {"n_train": n, "n_test": 1000, "wall_seconds": wall, "timings": report["timings"],
            "peak_anon_gib": peak["RssAnon"] * 1024 / GIB, "peak_file_gib": peak["RssFile"] * 1024 / GIB,
            "chosen": report["chosen"]["key"], "test_accuracy": report["chosen"]["test_accuracy"],
            "rungs": report.get("rungs", {}), **measured_on()}


def markdown(results: dict) -> str:
    rows = sorted(results["sizes"].values(), key=lambda r: r["n_train"])
    lines = ["# `h2t-edge train` defaults against the number of training images", "",
             "Fashion-MNIST, EfficientNet-Lite0, target sizes 512 / 2048 / 8192, 1,000 test images, one process per "
             "size (`benchmarks/bench_scale.py`). Peak anon: RssAnon; peak file: RssFile (the memory-mapped feature "
             "cache), sampled every 0.2 s.", "",
             "| n | machine | wall s | export s | extract s | fit s | compile s | peak anon GiB | peak file GiB | chosen | "
             "test % |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        t = r["timings"]
        extract = sum(v for k, v in t.items() if k.startswith("extract"))
        lines.append(f"| {r['n_train']:,} | {r['machine']} | {r['wall_seconds']:.0f} | {t.get('export', 0):.0f} | "
                     f"{extract:.0f} | {t.get('fit', 0):.0f} | {t.get('compile', 0):.0f} | {r['peak_anon_gib']:.2f} | "
                     f"{r['peak_file_gib']:.2f} | {r['chosen']} | {100 * r['test_accuracy']:.1f} |")
    return "\n".join(lines + ["", "![seconds and GiB against n](scale.png)", ""])


def figure(results: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["sizes"].values(), key=lambda r: r["n_train"])
    n = [r["n_train"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["wall_seconds"] for r in rows], "o-", label="wall")
    left.plot(n, [r["timings"].get("fit", 0) for r in rows], "s-", label="fit")
    left.plot(n, [sum(v for k, v in r["timings"].items() if k.startswith("extract")) for r in rows], "^-",
              label="extract")
    left.set(xlabel="training images", ylabel="seconds", xscale="log", yscale="log", title="time")
    right.plot(n, [r["peak_anon_gib"] for r in rows], "o-", label="peak RssAnon")
    right.plot(n, [r["peak_file_gib"] for r in rows], "s--", label="peak RssFile (cache pages)")
    right.set(xlabel="training images", ylabel="GiB", xscale="log", title="memory")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--work-dir", default="h2t-scale")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = OUT.with_suffix(".json")
    results = read_json(path, "scale results") if path.exists() else {"format": "h2t-edge/bench-scale", "version": 1,
                                                                      "sizes": {}}
    for n in (int(s) for s in args.sizes.split(",")):
        if str(n) in results["sizes"]:
            continue
        results["sizes"][str(n)] = run_size(n, work, lambda m: print(m, file=sys.stderr, flush=True))
        atomic_write_json(path, results)
        atomic_write_text(OUT.with_suffix(".md"), markdown(results))
        atomic_write_bytes(OUT.with_suffix(".png"), figure(results))
        print(json.dumps(results["sizes"][str(n)], indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
