"""Issue 28, the second red team: the bytes checked are the bytes run, every file a device acts on is
covered, trust settings fail closed, the version record loses no update and is never "empty", names
from artifacts are never paths, and malformed inputs give typed errors. Each test fails when the check
it names is removed (the Triton and deployment cases are in test_attacks.py and
tests/h2t_edge/test_deploy.py, the feature cache's in test_cache_integrity.py).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny_task import TASK_PREPROCESS, build_task_graph, file_blake3, sealed_sidecar

from runtime import trust
from runtime.errors import ArtifactError
from runtime.io import atomic_write_bytes
from runtime.predictor import Predictor
from runtime.trust import (
    TRUSTED_KEYS_ENV,
    VERSION_RECORD_ENV,
    IntegrityError,
    RollbackError,
    SignatureError,
    SigningKey,
    VersionRecord,
    seal,
)

pytest.importorskip("cryptography", reason="signing needs cryptography: pip install 'h2t-edge[sign]'")
IMAGES = np.random.default_rng(7).normal(size=(4, *TASK_PREPROCESS.input_size)).astype(np.float32)


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    signing = SigningKey.generate()
    return signing, signing.save(tmp_path_factory.mktemp("keys") / "k")[1]


def _graph_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return build_task_graph(rng.normal(size=(3, 4)).astype(np.float32) * 4, rng.normal(size=4).astype(np.float32),
                            TASK_PREPROCESS.height, TASK_PREPROCESS.width).SerializeToString()


def _signed_graph(folder: Path, key, seed: int = 0, name: str = "cats") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    atomic_write_bytes(path, _graph_bytes(seed))
    path.with_suffix(".json").write_text(json.dumps(sealed_sidecar(path, name, key)))
    return path


def _scores(predictor) -> np.ndarray:
    return predictor.predict_arrays(IMAGES)[1]


# -- 1. one read: the bytes checked are the bytes run ------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_graph_swapped_between_check_and_use_is_never_run(tmp_path, key, monkeypatch, backend):
    """The attacker's window: right after the graph's bytes are hashed (and found good), an unsigned graph
    is renamed over the path. The loader must run the bytes it checked, so the outputs are the good
    graph's. A loader that opens the path again after its check runs the attacker's graph."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    signing, pub = key
    graph = _signed_graph(tmp_path / "good", signing)
    with Predictor.load(graph, backend=backend, trusted_keys=[pub]) as good:
        expected = _scores(good)
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(_graph_bytes(99))
    digest, swapped = trust.file_digest, []

    def digest_then_swap(blob, *args):
        result = digest(blob, *args)
        if not swapped:
            os.replace(evil, graph)  # the local writer wins the race, every time
            swapped.append(True)
        return result

    monkeypatch.setattr(trust, "file_digest", digest_then_swap)
    with Predictor.load(graph, backend=backend, trusted_keys=[pub]) as loaded:
        assert swapped and graph.read_bytes() == _graph_bytes(99)  # the swap happened
        np.testing.assert_allclose(_scores(loaded), expected, rtol=1e-5)  # and the checked graph ran


def _loads_while_a_writer_alternates(graph: Path, pub: Path, write, evil: bytes, loads: int = 30) -> dict:
    """`loads` loads of `graph` while a thread keeps writing `evil` and the good bytes back with `write`;
    each load must run exactly the good graph or be refused. Returns how many ran and were refused."""
    good = graph.read_bytes()
    with Predictor.load(graph, trusted_keys=[pub]) as first:
        expected = _scores(first)
    stop, outcomes = threading.Event(), {"ran": 0, "refused": 0}

    def writer():
        i = 0
        while not stop.is_set():
            write(graph, evil if i % 2 == 0 else good)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(loads):
            try:
                with Predictor.load(graph, trusted_keys=[pub]) as p:
                    np.testing.assert_allclose(_scores(p), expected, rtol=1e-5)
                    outcomes["ran"] += 1
            except ArtifactError:  # IntegrityError, or a graph cut short by the writer
                outcomes["refused"] += 1
    finally:
        stop.set()
        thread.join()
    assert outcomes["ran"] + outcomes["refused"] == loads
    return outcomes


def test_a_writer_racing_many_loads_never_gets_its_graph_run(tmp_path, key):
    """A thread keeps swapping an unsigned graph in and the good one back (by rename) while the device
    loads: every load either is refused (it read the unsigned graph) or runs exactly the good graph."""
    signing, pub = key
    _loads_while_a_writer_alternates(_signed_graph(tmp_path, signing), pub, atomic_write_bytes, _graph_bytes(99))


def test_a_deployment_backbone_swapped_after_its_check_is_never_run(tiny_root, tmp_path, key, monkeypatch):
    """The same race on a `deploy` folder's backbone.onnx: SharedBackbonePredictor runs the bytes it checked."""
    from h2t_edge.steps.deploy import package_shared_step
    from runtime.heads import SharedBackbonePredictor

    signing, pub = key
    device = tmp_path / "device"
    package_shared_step([tiny_root["task"] / "head2toe"], device, backbone_onnx=tiny_root["backbone"],
                        signing_key=signing)
    images = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with SharedBackbonePredictor.load(device, trusted_keys=[pub]) as good:
        expected = good.predict_tasks(images)
    backbone = device / "backbone.onnx"
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(tiny_root["backbone12"].read_bytes())  # another (unsigned) backbone export
    digest, swapped = trust.file_digest, []

    def digest_then_swap(blob, *args):
        result = digest(blob, *args)
        if not swapped and backbone.read_bytes() == bytes(blob):
            os.replace(evil, backbone)
            swapped.append(True)
        return result

    monkeypatch.setattr(trust, "file_digest", digest_then_swap)
    with SharedBackbonePredictor.load(device, trusted_keys=[pub]) as loaded:
        assert swapped
        for task, (probabilities, _) in loaded.predict_tasks(images).items():
            np.testing.assert_allclose(probabilities, expected[task][0], rtol=1e-5)


class _Sessions:
    """ONNX Runtime sessions made and runs asked for, counted through a subclass of its InferenceSession."""

    def __init__(self, monkeypatch):
        import onnxruntime as ort

        self.made, self.runs, counts = [], [], self

        class Counting(ort.InferenceSession):
            def __init__(self, *args, **kwargs):
                counts.made.append(True)
                super().__init__(*args, **kwargs)

            def run(self, *args, **kwargs):
                counts.runs.append(True)
                return super().run(*args, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", Counting)


def test_a_graph_parsed_while_its_digest_is_computed_never_runs_unless_it_matches(tmp_path, key, monkeypatch):
    """The default load hands the bytes to ONNX Runtime while their BLAKE3 is computed on another thread.
    Bytes that fail the digest (here a valid, unsigned graph in place of the signed one) are refused before
    the session runs anything (not even the probe inference) and before the version record takes the
    artifact's version."""
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    record = VersionRecord.create(tmp_path / "versions.json")
    graph.write_bytes(_graph_bytes(99))
    sessions = _Sessions(monkeypatch)
    with pytest.raises(IntegrityError, match=f"task graph {graph} does not match the graph_blake3"):
        Predictor.load(graph, trusted_keys=[pub], version_record=record)
    assert sessions.made and not sessions.runs  # parsed meanwhile, never run
    assert record.read() == {}  # and not recorded
    atomic_write_bytes(graph, _graph_bytes(0))  # the signed bytes again: loads, runs, is recorded
    Predictor.load(graph, trusted_keys=[pub], version_record=record).close()
    assert sessions.runs and list(record.read()) == ["cats"]


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_verify_first_finishes_the_digest_before_the_engine_sees_a_byte(tmp_path, key, monkeypatch, how):
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    graph.write_bytes(_graph_bytes(99))
    sessions = _Sessions(monkeypatch)
    if how == "environment":
        monkeypatch.setenv(trust.VERIFY_FIRST_ENV, "1")
    with pytest.raises(IntegrityError, match="does not match the graph_blake3"):
        Predictor.load(graph, trusted_keys=[pub], verify_first=True if how == "argument" else None)
    assert not sessions.made


@pytest.mark.parametrize("setting", ["", "yes", "true", " 1"])
def test_a_verify_first_setting_other_than_0_or_1_is_an_error(tmp_path, key, monkeypatch, setting):
    signing, pub = key
    monkeypatch.setenv(trust.VERIFY_FIRST_ENV, setting)
    with pytest.raises(IntegrityError, match=f"\\${trust.VERIFY_FIRST_ENV} is set to"):
        Predictor.load(_signed_graph(tmp_path, signing), trusted_keys=[pub])


def test_a_deployment_backbone_parsed_while_hashing_is_refused_before_it_runs(tiny_root, tmp_path, key,
                                                                              monkeypatch):
    from h2t_edge.steps.deploy import package_shared_step
    from runtime.heads import SharedBackbonePredictor

    signing, pub = key
    device = tmp_path / "device"
    package_shared_step([tiny_root["task"] / "head2toe"], device, backbone_onnx=tiny_root["backbone"],
                        signing_key=signing)
    (device / "backbone.onnx").write_bytes(tiny_root["backbone12"].read_bytes())
    sessions = _Sessions(monkeypatch)
    with pytest.raises(IntegrityError, match="backbone graph .* does not match the graph_blake3"):
        SharedBackbonePredictor.load(device, trusted_keys=[pub])
    assert sessions.made and not sessions.runs


def _lease_or_skip(path: Path):
    lease = trust.FileLease.take(path)
    if lease is None:
        pytest.skip("this system grants no file lease here (not Linux, or a file system without leases)")
    return lease


def test_a_leased_file_cannot_be_written_until_the_lease_ends(tmp_path):
    """While the lease holds, a writer's open waits; its request ends the lease (FileChanging), and it
    writes only after the lease is dropped. A mapping of the leased file keeps the bytes it was taken with."""
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"good" * 1000)
    lease = _lease_or_skip(path)
    lease.verify()  # held
    wrote = threading.Event()

    def writer():
        with open(path, "r+b") as f:  # blocks until the lease is dropped
            f.write(b"evil")
        wrote.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not wrote.wait(0.5) and bytes(lease.mapped()) == b"good" * 1000
    with pytest.raises(trust.FileChanging, match=f"{path} was opened for writing while it was loaded"):
        lease.verify()
    lease.close()
    thread.join(timeout=30)
    assert wrote.is_set() and path.read_bytes().startswith(b"evil")


def test_no_lease_while_a_writer_has_the_file_open(tmp_path):
    path = tmp_path / "graph.onnx"
    path.write_bytes(b"x")
    _lease_or_skip(path).close()
    with open(path, "r+b"):
        assert trust.FileLease.take(path) is None


def test_a_graph_open_for_writing_loads_from_a_copy_of_its_bytes(tmp_path, key, monkeypatch):
    """No lease while a writer holds the file: the load reads the bytes into memory instead, checked."""
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    _lease_or_skip(graph).close()
    with open(graph, "r+b"), Predictor.load(graph, trusted_keys=[pub]) as held_open:
        scores = _scores(held_open)
    with Predictor.load(graph, trusted_keys=[pub]) as leased:
        np.testing.assert_allclose(_scores(leased), scores, rtol=1e-6)


def test_a_writer_overwriting_the_graph_in_place_never_gets_its_graph_run(tmp_path, key):
    """In place, not by rename: a thread keeps rewriting the graph file's bytes (an unsigned graph, then
    the good one) while the device loads. Each load runs exactly the good graph or is refused."""
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    size = graph.stat().st_size
    evil = _graph_bytes(99)[:size].ljust(size, b"\0")

    def overwrite(path: Path, data: bytes) -> None:
        with open(path, "r+b") as f:
            f.write(data)

    _loads_while_a_writer_alternates(graph, pub, overwrite, evil)


def test_a_graph_with_external_data_is_refused(tmp_path, key):
    """A signed graph whose weights sit in an external file: that file has no digest, so the graph is
    refused (an engine given bytes would read it from the working directory)."""
    import onnx

    signing, pub = key
    model = onnx.load_from_string(_graph_bytes(0))
    onnx.save_model(model, str(tmp_path / "cats.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="cats.weights", size_threshold=0)
    graph = tmp_path / "cats.onnx"
    graph.with_suffix(".json").write_text(json.dumps(sealed_sidecar(graph, "cats", signing)))
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(ArtifactError, match=f"ONNX graph {graph} keeps tensors in external data files"):
            Predictor.load(graph, backend=backend, trusted_keys=[pub])


def test_old_sealed_sidecars_with_sha256_digests_still_load(tmp_path, key):
    """Version 3 (sealed, sha256 file digests) is read and checked the old way; its edits are still refused."""
    from runtime.io import file_sha256

    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    data = {k: v for k, v in sealed_sidecar(graph, "cats").items() if k not in ("graph_blake3", "content_sha256")}
    graph.with_suffix(".json").write_text(json.dumps(seal({**data, "version": 3, "graph_sha256": file_sha256(graph)},
                                                          signing)))
    Predictor.load(graph, trusted_keys=[pub]).close()
    graph.write_bytes(_graph_bytes(5))
    with pytest.raises(IntegrityError, match=f"task graph {graph} does not match the graph_sha256"):
        Predictor.load(graph, trusted_keys=[pub])


# -- 3. fail closed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["", " ", ":", "::", "{pub}::{pub}"])
def test_a_trusted_keys_setting_that_names_no_key_is_an_error(tmp_path, key, monkeypatch, setting):
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    side = graph.with_suffix(".json")
    data = json.loads(side.read_text())
    data["classes"] = data["classes"][::-1]
    data["content_sha256"] = trust.content_digest(data)  # a re-hashed edit: only a signature check refuses it
    side.write_text(json.dumps(data))
    monkeypatch.setenv(TRUSTED_KEYS_ENV, setting.format(pub=pub))
    with pytest.raises(SignatureError, match=f"\\${TRUSTED_KEYS_ENV} is set to .* which names no key"):
        Predictor.load(graph)


def test_the_engine_cache_applies_the_trusted_keys(tmp_path, key, monkeypatch):
    """A planted engine with an unsealed-by-us (unsigned) record is a miss once keys are trusted; a record
    signed by a trusted key is a hit."""
    from runtime.backends.base import BatchProfile
    from runtime.backends.tensorrt import EngineCache, EngineKey

    signing, pub = key
    engine_key = EngineKey("0" * 64, "10.0", "GPU", "fp16", BatchProfile.up_to(8))
    EngineCache(tmp_path).store(engine_key, b"planted engine")  # unsigned record, valid seal
    assert EngineCache(tmp_path).lookup(engine_key) == b"planted engine"  # integrity only: found
    assert EngineCache(tmp_path, trusted_keys=[pub]).lookup(engine_key) is None
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(pub))  # from the environment too, as every loader
    assert EngineCache(tmp_path).lookup(engine_key) is None
    EngineCache(tmp_path, signing_key=signing).store(engine_key, b"our engine")
    assert EngineCache(tmp_path).lookup(engine_key) == b"our engine"
    (tmp_path / f"{engine_key.digest()}.engine").write_bytes(b"swapped engine")
    assert EngineCache(tmp_path).lookup(engine_key) is None


# -- the version record ---------------------------------------------------------------------------------


_RECORD_MANY = """
import sys
from runtime.trust import VersionRecord
record, worker, count = VersionRecord(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(count):
    record.check_and_update([f"w{worker}-t{i}"], 1000 + i, f"worker {worker}")
"""


def test_concurrent_version_record_writers_lose_no_update(tmp_path):
    """Four processes (fresh interpreters, not forks of this threaded one) record 50 tasks each at once."""
    import subprocess
    import sys

    path = tmp_path / "versions.json"
    VersionRecord.create(path)
    workers, count = 4, 50
    env = {**os.environ, "PYTHONPATH": str(Path(trust.__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _RECORD_MANY, str(path), str(w), str(count)], env=env)
             for w in range(workers)]
    assert [p.wait(timeout=300) for p in procs] == [0] * workers
    assert len(VersionRecord(path).read()) == workers * count  # 200 of 200


def test_the_first_record_is_created_explicitly_and_a_missing_one_is_an_error(tmp_path, key):
    signing, pub = key
    record = tmp_path / "device" / "versions.json"
    old = _signed_graph(tmp_path / "v1", signing)
    with pytest.raises(ArtifactError, match=f"version record {record} does not exist.*versions init"):
        Predictor.load(old, trusted_keys=[pub], version_record=record)
    VersionRecord.create(record)
    with pytest.raises(ArtifactError, match="already exists"):
        VersionRecord.create(record)
    new = tmp_path / "v2" / "cats.onnx"
    _signed_graph(tmp_path / "v2", signing, seed=1)
    Predictor.load(new, trusted_keys=[pub], version_record=record).close()
    record.unlink()  # deleted: a rollback must not pass as "nothing recorded yet"
    with pytest.raises(ArtifactError, match="does not exist"):
        Predictor.load(old, trusted_keys=[pub], version_record=record)
    record.symlink_to(tmp_path / "nowhere.json")  # dangling
    with pytest.raises(ArtifactError, match="does not exist"):
        Predictor.load(old, trusted_keys=[pub], version_record=record)


@pytest.mark.parametrize("value", ["true", "1e999", '"abc"', "-1", "1.5", "null", "9223372036854775808", "[1]"])
def test_a_malformed_version_record_is_an_error(tmp_path, key, value):
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    record = tmp_path / "versions.json"
    record.write_text('{"format": "h2t-edge/version-record", "version": 1, "tasks": {"cats": %s}}' % value)
    with pytest.raises(ArtifactError, match=f"version record {record}: field 'tasks.cats'"):
        Predictor.load(graph, trusted_keys=[pub], version_record=record)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": "other"}', "\xff"])
def test_an_unreadable_version_record_is_an_error(tmp_path, key, text):
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    record = tmp_path / "versions.json"
    record.write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=str(record)):
        Predictor.load(graph, trusted_keys=[pub], version_record=record)


def test_a_blank_version_record_setting_is_an_error(tmp_path, key, monkeypatch):
    signing, pub = key
    monkeypatch.setenv(VERSION_RECORD_ENV, " ")
    with pytest.raises(ArtifactError, match=f"\\${VERSION_RECORD_ENV} is set but blank"):
        Predictor.load(_signed_graph(tmp_path, signing), trusted_keys=[pub])


def test_rollback_after_an_update_through_the_cli(tmp_path, key):
    from click.testing import CliRunner
    from PIL import Image

    from h2t_edge.cli import cli

    signing, pub = key
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    record = tmp_path / "versions.json"
    old = _signed_graph(tmp_path / "v1", signing)
    new = _signed_graph(tmp_path / "v2", signing, seed=1)
    args = ["--trusted-key", str(pub), "--version-record", str(record)]
    missing = CliRunner().invoke(cli, ["predict", str(new), str(image), *args])
    assert missing.exit_code != 0 and "versions init" in str(missing.exception)
    assert CliRunner().invoke(cli, ["versions", "init", str(record)]).exit_code == 0
    assert CliRunner().invoke(cli, ["predict", str(new), str(image), *args]).exit_code == 0
    rolled = CliRunner().invoke(cli, ["predict", str(old), str(image), *args])
    assert rolled.exit_code != 0 and isinstance(rolled.exception, RollbackError)


# -- 4. names are data, not paths ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", ".hidden", "", "x" * 200, "a\\b", "..", "t\x00"])
def test_a_task_name_that_is_a_path_is_refused_before_any_path_is_built(tiny_root, tmp_path, name):
    from h2t_edge.core.errors import TaskArtifactError
    from h2t_edge.steps.deploy import package_shared_step
    from runtime.schema import content_sha256

    task = tmp_path / "deep" / "er" / "task"
    shutil.copytree(tiny_root["task"] / "head2toe", task)
    meta = json.loads((task / "task.json").read_text())
    meta["task"] = name
    meta["content_sha256"] = content_sha256(meta, "content_sha256")  # re-sealed
    (task / "task.json").write_text(json.dumps(meta))
    out = tmp_path / "deep" / "er" / "out"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(TaskArtifactError, match=f"{task / 'task.json'}: field 'task' .*not a valid name"):
        package_shared_step([task], out, backbone_onnx=tiny_root["backbone"])
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, inside -o or out of it
    assert not Path("/tmp/abs.json").exists()


def test_a_sidecar_task_name_that_is_a_path_is_refused(tmp_path, key):
    signing, pub = key
    graph = _signed_graph(tmp_path, signing)
    graph.with_suffix(".json").write_text(json.dumps(sealed_sidecar(graph, "../../x", signing)))
    with pytest.raises(ArtifactError, match="field 'task' is '../../x', not a valid task name"):
        Predictor.load(graph, trusted_keys=[pub])


def test_file_digest_is_blake3_on_every_core():
    import blake3

    blob = os.urandom(1 << 20)
    assert trust.file_digest(blob) == blake3.blake3(blob).hexdigest() == file_blake3_of(blob)


def file_blake3_of(blob: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        f.write(blob)
        f.flush()
        return file_blake3(Path(f.name))


# -- 2. a deployment lists its heads ------------------------------------------------------------------


def _named_task(tiny_root, folder: Path, name: str) -> Path:
    """The tiny fitted task under another task name (re-sealed as `fit` writes it)."""
    from runtime.schema import content_sha256

    shutil.copytree(tiny_root["task"] / "head2toe", folder)
    meta = json.loads((folder / "task.json").read_text())
    meta["task"] = name
    meta["content_sha256"] = content_sha256(meta, "content_sha256")
    (folder / "task.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("attack", ["deleted", "extra", "renamed", "manifest_unsigned"])
def test_a_deployment_refuses_a_missing_extra_or_renamed_head(tiny_root, tmp_path, key, attack):
    from h2t_edge.steps.deploy import package_shared_step
    from runtime.heads import HEADS_MANIFEST, SharedBackbonePredictor

    signing, pub = key
    device = tmp_path / "device"
    tasks = [_named_task(tiny_root, tmp_path / n, n) for n in ("first", "second")]
    package_shared_step(tasks, device, backbone_onnx=tiny_root["backbone"], signing_key=signing)
    with SharedBackbonePredictor.load(device, trusted_keys=[pub]) as p:
        assert [t.task for t in p.tasks] == ["first", "second"]
    heads = device / "heads"
    error, match = IntegrityError, f"{heads} does not hold the heads {device / HEADS_MANIFEST} lists"
    if attack == "deleted":  # the red team's case: `predict` used to run the others without a word
        (heads / "second.json").unlink()
        (heads / "second.safetensors").unlink()
    elif attack == "extra":
        shutil.copy(heads / "second.json", heads / "third.json")
    elif attack == "renamed":
        for suffix in (".json", ".safetensors"):
            (heads / f"second{suffix}").rename(heads / f"third{suffix}")
    else:
        data = json.loads((device / HEADS_MANIFEST).read_text())
        del data["heads"]["second"], data["signature"]
        data["content_sha256"] = trust.content_digest(data)
        (device / HEADS_MANIFEST).write_text(json.dumps(data))
        error, match = SignatureError, f"{device / HEADS_MANIFEST} is not signed"
    with pytest.raises(error, match=match):
        SharedBackbonePredictor.load(device, trusted_keys=[pub])


def test_adding_a_head_re_signs_the_deployment_manifest(tiny_root, tmp_path, key):
    from h2t_edge.steps.deploy import package_shared_step
    from runtime.heads import SharedBackbonePredictor

    signing, pub = key
    device = tmp_path / "device"
    package_shared_step([_named_task(tiny_root, tmp_path / "first", "first")], device,
                        backbone_onnx=tiny_root["backbone"], signing_key=signing)
    package_shared_step([_named_task(tiny_root, tmp_path / "second", "second")], device, signing_key=signing)
    with SharedBackbonePredictor.load(device, trusted_keys=[pub]) as p:
        assert [t.task for t in p.tasks] == ["first", "second"]
    package_shared_step([_named_task(tiny_root, tmp_path / "third", "third")], device)  # without the key
    with pytest.raises(SignatureError, match="heads.json is not signed"):
        SharedBackbonePredictor.load(device, trusted_keys=[pub])


def test_a_large_file_is_hashed_while_it_is_read(tmp_path):
    """read_hashed's pipeline (a reader thread filling the buffer, this thread hashing behind it) gives
    exactly the file's bytes and their BLAKE3; a file cut short while it is read is an IntegrityError."""
    blob = os.urandom(trust._PIPELINE_BYTES + 12345)
    path = tmp_path / "big.onnx"
    path.write_bytes(blob)
    data, digest = trust.read_hashed(path, what="task graph", fix="re-compile")
    assert data == blob and digest == trust.file_digest(blob) and type(data) is bytes
    assert trust.read_verified(path, digest, field="graph_blake3", descriptor="x.json", fix="f") == blob
    with pytest.raises(IntegrityError, match=f"task graph {path} does not match the graph_blake3"):
        trust.read_verified(path, "0" * 64, field="graph_blake3", descriptor="x.json", fix="f", what="task graph")


def test_an_older_heads_list_with_the_newer_heads_deleted_is_a_rollback(tiny_root, tmp_path, key):
    """Put back the signed heads.json from before a head was added and delete that head's files: every
    file agrees with that list, but the device has loaded a newer one."""
    from h2t_edge.steps.deploy import package_shared_step
    from runtime.heads import HEADS_MANIFEST, SharedBackbonePredictor

    signing, pub = key
    device, record = tmp_path / "device", VersionRecord.create(tmp_path / "versions.json")
    package_shared_step([_named_task(tiny_root, tmp_path / "first", "first")], device,
                        backbone_onnx=tiny_root["backbone"], signing_key=signing)
    SharedBackbonePredictor.load(device, trusted_keys=[pub], version_record=record).close()
    old_list = (device / HEADS_MANIFEST).read_bytes()
    package_shared_step([_named_task(tiny_root, tmp_path / "second", "second")], device, signing_key=signing)
    SharedBackbonePredictor.load(device, trusted_keys=[pub], version_record=record).close()
    (device / HEADS_MANIFEST).write_bytes(old_list)
    for suffix in (".json", ".safetensors"):
        (device / "heads" / f"second{suffix}").unlink()
    SharedBackbonePredictor.load(device, trusted_keys=[pub]).close()  # no record: nothing to compare with
    with pytest.raises(RollbackError, match=f"{device / HEADS_MANIFEST} holds task 'deployment:.*older"):
        SharedBackbonePredictor.load(device, trusted_keys=[pub], version_record=record)
