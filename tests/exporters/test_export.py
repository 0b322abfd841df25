import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.export import LAYOUT_KEY, TappedBackbone, export_backbone


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(photos, lite0, extra_random=2):
    from runtime.preprocess import PreprocessConfig, preprocess_batch

    cfg = PreprocessConfig.from_dict(lite0.preprocess)
    real = preprocess_batch([photos[n] for n in ("chelsea", "coffee", "astronaut")], cfg)
    noise = np.random.default_rng(0).normal(size=(extra_random, *real.shape[1:])).astype(np.float32)
    return np.concatenate([real, noise])


def test_every_onnx_tap_matches_torch(lite0, lite0_onnx, photos):
    path, layout = lite0_onnx
    x = _images(photos, lite0)  # batch 5: not the export's example batch of 2
    outputs = _session(path).run(None, {"images": x})
    with torch.no_grad():
        reference = TappedBackbone(lite0, lite0.taps, 512)(torch.from_numpy(x))
    assert len(outputs) == len(reference) == len(layout["taps"]) == 51
    for tap, got, want in zip(layout["taps"], outputs, reference):
        assert got.shape == (5, tap["features"]), tap["name"]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, err_msg=tap["name"])
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_layout_travels_in_onnx_metadata(lite0_onnx):
    path, layout = lite0_onnx
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    import json

    assert json.loads(meta[LAYOUT_KEY]) == layout
    offsets = [t["offset"] for t in layout["taps"]]
    sizes = [t["features"] for t in layout["taps"]]
    assert offsets == list(np.cumsum([0] + sizes[:-1]))
    assert layout["total_features"] == sum(sizes)
    assert [o.name for o in model.graph.output] == [t["name"] for t in layout["taps"]]


def test_graph_has_dynamic_batch_and_static_padding(lite0_onnx):
    path, _ = lite0_onnx
    model = onnx.load(str(path))
    dim = model.graph.input[0].type.tensor_type.shape.dim
    assert dim[0].dim_param and [d.dim_value for d in dim[1:]] == [3, 224, 224]
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # TF-style SAME padding is folded into Conv pads: no shape arithmetic in the graph.
    assert not {"Shape", "Pad", "Ceil", "If", "Loop"} & set(ops)


def test_tap_subset_export(lite0):
    model, layout = export_backbone(lite0, target_size=256, tap_names=["stem", "blocks.1.0"])
    assert [t["name"] for t in layout["taps"]] == ["stem", "blocks.1.0"]
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": np.zeros((1, 3, 224, 224), np.float32)})
    assert [o.shape[1] for o in out] == [t["features"] for t in layout["taps"]]
    # Only the first blocks are in the graph.
    assert sum(n.op_type == "Conv" for n in model.graph.node) < 10
