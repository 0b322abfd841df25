"""Layer-FT and SCL-FT: fine-tune one block of the backbone plus a linear head (seed paper Sec. 3.3).

Training follows the paper's general setup (Appendix B): SGD, momentum 0.9, weight decay 1e-4,
cosine learning rate from 0.1 down to 1e-4 over 200 epochs; batches of 64 (the paper's Table-2
setting; its general setup names no batch size). The head starts at zero. Only the tuned block
and the head learn; the tuned block's normalisation layers run in training mode and learn the
downstream statistics (paper: "we always let the normalization layers update the running means
and variances on the downstream data"). Every other weight, and every other statistic, stays the
pretrained one: the shared backbone prefix stays shared between tasks, and it is what makes the
one-pass cache below exact. `FineTuneConfig` scales epochs down only when asked.

CPU efficiency: the frozen prefix (segments before the tuned block) runs once over the training
images (`prefix_activations`), and every epoch trains only the tuned block and what follows it.
Inputs are therefore not augmented (none is in the paper's transfer recipe either).

A fine-tuned task is a directory: `task.json` (format `h2t-edge/finetuned-task`: method, layer,
classes, preprocessing, backbone identity and probe, config, report, sha256 of the weights) and
`tuned.safetensors` (`tuned/<name>` the block's state dict, `head/weight` float32[D, C],
`head/bias` float32[C]). `compile_finetuned_step` turns it into a task graph + sidecar that
`h2t-edge predict` and `runtime.predictor` run like any other task.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError
from runtime.io import atomic_write_bytes, atomic_write_json, read_json

from .datasets import ImageDataset
from .errors import FitError, TaskArtifactError

FINETUNED_FORMAT = "h2t-edge/finetuned-task"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FineTuneConfig:
    """Training settings; the defaults are the paper's (Appendix B, general setup)."""

    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.1
    lr_min: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise FitError(f"fine-tuning needs epochs >= 1 and batch_size >= 2 (batch statistics); got "
                           f"epochs={self.epochs}, batch_size={self.batch_size}")
        if not 0 <= self.lr_min <= self.lr:
            raise FitError(f"learning rates must satisfy 0 <= lr_min <= lr; got lr={self.lr}, lr_min={self.lr_min}")

    def lr_at(self, step: int, steps: int) -> float:
        """Cosine annealing from lr (step 0) to lr_min (last step) (Loshchilov & Hutter)."""
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * step / max(1, steps - 1)))


@dataclass
class FineTunedTask:
    """A fine-tuned task: the tuned block's weights and the linear head on its features."""

    task: str
    method: str  # 'LAYER-FT' | 'SCL-FT'
    layer: str
    classes: list[str]
    tuned: dict[str, np.ndarray]  # the block's state dict
    weight: np.ndarray  # float32[D_pre, C]
    bias: np.ndarray  # float32[C]
    backbone: dict  # name, weights (provenance), probe
    preprocess: dict
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def save(self, root: str | os.PathLike) -> Path:
        from safetensors.numpy import save

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        tensors = {f"tuned/{k}": np.ascontiguousarray(v) for k, v in self.tuned.items()}
        tensors["head/weight"] = np.ascontiguousarray(self.weight, dtype=np.float32)
        tensors["head/bias"] = np.ascontiguousarray(self.bias, dtype=np.float32)
        blob = save(tensors)
        atomic_write_bytes(root / "tuned.safetensors", blob)
        # written last: a task.json always describes the weights next to it
        atomic_write_json(root / "task.json", {
            "format": FINETUNED_FORMAT, "version": 1, "task": self.task, "method": self.method,
            "layer": self.layer, "classes": self.classes, "backbone": self.backbone, "preprocess": self.preprocess,
            "config": self.config, "report": self.report, "weights_sha256": hashlib.sha256(blob).hexdigest(),
        })
        return root

    @classmethod
    def load(cls, root: str | os.PathLike) -> "FineTunedTask":
        from safetensors.numpy import load

        root = Path(root)
        meta = read_json(root / "task.json", "fine-tuned task")
        if not isinstance(meta, dict) or meta.get("format") != FINETUNED_FORMAT or meta.get("version") != 1:
            raise TaskArtifactError(f"{root / 'task.json'} is not an h2t-edge fine-tuned task (version 1); "
                                    "make one with `h2t-edge finetune`")
        missing = [k for k in ("task", "method", "layer", "classes", "backbone", "preprocess", "weights_sha256")
                   if k not in meta]
        if missing:
            raise TaskArtifactError(f"{root / 'task.json'}: field {missing[0]!r} is missing; fine-tune again")
        path = root / "tuned.safetensors"
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise TaskArtifactError(f"cannot read {path}: {exc}; fine-tune the task again") from exc
        if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
            raise TaskArtifactError(f"{path} does not match {root / 'task.json'} (interrupted or mixed write); "
                                    "fine-tune the task again")
        t = load(blob)
        task = cls(meta["task"], meta["method"], meta["layer"], list(meta["classes"]),
                   {k[len("tuned/"):]: v for k, v in t.items() if k.startswith("tuned/")},
                   t["head/weight"], t["head/bias"], meta["backbone"], meta["preprocess"],
                   meta.get("config", {}), meta.get("report", {}))
        if task.weight.ndim != 2 or task.weight.shape[1] != len(task.classes) or task.bias.shape != (len(task.classes),):
            raise TaskArtifactError(f"{path}: head shape {task.weight.shape} does not match the "
                                    f"{len(task.classes)} classes; fine-tune again")
        return task

    @property
    def task_bytes(self) -> int:
        """Bytes this task adds beside the shared backbone: tuned block (weights + statistics) + head."""
        return int(sum(v.nbytes for k, v in self.tuned.items() if not k.endswith("num_batches_tracked"))
                   + self.weight.nbytes + self.bias.nbytes)


# ----------------------------------------------------------------------------- training


def prefix_activations(model, dataset: ImageDataset, preprocess: dict, batch_size: int = 32,
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One forward pass of the frozen prefix: float32[n, *shape at the tuned block's input]."""
    import torch

    from runtime.preprocess import PreprocessConfig, preprocess_batch

    cfg = PreprocessConfig.from_dict(preprocess, source="backbone preprocessing")
    out = None
    with torch.no_grad(), _threads():
        for start in range(0, len(dataset), batch_size):
            images = preprocess_batch(dataset.paths[start:start + batch_size], cfg)
            acts = model.prefix(torch.from_numpy(images)).numpy()
            if out is None:
                out = np.empty((len(dataset), *acts.shape[1:]), dtype=np.float32)
            out[start:start + len(acts)] = acts
            if progress:
                progress(min(start + batch_size, len(dataset)), len(dataset))
    if out is None:
        raise FitError(f"dataset {dataset.source} has no images to fine-tune on")
    return out


def train_finetuned(model, activations: np.ndarray, labels: np.ndarray, n_classes: int,
                    config: FineTuneConfig = FineTuneConfig(),
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Train `model.tuned` and a zero-initialised linear head on cached prefix activations.

    activations: float32[n, ...] (`prefix_activations`); labels: int[n] in [0, n_classes).
    Returns {'weight': float32[D, C], 'bias': float32[C], 'history': [{epoch, loss, train_acc}],
    'seconds': training wall time}. The model is left in eval mode with the tuned weights.
    """
    import torch

    labels = np.array(labels, dtype=np.int64)  # a writable copy (datasets freeze theirs)
    if len(activations) != len(labels) or len(labels) < 2:
        raise FitError(f"fine-tuning needs at least 2 examples with one label each; got {len(activations)} "
                       f"activations and {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise FitError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    start = time.perf_counter()
    with _threads():
        torch.manual_seed(config.seed)
        head = torch.nn.Linear(model.pre_logits_dim, n_classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        params = [p for p in model.tuned.parameters()] + list(head.parameters())
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        x, y = torch.from_numpy(np.array(activations, dtype=np.float32)), torch.from_numpy(labels)
        rng = np.random.default_rng(config.seed)
        n_batches = max(1, round(len(y) / config.batch_size))
        steps, step, history = config.epochs * n_batches, 0, []
        model.train()
        for epoch in range(config.epochs):
            # near-equal batches: never a batch of one, whose batch statistics are undefined
            total_loss, correct = 0.0, 0
            for rows in np.array_split(rng.permutation(len(y)), n_batches):
                rows = torch.from_numpy(rows)
                for group in opt.param_groups:
                    group["lr"] = config.lr_at(step, steps)
                logits = head(model.from_prefix(x[rows]))
                loss = torch.nn.functional.cross_entropy(logits, y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                total_loss += float(loss.detach()) * len(rows)
                correct += int((logits.argmax(1) == y[rows]).sum())
            if not math.isfinite(total_loss):
                raise FitError(f"fine-tuning diverged (loss {total_loss}) at epoch {epoch + 1}; lower --lr")
            history.append({"epoch": epoch + 1, "loss": total_loss / len(y), "train_acc": correct / len(y)})
            if progress:
                progress(epoch + 1, config.epochs)
        model.eval()
    return {"weight": head.weight.detach().numpy().T.copy(), "bias": head.bias.detach().numpy().copy(),
            "history": history, "seconds": time.perf_counter() - start}


def finetuned_logits(model, activations: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                     batch_size: int = 256) -> np.ndarray:
    """float32[n, C] logits of a trained model on prefix activations float32[n, ...] (eval mode)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad(), _threads():
        for start in range(0, len(activations), batch_size):
            feats = model.from_prefix(torch.from_numpy(np.array(activations[start:start + batch_size], dtype=np.float32)))
            out.append(feats.numpy() @ weight + bias)
    return np.concatenate(out).astype(np.float32)


def _threads():
    from .select import _cpu_training_mode

    return _cpu_training_mode()


# ----------------------------------------------------------------------------- steps


@dataclass
class FineTuneReport:
    task: FineTunedTask
    out: Path
    prefix_seconds: float
    train_seconds: float
    task_bytes: int
    test_accuracy: float | None = None


def _training_set(source: str | os.PathLike, backbone: str | None, weights: str | None):
    """(dataset of valid rows, backbone name, weights source, cache or None) from a feature cache
    directory (images, labels and backbone come from its manifest) or an image dataset."""
    from .datasets import load_dataset
    from .features import FeatureCache
    from .pipeline import _weights_source

    source = Path(source)
    if (source / "manifest.json").exists():
        cache = FeatureCache.open(source)
        rows = np.flatnonzero(cache.valid)
        dataset = ImageDataset(tuple(cache.manifest["images"][i] for i in rows), cache.labels[rows],
                               tuple(cache.classes), str(source))
        name = cache.manifest["backbone"]["name"]
        if backbone not in (None, name):
            raise FitError(f"feature cache {source} was extracted with {name}, not {backbone}; drop --backbone")
        return dataset, name, weights or _weights_source(cache.manifest["backbone"]["weights"]), cache
    return load_dataset(source), backbone or "efficientnet_lite0", weights or "bundled", None


def choose_layer(backbone, layer: str, cache=None) -> str:
    """A segment name from `layer`: a rule of `exporters.finetune_graph.paper_layer`, 'nc1' (the
    stage-opening block whose output features have the lowest NC1 on the training cache), or a
    segment name."""
    from exporters.finetune_graph import LAYER_RULES, paper_layer, tuning_units

    if layer in LAYER_RULES:
        return paper_layer(backbone, layer)
    if layer != "nc1":
        return layer
    if cache is None:
        raise FitError("--layer nc1 needs a feature cache as the training source (its taps give the NC1 per block)")
    from .diagnose import tap_nc1

    taps = {t["name"] for t in cache.layout["taps"]}
    units = [u for u in tuning_units(backbone) if u in taps]
    if not units:
        raise FitError(f"the feature cache {cache.root} has no block-output taps; export with all taps for --layer nc1")
    scores = tap_nc1(cache, units)
    return min(units, key=lambda u: scores[u])


def finetune_step(
    source: str | os.PathLike, out: str | os.PathLike, *, method: str = "SCL-FT", layer: str = "last-stage",
    backbone: str | None = None, weights: str | None = None, config: FineTuneConfig = FineTuneConfig(),
    test: str | os.PathLike | None = None, task: str | None = None, batch_size: int = 32,
    progress: Progress | None = None,
) -> FineTuneReport:
    """Fine-tune `layer` + head on `source` (a feature cache or an image dataset) and write the task
    directory `out`. test: an image dataset with the same classes, for a test accuracy."""
    from exporters.backbones import load_backbone
    from exporters.export import backbone_probe
    from exporters.finetune_graph import FineTunedModel, summarize

    from .datasets import load_dataset

    dataset, name, weights_source, cache = _training_set(source, backbone, weights)
    bb = load_backbone(name, weights=weights_source)
    layer = choose_layer(bb, layer, cache)
    model = FineTunedModel(bb, layer, method)
    stage = (lambda s: (lambda d, t: progress(s, d, t))) if progress else (lambda s: None)
    t0 = time.perf_counter()
    acts = prefix_activations(model, dataset, bb.preprocess, batch_size, stage("prefix activations"))
    prefix_seconds = time.perf_counter() - t0
    trained = train_finetuned(model, acts, dataset.labels, len(dataset.classes), config, stage(f"{method} epochs"))
    summary = summarize(model, bb, trained["weight"])
    report = {"train_examples": len(dataset), "prefix_seconds": prefix_seconds, "train_seconds": trained["seconds"],
              "history": trained["history"], "tuned_parameters": summary.tuned_parameters,
              "tuned_fraction": summary.tuned_fraction, "task_bytes": summary.task_bytes}
    accuracy = None
    if test is not None:
        test_set = load_dataset(test, classes=dataset.classes)
        test_acts = prefix_activations(model, test_set, bb.preprocess, batch_size, stage("test prefix"))
        logits = finetuned_logits(model, test_acts, trained["weight"], trained["bias"])
        accuracy = float((logits.argmax(1) == test_set.labels).mean())
        report["test_accuracy"] = accuracy
    result = FineTunedTask(
        task=task or Path(out).name, method=method, layer=layer, classes=list(dataset.classes),
        tuned={k: v.numpy() for k, v in model.tuned_state().items()}, weight=trained["weight"],
        bias=trained["bias"], backbone={"name": name, "weights": bb.weights, "probe": backbone_probe(bb)},
        preprocess=bb.preprocess, config=asdict(config), report=report,
    )
    result.save(out)
    return FineTuneReport(result, Path(out), prefix_seconds, trained["seconds"], result.task_bytes, accuracy)


def is_finetuned_task(task_dir: str | os.PathLike) -> bool:
    """True when TASK_DIR/task.json is a fine-tuned task (as opposed to a frozen-backbone head)."""
    try:
        meta = read_json(Path(task_dir) / "task.json", "task")
    except ArtifactError:  # missing or unreadable: the real loader names the problem
        return False
    return isinstance(meta, dict) and meta.get("format") == FINETUNED_FORMAT


def compile_finetuned_step(task_dir: str | os.PathLike, out: str | os.PathLike, weights: str | None = None):
    """Compile a fine-tuned task into OUT.onnx + OUT.json (the runtime's sidecar), through the same
    `export_module` as `h2t-edge compile`. Returns (path, onnx bytes, FineTunedSummary)."""
    from exporters.backbones import load_backbone
    from exporters.compile import OUTPUT_NAMES
    from exporters.finetune_graph import compile_finetuned_graph

    from .pipeline import _weights_source, write_task_graph

    task = FineTunedTask.load(task_dir)
    bb = load_backbone(task.backbone["name"], weights=weights or _weights_source(task.backbone["weights"]))
    model, summary = compile_finetuned_graph(bb, task.layer, task.method, task.tuned, task.weight, task.bias,
                                             probe=task.backbone.get("probe"))
    path = Path(out)
    if path.suffix != ".onnx":
        path = path.with_suffix(".onnx")
    blob = model.SerializeToString()
    sidecar = {
        "format": "h2t-edge/task-graph", "version": 1, "task": task.task, "method": task.method,
        "classes": task.classes, "preprocess": task.preprocess, "input": "images",
        "outputs": {"probabilities": OUTPUT_NAMES[0], "logits": OUTPUT_NAMES[1]},
        "backbone": {"name": task.backbone["name"], "weights": task.backbone["weights"]},
        "graph_sha256": hashlib.sha256(blob).hexdigest(), "tuned_layer": task.layer,
        "task_bytes": summary.task_bytes, "tuned_parameters": summary.tuned_parameters,
    }
    write_task_graph(path, blob, sidecar)
    return path, path.stat().st_size, summary
