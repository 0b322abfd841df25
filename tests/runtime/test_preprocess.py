"""Preprocessing must equal timm's eval transform bit for bit (within float rounding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from runtime.errors import ArtifactError, ImageError
from runtime.preprocess import PreprocessConfig, list_images, load_image, preprocess_batch, preprocess_image

PARITY_MODELS = ["tf_efficientnet_lite0", "resnet50", "vit_base_patch16_224"]
PARITY_IMAGES = ["chelsea", "coffee", "astronaut", "grayscale", "rgba", "small_nonsquare", "palette"]


def timm_pretrained_cfg(name: str) -> dict:
    import timm
    import torch

    # The meta device skips weight initialization (seconds for a ViT); the config is the same.
    with torch.device("meta"):
        return dict(timm.create_model(name, pretrained=False).pretrained_cfg)


def timm_eval_transform(cfg: dict):
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=cfg))


def timm_load(path) -> Image.Image:
    """How timm's ImageDataset reads a file."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


@pytest.fixture(scope="module", params=PARITY_MODELS)
def timm_cfg(request) -> dict:
    return timm_pretrained_cfg(request.param)


@pytest.mark.parametrize("image", PARITY_IMAGES)
def test_matches_timm_eval_transform(timm_cfg, photo_files, image):
    expected = timm_eval_transform(timm_cfg)(timm_load(photo_files[image])).numpy()
    actual = preprocess_image(load_image(photo_files[image]), PreprocessConfig.from_timm_config(timm_cfg))
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape == tuple(timm_cfg["input_size"])
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.parametrize(
    "override",
    [
        {"crop_mode": "squash"},
        {"crop_mode": "border"},
        {"input_size": (3, 160, 224)},  # non-square: timm's ResizeKeepRatio path
        {"input_size": (3, 224, 160), "crop_mode": "border"},
        {"crop_pct": 1.0, "interpolation": "bilinear"},
        {"interpolation": "nearest"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_matches_timm_other_modes(photo_files, override):
    cfg = {**timm_pretrained_cfg("resnet50"), **override}
    transform = timm_eval_transform(cfg)
    for image in ("chelsea", "small_nonsquare", "grayscale"):
        expected = transform(timm_load(photo_files[image])).numpy()
        actual = preprocess_image(load_image(photo_files[image]), PreprocessConfig.from_timm_config(cfg))
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() < 1e-4, image


def test_batch_mixes_images_and_paths(photo_files):
    cfg = PreprocessConfig((3, 64, 48), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.9)
    batch = preprocess_batch([photo_files["coffee"], load_image(photo_files["chelsea"])], cfg)
    assert batch.shape == (2, 3, 64, 48) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess_image(load_image(photo_files["chelsea"]), cfg))
    assert preprocess_batch([], cfg).shape == (0, 3, 64, 48)


# -- PreprocessConfig -----------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = PreprocessConfig((3, 240, 320), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", 0.95, "border")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_timm_config_fills_timm_defaults():
    cfg = PreprocessConfig.from_timm_config({"input_size": (3, 256, 256), "crop_pct": None})
    assert cfg == PreprocessConfig((3, 256, 256), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"interpolation": "cubic"}, "interpolation"),
        ({"input_size": [1, 224, 224]}, "input_size"),
        ({"mean": [0.5]}, "mean"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"crop_pct": 0}, "crop_pct"),
        ({"crop_mode": "zoom"}, "crop_mode"),
        ({"crop_pct": None}, "crop_pct"),
    ],
)
def test_from_dict_rejects_bad_fields(change, field):
    d = {**PreprocessConfig((3, 8, 8), (0,) * 3, (1,) * 3, "bicubic", 1.0).to_dict(), **change}
    with pytest.raises(ArtifactError, match=field):
        PreprocessConfig.from_dict(d, source="demo.json")


def test_from_dict_names_missing_field_and_source():
    d = PreprocessConfig((3, 8, 8), (0,) * 3, (1,) * 3, "bicubic", 1.0).to_dict()
    del d["std"]
    with pytest.raises(ArtifactError, match=r"demo\.json.*'std'"):
        PreprocessConfig.from_dict(d, source="demo.json")


# -- load_image -----------------------------------------------------------------------------


def _truncated(photo_files, tmp_path, fmt: str):
    path = tmp_path / f"truncated.{fmt}"
    Image.open(photo_files["chelsea"]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_FILES = {
    "corrupt_bytes": lambda p, t: _write(t / "corrupt.jpg", bytes(range(256)) * 8),
    "truncated_png": lambda p, t: _truncated(p, t, "png"),
    "truncated_jpeg": lambda p, t: _truncated(p, t, "jpg"),
    "missing": lambda p, t: t / "no_such_image.jpg",
    "text_file": lambda p, t: _write(t / "notes.png", b"these are not pixels\n"),
    "empty_file": lambda p, t: _write(t / "empty.jpg", b""),
    "directory": lambda p, t: _mkdir(t / "folder.jpg"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_image_errors_name_the_path(photo_files, tmp_path, kind):
    path = BAD_FILES[kind](photo_files, tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("image", ["grayscale", "rgba", "palette"])
def test_load_image_converts_to_rgb(photo_files, image):
    img = load_image(photo_files[image])
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.asarray(timm_load(photo_files[image])))


def test_load_image_converts_16_bit(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(path)
    assert load_image(path).mode == "RGB"


def test_list_images_is_sorted_recursive_and_case_insensitive(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.Jpeg", "sub/deeper/d.webp", "notes.txt", ".hidden.jpg", ".cache/e.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.png", "b.JPG", "sub/c.Jpeg", "sub/deeper/d.webp"]
    with pytest.raises(ImageError, match="missing_folder"):
        list_images(tmp_path / "missing_folder")
