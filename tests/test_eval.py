"""Evaluation suite: prompt builders, scorers, the results store, and CI-sized smoke runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2kv_cpp.config import Policy, Positions
from l2kv_cpp.errors import InvalidParamsError
from l2kv_cpp.eval import niah, passkey
from l2kv_cpp.eval.qa import PROTOCOL, PROTOCOL_FULL, Compression
from l2kv_cpp.eval.results import ResultStore
from l2kv_cpp.eval.tasks import compressions, run_passkey, run_ppl
from l2kv_cpp.session import open_tokenizer


def test_passkey_document_puts_the_key_at_the_requested_depth():
    for depth in (0.0, 0.25, 0.5, 1.0):
        case = passkey.PasskeyCase(n_junk=40, depth=depth, seed=3)
        doc = passkey.build_document(case)
        assert doc.startswith(passkey.PREFIX)
        assert doc.count(passkey.FILLER) == 40
        before = doc[: doc.index(passkey.key_sentence(case.key))].count(passkey.FILLER)
        assert before == round(depth * 40)
        assert 10000 <= case.key <= 99999 and passkey.PasskeyCase(40, depth, 3).key == case.key


def test_passkey_score_is_exact_match_on_the_first_number():
    assert passkey.score(" 68417. Remember it.", 68417) == 1.0
    assert passkey.score("The pass key is 68417", 68417) == 1.0
    assert passkey.score("The pass key is 6841", 68417) == 0.0
    assert passkey.score("It is 12 and 68417", 68417) == 0.0  # the first number counts
    assert passkey.score("no idea", 68417) == 0.0


def test_niah_score_counts_the_needle_facts():
    assert niah.score("Eat a sandwich and sit in Dolores Park.") == 1.0
    assert niah.score("eat a SANDWICH") == 0.5
    assert niah.score("Visit the Golden Gate Bridge.") == 0.0


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    with open_tokenizer(smollm2_path) as tok:
        yield tok


@pytest.mark.slow
@pytest.mark.parametrize("n_tokens", [500, 1000, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_niah_document_length_and_depth(smollm2_tokenizer, n_tokens, depth):
    tok = smollm2_tokenizer

    def tokenize(t):
        return tok.tokenize(t, add_bos=False, special=False)

    def detokenize(ts):
        return tok.detokenize(ts).decode("utf-8", errors="replace")

    doc = niah.build_document(niah.NiahCase(n_tokens, depth), tokenize, detokenize)
    assert abs(len(tokenize(doc)) - n_tokens) <= 0.02 * n_tokens
    assert doc.count(niah.NEEDLE) == 1
    # the needle sits at the sentence boundary just before the requested point: never after it, and
    # at most one long sentence (400 characters) before it
    hay_len = len(doc) - len(niah.NEEDLE)
    at = doc.index(niah.NEEDLE)
    assert at <= depth * hay_len + 2 and depth * hay_len - at <= 400, (at, depth * hay_len)
    if 0 < depth < 1:
        assert doc[:at].rstrip().endswith(".")


def test_result_store_writes_provenance_and_skips_done_runs(tmp_path, tiny_model):
    store = ResultStore(tmp_path / "task.jsonl")
    config = {"policy": "keep-low-norm", "keep": 0.5}
    assert not store.done("passkey", str(tiny_model), config)
    rec = store.add("passkey", str(tiny_model), config, {"score": 1.0})
    for key in ("model_sha256", "package_version", "patch_hash", "device", "config", "score"):
        assert key in rec
    assert store.done("passkey", str(tiny_model), config)
    assert not store.done("passkey", str(tiny_model), {**config, "keep": 0.3})
    reopened = ResultStore(tmp_path / "task.jsonl")  # the skip survives a restart
    assert reopened.done("passkey", str(tiny_model), config)
    assert json.loads((tmp_path / "task.jsonl").read_text())["config"] == config


def test_compression_grid_and_budget():
    grid = compressions((0.5, 0.1), ("keep-low-norm", "window"))
    assert grid[0].policy == "full" and len(grid) == 1 + 2 * 2
    assert Compression("keep-low-norm", 0.5).budget(1000) == 500
    assert Compression("keep-low-norm", 0.01).budget(1000) == 4 + 32 + 1  # never below the protections
    assert Compression("full", 1.0).budget(1000) is None


def test_recall_settings_are_a_variant_and_off_keeps_the_old_record_keys():
    from l2kv_cpp.eval.report import variant, variant_label
    from l2kv_cpp.eval.tasks import _comp_config

    grid = compressions((0.5,), ("key-diff",), recalls=("off", "lexical:64:exchange"), positions=("original",))
    assert [c.recall for c in grid] == ["off", "off", "lexical:64:exchange"]
    off, on = _comp_config(grid[1]), _comp_config(grid[2])
    assert "recall" not in off and on["recall"] == "lexical:64:exchange"
    assert variant(off)[3] == "off" and variant(on)[3] == "lexical:64:exchange"
    assert variant_label(variant(on)).endswith("+ recall lexical:64:exchange")
    assert grid[2].l2kv(1000).recall.n_tokens == 64 and not grid[2].l2kv(1000).recall.grow
    with pytest.raises(ValueError):
        Compression("key-diff", 0.5, recall="telepathy")


def test_positions_are_a_variant_and_original_keeps_the_old_record_keys():
    """Records from before the positions mode ran original positions and have no "positions" key; a cache
    run is its own row, and its settings reach the eviction."""
    from l2kv_cpp.eval.report import variant, variant_label
    from l2kv_cpp.eval.tasks import _comp_config

    grid = compressions((0.5,), ("key-diff",), positions=("original", "cache"))
    full, orig, cache = grid
    assert "positions" not in _comp_config(orig) and "positions" not in _comp_config(full)
    assert _comp_config(cache)["positions"] == "cache"
    assert variant(_comp_config(orig))[4] == "original" and variant(_comp_config(cache))[4] == "cache"
    assert variant_label(variant(_comp_config(cache))).endswith(", cache positions")
    assert variant_label(variant(_comp_config(orig))) == "KeyDiff: keep distinctive keys"
    assert cache.l2kv(1000).positions == Positions.CACHE and orig.l2kv(1000).positions == Positions.ORIGINAL
    with pytest.raises(InvalidParamsError):
        Compression("key-diff", 0.5, positions="sideways")


@pytest.mark.slow
def test_passkey_smoke_on_the_demo_model(tmp_path, smollm2_path):
    """Structure and ordering, not luck: the full cache answers, every run is recorded with its budget,
    and the paper's negative control (keep highest norm) does not beat keep-lowest-norm."""
    store = ResultStore(tmp_path / "passkey.jsonl")
    lines: list[str] = []
    case = passkey.PasskeyCase(n_junk=24, depth=0.5, seed=0)
    run_passkey("smollm2", [case], compressions((0.5,)), store, log=lines.append)
    recs = {r["config"]["policy"]: r for r in store.records()}
    assert set(recs) == {"full"} | {p.cli_name for p in Policy}
    assert recs["full"]["score"] == 1.0  # the task is doable for this model with a full cache
    n_doc = recs["full"]["n_doc_tokens"]
    assert all(r["budget"] == round(0.5 * n_doc) for p, r in recs.items() if p != "full")
    assert recs["keep-high-norm"]["score"] <= recs["keep-low-norm"]["score"]
    run_passkey("smollm2", [case], compressions((0.5,)), store, log=lines.append)  # all skipped
    n_runs = 1 + len(Policy)
    assert len(list(store.records())) == n_runs and len(lines) == n_runs


@pytest.mark.slow
def test_perplexity_smoke_on_the_demo_model(tmp_path, smollm2_path):
    store = ResultStore(tmp_path / "ppl.jsonl")
    run_ppl("smollm2", 512, compressions((0.5,), ("keep-low-norm", "keep-high-norm")), store, log=lambda _m: None)
    recs = {r["config"]["policy"]: r for r in store.records()}
    for r in recs.values():
        assert r["n_evictions"] > 0 and r["kld_mean"] > 0 and r["ppl"] > 1
        assert r["ppl_full"] == recs["keep-low-norm"]["ppl_full"]
    # the negative control loses more of the full cache's distribution than the paper's rule
    assert recs["keep-high-norm"]["kld_mean"] > recs["keep-low-norm"]["kld_mean"]


def test_attention_loss_on_a_hand_computed_example():
    from l2kv_cpp.eval.attention import LayerHeadLoss, attention_loss, recommend_skip_layers

    # one query (row 3) over 4 keys; keep 50% = 2 keys
    attn = np.zeros((4, 4))
    attn[3] = [0.1, 0.4, 0.2, 0.3]
    norms = np.array([3.0, 1.0, 2.0, 4.0])
    loss_norm, loss_ideal = attention_loss(attn, norms, 0.5, np.array([3]))
    # lowest norms: keys 1 and 2 keep 0.6 -> lose 0.4; top attention: keys 1 and 3 keep 0.7 -> lose 0.3
    assert loss_norm == pytest.approx(0.4) and loss_ideal == pytest.approx(0.3)
    assert LayerHeadLoss(0, 0, loss_norm, loss_ideal).alr == pytest.approx(0.1)
    losses = [LayerHeadLoss(0, 0, 0.5, 0.1), LayerHeadLoss(1, 0, 0.2, 0.1), LayerHeadLoss(2, 0, 0.9, 0.1)]
    assert recommend_skip_layers(losses, n=2) == [0, 2]


def test_attention_probe_captures_causal_weights(tiny_model):
    from conftest import random_tokens

    from l2kv_cpp.eval.attention import capture

    attn, keys, n_head_kv = capture(tiny_model, random_tokens(64))
    assert set(attn) == set(range(4)) and n_head_kv == 2
    a = attn[1][:, :, :64]  # [n_head, n_tok, n_kv]
    assert a.shape == (4, 64, 64)
    np.testing.assert_allclose(a.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.triu(a, k=1) == 0)  # no attention to future tokens
    assert keys[1].shape == (64, 2, 32)


@pytest.mark.slow
def test_niah_smoke_on_the_demo_model(tmp_path, smollm2_path):
    from l2kv_cpp.eval.tasks import run_niah

    store = ResultStore(tmp_path / "niah.jsonl")
    run_niah("smollm2", [niah.NiahCase(600, 0.5)], compressions((0.5,)), store, log=lambda _m: None)
    recs = {r["config"]["policy"]: r for r in store.records()}
    assert set(recs) == {"full"} | {p.cli_name for p in Policy}
    assert recs["full"]["score"] >= 0.5  # the model finds the needle with a full cache
    for p, r in recs.items():
        assert r["score"] in (0.0, 0.5, 1.0) and r["config"]["protocol"] == (PROTOCOL_FULL if p == "full" else PROTOCOL)
        assert abs(r["needle_depth"] - 0.5) < 0.1
        assert (r["budget"] is None) == (p == "full")
        # KV memory at the question vs a full f16 cache: 1 for the full cache; about half (+ key norms) at keep 0.5
        if p == "full":
            assert r["kv_fraction"] == pytest.approx(1.0)
        else:
            assert r["cells_before_question"] == r["budget"]
            assert 0.5 <= r["kv_fraction"] <= 0.5 * (1 + 1 / 32) + 0.01


@pytest.mark.slow
def test_attention_analysis_smoke_on_the_demo_model(smollm2_path):
    from conftest import random_tokens

    from l2kv_cpp.eval.attention import analyse

    losses = analyse(smollm2_path, random_tokens(128, low=100, high=20000), keep=0.5, n_queries=16)
    assert len(losses) == 30 * 3
    for x in losses:
        assert 0 <= x.loss_ideal <= x.loss_norm + 1e-9 <= 1 + 1e-6  # the ideal eviction loses the least


def test_case_and_policy_seeds_do_not_collide(tmp_path, monkeypatch):
    """Regression: the compression's seed once overwrote the passkey case's seed in the record config,
    so cases differing only by seed were skipped as already done."""
    import l2kv_cpp.eval.tasks as tasks
    from l2kv_cpp.eval.qa import QAResult

    calls = []

    def fake_run_qa(path, doc, q, comp, n_doc, chat, n, **kwargs):
        calls.append(doc)
        return QAResult("1", n_doc, comp.budget(n_doc), 0, 0, 1.0)

    monkeypatch.setattr(tasks, "run_qa", fake_run_qa)
    monkeypatch.setattr(tasks, "uses_chat", lambda path: False)
    cases = [passkey.PasskeyCase(n_junk=8, depth=0.5, seed=s) for s in (0, 1)]
    store = ResultStore(tmp_path / "p.jsonl")
    tasks.run_passkey(None, cases, compressions((0.5,), ("random",)), store, log=lambda _m: None)
    assert len(calls) == 2 * 2
    seeds = {(r["config"]["seed"], r["config"]["policy_seed"]) for r in store.records()}
    assert seeds == {(0, 0), (1, 0)}


@pytest.mark.slow
def test_question_first_protocol_compresses_the_question_too(tmp_path, smollm2_path):
    store = ResultStore(tmp_path / "passkey.jsonl")
    case = passkey.PasskeyCase(n_junk=24, depth=0.5, seed=0)
    run_passkey("smollm2", [case], compressions((0.5,), ("window",)), store, log=lambda _m: None, question_first=True)
    recs = {r["config"]["policy"]: r for r in store.records()}
    assert all("question before compression" in r["config"]["protocol"] for r in recs.values())
    assert recs["full"]["score"] == 1.0
    # the default protocol is a different run, not a skipped one
    run_passkey("smollm2", [case], compressions((0.5,), ("window",)), store, log=lambda _m: None)
    assert len(list(store.records())) == 4
