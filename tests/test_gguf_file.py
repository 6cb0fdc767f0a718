"""The fast GGUF scanner against gguf.GGUFReader (the reference), and its one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest

from l2kv_cpp.errors import ModelError
from l2kv_cpp.gguf_file import SMALL_ARRAY, check_gguf, read_gguf


def _reference(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and len(value) > SMALL_ARRAY:
            value = len(value)
        meta[key] = value
    tensors = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]
    return meta, tensors, reader.data_offset


def _ours(path: Path):
    info = read_gguf(path)
    tensors = [(t.name, t.shape, t.type, info.data_offset + t.offset) for t in info.tensors]
    return info.metadata, tensors, info.data_offset


def _assert_same(path: Path) -> None:
    ref_meta, ref_tensors, ref_offset = _reference(path)
    meta, tensors, offset = _ours(path)
    assert meta.keys() == ref_meta.keys()
    for key, value in ref_meta.items():
        assert meta[key] == pytest.approx(value) if isinstance(value, float) else meta[key] == value, key
    assert tensors == ref_tensors
    assert offset == ref_offset


def test_scanner_matches_gguf_reader_on_tiny_model(tiny_model):
    _assert_same(tiny_model)


@pytest.mark.slow
def test_scanner_matches_gguf_reader_on_smollm2(smollm2_path):
    _assert_same(smollm2_path)


@pytest.mark.parametrize("name", ["tiny_model", "smollm2_path"])
def test_n_vocab_matches_the_token_list(name, request):
    path = request.getfixturevalue(name)
    tokens = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents()
    assert read_gguf(path).n_vocab == len(tokens)


def test_tensor_sizes_end_at_file_end(tiny_model):
    info = check_gguf(tiny_model)
    end = info.data_offset + max(t.offset + t.n_bytes for t in info.tensors)
    assert end == info.file_size


def test_truncated_file_is_reported(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match="truncated: its tensors need"):
        check_gguf(cut_data)
    cut_meta = tmp_path / "cut-meta.gguf"
    cut_meta.write_bytes(data[:2000])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        check_gguf(cut_meta)


def test_not_gguf_missing_directory_and_unreadable(tmp_path, monkeypatch):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        check_gguf(junk)
    with pytest.raises(ModelError, match="not found"):
        check_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ModelError, match="is a directory"):
        check_gguf(tmp_path)
    locked = tmp_path / "locked.gguf"
    shutil.copy(junk, locked)

    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", deny)  # root ignores file modes, so simulate the OS refusing
    with pytest.raises(ModelError, match="cannot read model file .*Permission denied"):
        check_gguf(locked)


def test_error_messages_are_one_line(tiny_model, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_model.read_bytes()[:100])
    with pytest.raises(ModelError) as exc:
        check_gguf(bad)
    assert "\n" not in str(exc.value)
