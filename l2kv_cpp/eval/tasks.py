"""Run the evaluation tasks over a grid of cases and compression settings, one JSON record per run.

Each task function takes the model (name or path), its cases, the compression settings and a
`ResultStore`; runs whose record exists are skipped. `compressions()` builds the standard grid:
the full cache plus every policy at every keep ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..config import L2KVConfig
from ..models import KNOWN_MODELS, resolve_model
from ..session import L2KVModel, open_tokenizer
from . import niah, passkey
from .perplexity import run_perplexity, text_tokens
from .qa import POLICIES, Compression, document_tokens, protocol, run_qa
from .results import ResultStore

KEEP_RATIOS = (0.9, 0.7, 0.5, 0.3, 0.1)
PASSKEY_N_PREDICT = 12  # answer tokens generated per passkey case
NIAH_N_PREDICT = 40  # per needle case

Log = Callable[[str], None]


def compressions(
    keeps: Iterable[float] = KEEP_RATIOS,
    policies: Iterable[str] = POLICIES,
    cache_types: Iterable[str] = ("f16",),
    keep_system: Iterable[bool] = (True,),
    recalls: Iterable[str] = ("off",),
    positions: Iterable[str] = ("cache",),
    **kwargs: Any,
) -> list[Compression]:
    """The full cache in every cache type, then every policy at every keep ratio in every cache type (and
    with and without the system turn protected, when keep_system holds both; with every recall setting and
    every RoPE positions mode)."""
    types, systems, recall_settings, pos_modes = list(cache_types), list(keep_system), list(recalls), list(positions)
    out = [Compression("full", 1.0, cache_type=t) for t in types]
    out += [
        Compression(p, k, cache_type=t, keep_system=ks, recall=rc, positions=pm, **kwargs)
        for t in types
        for ks in systems
        for rc in recall_settings
        for pm in pos_modes
        for k in keeps
        for p in policies
    ]
    return out


def uses_chat(model_path: Path) -> bool:
    """Real-model tests of instruct models go through the chat template; base models complete text."""
    for m in KNOWN_MODELS.values():
        if m.path == model_path:
            return m.use_chat_template
    with open_tokenizer(model_path) as tok:
        return tok.has_chat_template


def _comp_config(c: Compression) -> dict[str, Any]:
    d = asdict(c)
    d["skip_layers"] = list(c.skip_layers) if c.skip_layers is not None else "default"
    d["policy_seed"] = d.pop("seed")  # "seed" belongs to the case (e.g. the passkey)
    if d["recall"] == "off":
        del d["recall"]  # as in the records from before recall existed
    if d["positions"] == "original" or c.policy == "full":
        del d["positions"]  # as in the records from before the positions mode existed (all original)
    return d


def _run_document(
    task: str,
    path: Path,
    chat: bool,
    case_config: dict[str, Any],
    doc: str,
    n_doc: int,
    question: str,
    comps: list[Compression],
    store: ResultStore,
    n_predict: int,
    question_first: bool,
    score: Callable[[str], float],
    extra: dict[str, Any],
    label: str,
    log: Log,
) -> None:
    """One document under every compression: skip the runs already recorded, answer, score, record."""
    for comp in comps:
        config = {
            **case_config,
            **_comp_config(comp),
            "chat": chat,
            "protocol": protocol(comp.policy, question_first),
        }
        if store.done(task, str(path), config):
            continue
        r = run_qa(path, doc, question, comp, n_doc, chat, n_predict, question_first=question_first)
        s = score(r.answer)
        store.add(
            task,
            str(path),
            config,
            {
                "score": s,
                "answer": r.answer,
                "n_doc_tokens": n_doc,
                "budget": r.budget,
                "n_evictions": r.n_evictions,
                "cells_before_question": r.cells_before_question,
                "kv_fraction": round(r.kv_fraction, 5),
                **extra,
            },
        )
        log(f"{task} {path.name} {label} {comp.policy}@{comp.keep}: {s:g} ({r.answer.strip()[:50]!r})")


def run_passkey(
    model: str | None,
    cases: Iterable[passkey.PasskeyCase],
    comps: Iterable[Compression],
    store: ResultStore,
    n_predict: int = PASSKEY_N_PREDICT,
    log: Log = print,
    question_first: bool = False,
) -> None:
    path = resolve_model(model)
    chat = uses_chat(path)
    comps = list(comps)
    with open_tokenizer(path) as tok:
        for case in cases:
            doc = passkey.build_document(case)
            _run_document(
                "passkey",
                path,
                chat,
                case.as_config(),
                doc,
                document_tokens(tok, doc, passkey.question(chat), chat),
                passkey.question(chat),
                comps,
                store,
                n_predict,
                question_first,
                lambda answer, key=case.key: passkey.score(answer, key),
                {"key": case.key},
                f"junk={case.n_junk} depth={case.depth} seed={case.seed}",
                log,
            )


def run_niah(
    model: str | None,
    cases: Iterable[niah.NiahCase],
    comps: Iterable[Compression],
    store: ResultStore,
    n_predict: int = NIAH_N_PREDICT,
    log: Log = print,
    question_first: bool = False,
) -> None:
    path = resolve_model(model)
    chat = uses_chat(path)
    comps = list(comps)
    corpus = niah.corpus_text()
    with open_tokenizer(path) as tok:
        for case in cases:
            doc = niah_document(tok, case, corpus)
            _run_document(
                "niah",
                path,
                chat,
                case.as_config(),
                doc,
                document_tokens(tok, doc, niah.question(chat), chat),
                niah.question(chat),
                comps,
                store,
                n_predict,
                question_first,
                niah.score,
                {"needle_depth": round(niah.needle_depth(doc), 4)},
                f"n={case.n_tokens} depth={case.depth}",
                log,
            )


def niah_document(tok: L2KVModel, case: niah.NiahCase, corpus: str | None = None) -> str:
    """The needle document of `case`, its length counted in the tokens of `tok`'s model."""
    return niah.build_document(
        case,
        lambda t: tok.tokenize(t, add_bos=False, special=False),
        lambda ts: tok.detokenize(ts).decode("utf-8", errors="replace"),
        niah.corpus_text() if corpus is None else corpus,
    )


def run_ppl(
    model: str | None,
    n_tokens: int,
    comps: Iterable[Compression],
    store: ResultStore,
    n_batch: int = 64,
    log: Log = print,
) -> None:
    path = resolve_model(model)
    with open_tokenizer(path) as tok:
        tokens = text_tokens(tok, niah.corpus_text(), n_tokens)
    for comp in comps:
        if comp.policy == "full":
            continue  # every run carries its own full-cache reference
        config = {
            "n_tokens": len(tokens),
            "n_batch": n_batch,
            **_comp_config(comp),
            "protocol": "stream: evict whenever budget + n_batch would be exceeded; KL(full || evicted)",
        }
        if store.done("ppl", str(path), config):
            continue
        budget = comp.budget(len(tokens))
        l2kv = L2KVConfig(
            kv_budget=budget,
            n_sink=comp.n_sink,
            n_recent=comp.n_recent,
            policy=comp.policy,
            skip_layers=comp.skip_layers,
            seed=comp.seed,
            positions=comp.positions,
        )
        r = run_perplexity(path, tokens, l2kv, n_batch)
        window = 128
        n_win = len(r.nll) // window
        by_pos = [float(np.exp(r.nll[i * window : (i + 1) * window].mean())) for i in range(n_win)]
        by_pos_full = [float(np.exp(r.nll_full[i * window : (i + 1) * window].mean())) for i in range(n_win)]
        store.add(
            "ppl",
            str(path),
            config,
            {
                "ppl": r.ppl,
                "ppl_full": r.ppl_full,
                "kld_mean": float(r.kld.mean()),
                "budget": budget,
                "n_evictions": r.n_evictions,
                "ppl_by_position": by_pos,
                "ppl_full_by_position": by_pos_full,
                "position_window": window,
            },
        )
        log(
            f"ppl {path.name} {comp.policy}@{comp.keep} (budget {budget}): ppl {r.ppl:.2f} vs full {r.ppl_full:.2f}, "
            f"KLD {r.kld.mean():.4f}"
        )
