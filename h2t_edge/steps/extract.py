"""Run an exported backbone over a dataset and cache the pooled tap features on disk.

A `FeatureCache` is a directory:
- `manifest.json`: backbone identity (sha256 of the ONNX), the feature layout, the image list,
  labels, classes, dtype, skipped images and whether the run completed; sealed
  (`runtime.trust.seal`: its `content_sha256` is mandatory) and, once complete, holding the sha256
  of every batch of rows (`batch_sha256`) and of labels.npy (`labels_sha256`);
- `features.npy`: float16/float32[n, D], memory-mappable (`np.load(mmap_mode='r')`);
- `labels.npy`: int64[n]; `valid.npy`: bool[n] (False for images skipped as unreadable);
- `digests.npy`: uint8[batches, 32], the sha256 of each finished batch's rows of features.npy (in
  their dtype, C order) followed by their valid flags, saved before the batch is marked done;
- `progress.npy`: bool[batches], rewritten atomically after each finished batch.

An interrupted run resumes at the first unfinished batch, after checking the batches already done
against their digests. `FeatureCache.open` recomputes every batch digest: a row edited in place, a
manifest edited or stripped of its digest, or labels swapped in from elsewhere are refused, naming
the file. A cache built from another backbone, dataset, dtype, batch size or cache format version
is never reused silently: it is an error that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from h2t_edge.core.schemas import CACHE_MANIFEST, CACHE_MANIFEST_V1, LAYOUT, MULTI_LAYOUT
from runtime.errors import ImageError
from runtime.io import FileLock, atomic_write_bytes, atomic_write_json, file_sha256, read_json
from runtime.preprocess import PreprocessConfig, load_image, preprocess_image
from runtime.schema import validate
from runtime.trust import DIGEST_FIELD, IntegrityError, seal, verify_bytes, verify_seal, warn_unverified

CACHE_FORMAT = "h2t-edge/feature-cache"
CACHE_VERSION = 2  # 2: sealed manifest and digests of the arrays; 1 is read only with allow_unverified
DIGESTS_NAME = "digests.npy"
FIX = "delete the cache and extract again (or pass --overwrite)"
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


def _precision_record(onnx_path: str | Path, session=None) -> dict | None:
    """The precision record of an extraction graph built by `steps.precision` (None: fp32 export)."""
    from h2t_edge.steps.precision import record_from_metadata

    return record_from_metadata(_onnx_metadata(onnx_path, session), onnx_path)


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

    def column_source(self):
        """The valid rows as a `ColumnSource` over the memory-mapped features (read in blocks, never
        whole as float32[n, D]) and their labels int64[n_valid]."""
        from h2t_edge.selection.screening import ColumnSource

        return ColumnSource(self.features, np.flatnonzero(self.valid)), self.labels[self.valid]

    def arrays(self, columns: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Valid rows only, as (float32[n_valid, d], int64[n_valid])."""
        x = self.features if columns is None else self.features[:, columns]
        return np.asarray(x[self.valid], dtype=np.float32), self.labels[self.valid]

    @classmethod
    def open(cls, root: str | Path, *, allow_unverified: bool = False) -> "FeatureCache":
        """Open a complete cache, checking its sealed manifest and every array against their digests
        (CacheError naming the file and the fix otherwise).

        allow_unverified: also open a version-1 cache (written before caches carried digests), with
        a loud RuntimeWarning; nothing vouches for its arrays."""
        root = Path(root)
        manifest = read_manifest(root, allow_unverified=allow_unverified)
        if not manifest["complete"]:
            raise CacheError(
                f"feature cache {root} is incomplete (an interrupted run): "
                "rerun the same `h2t-edge extract` command to resume it"
            )
        n, d = len(manifest["images"]), manifest["layout"]["total_features"]
        labels_blob = _read_array_file(root / "labels.npy")
        if manifest["version"] >= 2:  # the bytes checked are the bytes parsed
            try:
                verify_bytes(labels_blob, manifest["labels_sha256"], field="labels_sha256", path=root / "labels.npy",
                             descriptor=root / "manifest.json", fix=FIX, what="feature cache labels")
            except IntegrityError as exc:
                raise CacheError(str(exc)) from None
        # Each header is checked against the manifest before any array is allocated or mapped.
        labels = _npy_array(labels_blob, root / "labels.npy", (n,), np.int64)
        valid = _npy_array(_read_array_file(root / "valid.npy"), root / "valid.npy", (n,), np.bool_)
        _npy_array(_read_array_file(root / "features.npy", header_only=True), root / "features.npy", (n, d),
                   DTYPES[manifest["dtype"]], header_only=True)
        try:
            features = np.load(root / "features.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CacheError(f"feature cache {root} is damaged ({exc}); delete it and extract again") from exc
        if features.shape != (n, d) or features.dtype != DTYPES[manifest["dtype"]]:
            raise CacheError(f"feature cache {root}: array shapes do not match its manifest; extract again")
        if manifest["version"] >= 2:
            _verify_batches(root, manifest, features, valid)
        if not np.array_equal(labels, manifest["labels"]):
            raise CacheError(f"feature cache labels {root / 'labels.npy'} do not match the labels in its manifest; "
                             f"{FIX}")
        return cls(root, manifest, features, labels, valid)


def write_cache(root: str | Path, header: dict, features: np.ndarray) -> FeatureCache:
    """Write a complete cache at `root` from features in memory (synthetic caches, tests): the files
    and digests extraction writes. header: the manifest's fields but `format`, `version`, `skipped`
    and `complete` (backbone, layout, dataset, images, labels, classes, dtype, batch_size, provider);
    features: [n, total_features], every row valid. Replaces a cache already there."""
    root = Path(root)
    header = {**header, "format": CACHE_FORMAT, "version": CACHE_VERSION}
    batches = _batch_rows(len(header["images"]), header["batch_size"])
    with cache_lock(root):
        writer = _CacheWriter(root, header["layout"], [], _open_or_start(root, header, len(batches), True), batches)
        writer.open()
        for b, rows in enumerate(batches):
            writer.write(b, rows, np.array(features[rows.start:rows.stop], dtype=np.float32), [], header["images"])
        writer.finish()
    return FeatureCache.open(root)


def is_feature_cache(path: str | Path) -> bool:
    """Whether PATH is a feature cache folder (has a manifest.json); `FeatureCache.open` checks the rest."""
    return (Path(path) / "manifest.json").is_file()


def _old_version(data) -> int | None:
    """The format version of a manifest of another cache format version than this one writes."""
    if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
        version = data.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version != CACHE_VERSION:
            return version
    return None


def read_manifest(root: str | Path, *, allow_unverified: bool = False) -> dict:
    """The sealed, validated `manifest.json` of the cache at `root` (CacheError naming the file, the
    field and the fix otherwise). Its `content_sha256` is mandatory. A version-1 manifest (no
    digests of the arrays) is refused unless `allow_unverified`, which reads it with a loud warning."""
    path = Path(root) / "manifest.json"
    data = read_json(path, "feature cache manifest")
    if _old_version(data) == 1:
        if not allow_unverified:
            raise CacheError(f"feature cache manifest {path} is of cache format version 1, written before caches "
                             "carried digests of their features, labels and valid flags, so nothing vouches for "
                             f"them; {FIX} (or open it with allow_unverified=True)")
        try:
            verify_seal(data, path, fix=FIX, allow_unverified=True)  # the old, optional digest when present
        except IntegrityError as exc:
            raise CacheError(f"feature cache manifest {exc}") from None
        manifest = validate(data, CACHE_MANIFEST_V1, what="feature cache manifest", source=path, error=CacheError,
                            fix=FIX)
        warn_unverified(str(path), "is a version-1 feature cache: its features, labels and valid flags carry "
                                   "no digests")
        return manifest
    if isinstance(data, dict) and _old_version(data) is None:  # another version: the schema names it
        if DIGEST_FIELD not in data:
            raise CacheError(f"feature cache manifest {path} has no {DIGEST_FIELD} (every manifest this h2t-edge "
                             f"writes has one: it was removed); {FIX}")
        try:
            verify_seal(data, path, fix=FIX)
        except IntegrityError as exc:
            raise CacheError(f"feature cache manifest {exc}") from None
    return validate(data, CACHE_MANIFEST, what="feature cache manifest", source=path, error=CacheError, fix=FIX)


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Write `root/manifest.json` atomically, sealed (`runtime.trust.seal`: `issued` and
    `content_sha256`, set in `manifest` too). `issued` is 0: a cache is local (no rollback to guard
    against), and a resumed or distributed extraction writes the same bytes as an uninterrupted one."""
    for key in ("issued", DIGEST_FIELD):  # written last, after the fields they vouch for
        manifest.pop(key, None)
    seal(manifest, issued=0)
    atomic_write_json(Path(root) / "manifest.json", manifest)


def _batch_rows(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _batch_digest(features: np.ndarray, valid: np.ndarray, rows: range) -> bytes:
    """sha256 of rows `rows` of features (their bytes in the stored dtype, C order), then of their
    valid flags: one contiguous block each, no copy of a memory map."""
    digest = hashlib.sha256(np.ascontiguousarray(features[rows.start:rows.stop]))
    digest.update(np.ascontiguousarray(valid[rows.start:rows.stop]))
    return digest.digest()


def _batch_digests(features: np.ndarray, valid: np.ndarray, batches: list[range]) -> list[bytes]:
    """Every batch's digest; large caches on several threads (hashlib releases the GIL)."""
    if features.nbytes < 1 << 24 or len(batches) < 2:
        return [_batch_digest(features, valid, rows) for rows in batches]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda rows: _batch_digest(features, valid, rows), batches))


def _digest_mismatch(root: Path, rows: range, b: int, where: str) -> CacheError:
    return CacheError(f"feature cache {root / 'features.npy'}: rows {rows.start}..{rows.stop - 1} (batch {b}) or "
                      f"their valid flags in valid.npy do not match their digest in {where} (they changed after "
                      f"they were written); {FIX}")


def _read_array_file(path: Path, header_only: bool = False) -> bytes:
    """The bytes of a cache array file, read once (its first 64 KiB, enough for any .npy header, with
    `header_only`); CacheError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16) if header_only else f.read()
    except (OSError, MemoryError) as exc:
        raise CacheError(f"feature cache array {path} cannot be read ({exc}); {FIX}") from None


def _npy_array(blob: bytes, path: Path, shape: tuple[int, ...], dtype, header_only: bool = False) -> np.ndarray | None:
    """The array in the .npy bytes `blob` read from `path`, after checking its header against the
    expected shape and dtype (a header claiming 2^40 rows is refused here, before any allocation)."""
    import io

    stream = io.BytesIO(blob)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        header = read_header(stream, max_header_size=1 << 15)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise CacheError(f"feature cache array {path} has no valid .npy header ({exc}); {FIX}") from None
    found_shape, fortran, found_dtype = header
    if tuple(found_shape) != shape or found_dtype != np.dtype(dtype) or fortran:
        raise CacheError(f"feature cache array {path}: its shape or dtypes do not match the manifest (it holds "
                         f"{found_dtype}{list(found_shape)}, the manifest needs {np.dtype(dtype)}{list(shape)}, C "
                         f"order); {FIX}")
    if header_only:
        return None
    body = memoryview(blob)[stream.tell():]
    if len(body) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise CacheError(f"feature cache array {path} holds {len(body)} data bytes, its header needs "
                         f"{int(np.prod(shape)) * np.dtype(dtype).itemsize}; {FIX}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()  # writable, as np.load's


def _verify_batches(root: Path, manifest: dict, features: np.ndarray, valid: np.ndarray) -> None:
    """Check every batch of features.npy and valid.npy against the manifest's digests."""
    batches = _batch_rows(len(manifest["images"]), manifest["batch_size"])
    for b, (rows, actual) in enumerate(zip(batches, _batch_digests(features, valid, batches))):
        if actual.hex() != manifest["batch_sha256"][b]:
            raise _digest_mismatch(root, rows, b, str(root / "manifest.json"))
    skipped = sorted(s["index"] for s in manifest["skipped"])
    if np.flatnonzero(~valid).tolist() != skipped:
        raise CacheError(f"feature cache {root / 'valid.npy'} does not mark exactly the images its manifest lists "
                         f"as skipped; {FIX}")


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
    multi = _metadata_json(onnx_path, meta, MULTI_LAYOUT_KEY, MULTI_LAYOUT, "export it again")
    # One pass feeds every target size the same images: a layout that says otherwise would give a
    # cache computed with another preprocessing than the one it records.
    first = next(iter(multi["layouts"].values()))
    for t, layout in multi["layouts"].items():
        if layout["input"] != first["input"] or layout["preprocess"] != first["preprocess"]:
            raise CacheError(f"feature layout (metadata {MULTI_LAYOUT_KEY!r}) of {onnx_path}: target size {t} has "
                             "another input or preprocessing than the others, but one pass feeds them all the same "
                             "images; export it again")
    return multi


@dataclass
class _CacheWriter:
    """One cache being filled by `_extract`: where its features come from and what is done."""

    root: Path
    layout: dict
    outputs: list[str]  # ONNX output per tap, in layout order
    done: np.ndarray  # bool[batches]
    batches: list[range]  # rows of each batch
    features: np.ndarray | None = None
    valid: np.ndarray | None = None
    digests: np.ndarray | None = None  # uint8[batches, 32], as in digests.npy
    manifest: dict | None = None
    skipped: dict | None = None

    def open(self) -> None:
        """Open the cache's files for writing; the batches already done must match their digests."""
        try:
            self.features = np.load(self.root / "features.npy", mmap_mode="r+")
            self.valid = np.load(self.root / "valid.npy")
            self.digests = np.load(self.root / DIGESTS_NAME)
        except (OSError, ValueError) as exc:
            raise CacheError(f"feature cache {self.root} is damaged ({exc}); pass --overwrite to rebuild it") from exc
        n = self.batches[-1].stop if self.batches else 0
        if (self.features.shape != (n, self.layout["total_features"]) or self.valid.shape != (n,)
                or self.valid.dtype != bool or self.digests.shape != (len(self.batches), 32)
                or self.digests.dtype != np.uint8):
            raise CacheError(f"feature cache {self.root}: array shapes do not match its manifest; pass --overwrite "
                             "to rebuild it")
        self.manifest = read_manifest(self.root)
        self.skipped = {s["index"]: s for s in self.manifest["skipped"]}
        done = np.flatnonzero(self.done)
        for b, actual in zip(done, _batch_digests(self.features, self.valid, [self.batches[b] for b in done])):
            if actual != self.digests[b].tobytes():
                raise _digest_mismatch(self.root, self.batches[b], int(b), str(self.root / DIGESTS_NAME))

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
        # Order matters for resuming: data first, then its digest, then the record that it is there.
        self.features.flush()
        _save_npy(self.root / "valid.npy", self.valid)
        self.digests[b] = np.frombuffer(_batch_digest(self.features, self.valid, rows), dtype=np.uint8)
        _save_npy(self.root / DIGESTS_NAME, self.digests)
        if errors:
            self.manifest["skipped"] = sorted(self.skipped.values(), key=lambda s: s["index"])
            write_manifest(self.root, self.manifest)
        self.done[b] = True
        _save_npy(self.root / "progress.npy", self.done)

    def finish(self) -> None:
        """Record the batch digests and the labels' sha256 in the manifest and mark it complete."""
        self.features = None
        self.manifest["batch_sha256"] = [bytes(d).hex() for d in self.digests]
        self.manifest["labels_sha256"] = file_sha256(self.root / "labels.npy")
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
        precision = _precision_record(onnx_path, session)
        batches = _batch_rows(len(dataset), batch_size)
        writers = {}
        for key, (layout, outputs) in targets.items():
            header = {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "backbone": {"name": layout.backbone, "weights": layout.weights,
                             "onnx_sha256": onnx_sha256, "onnx": str(onnx_path.resolve()),
                             # a graph built at a precision (`steps.precision`): what the features are
                             **({"precision": precision} if precision is not None else {})},
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
            writers[key] = _CacheWriter(root, layout, outputs, _open_or_start(root, header, len(batches), overwrite),
                                        batches)
        if all(w.done.all() for w in writers.values()):
            for w in writers.values():  # a run killed after its last batch, before marking its cache complete
                if not read_manifest(w.root)["complete"]:
                    w.open()
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
        version = _old_version(read_json(manifest_path, "feature cache manifest"))
        if version is not None:  # like other settings: the cache is rebuilt only when asked to
            raise CacheError(f"{root} holds a feature cache with a different version ({version}; this h2t-edge "
                             f"writes version {CACHE_VERSION}, whose arrays carry digests); choose another --cache "
                             "directory or pass --overwrite to rebuild it")
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
    _save_npy(root / DIGESTS_NAME, np.zeros((n_batches, 32), dtype=np.uint8))
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
