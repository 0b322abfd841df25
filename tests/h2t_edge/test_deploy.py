"""Several tasks on one backbone: the multi-task graph and the shared-backbone + heads folder.

Heads are random selections on early taps with random weights (what is compiled does not depend on
how a head was fitted); the reference is always extract (the exported backbone) -> gather -> head.
"""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.cli import cli
from h2t_edge.steps.compile import DeployError, compile_tasks_step
from h2t_edge.steps.deploy import package_shared_step
from runtime.errors import ArtifactError
from runtime.heads import HEADS_MANIFEST, SharedBackbonePredictor, heads_manifest
from runtime.io import file_sha256, json_bytes
from runtime.predictor import MULTITASK_SIDECAR_VERSION, Predictor
from runtime.trust import seal

TAPS = ({"stem", "blocks.1.0.bn2"}, {"blocks.1.0.bn2", "blocks.2.0"}, {"blocks.0.0.bn1", "blocks.2.1.bn1"})


def _head(layout, sha, name, taps, classes, seed):
    rng = np.random.default_rng(seed)
    chosen = [t["offset"] + rng.choice(t["features"], 12, replace=False) for t in layout["taps"] if t["name"] in taps]
    features = np.sort(np.concatenate(chosen))
    return TaskHead(
        task=name, method="HEAD2TOE", classes=[f"{name}-{c}" for c in range(classes)], features=features,
        weight=rng.normal(size=(len(features), classes)).astype(np.float32),
        bias=rng.normal(size=classes).astype(np.float32), layout=layout,
        backbone={"name": layout["backbone"], "weights": layout["weights"], "onnx_sha256": sha},
    )


@pytest.fixture(scope="module")
def tasks(lite0_onnx, tmp_path_factory):
    path, layout = lite0_onnx
    root = tmp_path_factory.mktemp("tasks")
    sha = file_sha256(path)
    return [_head(layout, sha, f"t{i}", taps, 2 + i, i).save(root / f"t{i}") for i, taps in enumerate(TAPS)]


@pytest.fixture(scope="module")
def reference(lite0_onnx, tasks):
    """Images and each task's logits through extract -> gather -> head."""
    import onnxruntime as ort

    path, _ = lite0_onnx
    x = np.random.default_rng(7).normal(size=(3, 3, 224, 224)).astype(np.float32)
    taps = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    features = np.concatenate(taps, axis=1)
    return x, {TaskHead.load(d).task: TaskHead.load(d).logits(features) for d in tasks}


@pytest.fixture(scope="module")
def multitask_graph(tasks, tmp_path_factory):
    return compile_tasks_step(tasks, tmp_path_factory.mktemp("graph") / "tasks.onnx")


@pytest.mark.parametrize("edit", ["swap_classes", "rename_task"])
def test_edited_multitask_sidecar_is_refused(multitask_graph, tmp_path, edit):
    """The multi-task sidecar is signed like the single-task one (core.sidecar.write_task_graph):
    an edit that still fits the schema is refused at load, naming the file."""
    graph = tmp_path / "tasks.onnx"
    shutil.copy(multitask_graph.path, graph)
    sidecar = json.loads(multitask_graph.path.with_suffix(".json").read_text())
    assert "content_sha256" in sidecar
    if edit == "swap_classes":  # valid, and every label of t1 would be wrong
        sidecar["tasks"][1]["classes"] = sidecar["tasks"][1]["classes"][::-1]
    else:
        sidecar["tasks"][0]["task"] = "renamed"
    (tmp_path / "tasks.json").write_text(json.dumps(sidecar))
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'tasks.json'} was changed after it was written"):
        Predictor.load(graph, providers=["CPUExecutionProvider"])


def test_multitask_graph_predicts_every_task_like_the_pipeline(multitask_graph, reference):
    x, expected = reference
    assert multitask_graph.tasks == ["t0", "t1", "t2"]
    sidecar = json.loads(multitask_graph.path.with_suffix(".json").read_text())
    assert sidecar["version"] == MULTITASK_SIDECAR_VERSION
    assert [t["classes"] for t in sidecar["tasks"]] == [[f"t{i}-{c}" for c in range(2 + i)] for i in range(3)]
    with Predictor.load(multitask_graph.path, providers=["CPUExecutionProvider"]) as predictor:
        assert [t.task for t in predictor.tasks] == ["t0", "t1", "t2"]
        scores = predictor.predict_tasks(x)
        with pytest.raises(ArtifactError, match="predict_tasks"):
            predictor.predict_arrays(x)
    for task, logits in expected.items():
        probabilities, got = scores[task]
        np.testing.assert_allclose(got, logits, atol=1e-4)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
        assert (probabilities.argmax(1) == logits.argmax(1)).all()


def test_tasks_from_other_backbone_exports_are_refused(tasks, tmp_path):
    other = TaskHead.load(tasks[1])
    other.backbone = {**other.backbone, "onnx_sha256": "f" * 64}
    other.task = "other"
    other.save(tmp_path / "other")
    with pytest.raises(DeployError, match=r"task 'other' .*other.* task 't0' .*t0"):
        compile_tasks_step([tasks[0], tmp_path / "other"], tmp_path / "x.onnx")
    with pytest.raises(DeployError, match="more than once"):
        compile_tasks_step([tasks[0], tasks[0]], tmp_path / "x.onnx")


def test_shared_backbone_and_heads_compose_to_the_same_results(lite0_onnx, tasks, reference, tmp_path):
    """The device graph is pruned to the taps its heads read; heads compose to the extract -> head
    logits through it; a new head that needs another tap is refused, one within its taps is added."""
    import onnx

    path, layout = lite0_onnx
    x, expected = reference
    report = package_shared_step(tasks[:2], tmp_path / "deploy", backbone_onnx=path)
    assert report.backbone_written and set(report.heads) == {"t0", "t1"}
    union = ["stem", "blocks.1.0.bn2", "blocks.2.0"]  # TAPS[0] | TAPS[1], in layout order
    assert report.taps == union
    backbone = tmp_path / "deploy" / "backbone.onnx"
    graph = onnx.load(backbone)
    assert [o.name for o in graph.graph.output] == union
    full = onnx.load(path)
    assert len(graph.graph.node) < len(full.graph.node)  # pooling of 48 taps and the tail are gone
    # A head is tiny next to the backbone.
    assert max(report.heads.values()) < 0.01 * report.backbone_bytes
    stamp = backbone.stat().st_mtime_ns
    with pytest.raises(DeployError, match=r"reads taps \['blocks.0.0.bn1', 'blocks.2.1.bn1'\].*--taps-from"):
        package_shared_step(tasks[2:], tmp_path / "deploy")
    # Adding a task within the device's taps writes only its head.
    inside = _head(layout, file_sha256(path), "t3", {"stem", "blocks.2.0"}, 3, 9).save(tmp_path / "t3")
    again = package_shared_step([inside], tmp_path / "deploy")
    assert not again.backbone_written and backbone.stat().st_mtime_ns == stamp
    import onnxruntime as ort

    features = np.concatenate(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                              .run(None, {"images": x}), axis=1)
    expected = {**{k: v for k, v in expected.items() if k != "t2"}, "t3": TaskHead.load(inside).logits(features)}
    with SharedBackbonePredictor.load(tmp_path / "deploy", providers=["CPUExecutionProvider"]) as predictor:
        scores = predictor.predict_tasks(x)
    assert list(scores) == ["t0", "t1", "t3"]
    for task, logits in expected.items():
        np.testing.assert_allclose(scores[task][1], logits, atol=1e-4)
    # every task in one folder: the union of all three
    assert package_shared_step(tasks, tmp_path / "all", backbone_onnx=path).taps == [
        t["name"] for t in layout["taps"] if t["name"] in set().union(*TAPS)]


def test_device_taps_of_a_deploy_folder_and_of_a_compiled_graph(lite0_onnx, tasks, multitask_graph, tmp_path):
    from h2t_edge.steps.deploy import device_taps

    path, _ = lite0_onnx
    package_shared_step(tasks[:1], tmp_path / "deploy", backbone_onnx=path)
    device = device_taps(tmp_path / "deploy")
    assert set(device.taps) == TAPS[0] and device.backbone["name"] == "efficientnet_lite0"
    graph = device_taps(multitask_graph.path)
    assert set(graph.taps) == set().union(*TAPS)
    with pytest.raises(DeployError, match="neither a `deploy` folder"):
        device_taps(tmp_path)
    meta = tmp_path / "deploy" / "backbone.json"
    data = json.loads(meta.read_text())
    data["taps"] = data["taps"] + ["blocks.6.0"]  # edited without sealing again
    meta.write_text(json.dumps(data))
    with pytest.raises(DeployError, match="backbone.json"):
        device_taps(tmp_path / "deploy")


def test_shared_folder_refuses_a_head_of_another_export(lite0_onnx, tasks, tmp_path):
    path, _ = lite0_onnx
    package_shared_step(tasks[:1], tmp_path / "deploy", backbone_onnx=path)
    meta = tmp_path / "deploy" / "heads" / "t0.json"
    data = json.loads(meta.read_text())
    data["layout_sha256"] = "0" * 64
    meta.write_text(json.dumps(seal(data)))  # sealed again: the layout check itself must refuse it
    _relist(tmp_path / "deploy")
    with pytest.raises(ArtifactError, match="layout_sha256"):
        SharedBackbonePredictor.load(tmp_path / "deploy")
    with pytest.raises(DeployError, match="not the backbone export"):
        package_shared_step(tasks[:1], tmp_path / "other", backbone_onnx=meta)


def _relist(root, key=None):
    """Write ROOT/heads.json again over the head files there now (signed with `key`), so a test reaches
    the check of the head itself rather than the list's."""
    heads = {p.stem: p.read_bytes() for p in (root / "heads").glob("*.json")}
    (root / HEADS_MANIFEST).write_bytes(json_bytes(seal(heads_manifest(heads), key)))


def test_cli_compile_and_predict_one_column_per_task(multitask_graph, tasks, photos, tmp_path):
    runner = CliRunner()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copy(photos[name], images)
    result = runner.invoke(cli, ["predict", str(multitask_graph.path), str(images)])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == ["path", "t0", "t1", "t2"]
    assert len(rows) == 2 and all(r.split()[1].startswith("t0-") and r.split()[5].startswith("t2-") for r in rows)
    result = runner.invoke(cli, ["predict", str(multitask_graph.path), str(images), "--format", "csv"])
    assert result.output.splitlines()[0] == "path,t0,t0.probability,t1,t1.probability,t2,t2.probability,error"


def test_multitask_graph_passes_the_tensorrt_check(multitask_graph):
    from exporters.trt_check import check_tensorrt

    report = check_tensorrt(multitask_graph.path)
    assert report.ok, report.summary()


def test_multitask_graph_on_openvino_names_each_task(multitask_graph, reference):
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'h2t-edge[openvino]'")
    x, expected = reference
    # OpenVINO merges the names of fused tensors; each task's output must keep the task's name.
    with Predictor.load(multitask_graph.path, backend="openvino") as predictor:
        scores = predictor.predict_tasks(x)
    for task, logits in expected.items():
        np.testing.assert_allclose(scores[task][1], logits, atol=1e-4)


@pytest.mark.gpu
def test_multitask_engine_on_tensorrt_matches_onnxruntime(multitask_graph, reference, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'h2t-edge[tensorrt]'")
    from h2t_edge.serving.engines import build_engine
    from runtime.backends.tensorrt import gpu_name
    from runtime.errors import BackendUnavailable

    try:
        gpu_name()
    except BackendUnavailable as exc:
        pytest.skip(f"no usable NVIDIA GPU: {exc}")
    x, expected = reference
    graph = tmp_path / multitask_graph.path.name
    shutil.copy(multitask_graph.path, graph)
    shutil.copy(multitask_graph.path.with_suffix(".json"), graph.with_suffix(".json"))
    report = build_engine(graph, "tensorrt", "fp32", max_batch=4, cache_dir=tmp_path / "cache")
    assert json.loads(report.sidecar.read_text())["version"] == 2  # the task sidecar travels with the engine
    with Predictor.load(report.path, backend="tensorrt") as predictor:
        scores = predictor.predict_tasks(x)
    for task, logits in expected.items():
        np.testing.assert_allclose(scores[task][1], logits, atol=1e-3)


def test_cli_deploy_then_add_a_task_and_predict(lite0_onnx, tasks, photos, tmp_path):
    path, _ = lite0_onnx
    runner = CliRunner()
    out = tmp_path / "device"
    result = runner.invoke(cli, ["deploy", str(tasks[0]), "-o", str(out), "--backbone", str(path)])
    assert result.exit_code == 0, result.output
    assert "wrote head t0" in result.output and "backbone.onnx" in result.output
    result = runner.invoke(cli, ["deploy", str(tasks[1]), "-o", str(out)])  # t1 reads blocks.2.0: t0 does not
    assert isinstance(result.exception, DeployError) and "--taps-from" in str(result.exception), result.output
    subset = _head(TaskHead.load(tasks[1]).layout, file_sha256(path), "t1", {"blocks.1.0.bn2"}, 3, 1)
    result = runner.invoke(cli, ["deploy", str(subset.save(tmp_path / "t1")), "-o", str(out)])
    assert result.exit_code == 0 and "backbone.onnx" not in result.output, result.output
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["t0.json", "t0.safetensors", "t1.json", "t1.safetensors"]
    result = runner.invoke(cli, ["predict", str(out), str(photos["chelsea"]), "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["t0"].startswith("t0-") and row["t1"].startswith("t1-") and 0 < row["t1.probability"] <= 1


def test_shared_folder_attacks(lite0_onnx, tasks, tmp_path):
    """Issue 23 on the shared-backbone form: heads arrive one at a time, each signed on its own; the
    device refuses each downgrade path of a head with a typed error naming the file."""
    pytest.importorskip("cryptography", reason="signing needs cryptography: pip install 'h2t-edge[sign]'")
    from runtime.trust import IntegrityError, RollbackError, SignatureError, SigningKey, VersionRecord, content_digest

    path, _ = lite0_onnx
    key, other = SigningKey.generate(), SigningKey.generate()
    pub = key.save(tmp_path / "keys")[1]
    device, record = tmp_path / "device", tmp_path / "versions.json"
    package_shared_step(tasks[:2], device, backbone_onnx=path, signing_key=key)
    trusted = {"trusted_keys": [pub], "version_record": VersionRecord.create(record)}
    SharedBackbonePredictor.load(device, **trusted).close()
    heads = device / "heads"
    kept = {p.name: p.read_bytes() for p in heads.iterdir()}
    listed = (device / HEADS_MANIFEST).read_bytes()

    def restore():
        for name, data in kept.items():
            (heads / name).write_bytes(data)
        (device / HEADS_MANIFEST).write_bytes(listed)

    def load():
        # heads.json signed again over the edited files: each head's own checks must refuse it
        _relist(device, key)
        SharedBackbonePredictor.load(device, **trusted).close()

    meta = json.loads((heads / "t0.json").read_text())
    for edit, error, match in [
        (lambda d: d.pop("content_sha256"), IntegrityError, "has no content_sha256"),
        (lambda d: (d.update(classes=d["classes"][::-1]), d.update(content_sha256=content_digest(d))),
         SignatureError, "the signature does not verify"),
        (lambda d: (d.pop("signature"), d.update(content_sha256=content_digest(d))), SignatureError, "is not signed"),
    ]:
        data = json.loads(json.dumps(meta))
        edit(data)
        (heads / "t0.json").write_text(json.dumps(data))
        with pytest.raises(error, match=match) as info:
            load()
        assert str(heads / "t0.json") in str(info.value)
        restore()
    # signed by a key the device does not trust
    package_shared_step(tasks[:1], tmp_path / "rogue", backbone_onnx=path, signing_key=other)
    shutil.copy(tmp_path / "rogue" / "heads" / "t0.json", heads / "t0.json")
    shutil.copy(tmp_path / "rogue" / "heads" / "t0.safetensors", heads / "t0.safetensors")
    with pytest.raises(SignatureError, match="which this device does not trust"):
        load()
    restore()
    # another head's files swapped in under this head's name (both validly signed)
    shutil.copy(heads / "t1.json", heads / "t0.json")
    shutil.copy(heads / "t1.safetensors", heads / "t0.safetensors")
    with pytest.raises(IntegrityError, match=f"{heads / 't0.json'} holds task 't1', not 't0'"):
        load()
    restore()
    shutil.copy(heads / "t1.safetensors", heads / "t0.safetensors")  # the tensors only
    with pytest.raises(IntegrityError, match=f"{heads / 't0.safetensors'} does not match the head_blake3"):
        load()
    restore()
    blob = bytearray((heads / "t0.safetensors").read_bytes())  # one bit of one weight, in place
    blob[-3] ^= 0x01
    (heads / "t0.safetensors").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="does not match the head_blake3"):
        load()
    restore()
    # rollback: a newer t0 was installed and loaded; the old one copied back is refused
    package_shared_step(tasks[:1], device, signing_key=key)
    load()
    for name, data in kept.items():
        if name.startswith("t0."):
            (heads / name).write_bytes(data)
    with pytest.raises(RollbackError, match=f"{heads / 't0.json'} holds task 't0' issued at .* older"):
        load()


def test_compile_reports_each_tasks_added_latency(tasks, multitask_graph, tmp_path):
    """`compile A B ...`: the graph's estimated latency and what each task adds (the taps no earlier task reads)."""
    from h2t_edge.core.costs import TapCosts

    layout = TaskHead.load(tasks[0]).layout
    cost = TapCosts.bytes_model(layout).by_name()
    report = multitask_graph
    seen: set[str] = set()
    for task, taps in zip(("t0", "t1", "t2"), TAPS):
        assert report.added_latency[task] == pytest.approx(sum(cost[t] for t in taps - seen))
        seen |= taps
    assert report.latency_estimate == pytest.approx(1.0 + sum(cost[t] for t in seen))
    assert json.loads(report.path.with_suffix(".json").read_text())["latency_estimate"] == pytest.approx(
        report.latency_estimate)
    result = CliRunner().invoke(cli, ["compile", str(tasks[1]), str(tasks[0]), "-o", str(tmp_path / "two.onnx")])
    assert result.exit_code == 0, result.output
    assert "estimated batch-1 latency" in result.output and "t0: +" in result.output and "t1: +" in result.output
