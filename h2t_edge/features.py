"""Run an exported backbone over a dataset and cache the pooled tap features on disk.

A `FeatureCache` is a directory:
- `manifest.json`: backbone identity (sha256 of the ONNX), the feature layout, the image list,
  labels, classes, dtype, skipped images and whether the run completed;
- `features.npy`: float16/float32[n, D], memory-mappable (`np.load(mmap_mode='r')`);
- `labels.npy`: int64[n]; `valid.npy`: bool[n] (False for images skipped as unreadable);
- `progress.npy`: bool[batches], rewritten atomically after each finished batch.

An interrupted run resumes at the first unfinished batch. A cache built from another backbone,
dataset, dtype or batch size is never reused silently: it is an error that names the fix.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import ImageError
from runtime.io import atomic_write_bytes, atomic_write_json, file_sha256, read_json
from runtime.preprocess import PreprocessConfig, load_image, preprocess_image

from .datasets import ImageDataset
from .errors import CacheError

CACHE_FORMAT = "h2t-edge/feature-cache"
LAYOUT_KEY = "h2t_edge.layout"
DTYPES = {"float16": np.float16, "float32": np.float32}

Progress = Callable[[int, int], None]


def read_layout(onnx_path: str | Path, session=None) -> dict:
    """The feature layout stored in an exported backbone's ONNX metadata."""
    if session is None:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
    else:
        meta = session.get_modelmeta().custom_metadata_map
    if LAYOUT_KEY not in meta:
        raise CacheError(
            f"{onnx_path} has no h2t-edge feature layout in its metadata: "
            "export it with `h2t-edge export` first"
        )
    return json.loads(meta[LAYOUT_KEY])


@dataclass
class FeatureCache:
    """An opened, complete feature cache."""

    root: Path
    manifest: dict
    features: np.ndarray  # float16/32[n, D], memory-mapped
    labels: np.ndarray  # int64[n]
    valid: np.ndarray  # bool[n]

    @property
    def layout(self) -> dict:
        return self.manifest["layout"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def backbone_sha256(self) -> str:
        return self.manifest["backbone"]["onnx_sha256"]

    def tap_columns(self, name: str) -> slice:
        for tap in self.layout["taps"]:
            if tap["name"] == name:
                return slice(tap["offset"], tap["offset"] + tap["features"])
        raise CacheError(f"feature cache {self.root} has no tap {name!r}")

    def arrays(self, columns: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Valid rows only, as (float32[n_valid, d], int64[n_valid])."""
        x = self.features if columns is None else self.features[:, columns]
        return np.asarray(x[self.valid], dtype=np.float32), self.labels[self.valid]

    @classmethod
    def open(cls, root: str | Path) -> "FeatureCache":
        root = Path(root)
        manifest = read_json(root / "manifest.json", "feature cache manifest")
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheError(f"{root / 'manifest.json'} is not an h2t-edge feature cache")
        if not manifest.get("complete"):
            raise CacheError(
                f"feature cache {root} is incomplete (an interrupted run): "
                "rerun the same `h2t-edge extract` command to resume it"
            )
        try:
            features = np.load(root / "features.npy", mmap_mode="r")
            labels = np.load(root / "labels.npy")
            valid = np.load(root / "valid.npy")
        except (OSError, ValueError) as exc:
            raise CacheError(f"feature cache {root} is damaged ({exc}); delete it and extract again") from exc
        n, d = len(manifest["images"]), manifest["layout"]["total_features"]
        if features.shape != (n, d) or labels.shape != (n,) or valid.shape != (n,):
            raise CacheError(f"feature cache {root}: array shapes do not match its manifest; extract again")
        return cls(root, manifest, features, labels, valid)


def extract_features(
    onnx_path: str | Path,
    dataset: ImageDataset,
    cache_dir: str | Path,
    *,
    batch_size: int = 32,
    dtype: str = "float16",
    on_error: str = "raise",
    providers="auto",
    overwrite: bool = False,
    progress: Progress | None = None,
    backend: str = "onnxruntime",
    backend_options: dict | None = None,
) -> FeatureCache:
    """Extract pooled tap features of `dataset` with the exported backbone into `cache_dir`.

    backend: 'onnxruntime' (providers picks its execution providers), 'openvino' or 'tensorrt';
    backend_options go to the backend's loader (`runtime.backends.create_runner`).

    on_error: 'raise' stops at the first unreadable image with an error naming it; 'skip' records
    it in the manifest, stores zeros and marks the row invalid.
    """
    from runtime.backends import create_runner

    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if on_error not in ("raise", "skip"):
        raise CacheError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    onnx_path, root = Path(onnx_path), Path(cache_dir)
    options = dict(backend_options or {})
    if backend == "onnxruntime":
        options.setdefault("providers", providers)
    runner = create_runner(onnx_path, backend, **options)
    with runner:
        layout = read_layout(onnx_path, getattr(runner, "session", None))
        header = {
            "format": CACHE_FORMAT,
            "version": 1,
            "backbone": {"name": layout["backbone"], "weights": layout["weights"],
                         "onnx_sha256": file_sha256(onnx_path), "onnx": str(onnx_path.resolve())},
            "layout": layout,
            "dataset": {"source": dataset.source, "fingerprint": dataset.fingerprint()},
            "images": list(dataset.paths),
            "labels": dataset.labels.tolist(),
            "classes": list(dataset.classes),
            "dtype": dtype,
            "batch_size": batch_size,
            # ONNX Runtime reports its execution provider; other backends their name.
            "provider": getattr(runner, "provider", runner.name),
        }
        batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]
        done = _open_or_start(root, header, len(batches), overwrite)
        if done.all():
            return FeatureCache.open(root)
        features = np.load(root / "features.npy", mmap_mode="r+")
        valid = np.load(root / "valid.npy")
        manifest = read_json(root / "manifest.json", "feature cache manifest")
        skipped = {s["index"]: s for s in manifest["skipped"]}
        cfg = PreprocessConfig.from_dict(layout["preprocess"], source=f"{onnx_path} layout")
        outputs = [(t["output"], t["offset"], t["features"]) for t in layout["taps"]]

        def load(rows: range) -> tuple[np.ndarray, list[tuple[int, str]]]:
            images = np.zeros((len(rows), *cfg.input_size), dtype=np.float32)
            errors = []
            for j, row in enumerate(rows):
                try:
                    images[j] = preprocess_image(load_image(dataset.paths[row]), cfg)
                except ImageError as exc:
                    if on_error == "raise":
                        raise ImageError(f"{exc} (use --on-error skip to skip and count such images)") from exc
                    errors.append((row, str(exc)))
            return images, errors

        todo = [b for b, d in zip(batches, done) if not d]
        finished = len(batches) - len(todo)
        if progress:
            progress(finished * batch_size, len(dataset))
        # Decode and resize the next batch on a thread while the current one runs.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, todo[0])
            for k, rows in enumerate(todo):
                images, errors = pending.result()
                if k + 1 < len(todo):
                    pending = pool.submit(load, todo[k + 1])
                result = runner.infer({layout["input"]: images})
                block = np.concatenate([result[name] for name, _, _ in outputs], axis=1)
                if not np.isfinite(block).all():
                    raise CacheError(
                        f"the backbone produced NaN/inf features for images {rows.start}..{rows.stop - 1} "
                        f"(first: {dataset.paths[rows.start]}); check the ONNX file {onnx_path}"
                    )
                for row, message in errors:
                    block[row - rows.start] = 0
                    skipped[row] = {"index": row, "path": dataset.paths[row], "error": message}
                features[rows.start:rows.stop] = block.astype(features.dtype)
                valid[rows.start:rows.stop] = True
                for row, _ in errors:
                    valid[row] = False
                # Order matters for resuming: data first, then the record that it is there.
                features.flush()
                _save_npy(root / "valid.npy", valid)
                if errors:
                    manifest["skipped"] = sorted(skipped.values(), key=lambda s: s["index"])
                    atomic_write_json(root / "manifest.json", manifest)
                done[batches.index(rows)] = True
                _save_npy(root / "progress.npy", done)
                if progress:
                    progress(min(len(dataset), (finished + k + 1) * batch_size), len(dataset))
        del features
        manifest["complete"] = True
        atomic_write_json(root / "manifest.json", manifest)
    return FeatureCache.open(root)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _open_or_start(root: Path, header: dict, n_batches: int, overwrite: bool) -> np.ndarray:
    """Return the per-batch done flags, creating the cache files if needed."""
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not overwrite:
        old = read_json(manifest_path, "feature cache manifest")
        mismatch = [k for k in ("format", "backbone", "layout", "dataset", "images", "labels", "dtype", "batch_size")
                    if _identity(old.get(k), k) != _identity(header[k], k)]
        if mismatch:
            raise CacheError(
                f"{root} holds a feature cache with a different {', '.join(mismatch)}; "
                "choose another --cache directory or pass --overwrite to rebuild it"
            )
        try:
            return np.load(root / "progress.npy")
        except (OSError, ValueError) as exc:
            raise CacheError(f"{root}/progress.npy is damaged ({exc}); pass --overwrite to rebuild") from exc
    if root.exists() and overwrite:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    n, d = len(header["images"]), header["layout"]["total_features"]
    features = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=DTYPES[header["dtype"]], shape=(n, d))
    del features
    np.save(root / "labels.npy", np.asarray(header["labels"], dtype=np.int64))
    _save_npy(root / "valid.npy", np.zeros(n, dtype=bool))
    done = np.zeros(n_batches, dtype=bool)
    _save_npy(root / "progress.npy", done)
    atomic_write_json(manifest_path, {**header, "skipped": [], "complete": False})
    return done


def _identity(value, key: str):
    # The ONNX path may move; the hash identifies the backbone.
    if key == "backbone" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "onnx"}
    return value
