import numpy as np
import onnxruntime as ort
import pytest

from exporters.backbones import load_backbone
from exporters.compile import compile_task_graph, split_by_tap
from exporters.errors import ExportError


def _run(model_or_path, x):
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess, sess.run(None, {"images": x})


def _selection(layout, tap_names, per_tap, rng):
    chosen = []
    for tap in layout["taps"]:
        if tap["name"] in tap_names:
            local = rng.choice(tap["features"], size=min(per_tap, tap["features"]), replace=False)
            chosen.append(tap["offset"] + local)
    return np.sort(np.concatenate(chosen))


def test_compiled_graph_equals_extract_then_head(lite0, lite0_onnx):
    path, layout = lite0_onnx
    rng = np.random.default_rng(0)
    features = _selection(layout, {"stem", "blocks.1.0.bn2", "blocks.2.1", "blocks.3.0.bn1"}, 40, rng)
    weight = rng.normal(size=(len(features), 7)).astype(np.float32)
    bias = rng.normal(size=7).astype(np.float32)
    model, summary = compile_task_graph(lite0, layout, features, weight, bias)

    x = rng.normal(size=(4, 3, 224, 224)).astype(np.float32)
    _, taps = _run(str(path), x)
    pipeline_logits = np.concatenate(taps, axis=1)[:, features] @ weight + bias
    _, (probabilities, logits) = _run(model, x)
    np.testing.assert_allclose(logits, pipeline_logits, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert (probabilities.argmax(1) == pipeline_logits.argmax(1)).all()

    # Only blocks up to stage 3 are kept: most of the backbone's parameters are dropped.
    assert summary.taps_used == ["stem", "blocks.1.0.bn2", "blocks.2.1", "blocks.3.0.bn1"]
    assert summary.segments_kept == lite0.tap("blocks.3.0.bn1").segment + 1 < summary.segments_total
    assert summary.backbone_fraction_dropped > 0.8
    assert summary.head_parameters == weight.size + 7


def test_split_by_tap_validates_indices(lite0_onnx):
    _, layout = lite0_onnx
    used, local = split_by_tap(layout, np.array([0, 1, 600, layout["total_features"] - 1]))
    assert used == ["stem", "blocks.0.0.bn1", "logits"]
    assert [list(x) for x in local] == [[0, 1], [600 - 512], [999]]
    with pytest.raises(ExportError, match="sorted"):
        split_by_tap(layout, np.array([5, 3]))
    with pytest.raises(ExportError, match="out of range"):
        split_by_tap(layout, np.array([layout["total_features"]]))


def test_compile_refuses_other_weights(lite0_onnx):
    _, layout = lite0_onnx
    random = load_backbone("efficientnet_lite0", weights="random")
    with pytest.raises(ExportError, match="not the one"):
        compile_task_graph(random, layout, np.array([3]), np.ones((1, 2), np.float32), np.zeros(2, np.float32))


def test_multitask_graph_equals_each_single_task_graph(lite0, lite0_onnx):
    from exporters.compile import HeadSpec, compile_multitask_graph

    path, layout = lite0_onnx
    rng = np.random.default_rng(1)
    # Early taps only (a short backbone keeps the three exports quick); the tasks share some taps.
    taps = [{"stem", "blocks.1.0.bn2", "blocks.2.0"}, {"blocks.1.0.bn2", "blocks.2.1.bn1"}, {"blocks.0.0"}]
    heads = []
    for i, names in enumerate(taps):
        features = _selection(layout, names, 30, rng)
        c = 3 + i
        heads.append(HeadSpec(f"task{i}", features, rng.normal(size=(len(features), c)).astype(np.float32),
                              rng.normal(size=c).astype(np.float32)))
    model, summary = compile_multitask_graph(lite0, layout, heads)
    assert [o.name for o in model.graph.output] == ["task0", "task1", "task2"]
    assert summary.taps_used == ["stem", "blocks.0.0", "blocks.1.0.bn2", "blocks.2.0", "blocks.2.1.bn1"]
    # Only the taps' segments: the deepest used tap decides.
    assert summary.segments_kept == lite0.tap("blocks.2.1.bn1").segment + 1

    x = rng.normal(size=(3, 3, 224, 224)).astype(np.float32)
    _, multi = _run(model, x)
    _, taps_out = _run(str(path), x)
    features = np.concatenate(taps_out, axis=1)
    for head, got in zip(heads, multi):
        single, _ = compile_task_graph(lite0, layout, head.features, head.weight, head.bias)
        _, (_, single_logits) = _run(single, x)
        np.testing.assert_allclose(got, single_logits, atol=1e-4)
        np.testing.assert_allclose(got, features[:, head.features] @ head.weight + head.bias, atol=1e-4)


def test_multitask_graph_refuses_clashing_names(lite0, lite0_onnx):
    from exporters.compile import HeadSpec, compile_multitask_graph

    _, layout = lite0_onnx
    head = HeadSpec("a", np.array([3]), np.ones((1, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ExportError, match="unique"):
        compile_multitask_graph(lite0, layout, [head, head])
    with pytest.raises(ExportError, match="images"):
        compile_multitask_graph(lite0, layout, [HeadSpec("images", head.features, head.weight, head.bias)])
    with pytest.raises(ExportError, match="shapes do not agree"):
        HeadSpec("b", np.array([3, 4]), np.ones((1, 2), np.float32), np.zeros(2, np.float32))


def test_multitask_graph_with_one_task(lite0, lite0_onnx):
    from exporters.compile import HeadSpec, compile_multitask_graph

    path, layout = lite0_onnx
    rng = np.random.default_rng(2)
    features = _selection(layout, {"stem", "blocks.0.0"}, 25, rng)
    head = HeadSpec("only", features, rng.normal(size=(len(features), 4)).astype(np.float32), np.ones(4, np.float32))
    model, _ = compile_multitask_graph(lite0, layout, [head])
    x = rng.normal(size=(2, 3, 224, 224)).astype(np.float32)
    _, (logits,) = _run(model, x)
    _, taps = _run(str(path), x)
    np.testing.assert_allclose(logits, np.concatenate(taps, axis=1)[:, features] @ head.weight + 1, atol=1e-4)
