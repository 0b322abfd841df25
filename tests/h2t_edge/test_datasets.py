"""Loading labelled image datasets from class folders and CSV/JSONL manifests."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from h2t_edge.core.datasets import ImageDataset, from_folder, from_manifest, load_dataset
from h2t_edge.core.errors import DatasetError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 0).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """root/{cat,dog}/ with a nested image and a mixed-case suffix; a non-image file is ignored."""
    root = tmp_path / "data"
    _image(root / "dog" / "b.png")
    _image(root / "dog" / "a.PNG")
    _image(root / "cat" / "sub" / "c.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_from_folder_classes_labels_and_order(folder):
    ds = load_dataset(folder)
    assert ds.classes == ("cat", "dog")
    assert [Path(p).name for p in ds.paths] == ["c.jpg", "a.PNG", "b.png"]
    assert ds.labels.tolist() == [0, 1, 1] and ds.labels.dtype == np.int64
    assert all(Path(p).is_absolute() for p in ds.paths)
    assert ds.source == str(folder.resolve()) and len(ds) == 3


def test_subset_fingerprint_and_manifest_round_trip(folder, tmp_path):
    ds = from_folder(folder)
    assert ds.fingerprint() == from_folder(folder).fingerprint()
    changed = ImageDataset(ds.paths, [0, 1, 0], ds.classes, ds.source)
    assert changed.fingerprint() != ds.fingerprint()

    sub = ds.subset([2, 0])
    assert sub.labels.tolist() == [1, 0] and sub.classes == ds.classes
    assert ds.subset(ds.labels == 1).paths == ds.paths[1:]

    manifest = ds.to_manifest(tmp_path / "out" / "all.jsonl")
    back = from_manifest(manifest)
    assert back.paths == ds.paths and back.labels.tolist() == ds.labels.tolist() and back.classes == ds.classes
    # A subset without "cat" keeps its class indices only when loaded with the class list.
    only_dogs = from_manifest(ds.subset([1, 2]).to_manifest(tmp_path / "dogs.jsonl"), classes=ds.classes)
    assert only_dogs.labels.tolist() == [1, 1]


def test_csv_relative_paths_string_labels_extra_columns_blank_lines(folder):
    manifest = folder / "lists" / "train.csv"
    manifest.parent.mkdir()
    manifest.write_text("id,label,path\n1,dog,../dog/a.PNG\n\n2,cat,../cat/sub/c.jpg\n")
    ds = load_dataset(manifest)
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [1, 0]
    assert ds.paths == (str((folder / "dog" / "a.PNG").resolve()), str((folder / "cat" / "sub" / "c.jpg").resolve()))


def test_jsonl_int_labels_name_classes_up_to_the_maximum(folder):
    manifest = folder / "m.jsonl"
    lines = [{"path": "dog/a.PNG", "label": 2}, {"path": str(folder / "cat/sub/c.jpg"), "label": 0}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dataset(manifest)
    assert ds.classes == ("0", "1", "2") and ds.labels.tolist() == [2, 0]


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("m.csv", "file,label\ndog/a.PNG,dog\n", "line 1: header file,label lacks column(s) path"),
        ("m.csv", "path,label\ndog/a.PNG,dog\n,cat\n", "line 3: empty path"),
        ("m.csv", "path,label\ndog/a.PNG,1\ncat/sub/c.jpg,cat\n", "mixes int labels (line 2) and class-name labels (line 3)"),
        ("m.jsonl", '{"path": "dog/a.PNG", "label": "dog"}\n\n{"path": "x.png"}\n', "line 3: expected an object"),
        ("m.jsonl", '{"path": "dog/a.PNG", "label": 1.5}\n', "line 1: \"label\" must be"),
        ("m.jsonl", "{not json\n", "line 1: not valid JSON"),
        ("m.csv", "path,label\n", "lists no images"),
    ],
)
def test_manifest_errors_name_file_and_line(folder, name, text, needle):
    manifest = folder / name
    manifest.write_text(text)
    with pytest.raises(DatasetError, match="manifest") as info:
        load_dataset(manifest)
    assert str(manifest) in str(info.value) and needle in str(info.value)


def test_missing_files_are_listed_with_lines_and_counted(folder):
    manifest = folder / "m.csv"
    rows = ["dog/a.PNG,dog"] + [f"gone{i}.png,dog" for i in range(7)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetError) as info:
        from_manifest(manifest)
    message = str(info.value)
    assert "7 of 8 image files do not exist" in message and "line 3:" in message
    assert "gone4.png" in message and "gone5.png" not in message and "(2 more)" in message


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        from_folder(tmp_path / "empty")

    root = tmp_path / "data"
    _image(root / "cat" / "a.png")
    (root / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*dog has no images"):
        from_folder(root)

    _image(root / "dog" / "b.png")
    _image(root / "stray.JPG")
    with pytest.raises(DatasetError, match=r"top level \(stray.JPG\)"):
        from_folder(root)


def test_load_dataset_rejects_other_files(tmp_path):
    other = tmp_path / "list.txt"
    other.write_text("a.png 0\n")
    with pytest.raises(DatasetError, match=r"list.txt .*\.csv manifest"):
        load_dataset(other)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing.csv")
