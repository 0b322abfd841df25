"""`h2t_edge.steps.extract_ray`: extraction on a local Ray instance (2 CPUs) writes the same feature cache,
bit for bit, as local extraction; it resumes per shard and reports worker errors as local ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from h2t_edge.core.datasets import load_dataset
from h2t_edge.steps.extract_ray import RayBatches
from h2t_edge.steps.extract import FeatureCache, extract_features
from runtime.errors import ImageError

ray = pytest.importorskip("ray")

PREPROCESS = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
              "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A two-tap conv backbone with an h2t-edge layout: images -> conv -> relu (tap a, pooled)
    -> conv -> relu (tap b, pooled); float32[n, 8] per tap."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(8, 8, 3, 3)).astype(np.float32) / 4
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"]),
        helper.make_node("Flatten", ["p1"], ["tap_a"], axis=1),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p2"]),
        helper.make_node("Flatten", ["p2"], ["tap_b"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_backbone", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 8]) for n in ("tap_a", "tap_b")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    layout = {"format": "h2t-edge/backbone-layout", "version": 1, "backbone": "tiny-conv", "weights": "random",
              "target_size": 8, "input": "images", "preprocess": PREPROCESS, "pre_logits": "tap_b",
              "total_features": 16,
              "taps": [{"name": "a", "output": "tap_a", "offset": 0, "features": 8},
                       {"name": "b", "output": "tap_b", "offset": 8, "features": 8}]}
    helper.set_model_props(model, {"h2t_edge.layout": json.dumps(layout)})
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("backbone") / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """42 random images of odd sizes in two classes (one corrupt file is added per test where needed)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(42):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        h, w = rng.integers(20, 70, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def assert_same_cache(a: FeatureCache, b: FeatureCache) -> None:
    assert a.features.dtype == b.features.dtype
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))  # bit-identical
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.valid, b.valid)
    assert {k: v for k, v in a.manifest.items() if k != "backbone"} == {
        k: v for k, v in b.manifest.items() if k != "backbone"}
    assert a.backbone_sha256 == b.backbone_sha256


def test_ray_extraction_is_bit_identical_to_local(backbone, dataset_dir, tmp_path, local_ray):
    ds = load_dataset(dataset_dir)
    local = extract_features(backbone, ds, tmp_path / "local", batch_size=4, dtype="float32")
    source = RayBatches(shard_batches=3)
    distributed = extract_features(backbone, ds, tmp_path / "ray", batch_size=4, dtype="float32",
                                   batch_source=source)
    assert source.stats["shards"] == 4 and source.stats["workers"] == 2  # 11 batches of 4 in shards of 3
    assert_same_cache(local, distributed)
    assert np.asarray(local.features).std() > 0


def test_ray_resumes_only_missing_shards(backbone, dataset_dir, tmp_path, local_ray):
    ds = load_dataset(dataset_dir)
    reference = extract_features(backbone, ds, tmp_path / "ref", batch_size=4)

    class Stop(Exception):
        pass

    def stop_after_five_batches(done, total):
        if done >= 5 * 4:
            raise Stop

    with pytest.raises(Stop):
        extract_features(backbone, ds, tmp_path / "c", batch_size=4, progress=stop_after_five_batches,
                         batch_source=RayBatches(shard_batches=1))
    progress = np.load(tmp_path / "c" / "progress.npy")
    assert 5 <= progress.sum() < len(progress)
    source = RayBatches(shard_batches=2)
    resumed = extract_features(backbone, ds, tmp_path / "c", batch_size=4, batch_source=source)
    assert source.stats["shards"] == -(-int((~progress).sum()) // 2)
    assert_same_cache(reference, resumed)


def test_ray_worker_errors_read_as_local_ones(backbone, dataset_dir, tmp_path, local_ray):
    corrupt_root = tmp_path / "with_corrupt"
    shutil.copytree(dataset_dir, corrupt_root)
    (corrupt_root / "a" / "zzz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = load_dataset(corrupt_root)
    with pytest.raises(ImageError, match="zzz_corrupt.png.*--on-error skip"):
        extract_features(backbone, ds, tmp_path / "raise", batch_size=4, batch_source=RayBatches())
    local = extract_features(backbone, ds, tmp_path / "local", batch_size=4, on_error="skip")
    distributed = extract_features(backbone, ds, tmp_path / "skip", batch_size=4, on_error="skip",
                                   batch_source=RayBatches(shard_batches=2))
    assert not distributed.valid.all() and len(distributed.manifest["skipped"]) == 1
    assert_same_cache(local, distributed)


def test_cli_extract_ray(backbone, dataset_dir, tmp_path, local_ray):
    from click.testing import CliRunner

    from h2t_edge.cli import cli

    args = ["extract", str(backbone), str(dataset_dir), "--batch-size", "4", "-q"]
    result = CliRunner().invoke(cli, [*args, "-c", str(tmp_path / "ray"), "--ray", "--shard-batches", "2"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(cli, [*args, "-c", str(tmp_path / "local")]).exit_code == 0
    assert_same_cache(FeatureCache.open(tmp_path / "local"), FeatureCache.open(tmp_path / "ray"))


def test_unreachable_cluster_is_a_prompt_error(backbone, dataset_dir, tmp_path):
    from h2t_edge.core.errors import ServingError
    from h2t_edge.serving.serve import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ServingError, match=f"no Ray cluster answers at {address}"):
        extract_features(backbone, load_dataset(dataset_dir), tmp_path / "c", batch_size=4,
                         batch_source=RayBatches(address=address))
