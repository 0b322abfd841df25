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
`head/bias` float32[C]). `h2t_edge.steps.compile.compile_finetuned_step` turns it into a task graph + sidecar that
`h2t-edge predict` and `runtime.predictor` run like any other task.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from exporters import DEFAULT_BACKBONE
from h2t_edge.core.artifacts import FineTunedTask
from h2t_edge.core.datasets import ImageDataset
from h2t_edge.core.errors import FitError
from h2t_edge.core.progress import Progress


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
    from h2t_edge.selection import cpu_training_mode

    return cpu_training_mode()


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
    from h2t_edge.core.datasets import load_dataset
    from h2t_edge.steps.compile import weights_source
    from h2t_edge.steps.extract import FeatureCache, is_feature_cache

    source = Path(source)
    if is_feature_cache(source):
        cache = FeatureCache.open(source)
        rows = np.flatnonzero(cache.valid)
        dataset = ImageDataset(tuple(cache.manifest["images"][i] for i in rows), cache.labels[rows],
                               tuple(cache.classes), str(source))
        name = cache.manifest["backbone"]["name"]
        if backbone not in (None, name):
            raise FitError(f"feature cache {source} was extracted with {name}, not {backbone}; drop --backbone")
        return dataset, name, weights or weights_source(cache.manifest["backbone"]["weights"]), cache
    return load_dataset(source), backbone or DEFAULT_BACKBONE, weights or "bundled", None


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
    from h2t_edge.research.diagnose import tap_nc1

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
    from h2t_edge.core.datasets import load_dataset

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
