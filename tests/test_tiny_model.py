"""The seeded tiny-model generator: deterministic bytes, valid GGUF, config validation."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest

from l2kv_cpp.tiny_model import TinyModelConfig, tiny_vocab, write_tiny_model


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_tiny_model(tmp_path / "a.gguf", TinyModelConfig(seed=7))
    b = write_tiny_model(tmp_path / "b.gguf", TinyModelConfig(seed=7))
    c = write_tiny_model(tmp_path / "c.gguf", TinyModelConfig(seed=8))
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)


def test_written_shapes_match_config_via_gguf_reader(tmp_path):
    cfg = TinyModelConfig(n_layer=3, n_head=6, n_head_kv=2, head_dim=16, n_ff=96, seed=3)
    path = write_tiny_model(tmp_path / "m.gguf", cfg)
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 3
    assert fields["llama.attention.head_count"] == 6
    assert fields["llama.attention.head_count_kv"] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 * 9 + 3
    # ggml order (ne0 = input dim): K projection maps n_embd -> n_head_kv * head_dim
    assert list(tensors["blk.0.attn_k.weight"].shape) == [cfg.n_embd, cfg.n_head_kv * cfg.head_dim]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.all(np.isfinite(np.asarray(tensors["output.weight"].data, dtype=np.float32)))


def test_vocab_has_byte_fallback_for_every_byte():
    tokens, scores, types = tiny_vocab()
    assert len(tokens) == len(scores) == len(types)
    assert {f"<0x{b:02X}>" for b in range(256)} <= set(tokens)
    assert len(set(tokens)) == len(tokens)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_head": 3, "n_head_kv": 2}, "multiple of n_head_kv"),
        ({"head_dim": 15}, "even"),
        ({"n_layer": 0}, "n_layer must be positive"),
        ({"weight_type": "q8_0"}, "weight_type"),
        ({"n_vocab": 10}, "n_vocab must be at least"),
    ],
)
def test_invalid_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyModelConfig(**kwargs)


def test_q4_0_model_with_a_padded_vocab_loads_and_decodes(tmp_path):
    """The path of the synthetic benchmark shapes (Q4_0 matrices shared by every layer, a large
    vocabulary), at a small size: llama.cpp loads it with the requested shapes and decodes."""
    from conftest import make_llm, random_tokens

    from l2kv_cpp.decode import decode, logits_ith

    cfg = TinyModelConfig(n_layer=3, head_dim=64, n_ff=256, weight_type="q4_0", n_vocab=5000, share_layer_weights=True)
    path = write_tiny_model(tmp_path / "q.gguf", cfg)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    layer0 = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    layer2 = next(t for t in reader.tensors if t.name == "blk.2.ffn_up.weight")
    assert bytes(layer0.data) == bytes(layer2.data)  # shared
    llm = make_llm(path)
    try:
        assert llm.n_vocab() == 5000
        decode(llm, random_tokens(40), 0)
        assert np.all(np.isfinite(logits_ith(llm)))
    finally:
        llm.close()
