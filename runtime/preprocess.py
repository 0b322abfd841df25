"""Image loading and timm-exact evaluation preprocessing, with numpy and Pillow only.

`preprocess_image` reproduces what `timm.data.create_transform(**resolve_data_config(...))`
does at evaluation time (Resize -> CenterCrop -> ToTensor -> Normalize on a PIL image), so a
head trained on features computed with timm sees the same pixels on the device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import ArtifactError, ImageError

# timm's defaults (timm/data/constants.py, timm/data/config.py), used for keys a timm
# config leaves out.
TIMM_DEFAULT_INPUT_SIZE = (3, 224, 224)
TIMM_DEFAULT_INTERPOLATION = "bicubic"
TIMM_DEFAULT_MEAN = (0.485, 0.456, 0.406)
TIMM_DEFAULT_STD = (0.229, 0.224, 0.225)
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_DEFAULT_CROP_MODE = "center"

# The PIL filter torchvision uses for each timm interpolation name (torchvision's
# `pil_modes_mapping`); PIL resizes are what timm runs on PIL images.
RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash", "border")
# Largest network input side a config may ask for (real backbones use 224..1024).
MAX_INPUT_SIDE = 8192

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

ImageLike = Union[Image.Image, str, os.PathLike]

MAX_IMAGE_PIXELS_ENV = "H2T_EDGE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class PreprocessConfig:
    """How a backbone expects its input: timm's data config, as stored in artifacts.

    input_size: (C, H, W) of the network input; C must be 3 (RGB).
    mean, std: per-channel normalization applied to pixels scaled to [0, 1].
    interpolation: resize filter name, one of RESAMPLE_FILTERS.
    crop_pct: the image is resized to floor(H / crop_pct) x floor(W / crop_pct) before cropping.
    crop_mode: 'center' (keep aspect, crop), 'squash' (ignore aspect), 'border' (keep aspect, pad).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        # Normalize lists (from JSON) to tuples so configs compare and hash by value.
        converters = {
            "input_size": lambda v: tuple(int(x) for x in v),
            "mean": lambda v: tuple(float(x) for x in v),
            "std": lambda v: tuple(float(x) for x in v),
            "crop_pct": float,
        }
        for name, convert in converters.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, convert(value))
            except (TypeError, ValueError):
                raise ArtifactError(f"preprocess config field '{name}' has the wrong type: {value!r}") from None
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> ArtifactError:
            return ArtifactError(f"preprocess config field '{field}' {why}")

        if (len(self.input_size) != 3 or self.input_size[0] != 3 or min(self.input_size) <= 0
                or max(self.input_size) > MAX_INPUT_SIDE):
            raise bad("input_size", f"must be (3, H, W) with 0 < H, W <= {MAX_INPUT_SIDE}, got {self.input_size}")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise bad(field, f"must have 3 finite values (R, G, B), got {values}")
        if min(self.std) <= 0:
            raise bad("std", f"must be positive, got {self.std}")
        if self.interpolation not in RESAMPLE_FILTERS:
            raise bad("interpolation", f"must be one of {sorted(RESAMPLE_FILTERS)}, got {self.interpolation!r}")
        # Bounded so that the resize before the crop (side / crop_pct) stays a sane size.
        if not (math.isfinite(self.crop_pct) and 0.1 <= self.crop_pct <= 10):
            raise bad("crop_pct", f"must be a number in [0.1, 10], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise bad("crop_mode", f"must be one of {list(CROP_MODES)}, got {self.crop_mode!r}")

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists, not tuples); `from_dict(to_dict())` round-trips."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocess config") -> "PreprocessConfig":
        """Build from `to_dict()` output; `source` (e.g. the sidecar path) names it in errors.

        Raises ArtifactError on a missing or malformed field.
        """
        if not isinstance(d, Mapping):
            raise ArtifactError(f"{source}: 'preprocess' must be an object, got {type(d).__name__}")
        required = ("input_size", "mean", "std", "interpolation", "crop_pct")
        missing = [key for key in required if key not in d]
        if missing:
            raise ArtifactError(
                f"{source}: preprocess config is missing field(s) {missing}; re-create the artifact"
            )
        try:
            return cls(
                input_size=d["input_size"],
                mean=d["mean"],
                std=d["std"],
                interpolation=str(d["interpolation"]),
                crop_pct=d["crop_pct"],
                crop_mode=str(d.get("crop_mode", "center")),
            )
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}; re-create the artifact") from None

    @classmethod
    def from_timm_config(cls, cfg: Mapping[str, Any]) -> "PreprocessConfig":
        """From a timm pretrained/data config dict, filling left-out keys as timm's
        `resolve_data_config` does (no timm import; pass `model.pretrained_cfg`)."""

        def pick(key: str, default: Any) -> Any:
            # timm treats None and empty values as "not set".
            value = cfg.get(key)
            return value if value else default

        return cls.from_dict(
            {
                "input_size": pick("input_size", TIMM_DEFAULT_INPUT_SIZE),
                "mean": pick("mean", TIMM_DEFAULT_MEAN),
                "std": pick("std", TIMM_DEFAULT_STD),
                "interpolation": pick("interpolation", TIMM_DEFAULT_INTERPOLATION),
                "crop_pct": pick("crop_pct", TIMM_DEFAULT_CROP_PCT),
                "crop_mode": pick("crop_mode", TIMM_DEFAULT_CROP_MODE),
            },
            source="timm config",
        )


def max_image_pixels() -> int:
    """The largest image (width x height) `load_image` decodes: $H2T_EDGE_MAX_IMAGE_PIXELS, else
    Pillow's default of 89,478,485 (a 0.25 GiB RGBA image). Larger files are refused as possible
    decompression bombs (a few KB of PNG can inflate to gigabytes)."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ImageError(f"{MAX_IMAGE_PIXELS_ENV}={value!r} must be a positive whole number of pixels")
    return limit


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, converting any mode like timm's loader does.

    - EXIF orientation is applied (a phone photo stored sideways is turned upright), so the
      network sees the image as a viewer shows it; extraction and the runtime both read images
      here, so training features and on-device predictions see the same pixels.
    - Modes: CMYK, grayscale (L), LA, RGBA and palette images (with or without transparency)
      become RGB with their alpha dropped, as `PIL.Image.convert('RGB')` does in timm. 16-bit
      grayscale (I;16) is scaled to 8 bits (v / 257), where Pillow's convert would clip it at 255.
    - Images over `max_pixels` (default `max_image_pixels()`) are refused before decoding.

    Raises ImageError naming the path and the reason for a missing, unreadable, non-image,
    truncated, oversized or corrupt file. Truncated files are errors on purpose (no
    LOAD_TRUNCATED_IMAGES): a half-grey image would give a confident, wrong prediction.
    """
    path = Path(path)
    limit = max_image_pixels() if max_pixels is None else max_pixels
    # Pillow refuses images over 2x its own limit as soon as it opens them; a raised limit must win.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit

    def too_big(detail: str) -> ImageError:
        return ImageError(f"image {path} is {detail}, over the limit of {limit:,} pixels (decompression bomb "
                          f"guard); if it is a genuine image, raise the limit with {MAX_IMAGE_PIXELS_ENV}=<pixels>")

    try:
        with Image.open(path) as img:
            if img.width * img.height > limit:
                raise too_big(f"{img.width}x{img.height}")
            img.load()  # Image.open only reads the header; decode now so corruption shows here.
            if img.width == 0 or img.height == 0:
                raise ImageError(f"image {path} has zero size ({img.width}x{img.height})")
            return _to_rgb(_upright(img))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image {path} is a directory, not an image file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not an image file Pillow can identify") from None
    except Image.DecompressionBombError as exc:
        raise too_big(f"too large ({exc})") from None
    # Pillow's decoders signal corruption with many types (OSError, SyntaxError, EOFError,
    # struct.error, ValueError...), so any failure here is the file's.
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (no copy when there is nothing to turn)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        pixels = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray(((pixels + 128) // 257).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        # Via RGBA: the same colours as a direct convert, without Pillow's transparency warning.
        img = img.convert("RGBA")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """timm's eval transform on one PIL image. Returns float32[3, H, W] (normalized, CHW)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img, fill = _resize_for_crop(img, cfg)
    pixels = _center_crop_or_pad(np.asarray(img), (cfg.height, cfg.width), fill)  # uint8[H, W, 3]
    chw = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((chw - mean) / std, dtype=np.float32)


def preprocess_batch(images_or_paths: Iterable[ImageLike], cfg: PreprocessConfig) -> np.ndarray:
    """Preprocess PIL images and/or image paths. Returns float32[n, 3, H, W].

    Paths are read with `load_image`, so a bad file raises ImageError naming it.
    """
    arrays = [
        preprocess_image(item if isinstance(item, Image.Image) else load_image(item), cfg)
        for item in images_or_paths
    ]
    if not arrays:
        return np.zeros((0, *cfg.input_size), dtype=np.float32)
    return np.stack(arrays)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under `folder`, recursively, sorted by path.

    Matches IMAGE_EXTENSIONS case-insensitively. Hidden files and folders (names starting with
    '.') are left out: they are OS debris such as macOS '._x.jpg' resource forks, not images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"image folder {folder} does not exist or is not a directory")
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


def _resize_for_crop(img: Image.Image, cfg: PreprocessConfig) -> tuple[Image.Image, tuple[int, int, int]]:
    """The resize step of timm's `transforms_imagenet_eval` for cfg.crop_mode.

    Returns the resized image and the fill colour the following crop pads with (torchvision
    pads with black; timm's 'border' mode pads with the mean colour).
    """
    scale_h, scale_w = (math.floor(x / cfg.crop_pct) for x in (cfg.height, cfg.width))
    black = (0, 0, 0)
    if cfg.crop_mode == "squash":
        return _resize(img, (scale_h, scale_w), cfg.interpolation), black
    if cfg.crop_mode == "border":
        # timm ResizeKeepRatio(longest=1.0): fit the longest side, then CenterCropOrPad.
        size = _keep_ratio_size(img, (scale_h, scale_w), longest=True)
        fill = tuple(round(255 * m) for m in cfg.mean)
        return _resize(img, size, cfg.interpolation), fill
    if scale_h == scale_w:
        # torchvision Resize(int): shorter side to `scale`, longer side truncated, not rounded.
        short, long = sorted((img.height, img.width))
        new_short, new_long = scale_h, int(scale_h * long / short)
        size = (new_long, new_short) if img.width <= img.height else (new_short, new_long)
    else:
        # Non-square targets: timm ResizeKeepRatio(longest=0.0), which rounds.
        size = _keep_ratio_size(img, (scale_h, scale_w), longest=False)
    return _resize(img, size, cfg.interpolation), black


def _keep_ratio_size(img: Image.Image, target: tuple[int, int], longest: bool) -> tuple[int, int]:
    """timm ResizeKeepRatio.get_params without randomness: (h, w) scaled by one ratio."""
    ratio_h, ratio_w = img.height / target[0], img.width / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(img.height / ratio), round(img.width / ratio)


def _resize(img: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """Resize to (h, w) with PIL, as torchvision does for PIL images (which skips no-op resizes)."""
    h, w = size
    if (img.height, img.width) == (h, w):
        return img
    return img.resize((w, h), RESAMPLE_FILTERS[interpolation])


def _center_crop_or_pad(pixels: np.ndarray, size: tuple[int, int], fill: tuple[int, int, int]) -> np.ndarray:
    """torchvision CenterCrop / timm CenterCropOrPad on uint8[h, w, 3] -> uint8[H, W, 3].

    Sides shorter than the target are padded with `fill` (extra pixel on the right/bottom),
    then the crop offset is `int(round((h - H) / 2))`, Python's round-half-to-even included.
    """
    crop_h, crop_w = size
    h, w = pixels.shape[:2]
    if crop_h > h or crop_w > w:
        top, left = max(crop_h - h, 0) // 2, max(crop_w - w, 0) // 2
        canvas = np.empty((max(h, crop_h), max(w, crop_w), 3), dtype=np.uint8)
        canvas[...] = np.asarray(fill, dtype=np.uint8)
        canvas[top:top + h, left:left + w] = pixels
        pixels, (h, w) = canvas, canvas.shape[:2]
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]
