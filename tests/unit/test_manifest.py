"""async_ckpt.manifest: build/write/read round trip, refusing bad manifests, checking files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from async_ckpt.errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError
from async_ckpt.layout import MANIFEST_NAME
from async_ckpt.manifest import (
    FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    build_manifest,
    check_files,
    read_manifest,
    write_manifest,
)
from async_ckpt.storage import write_file

_COMPONENTS = [
    {"key": "model", "sharing_pattern": "global", "required": True, "file_format": "safetensors", "group": None, "metadata": {"arch": "tiny"}},
    {"key": "rng", "sharing_pattern": "per_rank", "required": False, "file_format": "torch", "group": None, "metadata": {}},
]


def _write(directory: Path, name: str, data: bytes) -> FileEntry:
    written = write_file(directory, name, lambda sink: sink.write(data))
    return FileEntry(size=written.size, xxh3=written.xxh3, codec=None, rank=0, component=name.split(".")[0].split("_")[0], slot="global")


def _checkpoint(tmp_path: Path) -> tuple[Path, Manifest]:
    """A directory holding two real files and the manifest describing them."""
    directory = tmp_path / "checkpoint-7"
    directory.mkdir()
    files = {
        "model.safetensors": _write(directory, "model.safetensors", b"model bytes" * 10),
        "rng_state.pt": FileEntry(**{**asdict(_write(directory, "rng_state.pt", b"rng")), "component": "rng", "slot": "rank:0"}),
    }
    manifest = build_manifest(step=7, world_size=1, path=directory, components=_COMPONENTS, files=files, timings={"0": {"stall_s": 0.01}})
    write_manifest(directory, manifest)
    return directory, manifest


def _raw(tmp_path: Path) -> tuple[Path, dict]:
    directory, manifest = _checkpoint(tmp_path)
    return directory, json.loads(manifest.to_json())


def _rewrite(directory: Path, raw) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(raw))


def test_round_trip(tmp_path):
    directory, manifest = _checkpoint(tmp_path)
    read = read_manifest(directory)
    assert read == manifest
    assert read.format_version == FORMAT_VERSION
    assert read.step == 7 and read.world_size == 1
    assert read.components["model"].files == ["model.safetensors"]
    assert read.components["model"].ranks == [0]
    assert read.components["model"].required is True
    assert read.components["model"].metadata == {"arch": "tiny"}
    assert read.components["rng"].size_bytes == 3
    assert read.files_of("rng") == {"rng_state.pt": manifest.files["rng_state.pt"]}
    assert read.timings == {"0": {"stall_s": 0.01}}
    # seed fields of the Forgather guide are there
    for key in ("checkpoint_path", "world_size", "timestamp", "pytorch_version", "components"):
        assert key in json.loads((directory / MANIFEST_NAME).read_text())
    assert check_files(directory, read) == ([], [])


def test_json_is_the_whole_dataclass_tree(tmp_path):
    """``to_json``'s shallow conversion writes exactly what ``dataclasses.asdict`` would, less the
    SHARDED fields of files that have none (they read as in format_version 1)."""
    _, manifest = _checkpoint(tmp_path)
    tree = asdict(manifest)
    for entry in tree["files"].values():
        assert entry.pop("chunks") is None and entry.pop("pickle") is None
    assert manifest.to_json() == json.dumps(tree, indent=2)


def test_str_path_accepted(tmp_path):
    directory, manifest = _checkpoint(tmp_path)
    assert read_manifest(str(directory)) == manifest


def test_unknown_fields_ignored(tmp_path):
    directory, raw = _raw(tmp_path)
    raw["future_field"] = {"anything": [1, 2]}
    raw["components"]["model"]["shiny"] = True
    raw["files"]["model.safetensors"]["extra"] = "x"
    _rewrite(directory, raw)
    manifest = read_manifest(directory)
    assert manifest.step == 7
    assert "model.safetensors" in manifest.files


def test_newer_format_version_refused(tmp_path):
    directory, raw = _raw(tmp_path)
    raw["format_version"] = FORMAT_VERSION + 1
    _rewrite(directory, raw)
    with pytest.raises(CheckpointFormatError, match="upgrade async_ckpt") as info:
        read_manifest(directory)
    assert str(directory / MANIFEST_NAME) in str(info.value)


def test_missing_format_version_reads_as_one(tmp_path):
    directory, raw = _raw(tmp_path)
    del raw["format_version"]
    _rewrite(directory, raw)
    assert read_manifest(directory).format_version == 1


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        read_manifest(tmp_path / "checkpoint-1")


def test_missing_manifest(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(CheckpointCorruptError, match="has no checkpoint_manifest.json"):
        read_manifest(tmp_path / "checkpoint-1")


@pytest.mark.parametrize("text", [b"{not json", b"", b"\xff\xfe\x00", b'{"step": 1'])
def test_malformed_json_names_path(tmp_path, text):
    directory, _ = _checkpoint(tmp_path)
    (directory / MANIFEST_NAME).write_bytes(text)
    with pytest.raises(CheckpointCorruptError) as info:
        read_manifest(directory)
    assert str(directory / MANIFEST_NAME) in str(info.value)


def _mutations():
    def setter(*path, value=None, delete=False):
        def apply(raw):
            node = raw
            for key in path[:-1]:
                node = node[key]
            if delete:
                del node[path[-1]]
            else:
                node[path[-1]] = value

        return apply

    m = "model.safetensors"
    return {
        "step_string": setter("step", value="7"),
        "step_negative": setter("step", value=-1),
        "step_bool": setter("step", value=True),
        "step_float": setter("step", value=7.0),
        "world_null": setter("world_size", value=None),
        "no_step": setter("step", delete=True),
        "no_world_size": setter("world_size", delete=True),
        "no_files": setter("files", delete=True),
        "no_components": setter("components", delete=True),
        "files_list": setter("files", value=[]),
        "components_string": setter("components", value="model"),
        "file_entry_string": setter("files", m, value="x"),
        "file_no_size": setter("files", m, "size", delete=True),
        "file_no_xxh3": setter("files", m, "xxh3", delete=True),
        "file_xxh3_int": setter("files", m, "xxh3", value=123),
        "file_size_string": setter("files", m, "size", value="10"),
        "file_bad_codec": setter("files", m, "codec", value="gzip"),
        "file_no_rank": setter("files", m, "rank", delete=True),
        "file_no_component": setter("files", m, "component", delete=True),
        "component_not_object": setter("components", "model", value=3),
        "component_no_key": setter("components", "model", "key", delete=True),
        "component_files_string": setter("components", "model", "files", value="model.safetensors"),
        "component_files_ints": setter("components", "model", "files", value=[1]),
        "component_unknown_file": setter("components", "model", "files", value=["other.pt"]),
        "component_ranks_bad": setter("components", "model", "ranks", value=["0"]),
        "format_version_string": setter("format_version", value="1"),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_wrong_types_and_missing_keys_name_path(tmp_path, case):
    directory, raw = _raw(tmp_path)
    _mutations()[case](raw)
    _rewrite(directory, raw)
    with pytest.raises(CheckpointCorruptError) as info:
        read_manifest(directory)
    assert not isinstance(info.value, CheckpointFormatError)
    assert str(directory / MANIFEST_NAME) in str(info.value)


@pytest.mark.parametrize("top", [[], "x", 3, None])
def test_top_level_not_object(tmp_path, top):
    directory, _ = _checkpoint(tmp_path)
    _rewrite(directory, top)
    with pytest.raises(CheckpointCorruptError, match="top level is not an object"):
        read_manifest(directory)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "x\x00y", "a\\b", ""])
def test_hostile_file_names_refused(tmp_path, name):
    directory, raw = _raw(tmp_path)
    raw["files"][name] = dict(raw["files"]["model.safetensors"])
    _rewrite(directory, raw)
    with pytest.raises(CheckpointCorruptError, match="Refusing manifest file name"):
        read_manifest(directory)


def test_symlink_entry_refused(tmp_path):
    directory, raw = _raw(tmp_path)
    outside = tmp_path / "secret"
    outside.write_bytes(b"model bytes" * 10)
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        read_manifest(directory)


def test_manifest_itself_a_symlink_refused(tmp_path):
    directory, _ = _checkpoint(tmp_path)
    real = tmp_path / "real.json"
    os.rename(directory / MANIFEST_NAME, real)
    (directory / MANIFEST_NAME).symlink_to(real)
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        read_manifest(directory)


def test_oversized_manifest_refused_without_reading(tmp_path):
    directory, _ = _checkpoint(tmp_path)
    with open(directory / MANIFEST_NAME, "r+b") as handle:
        handle.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: cheap to make, costly to parse
    with pytest.raises(CheckpointCorruptError, match="larger than any manifest"):
        read_manifest(directory)


def test_check_files_missing_vs_wrong_size_vs_wrong_hash(tmp_path):
    directory, manifest = _checkpoint(tmp_path)
    assert check_files(directory, manifest) == ([], [])
    # wrong hash, same size
    model = directory / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[3] ^= 0xFF
    model.write_bytes(bytes(data))
    missing, problems = check_files(directory, manifest)
    assert missing == [] and len(problems) == 1 and "xxh3" in problems[0] and "model.safetensors" in problems[0]
    # the hash is not read when check_hash is off
    assert check_files(directory, manifest, check_hash=False) == ([], [])
    # wrong size
    model.write_bytes(bytes(data) + b"!")
    missing, problems = check_files(directory, manifest, check_hash=False)
    assert missing == [] and len(problems) == 1 and "size" in problems[0]
    # missing is reported apart
    (directory / "rng_state.pt").unlink()
    missing, problems = check_files(directory, manifest, ["rng_state.pt"])
    assert missing == ["rng_state.pt"] and problems == []


def test_check_files_reports_symlink_as_problem(tmp_path):
    directory, manifest = _checkpoint(tmp_path)
    target = tmp_path / "rng"
    target.write_bytes(b"rng")
    (directory / "rng_state.pt").unlink()
    (directory / "rng_state.pt").symlink_to(target)
    missing, problems = check_files(directory, manifest)
    assert missing == [] and len(problems) == 1 and "not a regular file" in problems[0]
