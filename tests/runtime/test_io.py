"""Atomic writes leave either the old file or the new one, never a torn one."""

from __future__ import annotations

import os

import pytest

from runtime.errors import ArtifactError
from runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json


def test_json_round_trip_keeps_key_order_and_ends_with_newline(tmp_path):
    path = tmp_path / "nested" / "manifest.json"
    atomic_write_json(path, {"z": 1, "a": [1, 2]})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"z"') < text.index('"a"')
    assert '\n  "z": 1' in text  # indent=2
    assert read_json(path, "manifest") == {"z": 1, "a": [1, 2]}
    assert os.listdir(path.parent) == ["manifest.json"]  # no temp file left behind


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    atomic_write_bytes(path, b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"sidecar .*missing\.json does not exist"):
        read_json(tmp_path / "missing.json", "sidecar")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match=r"bad\.json is not valid JSON \(line 1"):
        read_json(bad, "sidecar")
