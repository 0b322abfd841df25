"""Distributed feature extraction on Ray: `h2t-edge extract --ray [ADDRESS]`.

The driver (this process) owns the feature cache exactly as local extraction does
(`h2t_edge.steps.extract`: same files, same lock, same per-batch progress record); Ray actors only
compute. Missing batches are grouped into shards of consecutive batches; each actor loads the
backbone once and runs whole shards, each batch with the same rows and the same engine as local
extraction, so the cache is bit-identical to a local run. Results are written as shards finish,
so an interrupted run resumes with the shards (batches) that are missing.

On a multi-node cluster the workers read the images by their paths: keep the dataset on storage
every node mounts at the same path. The backbone travels through Ray's object store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from h2t_edge.core.errors import H2TEdgeError, ServingError
from h2t_edge.steps.extract import BatchJob, load_rows

LOCAL = "local"  # address meaning: start a Ray instance on this machine


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ServingError(f"extraction on Ray needs the 'ray' package ({exc}); pip install -e '.[ray]'") from None
    return ray


class _ShardWorker:
    """A Ray actor: one backbone session, many shards."""

    def __init__(self, model: Any, job: BatchJob, threads: int):
        from runtime.backends import create_runner

        self.job = job
        options = dict(job.backend_options)
        # One engine thread per CPU Ray gave the actor (the engines' default is every core of the
        # node, which oversubscribes it when several actors share a node).
        if job.backend == "onnxruntime":
            options.setdefault("intra_op_threads", threads)
        elif job.backend == "openvino":
            options.setdefault("num_threads", threads)
        self.runner = create_runner(model, job.backend, **options)
        self.runner.activate()

    def run(self, shard: list[tuple[int, range]]) -> list[tuple[int, dict, list]]:
        """shard: [(batch index, rows)] -> [(batch index, {output: array}, [(row, error)])]."""
        out = []
        for b, rows in shard:
            images, errors = load_rows(self.job, rows)
            result = self.runner.infer({self.job.input_name: images})
            out.append((b, {name: result[name] for name in self.job.outputs}, errors))
        return out


@dataclass
class RayBatches:
    """A `features.BatchSource` that computes batches on Ray.

    address: a running cluster ('auto', 'ray://host:10001', 'host:6379'), or None / 'local' to
    start a local instance with `num_cpus` CPUs (stopped again afterwards).
    shard_batches: consecutive batches per shard (the unit of scheduling and of resuming).
    workers: actors, each with `cpus_per_worker` CPUs (default: as many as the cluster's CPUs allow).
    """

    address: str | None = None
    shard_batches: int = 4
    workers: int | None = None
    cpus_per_worker: float = 1.0
    num_cpus: int | None = None
    stats: dict | None = None  # filled per run: shards, workers, seconds to start

    def __post_init__(self) -> None:
        if self.shard_batches < 1:
            raise ServingError(f"shard_batches must be at least 1, got {self.shard_batches}")
        if self.workers is not None and self.workers < 1:
            raise ServingError(f"workers must be at least 1, got {self.workers}")

    def __call__(self, runner, job: BatchJob, batches: list[range], todo: list[int]) -> Iterator[tuple]:
        import time

        ray = _import_ray()
        from ray.util import ActorPool

        started = time.perf_counter()
        local = self.address in (None, LOCAL)
        if not local:
            _check_reachable(self.address)
        owns = not ray.is_initialized()
        if owns:
            try:
                ray.init(address=None if local else self.address, num_cpus=self.num_cpus if local else None,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - Ray raises several types for an unreachable cluster
                raise ServingError(f"cannot connect to Ray at {self.address or 'a new local instance'}: "
                                   f"{type(exc).__name__}: {exc}") from None
        try:
            # ONNX Runtime reads the model from bytes; other engines need a path every node sees.
            model = job.onnx_path.read_bytes() if job.backend == "onnxruntime" else str(Path(job.onnx_path).resolve())
            model_ref = ray.put(model)
            shards = [[(b, batches[b]) for b in todo[i:i + self.shard_batches]]
                      for i in range(0, len(todo), self.shard_batches)]
            # No more actors than the cluster can run at once: an actor still waiting for CPUs would
            # hold its shard until the others finish, which they never do (actors keep their CPUs).
            fits = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_worker))
            count = min(len(shards), self.workers or fits, fits)
            actor = ray.remote(num_cpus=self.cpus_per_worker)(_ShardWorker)
            threads = max(1, int(self.cpus_per_worker))
            pool = ActorPool([actor.remote(model_ref, job, threads) for _ in range(count)])
            self.stats = {"shards": len(shards), "workers": count}
            first = True
            for results in pool.map_unordered(lambda a, shard: a.run.remote(shard), shards):
                if first:
                    self.stats["seconds_to_first_shard"] = time.perf_counter() - started
                    first = False
                yield from results
        except ray.exceptions.RayError as exc:
            # A worker's typed error (an unreadable image, a backbone that does not load, in a task
            # or in an actor's constructor) reads as it would locally.
            cause = getattr(exc, "cause", None)
            cause = getattr(cause, "cause", cause)  # an actor that died of a RayTaskError
            if isinstance(cause, (H2TEdgeError, *_runtime_errors())):
                raise cause from None
            raise ServingError(f"a Ray worker failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        finally:
            if owns:
                ray.shutdown()


def _runtime_errors() -> tuple[type, ...]:
    from runtime.errors import H2TRuntimeError

    return (H2TRuntimeError,)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens at (Ray itself retries for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto' and other forms Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ServingError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head`, "
                           "or pass --ray without an address for a local instance") from None
