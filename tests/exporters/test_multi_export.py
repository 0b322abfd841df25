"""One export, every target size: the features of each T equal those of a single-T export."""

import numpy as np
import pytest
import torch

from exporters.export import TappedBackbone, export_backbone, select_taps
from exporters.multi_export import MultiTargetBackbone, export_backbone_multi
from h2t_edge.core.errors import CacheError
from h2t_edge.steps.extract import extract_features, extract_features_multi
from h2t_edge.suite.tasks.dsprites import build_dsprites_task

SHALLOW = ["stem", "blocks.0.*", "blocks.1.*"]  # three segments: a quick export


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return build_dsprites_task(tmp_path_factory.mktemp("dspr"), n_train=10, n_test=4, bins=2, seed=5)["train"]


def test_torch_outputs_equal_single_target_modules(lite0):
    taps = select_taps(lite0, SHALLOW + ["pre_logits"])
    multi = MultiTargetBackbone(lite0, taps, [512, 64, 2048]).eval()
    assert multi.target_sizes == [64, 512, 2048]
    x = torch.randn(2, *lite0.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = dict(zip(multi.output_names, multi(x)))
        for t in multi.target_sizes:
            want = TappedBackbone(lite0, taps, t).eval()(x)
            for tap, ref in zip(taps, want):
                torch.testing.assert_close(got[multi.output_of[(t, tap.name)]], ref, rtol=0, atol=0)
    # a tap pooled the same way at every T (the pre-logits vector) is one output, not one per T
    assert [n for n in multi.output_names if n.startswith("pre_logits")] == ["pre_logits@T64"]
    assert {multi.output_of[(t, "pre_logits")] for t in multi.target_sizes} == {"pre_logits@T64"}


def test_multi_caches_equal_single_export_caches(lite0, lite0_onnx, images, tmp_path):
    model, multi = export_backbone_multi(lite0, [64, 512], SHALLOW)
    path = tmp_path / "multi.onnx"
    path.write_bytes(model.SerializeToString())
    single, layout64 = export_backbone(lite0, 64, SHALLOW)
    single_path = tmp_path / "single64.onnx"
    single_path.write_bytes(single.SerializeToString())
    assert multi["layouts"]["64"] == layout64

    seen = []
    caches = extract_features_multi(path, images, {64: tmp_path / "m64", 512: tmp_path / "m512"},
                                    batch_size=4, dtype="float32", progress=lambda d, t: seen.append(d))
    assert seen[-1] == len(images)  # one pass reports progress once per batch, not once per T
    assert len(seen) == 1 + 3
    ref64 = extract_features(single_path, images, tmp_path / "s64", batch_size=4, dtype="float32")
    np.testing.assert_allclose(caches[64].features, ref64.features, rtol=0, atol=1e-6)
    assert caches[64].layout == ref64.layout

    # T=512 against the session's full single-T export, on the same taps' columns
    full = extract_features(lite0_onnx[0], images, tmp_path / "s512", batch_size=4, dtype="float32")
    for tap in caches[512].layout["taps"]:
        np.testing.assert_allclose(caches[512].features[:, caches[512].tap_columns(tap["name"])],
                                   full.features[:, full.tap_columns(tap["name"])], rtol=0, atol=1e-5)

    # rerun: nothing to do; a T the export lacks is an error naming the fix
    again = extract_features_multi(path, images, {64: tmp_path / "m64"}, batch_size=4, dtype="float32",
                                   progress=lambda d, t: pytest.fail("re-extracted a finished cache"))
    np.testing.assert_array_equal(again[64].features, caches[64].features)
    with pytest.raises(CacheError, match="export it again"):
        extract_features_multi(path, images, {2048: tmp_path / "m2048"}, batch_size=4)
    # these caches lack the pre-logits: fitting them with the guard is an error naming the fix
    from h2t_edge.train.protocol import TrainError, fit_target_sizes

    with pytest.raises(TrainError, match="--tap pre_logits"):
        fit_target_sizes(caches, tmp_path / "fit")
