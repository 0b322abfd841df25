"""Real-world image files, each with a defined result. Extraction and the runtime read images through
the one `runtime.preprocess.load_image`, so each case is checked there and end to end where it
matters (a cache row equals the Predictor's input)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from tiny_backbone import PREPROCESS

from h2t_edge.core.datasets import from_folder, from_manifest
from h2t_edge.core.errors import DatasetError
from h2t_edge.steps.extract import extract_features
from runtime.errors import ImageError
from runtime.predictor import Predictor
from runtime.preprocess import MAX_IMAGE_PIXELS_ENV, load_image, preprocess_image


ENV_AT_IMPORT = os.environ.get(MAX_IMAGE_PIXELS_ENV)


def photo(h: int = 24, w: int = 36) -> np.ndarray:
    """uint8[h, w, 3] with distinct rows and columns, so any rotation or flip shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + 2 * y) % 256], axis=-1).astype(np.uint8)


# -- modes ----------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(photo()).convert("CMYK").save(path, quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (36, 24)
    # Pillow's CMYK -> RGB inversion; the JPEG round trip costs a few levels.
    assert np.abs(np.asarray(img).astype(int) - photo()).mean() < 6


@pytest.mark.parametrize("transparency", ["index", "bytes"])
def test_palette_png_with_transparency_keeps_palette_colours(tmp_path, transparency):
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) % 4
    img = Image.fromarray(pixels, mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (768 - 12))
    path = tmp_path / "palette.png"
    img.save(path, transparency=0 if transparency == "index" else bytes([0, 128, 255, 255]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow "convert to RGBA" warning either
        out = np.asarray(load_image(path))
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], dtype=np.uint8)
    np.testing.assert_array_equal(out, colours[pixels])  # alpha dropped, stored colour kept


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_gray_and_alpha_modes_drop_alpha(tmp_path, mode):
    gray = photo()[..., 0]
    arrays = {"L": gray, "LA": np.dstack([gray, np.full_like(gray, 7)]), "RGBA": np.dstack([photo(), gray])}
    path = tmp_path / f"{mode}.png"
    Image.fromarray(arrays[mode], mode=mode).save(path)
    expected = photo() if mode == "RGBA" else np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, fmt):
    values = np.linspace(0, 65535, 24 * 36).astype(np.uint16).reshape(24, 36)
    path = tmp_path / f"deep.{fmt}"
    Image.fromarray(values).save(path)
    out = np.asarray(load_image(path))
    expected = np.round(values / 257.0).astype(np.uint8)  # 65535 -> 255, linear
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255 and np.median(out) < 200  # not saturated


def test_16_bit_rgb_png_reads_as_8_bit(tmp_path):
    # Pillow reads 48-bit PNGs as 8-bit RGB (high bytes): check the result is the photo, not noise.
    pixels16 = photo().astype(np.uint16) * 257
    path = tmp_path / "rgb48.png"
    _write_png16_rgb(path, pixels16)
    np.testing.assert_array_equal(np.asarray(load_image(path)), photo())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


# -- EXIF orientation ------------------------------------------------------------------------------


def _with_orientation(path: Path, pixels: np.ndarray, orientation: int, fmt: str) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return path


# Stored pixels for each orientation tag, given the upright image (EXIF spec, as Pillow applies it).
STORED = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: np.transpose(a, (1, 0, 2)), 6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = photo()
    path = _with_orientation(tmp_path / "o.png", np.ascontiguousarray(STORED[orientation](upright)), orientation, "PNG")
    np.testing.assert_array_equal(np.asarray(load_image(path)), upright)


def test_exif_rotated_jpeg_extraction_and_runtime_agree(tmp_path, tiny_root, tiny_graph):
    """A sideways phone JPEG (orientation 6): the cache row and the Predictor both see it upright,
    the same pixels as an upright copy of the file."""
    upright = photo(32, 48)
    classes = tmp_path / "ds"
    (classes / "a").mkdir(parents=True)
    (classes / "b").mkdir()
    rotated = _with_orientation(classes / "a" / "phone.jpg", np.ascontiguousarray(np.rot90(upright, 1)), 6, "JPEG")
    plain = Image.open(rotated)
    plain.load()
    # The same decoded pixels, turned by hand and stored losslessly without a tag.
    Image.fromarray(np.rot90(np.asarray(plain), -1)).save(classes / "b" / "by_hand.png")
    ds = from_folder(classes)
    cache = extract_features(tiny_root["backbone"], ds, tmp_path / "cache", batch_size=2, dtype="float32")
    np.testing.assert_array_equal(cache.features[0], cache.features[1])
    session = ort.InferenceSession(str(tiny_root["backbone"]), providers=["CPUExecutionProvider"])
    direct = np.concatenate(session.run(None, {"images": preprocess_image(load_image(rotated), PREPROCESS)[None]}), 1)
    np.testing.assert_allclose(cache.features[0], direct[0], rtol=1e-6)
    with Predictor.load(tiny_graph.path) as predictor:
        a, b = predictor.predict_paths([rotated, classes / "b" / "by_hand.png"])
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


# -- damaged files, bombs ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "zero_bytes"])
def test_truncated_and_empty_files_are_named_and_skippable(tmp_path, tiny_root, tiny_graph, kind):
    folder = tmp_path / "ds"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.fromarray(photo()).save(folder / c / "good.png")
    data = io.BytesIO()
    Image.fromarray(photo()).save(data, format="JPEG" if "jpeg" in kind else "PNG")
    bad = folder / "a" / ("bad.jpg" if "jpeg" in kind else "bad.png")
    bad.write_bytes(b"" if kind == "zero_bytes" else data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError, match="bad"):
        load_image(bad)
    ds = from_folder(folder)
    with pytest.raises(ImageError, match=str(bad)):
        extract_features(tiny_root["backbone"], ds, tmp_path / "raise", batch_size=2)
    cache = extract_features(tiny_root["backbone"], ds, tmp_path / "skip", batch_size=2, on_error="skip")
    row = ds.paths.index(str(bad))
    assert not cache.valid[row] and cache.valid.sum() == 2 and not cache.features[row].any()
    assert [s["path"] for s in cache.manifest["skipped"]] == [str(bad)]
    with Predictor.load(tiny_graph.path) as predictor:
        results = predictor.predict_paths(list(ds.paths), on_error="skip")
    assert [r.ok for r in results] == [i != row for i in range(3)] and str(bad) in results[row].error


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A 70-byte PNG claiming width x height 1-bit pixels: the shape of a decompression bomb."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_with_a_raisable_limit(tmp_path, monkeypatch):
    bomb = _png_header_only(tmp_path / "bomb.png", 40_000, 40_000)  # 1.6 Gpixel, far over Pillow's 2x check
    with pytest.raises(ImageError, match=f"bomb.png.*decompression bomb.*{MAX_IMAGE_PIXELS_ENV}"):
        load_image(bomb)
    small = tmp_path / "small.png"
    Image.fromarray(photo(100, 100)).save(small)  # 10,000 pixels
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "5000")
    with pytest.raises(ImageError, match="100x100, over the limit of 5,000 pixels"):
        load_image(small)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "10000")
    assert load_image(small).size == (100, 100)
    assert load_image(small, max_pixels=20_000).size == (100, 100)  # the API argument wins
    # Raised above the bomb's size, the limit lets it through to decoding (where this fake one fails).
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(2_000_000_000))
    with pytest.raises(ImageError, match="cannot decode") as info:
        load_image(bomb)
    assert "decompression bomb" not in str(info.value)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match=f"{MAX_IMAGE_PIXELS_ENV}='lots' must be a positive"):
        load_image(small)


# -- folders: other files, hidden files, symlinks, non-UTF-8 names ----------------------------------


def test_class_folders_skip_non_images_and_hidden_files(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c / ".thumbs").mkdir(parents=True)
        Image.fromarray(photo()).save(tmp_path / c / "img.png")
        Image.fromarray(photo()).save(tmp_path / c / ".thumbs" / "hidden_dir.png")
        Image.fromarray(photo()).save(tmp_path / c / "._resource_fork.png")
        (tmp_path / c / "notes.txt").write_text("not an image")
        (tmp_path / c / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / ".git").mkdir()
    ds = from_folder(tmp_path)
    assert ds.classes == ("a", "b") and [Path(p).name for p in ds.paths] == ["img.png", "img.png"]


def test_text_file_with_an_image_suffix_is_a_named_image_error(tmp_path, tiny_root):
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        Image.fromarray(photo()).save(tmp_path / "ds" / c / "img.png")
    fake = tmp_path / "ds" / "a" / "readme.jpg"
    fake.write_text("this is text")
    ds = from_folder(tmp_path / "ds")
    with pytest.raises(ImageError, match=f"{fake}.*not an image file"):
        extract_features(tiny_root["backbone"], ds, tmp_path / "cache", batch_size=2)


def test_symlinks_are_followed_broken_ones_named_and_folder_loops_not_entered(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    Image.fromarray(photo()).save(store / "target.png")
    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(photo()).save(root / c / "own.png")
    os.symlink(store / "target.png", root / "a" / "linked.png")
    os.symlink(root, root / "b" / "loop")  # a folder link back to the top: must not recurse forever
    os.symlink(store, root / "b" / "store_link")
    ds = from_folder(root)
    # a/linked.png sorts first and is listed as its target
    assert ds.paths == (str(store / "target.png"), str(root / "a" / "own.png"), str(root / "b" / "own.png"))
    assert load_image(ds.paths[0]).size == (36, 24)
    os.symlink(tmp_path / "gone.png", root / "a" / "dangling.png")
    with pytest.raises(DatasetError, match="broken symlink.*dangling.png"):
        from_folder(root)


def test_non_utf8_file_names_round_trip(tmp_path, tiny_root, tiny_graph):
    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(photo()).save(root / c / "plain.png")
    odd = os.path.join(os.fsencode(root / "a"), b"caf\xe9-\xff.png")  # Latin-1 bytes, invalid UTF-8
    Image.fromarray(photo()[::-1].copy()).save(odd)
    ds = from_folder(root)
    name = os.fsdecode(odd)
    assert name in ds.paths
    cache = extract_features(tiny_root["backbone"], ds, tmp_path / "cache", batch_size=2, dtype="float32")
    assert cache.manifest["images"] == list(ds.paths) and cache.valid.all()
    manifest = ds.to_manifest(tmp_path / "ds.jsonl")
    manifest.read_bytes().decode("utf-8")  # stays valid UTF-8
    assert from_manifest(manifest, classes=ds.classes).paths == ds.paths
    with Predictor.load(tiny_graph.path) as predictor:
        result = predictor.predict_paths([name])[0]
    assert result.ok and result.path == name


def test_cli_max_image_pixels_flag_raises_and_lowers_the_limit(tiny_graph, tmp_path, monkeypatch):
    """`h2t-edge --max-image-pixels N predict ...`: the limit for this run, without the environment."""
    from click.testing import CliRunner

    from h2t_edge.cli import cli

    # The flag sets the variable for the whole process (so subprocesses and Ray workers see it). setenv
    # first, so that monkeypatch records the original state and restores it after the test.
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1")
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV)
    small = tmp_path / "small.png"
    Image.fromarray(photo(100, 100)).save(small)  # 10,000 pixels
    runner = CliRunner()
    refused = runner.invoke(cli, ["--max-image-pixels", "5000", "predict", str(tiny_graph.path), str(small),
                                  "--format", "json"])
    assert refused.exit_code != 0
    assert "100x100, over the limit of 5,000 pixels" in str(refused.output) + str(refused.exception)
    os.environ.pop(MAX_IMAGE_PIXELS_ENV)  # the flag set it in this process; monkeypatch restores the original
    allowed = runner.invoke(cli, ["--max-image-pixels", "10000", "predict", str(tiny_graph.path), str(small),
                                  "--format", "json"])
    assert allowed.exit_code == 0, allowed.output
    assert "small.png" in allowed.output
    bad = runner.invoke(cli, ["--max-image-pixels", "0", "predict", str(tiny_graph.path), str(small)])
    assert bad.exit_code == 2 and "--max-image-pixels" in bad.output


def test_no_image_limit_leaks_between_tests():
    """Runs after the CLI test above (file order): the process-wide variable it set is back as it was."""
    assert os.environ.get(MAX_IMAGE_PIXELS_ENV) == ENV_AT_IMPORT
