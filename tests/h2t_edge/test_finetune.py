"""Layer-FT / SCL-FT: the paper's layer choice, frozen weights stay bit-identical, the cached-prefix
training equals the end-to-end model, and a compiled fine-tuned task graph gives the torch logits."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from exporters.backbones import load_backbone
from exporters.errors import ExportError
from exporters.finetune_graph import FineTunedModel, paper_layer, tuning_units
from h2t_edge.steps.compile import DeployError
from h2t_edge.research.finetune import FineTuneConfig, FineTunedTask, finetuned_logits, train_finetuned


@pytest.fixture(scope="module")
def lite0_64():
    """EfficientNet-Lite0 with its weights at a 64 px input: same blocks, 12x fewer pixels."""
    return load_backbone("efficientnet_lite0", weights="bundled", input_size=64)


def test_paper_layer_rules(lite0_64):
    units = tuning_units(lite0_64)
    assert units[0] == "blocks.0.0" and units[-1] == "blocks.6.0" and len(units) == 16
    assert paper_layer(lite0_64, "last-stage") == "blocks.6.0"  # first block of the last stage
    assert paper_layer(lite0_64, "middle") == "blocks.4.0"  # stage opening at the middle (block 9 of 16)
    with pytest.raises(ExportError, match="no segment"):
        FineTunedModel(lite0_64, "blocks.9.9", "LAYER-FT")
    with pytest.raises(ExportError, match="pre-logits"):
        FineTunedModel(lite0_64, "logits", "LAYER-FT")


def _state(modules) -> list[torch.Tensor]:
    return [v.clone() for m in modules for v in m.state_dict().values()]


@pytest.mark.parametrize("method,layer", [("LAYER-FT", "blocks.6.0"), ("SCL-FT", "blocks.5.3")])
def test_only_the_tuned_block_and_head_change(lite0_64, method, layer):
    original = copy.deepcopy(lite0_64.model.state_dict())
    model = FineTunedModel(lite0_64, layer, method)
    index = model.index
    frozen_before = _state(m for _, m in lite0_64.segments[:index] + lite0_64.segments[index + 1:])
    tuned_before = _state([model.tuned])
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = np.arange(12) % 3
    with torch.no_grad():
        acts = model.prefix(images).numpy()
    trained = train_finetuned(model, acts, labels, 3, FineTuneConfig(epochs=3, batch_size=4, lr=0.05))
    # frozen: every parameter and buffer outside the tuned block, in the model and in the backbone
    frozen_model = [v for m in [*model.prefix, *model.suffix] for v in m.state_dict().values()]
    n_prefix_suffix = len(frozen_model)
    assert all(torch.equal(a, b) for a, b in zip(frozen_model, frozen_before[:n_prefix_suffix]))
    assert all(torch.equal(v, original[k]) for k, v in lite0_64.model.state_dict().items())
    assert not any(p.requires_grad for m in [*model.prefix, *model.suffix] for p in m.parameters())
    # tuned: the weights moved, and its normalisation statistics learned the new data
    assert all(not torch.equal(a, b) for a, b in zip(tuned_before, _state([model.tuned])))
    assert np.abs(trained["weight"]).sum() > 0 and len(trained["history"]) == 3
    # the cached-prefix path is the end-to-end model
    with torch.no_grad():
        direct = model(images).numpy() @ trained["weight"] + trained["bias"]
    np.testing.assert_allclose(finetuned_logits(model, acts, trained["weight"], trained["bias"]), direct,
                               atol=1e-5, rtol=1e-5)


def test_scl_skip_is_pooled_block_output_zero_padded(lite0_64):
    layer_ft = FineTunedModel(lite0_64, "blocks.6.0", "LAYER-FT").eval()
    scl_ft = FineTunedModel(lite0_64, "blocks.6.0", "SCL-FT").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = layer_ft.prefix(x)
        block = layer_ft.tuned(acts)
        pre = layer_ft.suffix[1](layer_ft.suffix[0](block))  # head conv, global pool: raw pre-logits
        skip = torch.zeros_like(pre)
        skip[:, :320] = block.mean(dim=(2, 3))
        expected = (pre + skip) / torch.linalg.vector_norm(pre + skip, dim=1, keepdim=True)
        assert torch.allclose(scl_ft.from_prefix(acts), expected, atol=1e-6)
        assert torch.allclose(layer_ft.from_prefix(acts), pre / torch.linalg.vector_norm(pre, dim=1, keepdim=True),
                              atol=1e-6)


def _image_folder(root, n_per_class=6, size=40):
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(rng.normal(colour, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_finetune_compile_predict_cli_matches_torch(tmp_path):
    """CLI end to end at the native 224 px: finetune (SCL-FT, 2 epochs) -> compile -> ONNX Runtime
    logits equal the torch model's within 1e-4; the sidecar reports the per-task bytes."""
    import onnxruntime as ort

    from h2t_edge.cli import cli
    from runtime.preprocess import PreprocessConfig, preprocess_batch

    data = _image_folder(tmp_path / "data")
    runner = CliRunner()
    result = runner.invoke(cli, ["finetune", str(data), "-o", str(tmp_path / "task"), "--method", "SCL-FT",
                                 "--epochs", "2", "--batch-size", "6", "--test", str(data),
                                 "--compile", str(tmp_path / "task.onnx"), "-q"])
    assert result.exit_code == 0, result.output
    assert "blocks.6.0" in result.output and "test accuracy" in result.output
    task = FineTunedTask.load(tmp_path / "task")
    assert task.config["epochs"] == 2 and task.method == "SCL-FT"
    sidecar = json.loads((tmp_path / "task.json").read_text())
    assert sidecar["task_bytes"] == task.task_bytes == 4 * (605440 + 2 * (1152 + 1152 + 320) + 1281 * 3)

    bb = load_backbone("efficientnet_lite0", weights="bundled")
    model = FineTunedModel(bb, task.layer, task.method)
    model.load_tuned_state(task.tuned)
    images = preprocess_batch(sorted(str(p) for p in data.rglob("*.png"))[:5], PreprocessConfig.from_dict(task.preprocess))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images)).numpy() @ task.weight + task.bias
    session = ort.InferenceSession(str(tmp_path / "task.onnx"), providers=["CPUExecutionProvider"])
    probabilities, logits = session.run(["probabilities", "logits"], {"images": images})
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)

    result = runner.invoke(cli, ["predict", str(tmp_path / "task.onnx"), str(data / "red"), "--format", "json"])
    assert result.exit_code == 0, result.output

    # `h2t-edge compile` recognises a fine-tuned task: the same graph as `finetune --compile`, a signed sidecar
    result = runner.invoke(cli, ["compile", str(tmp_path / "task"), "-o", str(tmp_path / "again.onnx")])
    assert result.exit_code == 0, result.output
    assert "block blocks.6.0 tuned" in result.output
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "task.onnx").read_bytes()
    from runtime.schema import content_sha256
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["content_sha256"] == content_sha256(again, "content_sha256")
    # ... and refuses to put it in a multi-task graph (its backbone is not the shared one)
    result = runner.invoke(cli, ["compile", str(tmp_path / "task"), str(tmp_path / "task"), "-o",
                                 str(tmp_path / "multi.onnx")])
    # a typed error (h2t-edge prints it as one "error: ..." line and exits 1), raised by the API
    assert result.exit_code == 1 and isinstance(result.exception, DeployError)
    assert "fine-tuned task" in str(result.exception)
