"""Labelled image datasets as plain data: a folder of class subfolders or a CSV/JSONL manifest.

An `ImageDataset` is only paths, integer labels and class names; reading pixels is the job of
`runtime.preprocess`. Class indices are the position of the class name in `classes`, so two
datasets (train and test) agree on indices when they are loaded with the same `classes`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from h2t_edge.core.errors import DatasetError
from runtime.io import atomic_write_text

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
MANIFEST_SUFFIXES = (".csv", ".jsonl")
_SHOWN = 5  # how many offending files or lines an error message lists before it only counts
_INT_LABEL = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Image paths with integer labels.

    paths: absolute, resolved file paths, in dataset order.
    labels: int64[n], index into `classes`.
    classes: class names; `labels` index into them.
    source: the folder or manifest the dataset came from.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        labels.setflags(write=False)  # frozen means frozen: no edits through `ds.labels[i] = ...`
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "labels", labels)
        if len(labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got {labels.min()}..{labels.max()}")

    def __len__(self) -> int:
        return len(self.paths)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageDataset):
            return NotImplemented
        return (
            self.paths == other.paths
            and self.classes == other.classes
            and self.source == other.source
            and np.array_equal(self.labels, other.labels)
        )

    __hash__ = None  # labels is an array; equal datasets need not be hashable

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """The examples at `indices` (int[k] positions or bool[n] mask), with the same classes."""
        index = np.asarray(indices)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {index.shape}, expected ({len(self)},)")
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False).reshape(-1)
        return ImageDataset(
            paths=tuple(self.paths[i] for i in index),
            labels=self.labels[index],
            classes=self.classes,
            source=self.source,
        )

    def fingerprint(self) -> str:
        """sha256 (hex) over the ordered paths, labels and classes; stable across runs and platforms."""
        digest = hashlib.sha256()
        payload = {"paths": list(self.paths), "labels": self.labels.tolist(), "classes": list(self.classes)}
        digest.update(json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii"))
        return digest.hexdigest()

    def class_counts(self) -> np.ndarray:
        """int64[len(classes)]: how many examples each class has."""
        return np.bincount(self.labels, minlength=len(self.classes)).astype(np.int64)

    def to_manifest(self, path: str | os.PathLike) -> Path:
        """Write a JSONL manifest ({"path": absolute path, "label": ...} per line) atomically.

        Labels are written as class names; when the classes are "0".."k-1" they are written as ints,
        so that `from_manifest` reads them back in numeric rather than string order. Load it back
        with `from_manifest(path, classes=ds.classes)` to keep classes that have no example here.
        """
        int_names = self.classes == tuple(str(i) for i in range(len(self.classes)))
        lines = []
        for p, label in zip(self.paths, self.labels.tolist()):
            value = label if int_names else self.classes[label]
            # A file name that is not UTF-8 (kept by Python as surrogate escapes) is written \u-escaped,
            # so the manifest stays valid UTF-8 and reads back to the same bytes.
            lines.append(json.dumps({"path": p, "label": value}, ensure_ascii=not _utf8(p)))
        return atomic_write_text(path, "".join(line + "\n" for line in lines))


def load_dataset(path: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageDataset:
    """Load a folder of class subfolders, or a `.csv` / `.jsonl` manifest. See `from_folder`, `from_manifest`."""
    path = Path(path)
    if path.is_dir():
        return from_folder(path, classes=classes)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return from_manifest(path, classes=classes)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist; pass a folder of class subfolders or a .csv/.jsonl manifest")
    raise DatasetError(
        f"dataset {path} is neither a folder nor a manifest; pass a folder with one subfolder per class, "
        "a .csv manifest with 'path,label' columns, or a .jsonl manifest with {\"path\", \"label\"} objects"
    )


def from_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageDataset:
    """One subfolder per class; images are found recursively inside each class subfolder.

    Classes are the sorted subfolder names (hidden ones skipped), unless `classes` fixes the list and
    its order (then every subfolder must be one of them). Examples are ordered by class, then path.
    Image suffixes are matched case-insensitively against `IMAGE_EXTENSIONS`; other files and hidden
    files or folders (names starting with '.') are left out. Symlinked image files are followed and
    listed by their target; symlinked folders inside a class are not entered; a broken symlink is an
    error. File names need not be UTF-8 (they are kept as Python's surrogate escapes).
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset folder {root} {what}; pass a folder with one subfolder per class")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    stray = [p.name for p in entries if p.is_file() and _is_image(p)]
    if stray:
        raise DatasetError(
            f"dataset folder {root} has {len(stray)} image(s) at its top level ({_first(stray)}), "
            "which belong to no class; move them into a class subfolder"
        )
    found = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not found:
        raise DatasetError(f"dataset folder {root} has no class subfolders; put each class's images in <root>/<class>/")
    class_names = _check_known(found, classes, f"dataset folder {root}", "subfolder")

    paths: list[str] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(class_names)}
    for name in sorted(found, key=index.__getitem__):
        # Symlinked files are followed (the dataset lists their targets); symlinked folders are not
        # descended into (rglob), so a link loop cannot hang the scan. A broken link is an error.
        candidates = [p for p in (root / name).rglob("*")
                      if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)]
        broken = [str(p) for p in candidates if p.is_symlink() and not p.exists()]
        if broken:
            raise DatasetError(f"class folder {root / name} has {len(broken)} broken symlink(s) ({_first(broken)}); "
                               "repair or remove them")
        images = sorted(p for p in candidates if p.is_file())
        if not images:
            raise DatasetError(
                f"class folder {root / name} has no images (suffixes {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        paths.extend(str(p.resolve()) for p in images)
        labels.extend([index[name]] * len(images))
    return ImageDataset(tuple(paths), np.asarray(labels, np.int64), class_names, str(root.resolve()))


def from_manifest(path: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageDataset:
    """Read a `.csv` (header with `path` and `label`, extra columns ignored) or `.jsonl` manifest.

    Relative paths are resolved against the manifest's folder; blank lines are skipped.
    Labels are all class names (strings) or all ints >= 0. Classes are, unless `classes` is given:
    the sorted unique names, or for ints "0".."max". With `classes`, names must be among them and
    ints must index them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DatasetError(f"manifest {path} must end in .csv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM before the header
    except FileNotFoundError:
        raise DatasetError(f"manifest {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read manifest {path} as UTF-8 text: {exc}") from exc

    rows = _csv_rows(path, text) if suffix == ".csv" else _jsonl_rows(path, text)
    if not rows:
        raise DatasetError(f"manifest {path} lists no images; add lines with a path and a label")

    base = path.resolve().parent
    resolved = [(line, (base / Path(os.path.expanduser(p))).resolve()) for line, p, _ in rows]
    missing = [f"line {line}: {p}" for line, p in resolved if not p.is_file()]
    if missing:
        raise DatasetError(
            f"manifest {path}: {len(missing)} of {len(rows)} image files do not exist ({_first(missing)}); "
            f"fix the paths (relative paths are taken from {base})"
        )
    class_names, labels = _label_indices(path, [(line, label) for line, _, label in rows], classes)
    return ImageDataset(tuple(str(p) for _, p in resolved), labels, class_names, str(path.resolve()))


def _csv_rows(path: Path, text: str) -> list[tuple[int, str, str | int]]:
    """(line number, path, label) for each non-blank CSV row; CSV labels that look like ints are ints."""
    reader = csv.reader(text.splitlines())
    header = next((row for row in reader if any(cell.strip() for cell in row)), None)
    if header is None:
        raise DatasetError(f"manifest {path} is empty; it needs a header line 'path,label' and one line per image")
    columns = [cell.strip() for cell in header]
    absent = [c for c in ("path", "label") if c not in columns]
    if absent:
        raise DatasetError(
            f"manifest {path} line {reader.line_num}: header {','.join(columns)} lacks column(s) "
            f"{', '.join(absent)}; the header must contain 'path' and 'label'"
        )
    i_path, i_label = columns.index("path"), columns.index("label")
    rows = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(i_path, i_label):
            raise DatasetError(
                f"manifest {path} line {reader.line_num}: {len(row)} field(s), but the header has {len(columns)}; "
                "give every line a path and a label"
            )
        value = row[i_path].strip()
        label = row[i_label].strip()
        _check_entry(path, reader.line_num, value, label)
        rows.append((reader.line_num, value, int(label) if _INT_LABEL.match(label) else label))
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, str, str | int]]:
    """(line number, path, label) for each non-blank JSONL line."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"manifest {path} line {line_no}: not valid JSON ({exc.msg}); write one object per line") from None
        if not isinstance(obj, dict) or "path" not in obj or "label" not in obj:
            raise DatasetError(
                f"manifest {path} line {line_no}: expected an object with keys \"path\" and \"label\", "
                f"got {line.strip()[:80]}"
            )
        value, label = obj["path"], obj["label"]
        if not isinstance(value, str):
            raise DatasetError(f"manifest {path} line {line_no}: \"path\" must be a string, got {value!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DatasetError(
                f"manifest {path} line {line_no}: \"label\" must be a class name (string) or an int, got {label!r}"
            )
        _check_entry(path, line_no, value.strip(), label)
        rows.append((line_no, value.strip(), label.strip() if isinstance(label, str) else label))
    return rows


def _check_entry(path: Path, line: int, value: str, label: str | int) -> None:
    if not value:
        raise DatasetError(f"manifest {path} line {line}: empty path; give each image's file path")
    if isinstance(label, str) and not label.strip():
        raise DatasetError(f"manifest {path} line {line}: empty label; give each image a class name or int")


def _label_indices(
    path: Path, labels: list[tuple[int, str | int]], classes: Sequence[str] | None
) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and int64[n] label indices; all labels must be of one kind (int or name)."""
    kinds = {isinstance(label, int) for _, label in labels}
    if len(kinds) > 1:
        first_int = next(line for line, label in labels if isinstance(label, int))
        first_str = next(line for line, label in labels if isinstance(label, str))
        raise DatasetError(
            f"manifest {path} mixes int labels (line {first_int}) and class-name labels (line {first_str}); "
            "use one kind for every line"
        )
    if kinds == {True}:
        negative = [f"line {line}" for line, label in labels if label < 0]
        if negative:
            raise DatasetError(f"manifest {path}: negative int labels ({_first(negative)}); labels count from 0")
        values = np.asarray([label for _, label in labels], np.int64)
        if classes is None:
            return tuple(str(i) for i in range(int(values.max()) + 1)), values
        class_names = tuple(str(c) for c in classes)
        too_big = [f"line {line}" for line, label in labels if label >= len(class_names)]
        if too_big:
            raise DatasetError(
                f"manifest {path}: int labels beyond the {len(class_names)} given classes ({_first(too_big)}); "
                "fix the labels or the class list"
            )
        return class_names, values
    names = [label for _, label in labels]
    class_names = _check_known(sorted(set(names)), classes, f"manifest {path}", "label")
    index = {name: i for i, name in enumerate(class_names)}
    return class_names, np.asarray([index[name] for name in names], np.int64)


def _check_known(found: list[str], classes: Sequence[str] | None, where: str, what: str) -> tuple[str, ...]:
    """`classes` as a tuple (or the sorted `found` names); raise if some found name is not among them."""
    if classes is None:
        return tuple(sorted(found))
    class_names = tuple(str(c) for c in classes)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DatasetError(
            f"{where}: {what}(s) {_first(unknown)} are not among the {len(class_names)} given classes; "
            "fix the names or the class list"
        )
    return class_names


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown}, ... ({len(items) - _SHOWN} more)"
