"""`h2t_edge.serving.triton_repo`: model repositories checked with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from h2t_edge.cli import cli
from h2t_edge.core.errors import ServingError
from h2t_edge.serving.triton_repo import export_repository, validate_model_dir
from runtime.io import read_json


def parse(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_repository_layout_and_config(task_graphs, tmp_path):
    dirs = export_repository(task_graphs, tmp_path / "repo", max_batch_size=16, max_queue_delay_us=250)
    assert [d.name for d in dirs] == ["tiny", "tiny2"]
    for model_dir, graph in zip(dirs, task_graphs):
        config = parse(model_dir)
        assert config.name == model_dir.name and config.backend == "onnxruntime"
        assert config.max_batch_size == 16 and config.dynamic_batching.max_queue_delay_microseconds == 250
        assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [
            ("images", [3, 32, 32], model_config_pb2.TYPE_FP32)]
        assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
            ("probabilities", [4], "labels.txt"), ("logits", [4], "labels.txt")]
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
        assert (model_dir / "1" / "model.onnx").read_bytes() == graph.read_bytes()
        sidecar = read_json(graph.with_suffix(".json"), "sidecar")
        assert (model_dir / "labels.txt").read_text().splitlines() == sidecar["classes"]
        # The preprocessing contract travels with the model: in the config and as the sidecar.
        assert json.loads(config.parameters["h2t_edge.preprocess"].string_value) == sidecar["preprocess"]
        assert read_json(model_dir / "h2t_edge_task.json", "sidecar") == sidecar


def test_multi_task_graph_gets_every_output_and_its_labels(multi_task_graph, tmp_path):
    (model_dir,) = export_repository([multi_task_graph], tmp_path / "repo", tensorrt=None)
    assert model_dir.name == "animals_objects"
    config = parse(model_dir)
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    outputs = {o.name: (list(o.dims), o.label_filename) for o in config.output}
    assert {name: dims for name, (dims, _) in outputs.items()} == {
        "animals_probabilities": [2], "animals_logits": [2], "objects_probabilities": [3], "objects_logits": [3]}
    labels = {name: (model_dir / f).read_text().splitlines() for name, (_, f) in outputs.items()}
    assert labels["animals_logits"] == ["cat", "dog"] and labels["objects_probabilities"] == ["cup", "rocket", "other"]


def test_python_backend_flavour(task_graphs, tmp_path):
    (model_dir,) = export_repository(task_graphs[:1], tmp_path / "repo", backend="python", instances=2)
    config = parse(model_dir)
    assert config.backend == "python" and (model_dir / "1" / "model.py").is_file()
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["h2t_edge.graph_file"].string_value == "model.onnx"


def test_versions_overwrite_and_names(task_graphs, tmp_path):
    repo = tmp_path / "repo"
    export_repository(task_graphs[:1], repo)
    with pytest.raises(ServingError, match="already exists.*--overwrite"):
        export_repository(task_graphs[:1], repo)
    export_repository(task_graphs[:1], repo, version=2)
    assert sorted(p.name for p in (repo / "tiny").iterdir() if p.is_dir()) == ["1", "2"]
    export_repository(task_graphs[:1], repo, overwrite=True)
    with pytest.raises(ServingError, match="both named 'tiny'"):
        export_repository([task_graphs[0], task_graphs[0]], tmp_path / "other")
    with pytest.raises(ServingError, match="not a usable Triton model name"):
        export_repository(task_graphs[:1], tmp_path / "other", names=["a/b"])


def test_validation_catches_a_broken_config(task_graphs, tmp_path):
    (model_dir,) = export_repository(task_graphs[:1], tmp_path / "repo")
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace("dims: 4\n", "dims: 5\n", 1))
    with pytest.raises(ServingError, match="field 'output' does not match"):
        validate_model_dir(model_dir)
    config.write_text(text.replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(ServingError, match="not a valid Triton model config"):
        validate_model_dir(model_dir)
    config.write_text(text)
    (model_dir / "labels.txt").unlink()
    with pytest.raises(ServingError, match="label_filename"):
        validate_model_dir(model_dir)


def test_cli_export_triton(task_graphs, tmp_path):
    result = CliRunner().invoke(cli, ["export-triton", *map(str, task_graphs), "-o", str(tmp_path / "repo"),
                                      "--tensorrt", "off", "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert parse(tmp_path / "repo" / "tiny2").max_batch_size == 8
    assert "tiny2:" in result.output


def test_preprocess_contract_from_config_and_its_errors(task_graphs, tmp_path):
    from h2t_edge.serving.triton_repo import preprocess_contract
    from runtime.preprocess import PreprocessConfig

    (model_dir,) = export_repository(task_graphs[:1], tmp_path / "repo")
    config = parse(model_dir)
    expected = PreprocessConfig.from_dict(read_json(task_graphs[0].with_suffix(".json"), "sidecar")["preprocess"])
    assert preprocess_contract(config) == expected
    as_dict = {"name": "tiny", "parameters": {"h2t_edge.preprocess": {
        "string_value": config.parameters["h2t_edge.preprocess"].string_value}}}
    assert preprocess_contract(as_dict) == expected
    del config.parameters["h2t_edge.preprocess"]
    with pytest.raises(ServingError, match="no 'h2t_edge.preprocess' parameter"):
        preprocess_contract(config)
