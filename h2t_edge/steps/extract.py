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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from h2t_edge.core.datasets import ImageDataset
from h2t_edge.core.errors import CacheError
from h2t_edge.core.layout import Layout
from h2t_edge.core.progress import StageProgress
from h2t_edge.core.schemas import CACHE_MANIFEST, LAYOUT, MULTI_LAYOUT
from runtime.errors import ImageError
from runtime.io import FileLock, atomic_write_bytes, atomic_write_json, file_sha256, read_json
from runtime.preprocess import PreprocessConfig, load_image, preprocess_image
from runtime.schema import content_sha256, validate

CACHE_FORMAT = "h2t-edge/feature-cache"
LAYOUT_KEY = "h2t_edge.layout"
MULTI_LAYOUT_KEY = "h2t_edge.multi_layout"  # exporters.multi_export (no torch import here)
DTYPES = {"float16": np.float16, "float32": np.float32}
LOCK_NAME = ".lock"  # held (flock) by the process writing the cache



def _onnx_metadata(onnx_path: str | Path, session=None) -> dict[str, str]:
    """The metadata properties of an ONNX file (from an open ONNX Runtime session when given)."""
    if session is not None:
        return session.get_modelmeta().custom_metadata_map
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def read_layout(onnx_path: str | Path, session=None) -> Layout:
    """The feature layout stored in an exported backbone's ONNX metadata."""
    meta = _onnx_metadata(onnx_path, session)
    if LAYOUT_KEY not in meta:
        raise CacheError(
            f"{onnx_path} has no h2t-edge feature layout in its metadata: "
            "export it with `h2t-edge export` first"
        )
    return Layout(_metadata_json(onnx_path, meta, LAYOUT_KEY, LAYOUT, "export the backbone again with `h2t-edge export`"))


def _metadata_json(onnx_path, meta: dict, key: str, schema, fix: str):
    """The JSON under metadata `key`, validated against `schema` (CacheError naming the ONNX file)."""
    what = f"feature layout (metadata {key!r}) of"
    try:
        data = json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise CacheError(f"{what} {onnx_path} is not valid JSON ({exc}); {fix}") from None
    return validate(data, schema, what=what, source=onnx_path, error=CacheError, fix=fix)


@dataclass
class FeatureCache:
    """An opened, complete feature cache."""

    root: Path
    manifest: dict
    features: np.ndarray  # float16/32[n, D], memory-mapped
    labels: np.ndarray  # int64[n]
    valid: np.ndarray  # bool[n]

    @property
    def layout(self) -> Layout:
        return Layout.of(self.manifest["layout"])

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
        manifest = read_manifest(root)
        if not manifest["complete"]:
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
        if (features.dtype != DTYPES[manifest["dtype"]] or labels.dtype != np.int64 or valid.dtype != bool
                or not np.array_equal(labels, manifest["labels"])):
            raise CacheError(f"feature cache {root}: array dtypes or labels do not match its manifest; extract again")
        return cls(root, manifest, features, labels, valid)


def is_feature_cache(path: str | Path) -> bool:
    """Whether PATH is a feature cache folder (has a manifest.json); `FeatureCache.open` checks the rest."""
    return (Path(path) / "manifest.json").is_file()


def read_manifest(root: str | Path) -> dict:
    """The validated `manifest.json` of the cache at `root` (CacheError naming the file and field otherwise)."""
    path = Path(root) / "manifest.json"
    fix = "delete the cache and extract again (or pass --overwrite)"
    manifest = validate(read_json(path, "feature cache manifest"), CACHE_MANIFEST, what="feature cache manifest",
                        source=path, error=CacheError, fix=fix)
    # Caches written before manifests were signed have no content_sha256; they are read as they are.
    if "content_sha256" in manifest and content_sha256(manifest, "content_sha256") != manifest["content_sha256"]:
        raise CacheError(f"feature cache manifest {path} was changed after it was written (its content does not "
                         f"match its content_sha256); {fix}")
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Write `root/manifest.json` atomically, signed with `content_sha256` (set in `manifest` too)."""
    manifest["content_sha256"] = content_sha256(manifest, "content_sha256")
    atomic_write_json(Path(root) / "manifest.json", manifest)


def cache_lock(root: str | Path) -> FileLock:
    """The lock a process holds on `root/.lock` while it writes the cache there."""
    return FileLock(Path(root) / LOCK_NAME, f"feature cache {root}", "wait for it to finish, or choose another "
                    "--cache directory", CacheError)


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
    progress: StageProgress | None = None,
    backend: str = "onnxruntime",
    backend_options: dict | None = None,
    batch_source: "BatchSource | None" = None,
) -> FeatureCache:
    """Extract pooled tap features of `dataset` with the exported backbone into `cache_dir`.

    backend: 'onnxruntime' (providers picks its execution providers), 'openvino' or 'tensorrt';
    backend_options go to the backend's loader (`runtime.backends.create_runner`).
    batch_source: where batches are computed (default `local_batches`; `h2t_edge.steps.extract_ray`
    has one on Ray); the cache is written here either way.

    on_error: 'raise' stops at the first unreadable image with an error naming it; 'skip' records
    it in the manifest, stores zeros and marks the row invalid.
    """
    caches = _extract(onnx_path, dataset, {None: cache_dir}, batch_size=batch_size, dtype=dtype,
                      on_error=on_error, providers=providers, overwrite=overwrite, progress=progress,
                      backend=backend, backend_options=backend_options, batch_source=batch_source)
    return caches[None]


def extract_features_multi(
    onnx_path: str | Path,
    dataset: ImageDataset,
    cache_dirs: dict[int, str | Path],
    **options,
) -> dict[int, FeatureCache]:
    """One backbone pass over `dataset` with a multi-target-size export
    (`exporters.multi_export.export_backbone_multi`), written as one FeatureCache per target size.

    cache_dirs: {T: directory}, a subset of the export's target sizes. Each cache holds exactly
    what a single-T export's cache holds (same layout, same features); its backbone identity is
    the multi export's sha256. Options as for `extract_features`; resumable the same way (a batch
    is rerun only where some cache lacks it).
    """
    return _extract(onnx_path, dataset, dict(cache_dirs), **options)


def read_multi_layout(onnx_path: str | Path, session=None) -> dict:
    """The per-target-size layouts stored in a multi-target-size export's ONNX metadata."""
    meta = _onnx_metadata(onnx_path, session)
    if MULTI_LAYOUT_KEY not in meta:
        raise CacheError(f"{onnx_path} is not a multi-target-size export (no {MULTI_LAYOUT_KEY} metadata); "
                         "export it with `exporters.multi_export.export_backbone_multi` or `h2t-edge train`")
    return _metadata_json(onnx_path, meta, MULTI_LAYOUT_KEY, MULTI_LAYOUT, "export it again")


@dataclass
class _CacheWriter:
    """One cache being filled by `_extract`: where its features come from and what is done."""

    root: Path
    layout: dict
    outputs: list[str]  # ONNX output per tap, in layout order
    done: np.ndarray  # bool[batches]
    features: np.ndarray | None = None
    valid: np.ndarray | None = None
    manifest: dict | None = None
    skipped: dict | None = None

    def open(self) -> None:
        self.features = np.load(self.root / "features.npy", mmap_mode="r+")
        self.valid = np.load(self.root / "valid.npy")
        self.manifest = read_manifest(self.root)
        self.skipped = {s["index"]: s for s in self.manifest["skipped"]}

    def write(self, b: int, rows: range, block: np.ndarray, errors, paths) -> None:
        for row, message in errors:
            block[row - rows.start] = 0
            self.skipped[row] = {"index": row, "path": paths[row], "error": message}
        with np.errstate(over="ignore"):  # overflow is checked just below, with the fix in the message
            stored = block.astype(self.features.dtype)
        if not np.isfinite(stored).all():
            raise CacheError(f"features of images {rows.start}..{rows.stop - 1} overflow {self.features.dtype} "
                             f"(|x| > {np.finfo(self.features.dtype).max:g}); extract with --dtype float32")
        self.features[rows.start:rows.stop] = stored
        self.valid[rows.start:rows.stop] = True
        for row, _ in errors:
            self.valid[row] = False
        # Order matters for resuming: data first, then the record that it is there.
        self.features.flush()
        _save_npy(self.root / "valid.npy", self.valid)
        if errors:
            self.manifest["skipped"] = sorted(self.skipped.values(), key=lambda s: s["index"])
            write_manifest(self.root, self.manifest)
        self.done[b] = True
        _save_npy(self.root / "progress.npy", self.done)

    def finish(self) -> None:
        self.features = None
        self.manifest["complete"] = True
        write_manifest(self.root, self.manifest)


@dataclass(frozen=True)
class BatchJob:
    """Everything needed to compute cache batches anywhere (this process or a Ray worker)."""

    onnx_path: Path
    backend: str
    backend_options: dict  # for `runtime.backends.create_runner`
    input_name: str
    outputs: list[str]  # the ONNX outputs any cache being filled needs
    preprocess: PreprocessConfig
    paths: list[str]  # every image of the dataset, by row
    on_error: str


# (runner, job, batches, todo) -> (batch index, {output: float32[rows, d]}, [(row, error)]) for each
# batch index in todo, in any order. The runner is the caller's, already active.
BatchSource = Callable[..., Iterator[tuple[int, dict, list]]]


def load_rows(job: BatchJob, rows: range) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode and preprocess images `rows` of the job: (float32[len(rows), 3, H, W], [(row, error)])."""
    images = np.zeros((len(rows), *job.preprocess.input_size), dtype=np.float32)
    errors = []
    for j, row in enumerate(rows):
        try:
            images[j] = preprocess_image(load_image(job.paths[row]), job.preprocess)
        except ImageError as exc:
            if job.on_error == "raise":
                raise ImageError(f"{exc} (use --on-error skip to skip and count such images)") from exc
            errors.append((row, str(exc)))
    return images, errors


def local_batches(runner, job: BatchJob, batches: list[range], todo: list[int]):
    """The default BatchSource: batches in order on `runner`, decoding the next batch on a
    thread while the current one runs."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_rows, job, batches[todo[0]])
        for k, b in enumerate(todo):
            images, errors = pending.result()
            if k + 1 < len(todo):
                pending = pool.submit(load_rows, job, batches[todo[k + 1]])
            yield b, runner.infer({job.input_name: images}), errors


def _extract(onnx_path, dataset: ImageDataset, cache_dirs: dict, *, batch_size: int = 32,
             dtype: str = "float16", on_error: str = "raise", providers="auto", overwrite: bool = False,
             progress: StageProgress | None = None, backend: str = "onnxruntime",
             backend_options: dict | None = None, batch_source: "BatchSource | None" = None) -> dict:
    """Fill one cache per key of cache_dirs; key None is a single-T export, an int T a target size
    of a multi-target-size export. batch_source computes the missing batches (default
    `local_batches`, in this process)."""
    from runtime.backends import create_runner

    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if on_error not in ("raise", "skip"):
        raise CacheError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    onnx_path = Path(onnx_path)
    options = dict(backend_options or {})
    if backend == "onnxruntime":
        options.setdefault("providers", providers)
    runner = create_runner(onnx_path, backend, **options)
    with runner, ExitStack() as locks:
        session = getattr(runner, "session", None)
        if None in cache_dirs:
            layout = read_layout(onnx_path, session)
            targets = {None: (layout, [t["output"] for t in layout["taps"]])}
        else:
            multi = read_multi_layout(onnx_path, session)
            missing = [t for t in cache_dirs if str(t) not in multi["layouts"]]
            if missing:
                raise CacheError(f"{onnx_path} was exported for target sizes {multi['target_sizes']}, not "
                                 f"{missing}; export it again with every target size you need")
            targets = {t: (Layout(multi["layouts"][str(t)]), multi["outputs"][str(t)]) for t in cache_dirs}
        onnx_sha256 = file_sha256(onnx_path)
        batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]
        writers = {}
        for key, (layout, outputs) in targets.items():
            header = {
                "format": CACHE_FORMAT,
                "version": 1,
                "backbone": {"name": layout.backbone, "weights": layout.weights,
                             "onnx_sha256": onnx_sha256, "onnx": str(onnx_path.resolve())},
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
            root = Path(cache_dirs[key])
            missing = [name for name in outputs if name not in runner.output_names]
            if layout["input"] not in runner.input_names or len(outputs) != len(layout["taps"]) or missing:
                raise CacheError(f"{onnx_path} has no tensor(s) {missing[:5]} that its layout names; "
                                 "export the backbone again")
            locks.enter_context(cache_lock(root))
            writers[key] = _CacheWriter(root, layout, outputs, _open_or_start(root, header, len(batches), overwrite))
        if all(w.done.all() for w in writers.values()):
            for w in writers.values():  # a run killed after its last batch, before marking its cache complete
                w.open()
                if not w.manifest["complete"]:
                    w.finish()
            return {key: FeatureCache.open(w.root) for key, w in writers.items()}
        for w in writers.values():
            w.open()
        first_layout = next(iter(targets.values()))[0]
        job = BatchJob(
            onnx_path=onnx_path, backend=backend, backend_options=options, input_name=first_layout["input"],
            outputs=sorted({name for w in writers.values() for name in w.outputs}),
            preprocess=PreprocessConfig.from_dict(first_layout.preprocess, source=f"{onnx_path} layout"),
            paths=list(dataset.paths), on_error=on_error,
        )
        todo = [b for b in range(len(batches)) if not all(w.done[b] for w in writers.values())]
        finished = len(batches) - len(todo)
        if progress:
            progress(finished * batch_size, len(dataset))
        for k, (b, result, errors) in enumerate((batch_source or local_batches)(runner, job, batches, todo)):
            rows = batches[b]
            for w in writers.values():
                if w.done[b]:
                    continue
                shapes = [result[name].shape[1:] for name in w.outputs]
                if shapes != [(t["features"],) for t in w.layout["taps"]]:
                    raise CacheError(f"{onnx_path} outputs per-image shapes {shapes} for taps {w.outputs}, its "
                                     f"layout says {[t['features'] for t in w.layout['taps']]}; export it again")
                block = np.concatenate([result[name] for name in w.outputs], axis=1)
                if not np.isfinite(block).all():
                    raise CacheError(
                        f"the backbone produced NaN/inf features for images {rows.start}..{rows.stop - 1} "
                        f"(first: {dataset.paths[rows.start]}); check the ONNX file {onnx_path}"
                    )
                w.write(b, rows, block, errors, dataset.paths)
            if progress:
                progress(min(len(dataset), (finished + k + 1) * batch_size), len(dataset))
        for w in writers.values():
            w.finish()
    return {key: FeatureCache.open(w.root) for key, w in writers.items()}


def _save_npy(path: Path, array: np.ndarray) -> None:
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _open_or_start(root: Path, header: dict, n_batches: int, overwrite: bool) -> np.ndarray:
    """Return the per-batch done flags, creating the cache files if needed."""
    manifest_path = root / "manifest.json"
    for stale in root.glob(".*.tmp"):  # temporary files of writes that a killed run left half done
        stale.unlink()
    if manifest_path.exists() and not overwrite:
        old = read_manifest(root)
        mismatch = [k for k in ("format", "backbone", "layout", "dataset", "images", "labels", "dtype", "batch_size")
                    if _identity(old.get(k), k) != _identity(header[k], k)]
        if mismatch:
            raise CacheError(
                f"{root} holds a feature cache with a different {', '.join(mismatch)}; "
                "choose another --cache directory or pass --overwrite to rebuild it"
            )
        try:
            done = np.load(root / "progress.npy")
        except (OSError, ValueError) as exc:
            raise CacheError(f"{root}/progress.npy is damaged ({exc}); pass --overwrite to rebuild") from exc
        if done.shape != (n_batches,) or done.dtype != bool:
            raise CacheError(f"{root}/progress.npy does not match the cache's {n_batches} batches; "
                             "pass --overwrite to rebuild")
        return done
    if overwrite and root.is_dir():
        # Everything but the lock file this process holds.
        for child in root.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    n, d = len(header["images"]), header["layout"]["total_features"]
    features = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=DTYPES[header["dtype"]], shape=(n, d))
    del features
    np.save(root / "labels.npy", np.asarray(header["labels"], dtype=np.int64))
    _save_npy(root / "valid.npy", np.zeros(n, dtype=bool))
    done = np.zeros(n_batches, dtype=bool)
    _save_npy(root / "progress.npy", done)
    write_manifest(root, {**header, "skipped": [], "complete": False})
    return done


def _identity(value, key: str):
    # The ONNX path may move; the hash identifies the backbone. The dataset's source (a folder or
    # manifest path) may differ for the same images: the fingerprint of paths, labels and classes
    # identifies it.
    if key == "backbone" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "onnx"}
    if key == "dataset" and isinstance(value, dict):
        return value.get("fingerprint")
    return value
