"""Attacks on what a device loads (issue 23): every downgrade path of a task graph, a multi-task
graph, an engine, a TensorRT engine record and a Triton model is refused with a typed error naming
the file. The shared-backbone deployment's cases are in tests/h2t_edge/test_deploy.py, the feature
cache's in test_cache_integrity.py.

Integrity (a seal on every descriptor, a sha256 of every file) is always checked; authenticity (an
ed25519 signature by a trusted key) once keys are configured; rollbacks where the device keeps a
version record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_task import TASK_PREPROCESS, build_task_graph, file_blake3, sealed_sidecar

from runtime.errors import ArtifactError
from runtime.io import atomic_write_bytes, file_sha256
from runtime.predictor import MULTITASK_SIDECAR_VERSION, Predictor
from runtime.trust import (
    TRUSTED_KEYS_ENV,
    IntegrityError,
    RollbackError,
    SignatureError,
    SigningKey,
    VersionRecord,
    content_digest,
    seal,
)

pytest.importorskip("cryptography", reason="signing needs cryptography: pip install 'h2t-edge[sign]'")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: 'trusted' (the device has its signing.pub) and 'other' (it does not)."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("trusted", "other"):
        key = SigningKey.generate()
        _, public = key.save(root / name)
        out[name], out[f"{name}_pub"] = key, public
    return out


def _write_graph(folder: Path, name: str, seed: int, key=None, issued=None, **changes) -> Path:
    """A tiny task graph (distinct weights per seed) with its sealed sidecar, as `compile` writes it."""
    rng = np.random.default_rng(seed)
    model = build_task_graph(rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32),
                             TASK_PREPROCESS.height, TASK_PREPROCESS.width)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    atomic_write_bytes(path, model.SerializeToString())
    sidecar = sealed_sidecar(path, name, None, **changes)
    path.with_suffix(".json").write_text(json.dumps(seal(sidecar, key, issued=issued)))
    return path


def _edit_sidecar(graph: Path, edit, reseal: bool = False) -> Path:
    side = graph.with_suffix(".json")
    data = json.loads(side.read_text())
    edit(data)
    if reseal:  # what an attacker without the key can do: recompute the public digest
        data["content_sha256"] = content_digest(data)
    side.write_text(json.dumps(data))
    return side


def _refused(error, match, load):
    with pytest.raises(error, match=match) as info:
        load()
    return info.value


# -- the task graph -------------------------------------------------------------------------------


def test_a_compiled_graph_loads_with_and_without_trusted_keys(tmp_path, keys):
    graph = _write_graph(tmp_path, "cats", 0, keys["trusted"])
    Predictor.load(graph).close()
    Predictor.load(graph, trusted_keys=[keys["trusted_pub"]]).close()


def test_stripped_digest_is_refused(tmp_path):
    graph = _write_graph(tmp_path, "cats", 0)
    side = _edit_sidecar(graph, lambda d: d.pop("content_sha256"))
    _refused(IntegrityError, f"{side} has no content_sha256", lambda: Predictor.load(graph))


def test_stripped_graph_hash_is_refused(tmp_path):
    """Deleting graph_blake3 (and re-hashing the sidecar) no longer deletes the check."""
    graph = _write_graph(tmp_path, "cats", 0)
    side = _edit_sidecar(graph, lambda d: d.pop("graph_blake3"), reseal=True)
    _refused(IntegrityError, f"{side}: field 'graph_blake3' must be a blake3", lambda: Predictor.load(graph))


def test_edited_sidecar_is_refused(tmp_path):
    graph = _write_graph(tmp_path, "cats", 0)
    side = _edit_sidecar(graph, lambda d: d.update(classes=d["classes"][::-1]))
    _refused(IntegrityError, f"{side} was changed after it was written", lambda: Predictor.load(graph))


def test_rehashed_edit_is_refused_by_the_signature(tmp_path, keys):
    """Re-hashing passes the integrity check by design (the digest is public); the signature does not."""
    graph = _write_graph(tmp_path, "cats", 0, keys["trusted"])
    side = _edit_sidecar(graph, lambda d: d.update(classes=d["classes"][::-1]), reseal=True)
    Predictor.load(graph).close()  # integrity alone: an accident would have been caught, an attacker is not
    _refused(SignatureError, f"{side}: the signature does not verify",
             lambda: Predictor.load(graph, trusted_keys=[keys["trusted_pub"]]))


def test_stripped_signature_is_refused_once_keys_are_trusted(tmp_path, keys):
    graph = _write_graph(tmp_path, "cats", 0, keys["trusted"])
    side = _edit_sidecar(graph, lambda d: d.pop("signature"), reseal=True)
    _refused(SignatureError, f"{side} is not signed", lambda: Predictor.load(graph, trusted_keys=[keys["trusted_pub"]]))


def test_untrusted_key_is_refused(tmp_path, keys):
    graph = _write_graph(tmp_path, "cats", 0, keys["other"])
    side = graph.with_suffix(".json")
    _refused(SignatureError, f"{side} is signed by key {keys['other'].key_id}, which this device does not trust",
             lambda: Predictor.load(graph, trusted_keys=[keys["trusted_pub"]]))


def test_trusted_keys_from_the_environment(tmp_path, keys, monkeypatch):
    graph = _write_graph(tmp_path, "cats", 0, keys["other"])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["trusted_pub"]))
    _refused(SignatureError, "does not trust", lambda: Predictor.load(graph))
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["other_pub"]))
    Predictor.load(graph).close()


@pytest.mark.parametrize("swapped", ["graph", "sidecar"])
def test_a_file_swapped_in_from_another_artifact_is_refused(tmp_path, keys, swapped):
    """Both tasks are validly signed by the trusted key; mixing their files is still refused."""
    cats = _write_graph(tmp_path / "cats", "cats", 0, keys["trusted"])
    dogs = _write_graph(tmp_path / "dogs", "cats", 1, keys["trusted"])  # same name, other weights
    if swapped == "graph":
        shutil.copy(dogs, cats)
    else:
        shutil.copy(dogs.with_suffix(".json"), cats.with_suffix(".json"))
    _refused(IntegrityError, f"task graph {cats} does not match the graph_blake3",
             lambda: Predictor.load(cats, trusted_keys=[keys["trusted_pub"]]))


def test_an_array_edited_in_place_is_refused(tmp_path, keys):
    graph = _write_graph(tmp_path, "cats", 0, keys["trusted"])
    blob = bytearray(graph.read_bytes())
    blob[-20] ^= 0x01  # one bit of an initializer near the end of the protobuf
    graph.write_bytes(bytes(blob))
    _refused(IntegrityError, f"task graph {graph} does not match", lambda: Predictor.load(graph))


def test_rollback_is_refused_where_the_device_keeps_a_version_record(tmp_path, keys):
    record = tmp_path / "device" / "versions.json"
    old = _write_graph(tmp_path / "v1", "cats", 0, keys["trusted"], issued=100)
    new = _write_graph(tmp_path / "v2", "cats", 1, keys["trusted"], issued=200)
    load = {"trusted_keys": [keys["trusted_pub"]], "version_record": VersionRecord.create(record)}
    Predictor.load(old, **load).close()
    Predictor.load(new, **load).close()  # an update: recorded
    assert json.loads(record.read_text())["tasks"] == {"cats": 200}
    _refused(RollbackError, f"{old.with_suffix('.json')} holds task 'cats' issued at 100, older",
             lambda: Predictor.load(old, **load))
    Predictor.load(old, trusted_keys=[keys["trusted_pub"]]).close()  # no record kept: no rollback check


def test_old_format_is_refused_or_loads_only_when_allowed_loudly(tmp_path, keys):
    graph = _write_graph(tmp_path, "cats", 0)
    side = _edit_sidecar(graph, lambda d: (d.update(version=1), d.pop("content_sha256"), d.pop("issued")))
    _refused(IntegrityError, f"task sidecar {side} is format version 1.*re-compile", lambda: Predictor.load(graph))
    with pytest.warns(RuntimeWarning, match="LOADING AN UNVERIFIED ARTIFACT"):
        Predictor.load(graph, allow_unverified=True).close()
    _refused(IntegrityError, "format version 1",  # trusted keys: nothing unsigned, allowed or not
             lambda: Predictor.load(graph, allow_unverified=True, trusted_keys=[keys["trusted_pub"]]))


def test_old_format_keeps_the_checks_it_had(tmp_path):
    """--allow-unverified lifts only what the old format lacked: a digest or graph hash it does
    carry is still checked, as that format's loader checked it."""
    graph = _write_graph(tmp_path, "cats", 0)
    side = _edit_sidecar(graph, lambda d: (d.update(version=1, graph_sha256=file_sha256(graph)), d.pop("issued"),
                                           d.pop("graph_blake3")), reseal=True)  # as that format wrote it
    _edit_sidecar(graph, lambda d: d.update(classes=d["classes"][::-1]))  # its digest no longer matches
    with pytest.warns(RuntimeWarning, match="UNVERIFIED"):
        _refused(IntegrityError, f"{side} was changed", lambda: Predictor.load(graph, allow_unverified=True))
    _edit_sidecar(graph, lambda d: d.pop("content_sha256"))
    shutil.copy(_write_graph(tmp_path / "other", "cats", 1), graph)  # and another graph in its place
    with pytest.warns(RuntimeWarning, match="UNVERIFIED"):
        _refused(IntegrityError, f"task graph {graph} does not match the graph_sha256",
                 lambda: Predictor.load(graph, allow_unverified=True))


# -- multi-task graph and engine --------------------------------------------------------------------


def _multi_task_graph(tmp_path: Path, key) -> Path:
    """A two-task graph (the tiny graph's two outputs read as two tasks), with the version-4 sidecar
    `compile A B` writes, sealed and signed."""
    graph = _write_graph(tmp_path, "pair", 0)
    single = json.loads(graph.with_suffix(".json").read_text())
    tasks = [{"task": "cats", "classes": single["classes"], "outputs": {"logits": "logits"}},
             {"task": "dogs", "classes": single["classes"][::-1], "outputs": {"logits": "probabilities"}}]
    sidecar = {"format": single["format"], "version": MULTITASK_SIDECAR_VERSION, "tasks": tasks,
               "preprocess": single["preprocess"], "input": "images", "backbone": single["backbone"],
               "graph_blake3": file_blake3(graph)}
    graph.with_suffix(".json").write_text(json.dumps(seal(sidecar, key)))
    return graph


def test_multi_task_graph_attacks(tmp_path, keys):
    graph = _multi_task_graph(tmp_path, keys["trusted"])
    trusted = {"trusted_keys": [keys["trusted_pub"]]}
    Predictor.load(graph, **trusted).close()
    side = _edit_sidecar(graph, lambda d: d["tasks"].reverse(), reseal=True)  # swap the tasks' outputs
    _refused(SignatureError, f"{side}: the signature does not verify", lambda: Predictor.load(graph, **trusted))
    _edit_sidecar(graph, lambda d: d.pop("content_sha256"))
    _refused(IntegrityError, f"{side} has no content_sha256", lambda: Predictor.load(graph))


def test_engine_attacks(tmp_path, keys):
    from h2t_edge.serving.engines import build_engine

    graph = _write_graph(tmp_path, "cats", 0, keys["trusted"])
    engine = build_engine(graph, "onnxruntime", "fp16", signing_key=keys["trusted"], accept_drop=True).path
    side = engine.with_suffix(".json")
    trusted = {"trusted_keys": [keys["trusted_pub"]]}
    Predictor.load(engine, **trusted).close()
    original = side.read_text()
    _edit_sidecar(engine, lambda d: d["build"].update(precision="fp32"), reseal=True)  # the record lies
    _refused(SignatureError, f"{side}: the signature does not verify", lambda: Predictor.load(engine, **trusted))
    side.write_text(original)
    _edit_sidecar(engine, lambda d: d["build"].pop("artifact_blake3"), reseal=True)
    _refused(IntegrityError, "build.artifact_blake3", lambda: Predictor.load(engine))
    side.write_text(original)
    shutil.copy(graph, engine)  # another valid graph in place of the engine
    _refused(IntegrityError, f"engine {engine} does not match the build.artifact_blake3",
             lambda: Predictor.load(engine, **trusted))


def test_building_an_engine_checks_its_source_graph(tmp_path):
    from h2t_edge.serving.engines import EngineBuildError, build_engine

    graph = _write_graph(tmp_path, "cats", 0)
    _edit_sidecar(graph, lambda d: d.update(classes=d["classes"][::-1]))
    _refused(EngineBuildError, "was changed after it was written", lambda: build_engine(graph, "onnxruntime", "fp16"))


def test_tensorrt_engine_record_attacks(tmp_path):
    from runtime.backends.base import BatchProfile
    from runtime.backends.tensorrt import EngineKey, check_engine_record, write_engine_record

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine")
    record = write_engine_record(engine, EngineKey("0" * 64, "10.0", "GPU", "fp16", BatchProfile.up_to(8)))
    assert check_engine_record(engine, "10.0", "GPU").precision == "fp16"
    data = json.loads(record.read_text())
    edited = {**data, "key": {**data["key"], "precision": "int8"}}  # an edited record (issue 23)
    record.write_text(json.dumps(edited))
    _refused(IntegrityError, f"engine record {record} was changed", lambda: check_engine_record(engine, "10.0", "GPU"))
    record.write_text(json.dumps({k: v for k, v in data.items() if k != "content_sha256"}))
    _refused(IntegrityError, "has no content_sha256", lambda: check_engine_record(engine, "10.0", "GPU"))
    record.write_text(json.dumps(data))
    engine.write_bytes(b"another engine")
    _refused(ArtifactError, "does not match the engine_blake3", lambda: check_engine_record(engine, "10.0", "GPU"))


# -- serving ---------------------------------------------------------------------------------------


def test_export_triton_verifies_every_graph_before_it_enters_the_repository(tmp_path, keys):
    from h2t_edge.core.errors import ServingError
    from h2t_edge.serving.triton_repo import export_repository

    good = _write_graph(tmp_path / "a", "cats", 0, keys["trusted"])
    unsigned = _write_graph(tmp_path / "b", "dogs", 1)
    repo = tmp_path / "repo"
    with pytest.raises(ServingError, match=f"{unsigned.with_suffix('.json')} is not signed"):
        export_repository([good, unsigned], repo, trusted_keys=[keys["trusted_pub"]])
    assert not repo.exists()  # nothing entered: every graph is checked before any is written
    tampered = _write_graph(tmp_path / "c", "birds", 2)
    _edit_sidecar(tampered, lambda d: d.update(classes=d["classes"][::-1]))
    with pytest.raises(ServingError, match="was changed after it was written"):
        export_repository([tampered], repo)


def _python_model(tmp_path, keys, monkeypatch):
    """A signed python-backend model folder and the `initialize` args Triton would pass for it."""
    from google.protobuf import json_format

    from h2t_edge.serving.triton_repo import export_repository, parse_config

    good = _write_graph(tmp_path / "a", "cats", 0, keys["trusted"])
    model_dir, = export_repository([good], tmp_path / "repo", backend="python", trusted_keys=[keys["trusted_pub"]],
                                   signing_key=keys["trusted"])
    config = parse_config((model_dir / "config.pbtxt").read_text())
    # Triton hands the model its config as JSON; protobuf's JSON form has the same fields
    args = {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(model_dir), "model_version": "1"}
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["trusted_pub"]))
    return model_dir, args


def test_the_triton_model_file_checks_its_model_again_at_load(tmp_path, keys, monkeypatch):
    from h2t_edge.serving.triton_python_model import MANIFEST_FILE, TritonPythonModel
    from h2t_edge.serving.triton_repo import SIDECAR_FILE

    model_dir, args = _python_model(tmp_path, keys, monkeypatch)
    TritonPythonModel().initialize(args)  # loads
    side = model_dir / SIDECAR_FILE
    original = side.read_text()
    data = json.loads(original)
    data["classes"] = data["classes"][::-1]
    data["content_sha256"] = content_digest(data)
    side.write_text(json.dumps(data))  # edited inside the repository, digest recomputed
    _refused(IntegrityError, f"{side} does not match the files.{SIDECAR_FILE}_blake3 recorded in "
             f"{model_dir / MANIFEST_FILE}", lambda: TritonPythonModel().initialize(args))
    _relist_triton(model_dir, keys["trusted"])  # even with the manifest signed again, the sidecar's signature
    _refused(SignatureError, f"{side}: the signature does not verify", lambda: TritonPythonModel().initialize(args))
    side.write_text(original)
    (model_dir / "1" / "model.onnx").write_bytes(_write_graph(tmp_path / "d", "cats", 3).read_bytes())
    _relist_triton(model_dir, keys["trusted"])
    _refused(IntegrityError, "does not match the graph_blake3", lambda: TritonPythonModel().initialize(args))


def _relist_triton(model_dir: Path, key) -> None:
    """The model's manifest signed again over the files there now (to reach the checks behind it)."""
    from h2t_edge.serving.triton_python_model import MANIFEST_FILE, model_files
    from runtime.io import json_bytes
    from runtime.trust import file_digest

    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["files"] = {rel: file_digest((model_dir / rel).read_bytes()) for rel in model_files(model_dir)}
    (model_dir / MANIFEST_FILE).write_bytes(json_bytes(seal(manifest, key)))


@pytest.mark.parametrize("attack", ["labels", "config", "model_code", "extra_file", "deleted_file",
                                    "unsigned_manifest", "config_loaded"])
def test_every_file_of_a_triton_model_is_covered(tmp_path, keys, monkeypatch, attack):
    """Issue 28: editing labels.txt, the preprocessing in config.pbtxt or the model code, adding or deleting a
    file, an unsigned (re-hashed) manifest, or a config Triton loaded that differs from the signed one: refused."""
    from h2t_edge.core.errors import ServingError
    from h2t_edge.serving.triton_python_model import MANIFEST_FILE, TritonPythonModel
    from h2t_edge.serving.triton_repo import verify_repository

    model_dir, args = _python_model(tmp_path, keys, monkeypatch)
    manifest = model_dir / MANIFEST_FILE
    error, match = IntegrityError, f"does not match the files.{{}}_blake3 recorded in {manifest}"
    if attack == "labels":
        labels = model_dir / "labels.txt"
        labels.write_text(labels.read_text().replace("cat", "dog"))
        match = match.format("labels.txt")
    elif attack == "config":
        config = model_dir / "config.pbtxt"
        config.write_text(config.read_text().replace("0.485", "0.9"))  # the preprocessing contract
        match = match.format("config.pbtxt")
    elif attack == "model_code":
        code = model_dir / "1" / "model.py"
        code.write_text(code.read_text() + "\nimport os  # appended\n")
        match = match.format("1/model.py")
    elif attack == "extra_file":
        (model_dir / "1" / "helper.py").write_text("print('planted')\n")
        match = r"does not hold the files .* lists: missing \[\], not listed \['1/helper.py'\]"
    elif attack == "deleted_file":
        (model_dir / "labels.txt").unlink()
        match = r"missing \['labels.txt'\]"
    elif attack == "unsigned_manifest":
        data = json.loads(manifest.read_text())
        data.pop("signature")
        data["content_sha256"] = content_digest(data)
        manifest.write_text(json.dumps(data))
        error, match = SignatureError, f"{manifest} is not signed"
    else:  # Triton read another config.pbtxt than the one on disk now (swapped back after its read)
        loaded = json.loads(args["model_config"])
        loaded["parameters"]["h2t_edge.preprocess"]["string_value"] = "{}"
        args = {**args, "model_config": json.dumps(loaded)}
        match = "the config Triton loaded"
    _refused(error, match, lambda: TritonPythonModel().initialize(args))
    if attack != "config_loaded":  # what `serve` checks before it starts the server
        with pytest.raises(ServingError, match=match):
            verify_repository(model_dir.parent, [keys["trusted_pub"]])


def test_predict_cli_takes_trusted_keys_and_names_the_refused_file(tmp_path, keys):
    from click.testing import CliRunner
    from PIL import Image

    from h2t_edge.cli import cli

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    graph = _write_graph(tmp_path, "cats", 0, keys["other"])
    ok = CliRunner().invoke(cli, ["predict", str(graph), str(image), "--trusted-key", str(keys["other_pub"])])
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(cli, ["predict", str(graph), str(image), "--trusted-key", str(keys["trusted_pub"])])
    assert refused.exit_code != 0 and isinstance(refused.exception, SignatureError)
    assert str(graph.with_suffix(".json")) in str(refused.exception)


def test_keys_generate_writes_a_private_key_only_its_owner_reads(tmp_path):
    from click.testing import CliRunner

    from h2t_edge.cli import cli

    result = CliRunner().invoke(cli, ["keys", "generate", "-o", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    SigningKey.load(tmp_path / "k" / "signing.key")  # loads back; the public key is PEM too
    assert (tmp_path / "k" / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = CliRunner().invoke(cli, ["keys", "generate", "-o", str(tmp_path / "k")])
    assert again.exit_code != 0 and "already holds a key pair" in str(again.exception)
