"""A feature cache's integrity: its manifest is sealed (the digest is mandatory), and the manifest
holds the sha256 of every batch of rows of features.npy + valid.npy and of labels.npy. A manifest
stripped of its digest or edited, a feature edited in place, labels swapped in from another cache,
an old (version-1) cache: each is refused with a CacheError naming the file and the fix. A version-1
cache opens only under an explicit allow_unverified, loudly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from h2t_edge.core.errors import CacheError
from h2t_edge.steps.extract import FeatureCache, _batch_digest, extract_features
from runtime.schema import content_sha256
from runtime.trust import content_digest

FIX = r"delete the cache and extract again \(or pass --overwrite\)"
ARRAYS = ("manifest.json", "features.npy", "labels.npy", "valid.npy", "digests.npy")


@pytest.fixture
def cache(tiny_root, tmp_path):
    """A copy of the tiny float32 cache: 18 images in 5 batches of 4 rows."""
    root = tmp_path / "cache"
    shutil.copytree(tiny_root["cache"], root)
    return root


def _manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write(root, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _resealed(manifest: dict) -> dict:
    """The manifest with a recomputed content_sha256 (a buggy writer, or a careful editor)."""
    return {**manifest, "content_sha256": content_digest(manifest)}


def _edit_feature(root, row: int = 5, column: int = 7) -> None:
    features = np.load(root / "features.npy", mmap_mode="r+")
    features[row, column] += 1.0
    features.flush()
    del features


def test_the_manifest_records_every_batch_and_the_labels(cache):
    opened = FeatureCache.open(cache)
    manifest = opened.manifest
    assert manifest["version"] == 2 and manifest["issued"] == 0
    assert manifest["content_sha256"] == content_digest(manifest)
    assert len(manifest["batch_sha256"]) == 5 and len(set(manifest["batch_sha256"])) == 5
    assert manifest["batch_sha256"][1] == _batch_digest(opened.features, opened.valid, range(4, 8)).hex()
    digests = np.load(cache / "digests.npy")
    assert [bytes(d).hex() for d in digests] == manifest["batch_sha256"]


def test_manifest_without_its_digest_is_refused(cache):  # (a)
    manifest = _manifest(cache)
    del manifest["content_sha256"]
    _write(cache, manifest)
    with pytest.raises(CacheError, match=f"{cache / 'manifest.json'} has no content_sha256.*{FIX}"):
        FeatureCache.open(cache)
    with pytest.raises(CacheError, match="has no content_sha256"):  # allow_unverified is for old caches only
        FeatureCache.open(cache, allow_unverified=True)


@pytest.mark.parametrize("edit, names", [
    ("provider", None),  # consistent with the arrays: loads
    ("labels", "labels.npy"),
    ("batch_size", "batch_sha256"),
    ("batch_sha256", "features.npy"),
    ("skipped", "valid.npy"),
    ("dtype", "dtypes"),
])
def test_resealed_manifest_loads_only_if_its_arrays_agree(cache, edit, names):  # (b)
    manifest = _manifest(cache)
    if edit == "provider":
        manifest["provider"] = "elsewhere"
    elif edit == "labels":
        manifest["labels"][0], manifest["labels"][-1] = manifest["labels"][-1], manifest["labels"][0]
    elif edit == "batch_size":
        manifest["batch_size"] = 6
    elif edit == "batch_sha256":
        manifest["batch_sha256"][2] = "0" * 64
    elif edit == "skipped":
        manifest["skipped"] = [{"index": 3, "path": manifest["images"][3], "error": "unreadable"}]
    else:
        manifest["dtype"] = "float16"
    _write(cache, _resealed(manifest))
    if names is None:
        assert FeatureCache.open(cache).manifest["provider"] == "elsewhere"
        return
    with pytest.raises(CacheError, match=f"{cache}.*{names}"):
        FeatureCache.open(cache)


def test_feature_edited_in_place_is_refused(cache):  # (c)
    FeatureCache.open(cache)
    _edit_feature(cache, row=5)
    with pytest.raises(CacheError, match=f"{cache / 'features.npy'}: rows 4..7 \\(batch 1\\).*"
                                         f"{cache / 'manifest.json'}.*{FIX}"):
        FeatureCache.open(cache)


def test_valid_flag_edited_in_place_is_refused(cache):
    valid = np.load(cache / "valid.npy")
    valid[17] = False  # the last batch: rows 16..17
    np.save(cache / "valid.npy", valid)
    with pytest.raises(CacheError, match=r"rows 16..17 \(batch 4\) or their valid flags in valid.npy"):
        FeatureCache.open(cache)


def test_features_and_batch_digests_edited_without_resealing_are_refused(cache):  # (d)
    _edit_feature(cache, row=5)
    opened = np.load(cache / "features.npy", mmap_mode="r")
    manifest = _manifest(cache)
    manifest["batch_sha256"][1] = _batch_digest(opened, np.load(cache / "valid.npy"), range(4, 8)).hex()
    _write(cache, manifest)
    with pytest.raises(CacheError, match=f"{cache / 'manifest.json'} was changed after it was written.*{FIX}"):
        FeatureCache.open(cache)
    _write(cache, _resealed(manifest))  # resealed too: consistent again (integrity, not authenticity)
    assert FeatureCache.open(cache).features[5, 7] == opened[5, 7]


def _as_version_1(manifest: dict, digest: bool = True) -> dict:
    """The manifest as the h2t-edge before mandatory digests wrote it."""
    old = {k: v for k, v in manifest.items()
           if k not in ("issued", "content_sha256", "batch_sha256", "labels_sha256")}
    old["version"] = 1
    return {**old, "content_sha256": content_sha256(old, "content_sha256")} if digest else old


@pytest.mark.parametrize("digest", [True, False])
def test_version_1_cache_is_refused_unless_allowed_loudly(tiny_root, cache, digest):  # (e)
    _write(cache, _as_version_1(_manifest(cache), digest))
    with pytest.raises(CacheError, match=f"{cache / 'manifest.json'} is of cache format version 1.*{FIX}"):
        FeatureCache.open(cache)
    with pytest.warns(RuntimeWarning, match=f"UNVERIFIED.*{cache / 'manifest.json'}"):
        old = FeatureCache.open(cache, allow_unverified=True)
    np.testing.assert_array_equal(old.features, FeatureCache.open(tiny_root["cache"]).features)
    # extracting into it: like a cache of other settings, rebuilt only when asked to
    with pytest.raises(CacheError, match=f"{cache} holds a feature cache with a different version.*--overwrite"):
        extract_features(tiny_root["backbone"], tiny_root["dataset"], cache, batch_size=4, dtype="float32")
    rebuilt = extract_features(tiny_root["backbone"], tiny_root["dataset"], cache, batch_size=4, dtype="float32",
                               overwrite=True)
    assert rebuilt.manifest == FeatureCache.open(tiny_root["cache"]).manifest


def test_edited_version_1_cache_is_refused_even_when_allowed(cache):
    manifest = _as_version_1(_manifest(cache))
    manifest["classes"] = manifest["classes"][::-1]
    _write(cache, manifest)
    with pytest.raises(CacheError, match="was changed after it was written"):
        FeatureCache.open(cache, allow_unverified=True)


def test_labels_swapped_in_from_another_cache_are_refused(tiny_root, cache, tmp_path):  # (f)
    order = np.random.default_rng(0).permutation(len(tiny_root["dataset"]))
    other = extract_features(tiny_root["backbone"], tiny_root["dataset"].subset(order), tmp_path / "other",
                             batch_size=4, dtype="float32")
    assert other.labels.shape == (18,) and not np.array_equal(other.labels, FeatureCache.open(cache).labels)
    shutil.copy(other.root / "labels.npy", cache / "labels.npy")
    with pytest.raises(CacheError, match=f"{cache / 'labels.npy'} does not match the labels_sha256.*{FIX}"):
        FeatureCache.open(cache)


def _interrupted(tiny_root, root, batches: int = 2) -> None:
    class Stop(Exception):
        pass

    def stop(done, total):
        if done >= batches * 4:
            raise Stop

    with pytest.raises(Stop):
        extract_features(tiny_root["backbone"], tiny_root["dataset"], root, batch_size=4, dtype="float32",
                         progress=stop)


def test_resumed_extraction_writes_the_same_digests(tiny_root, tmp_path):  # (g)
    root = tmp_path / "cache"
    _interrupted(tiny_root, root)
    assert np.load(root / "progress.npy").tolist() == [True, True, False, False, False]
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache.open(root)
    resumed = extract_features(tiny_root["backbone"], tiny_root["dataset"], root, batch_size=4, dtype="float32")
    for name in ARRAYS:  # the uninterrupted run of the fixture
        assert (root / name).read_bytes() == (tiny_root["cache"] / name).read_bytes(), name
    assert resumed.manifest["batch_sha256"] == FeatureCache.open(tiny_root["cache"]).manifest["batch_sha256"]


def test_resume_checks_the_batches_already_done(tiny_root, tmp_path):
    root = tmp_path / "cache"
    _interrupted(tiny_root, root)
    _edit_feature(root, row=2)  # batch 0, already done
    with pytest.raises(CacheError, match=f"{root / 'features.npy'}: rows 0..3 \\(batch 0\\).*"
                                         f"{root / 'digests.npy'}.*--overwrite"):
        extract_features(tiny_root["backbone"], tiny_root["dataset"], root, batch_size=4, dtype="float32")
    rebuilt = extract_features(tiny_root["backbone"], tiny_root["dataset"], root, batch_size=4, dtype="float32",
                               overwrite=True)
    np.testing.assert_array_equal(rebuilt.features, FeatureCache.open(tiny_root["cache"]).features)


def test_write_cache_writes_what_extraction_writes(tiny_root, tmp_path):
    """`write_cache` (synthetic caches) gives the same files, digests and seal as extraction."""
    from h2t_edge.steps.extract import write_cache

    reference = FeatureCache.open(tiny_root["cache"])
    header = {k: v for k, v in reference.manifest.items()
              if k not in ("skipped", "complete", "batch_sha256", "labels_sha256", "issued", "content_sha256")}
    written = write_cache(tmp_path / "cache", header, np.asarray(reference.features))
    for name in ARRAYS:
        assert (written.root / name).read_bytes() == (reference.root / name).read_bytes(), name


@pytest.mark.parametrize("array", ["labels.npy", "valid.npy"])
def test_an_array_header_claiming_2_40_rows_is_a_cache_error(cache, array):
    """Issue 28: a .npy header claiming 2^40 rows (its digest re-recorded) was a raw MemoryError; the
    header is now checked against the manifest before anything is allocated."""
    import hashlib
    import io

    header = io.BytesIO()
    dtype = np.int64 if array == "labels.npy" else np.bool_
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": (1 << 40,)})
    blob = header.getvalue() + b"\0" * 64
    (cache / array).write_bytes(blob)
    manifest = _manifest(cache)
    if array == "labels.npy":
        manifest["labels_sha256"] = hashlib.sha256(blob).hexdigest()
    _write(cache, _resealed(manifest))
    with pytest.raises(CacheError, match=f"{cache / array}: its shape or dtypes do not match the manifest"):
        FeatureCache.open(cache)
