"""The cache holds exactly the tokens of the whole prompt: no token split at the document/question boundary.

References are other code paths: llama-cpp-python's own chat formatter and tokenizer for the tokens,
its `create_chat_completion` / `create_completion` for the answers.
"""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from l2kv_cpp.chat import Conversation
from l2kv_cpp.cli import main
from l2kv_cpp.config import L2KVConfig
from l2kv_cpp.eval import niah
from l2kv_cpp.prompt_tokens import common_prefix_len, stable_prefix_len, tokens_within
from l2kv_cpp.recall import RecallSettings
from l2kv_cpp.sampling import SamplingSettings
from l2kv_cpp.session import L2KVModel, ModelSettings

GREEDY = SamplingSettings(temperature=0)
SETTINGS = ModelSettings(n_batch=128, n_ubatch=128)
# documents ending in every way a tokenizer may merge with what follows
ENDINGS = {
    "period": "The report ends here.",
    "newline": "The report ends here.\n",
    "blank-line": "The report ends here.\n\n",
    "space": "The report ends here. ",
    "digits": "The report ends with the number 123456",
    "cjk": "The report ends in Chinese: 报告到此结束",
    "emoji": "The report ends with an emoji 🎉",
}
QUESTIONS = ("What does the report say?", "Summarize it.", "1 or 2?", "And then?")


# the helpers, on their own


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2]) == 2


def test_stable_prefix_holds_back_what_a_continuation_changes():
    # a toy tokenizer that merges a run of newlines into one token: trailing newlines are not stable
    def tokenize(text: str) -> list[int]:
        out: list[int] = []
        for ch in text:
            if ch == "\n" and out and out[-1] >= 1000:
                out[-1] += 1
            else:
                out.append(1000 if ch == "\n" else ord(ch))
        return out

    def pieces(tokens: list[int]) -> list[bytes]:
        return [("\n" * (t - 999) if t >= 1000 else chr(t)).encode() for t in tokens]

    for text, stable in (("ab\n\n", 2), ("abc", 3), ("x" * 3000 + "ab\n\n\n", 3002)):
        tokens = tokenize(text)
        assert stable_prefix_len(tokenize, text, tokens) == stable
        assert stable_prefix_len(tokenize, text, tokens, pieces(tokens), window=16) == stable  # the tail only
        seen: list[int] = []

        def counting(t: str, seen: list[int] = seen) -> list[int]:
            seen.append(len(t))
            return tokenize(t)

        stable_prefix_len(counting, text, tokens, pieces(tokens), window=16)
        assert max(seen) < 32 or len(text) < 32  # only the tail was tokenized again
        with_bos = [1, *tokens]  # a BOS in front, not part of the text
        assert stable_prefix_len(tokenize, text, with_bos, [b"<s>", *pieces(tokens)], skip=1, window=16) == stable + 1


def test_tokens_within_counts_tokens_inside_the_prefix():
    pieces = [b"<s>", b"doc", b"\n", b"\n", b"What"]
    assert tokens_within(pieces, "doc\n\nWhat", "doc\n\n", skip=1) == 4
    assert tokens_within(pieces, "doc\n\nWhat", "doc\n", skip=1) == 3
    assert tokens_within([b"do", b"c\n\nWh", b"at"], "doc\n\nWhat", "doc\n\n") == 1  # a token across the boundary
    assert tokens_within(pieces, "doc\n\nWhy", "doc\n\n", skip=1) is None  # pieces do not spell the text


# real models: the cache's tokens against llama-cpp-python's tokenization of the whole prompt


def _reference_chat_tokens(m: L2KVModel, messages: list[dict[str, str]]) -> list[int]:
    """What create_chat_completion feeds for these messages: llama-cpp-python's Jinja2 formatter on the
    GGUF's template, tokenized whole (add_bos off: the formatter reports that it added the specials)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = m.llm
    fmt = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    res = fmt(messages=messages)
    return llm.tokenize(res.prompt.encode(), add_bos=not res.added_special, special=True)


@pytest.mark.slow
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_chat_cache_holds_the_whole_prompt_tokens(smollm2_path, ending):
    """SmolLM2 through its template, 1 to 4 turns, each a document then a question: after every turn the
    cache's tokens are llama-cpp-python's tokens of the whole conversation (answers included)."""
    with L2KVModel(smollm2_path, SETTINGS, l2kv=None) as m:
        conv = Conversation(m)
        messages: list[dict[str, str]] = []
        for turn, question in enumerate(QUESTIONS):
            document = f"Part {turn + 1}. {ENDINGS[ending]}"
            conv.load_document(document)
            user = {"role": "user", "content": f"{document}\n\n{question}"}
            whole = _reference_chat_tokens(m, [*messages, user])
            fed = conv.tokens
            assert whole[: len(fed)] == fed, "a document fed on its own diverges from the whole prompt"
            assert len(whole) - len(fed) <= 16  # only the question and the template's tail are held back
            answer = "".join(r.text for r in conv.ask(question, GREEDY, 2))
            messages += [user, {"role": "assistant", "content": answer}]
            prompt_len = len(whole)
            assert conv.tokens[:prompt_len] == whole
            rest = conv.tokens[prompt_len:]
            assert rest[: len(conv.answers[-1])] == conv.answers[-1]  # the sampled tokens, then at most an end token
            assert len(rest) - len(conv.answers[-1]) <= 1 and all(m.is_eog(t) for t in rest[len(conv.answers[-1]) :])
            assert len(conv.tokens) == m.n_past
            # the answers here re-tokenize to what was sampled, so the rendered conversation so far, tokenized
            # whole by the reference (with the template's end of turn), extends the cache
            after = _reference_chat_tokens(m, messages)
            n_common = common_prefix_len(after, conv.tokens)
            assert n_common >= prompt_len + len(conv.answers[-1]), (turn, after[prompt_len:], conv.tokens[prompt_len:])
        assert conv.n_reevaluations == 0


@pytest.mark.slow
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_plain_cache_holds_the_whole_prompt_tokens(gemma_path, ending):
    """Gemma 3 (base model, plain text): the document and the question are one text; answers stay as sampled."""
    with L2KVModel(gemma_path, SETTINGS, l2kv=None) as m:
        conv = Conversation(m)
        assert not conv.chat
        expected: list[int] = []
        for turn, question in enumerate(QUESTIONS):
            document = f"Part {turn + 1}. {ENDINGS[ending]}"
            conv.load_document(document)
            text = document + " " + question
            segment = m.tokenize(text, add_bos=m.add_bos and not expected, special=False)
            assert conv.tokens == (expected + segment)[: len(conv.tokens)]
            list(conv.ask(" " + question, GREEDY, 2))
            expected += segment
            assert conv.tokens[: len(expected)] == expected
            expected = list(conv.tokens)  # the sampled tokens stay; an end token is not part of the text
            if m.is_eog(expected[-1]):
                expected.pop()
        assert conv.n_reevaluations == 0


@pytest.mark.slow
def test_document_split_matches_the_whole_prompt_on_both_models(smollm2_path, gemma_path):
    """With the question known, the tokens fed for the document are exactly the whole prompt's tokens that lie
    inside the document, for every ending."""
    for path in (smollm2_path, gemma_path):
        with L2KVModel(path, SETTINGS, l2kv=None) as m:
            for ending, text in ENDINGS.items():
                conv = Conversation(m)
                conv.load_document(text, next_text="Why?")
                whole = conv.turn_tokens("Why?")
                n = len(conv.tokens)
                assert whole[:n] == conv.tokens, ending
                # the next token holds text that is not the document's
                prefix_bytes = b"".join(m.token_pieces(whole[:n]))
                assert text.encode() in prefix_bytes or text.encode().rstrip() in prefix_bytes, ending
                m.reset()


# answers against llama-cpp-python's own completion paths (no eviction: a budget larger than the prompt)

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _passkey_document() -> str:  # the README's worked example
    return (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
        "about the important information there.\n"
        + PASSKEY_FILLER * 20
        + "The pass key is 68417. Remember it. 68417 is the pass key. "
        + PASSKEY_FILLER * 20
        + "\n"
    )


def _needle_document(smollm2_path) -> str:
    """The evaluation's 2000-token needle at 10% depth: the case whose answer flipped when the prompt was read
    in other batches than create_chat_completion's (a near-tie: "eat a sandwich" / "eating pizza")."""
    from l2kv_cpp.eval.tasks import niah_document
    from l2kv_cpp.session import open_tokenizer

    with open_tokenizer(smollm2_path) as tok:
        return niah_document(tok, niah.NiahCase(2000, 0.1))


def _reference_llama(path, n_ctx: int):
    from l2kv_cpp import _lib

    return _lib.llama_cpp().Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=128, n_ubatch=128, flash_attn=True, verbose=False, seed=0
    )


def _cli_answer(path, document_path, question: str, n: int, *extra: str) -> str:
    res = CliRunner().invoke(
        main,
        ["run", str(path), "-f", str(document_path), "-p", question, "--json", "--temp", "0", "-n", str(n),
         "-b", "128", "-ub", "128", "--kv-budget", "4096", *extra],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kv"]["n_evictions"] == 0
    return out["text"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, document, question",
    [
        ("passkey", lambda _path: _passkey_document(), "What is the pass key?"),
        ("needle", _needle_document, niah.CHAT_QUESTION),
    ],
)
def test_run_answers_like_create_chat_completion(smollm2_path, tmp_path, name, document, question):
    doc = document(smollm2_path)
    path = tmp_path / f"{name}.txt"
    path.write_text(doc)
    ours = _cli_answer(smollm2_path, path, question, 32)
    llm = _reference_llama(smollm2_path, 4096)
    try:
        ref = llm.create_chat_completion(
            messages=[{"role": "user", "content": f"{doc}\n\n{question}"}],
            temperature=0.0,
            repeat_penalty=1.0,
            max_tokens=32,
        )["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert ours == ref


@pytest.mark.slow
def test_run_completes_like_create_completion(gemma_path, tmp_path):
    doc = _passkey_document()
    path = tmp_path / "passkey.txt"
    path.write_text(doc)
    question = " What is the pass key? The pass key is"
    ours = _cli_answer(gemma_path, path, question, 12)
    llm = _reference_llama(gemma_path, 4096)
    try:
        ref = llm.create_completion(doc + question, temperature=0.0, repeat_penalty=1.0, max_tokens=12)
    finally:
        llm.close()
    assert ours == ref["choices"][0]["text"]


# divergence from the cache: back to it, or re-evaluated (and logged) when an eviction compacted it


def test_divergence_after_the_last_eviction_goes_back(tiny_model):
    # recall off: its own evictions would be counted below (recall with a divergence: test_recall.py)
    config = L2KVConfig(kv_budget=64, recall=RecallSettings())
    with L2KVModel(tiny_model, ModelSettings(n_batch=32, n_ubatch=32), config) as m:
        conv = Conversation(m)
        conv.load_document("word " * 100)
        assert m.stats().n_evictions > 0
        target = conv.turn_tokens(" end")
        conv.tokens[-1] = (conv.tokens[-1] + 1) % m.llm.n_vocab()  # as if the last token had been fed differently
        n_evictions = m.stats().n_evictions
        list(conv.ask(" end", GREEDY, 2))
        assert conv.n_reevaluations == 0
        assert m.stats().n_evictions == n_evictions  # went back one token, did not re-read the document
        assert conv.tokens[: len(target)] == target and len(conv.tokens) == m.n_past


def test_divergence_inside_the_compacted_part_is_reevaluated_and_logged(tiny_model, caplog):
    with L2KVModel(tiny_model, ModelSettings(n_batch=32, n_ubatch=32), L2KVConfig(kv_budget=64)) as m:
        conv = Conversation(m)
        conv.load_document("word " * 100)
        assert m.stats().n_evictions > 0
        target = conv.turn_tokens(" end")
        conv.tokens[10] = (conv.tokens[10] + 1) % m.llm.n_vocab()  # a divergence where eviction compacted
        with caplog.at_level(logging.WARNING, logger="l2kv_cpp.chat"):
            list(conv.ask(" end", GREEDY, 2))
        assert conv.n_reevaluations == 1
        assert any("re-evaluating the conversation" in r.getMessage() for r in caplog.records)
        assert conv.tokens[: len(target)] == target and len(conv.tokens) == m.n_past


# the system turn stays


@pytest.mark.slow
@pytest.mark.parametrize("keep_system", [True, False])
def test_the_system_turn_is_never_evicted_by_default(smollm2_path, keep_system):
    from l2kv_cpp import cache

    l2kv = L2KVConfig(kv_budget=128, keep_system=keep_system)
    with L2KVModel(smollm2_path, ModelSettings(n_batch=64, n_ubatch=64), l2kv) as m:
        conv = Conversation(m)
        prompt = conv.turn_tokens(question := "Why?")
        header = m.tokenize("<|im_start|>user\n", special=True)
        # the system turn and the user turn's header: where two prompts with different questions part
        n_prefix = common_prefix_len(prompt, _reference_chat_tokens(m, [{"role": "user", "content": "x"}]))
        assert prompt[n_prefix - len(header) : n_prefix] == header
        assert conv.n_sink == (n_prefix if keep_system else 4) and n_prefix > 20
        conv.load_document(_passkey_document(), next_text=question)
        assert m.stats().n_evictions > 0
        kept_everywhere = set(range(n_prefix))
        for il in range(m.stats().n_layers):
            _, pos = cache.read_layer(m.llm.ctx, il)
            for head in range(pos.shape[1]):
                kept_everywhere &= set(pos[:, head].tolist())
        if keep_system:  # without it, what survives is up to the policy
            assert kept_everywhere == set(range(n_prefix))


def test_a_token_the_conversation_does_not_know_is_taken_back(tiny_model):
    """The cache may hold a token the conversation never recorded (a decode interrupted in an answer):
    the next turn goes back to what it knows instead of building on an unknown token."""
    with L2KVModel(tiny_model, ModelSettings(n_batch=32, n_ubatch=32), L2KVConfig(kv_budget=64)) as m:
        conv = Conversation(m)
        list(conv.ask("first", GREEDY, 3))
        known = len(conv.tokens)
        m.feed([5])  # behind the conversation's back
        target = conv.turn_tokens(" second")
        list(conv.ask(" second", GREEDY, 2))
        assert conv.tokens[: len(target)] == target and len(conv.tokens) == m.n_past
        assert target[:known] == conv.tokens[:known] and conv.n_reevaluations == 0
