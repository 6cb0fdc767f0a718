"""One question-answering case under a compression setting, shared by the passkey and needle tasks.

Protocol (stated in every record as `protocol`):
0. the prompt (the document, then the question, through the chat template or as plain text) is
   tokenized whole, and the cache holds exactly those tokens (`Conversation`): "after the
   document" is the point where the whole prompt's tokens leave the document's text;
1. the document's tokens are processed in batches of n_batch tokens; with eviction, the cache
   evicts down to the budget whenever budget + n_batch entries would be exceeded (the product's
   streaming mode);
2. after the document, the cache is compressed to exactly the budget (`evict_now`);
3. the question's tokens are appended after compression (with recall on, the question first
   brings back the archived spans it matches: `Conversation.recall`) and the answer, including its first
   token, is generated from the compressed cache (stricter than the paper's code, which took the
   first token from the uncompressed pass). With `question_first`, the question is part of the
   prompt that streams in and is compressed; generation still starts after the compression.
The budget is `round(keep * n_document_tokens)`; `policy = "full"` runs with no eviction and reads the
whole prompt in one go (PROTOCOL_FULL: no compression point, the batches of stock llama.cpp). K and V
are stored in `cache_type` (f16, or q8_0/q4_0 as stock llama.cpp's -ctk/-ctv offer); `kv_fraction`
is the KV memory held when the question arrives (norms included) relative to a full f16 cache.

Protocol v1 (records without "whole-prompt tokens") tokenized the document and the question
separately; its records are void: the boundary tokens differed from the whole prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import cache
from ..chat import Conversation
from ..config import L2KVConfig, Policy, Positions
from ..generate import stream_generate
from ..recall import RecallSettings
from ..sampling import SamplingSettings
from ..session import L2KVModel, ModelSettings

PROTOCOL = (
    "whole-prompt tokens; stream-evict-then-compress; question after compression; first answer token after eviction"
)
# the full cache has no compression point: the whole prompt is read in one go, in the batches stock llama.cpp
# and create_chat_completion use (splitting it at the document's end changes the question's batches, and
# with them the logits at the level of float rounding: enough to flip a greedy answer on a near-tie)
PROTOCOL_FULL = "whole-prompt tokens; full cache: the whole prompt read in one go"
PROTOCOL_QUESTION_FIRST = (
    "whole-prompt tokens; stream-evict-then-compress; question before compression (compressed with the "
    "document); first answer token after eviction"
)
# bytes per element of the cache types the evaluation compares (ggml block sizes)
CACHE_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
GREEDY = SamplingSettings(temperature=0.0)
POLICIES = tuple(p.cli_name for p in Policy)  # every policy, in enum order


@dataclass(frozen=True)
class Compression:
    policy: str  # "full" or a Policy.cli_name (POLICIES)
    keep: float  # fraction of the document's tokens kept (1.0 for full)
    n_sink: int = 4
    n_recent: int = 32
    skip_layers: tuple[int, ...] | None = None  # None: the policy's default (Policy.default_skip_layers)
    seed: int = 0
    cache_type: str = "f16"  # K and V cache type (CACHE_TYPE_BYTES)
    keep_system: bool = True  # chat: the rendered system turn is never evicted (L2KVConfig.keep_system)
    recall: str = "off"  # what the question brings back from the archive (RecallSettings.parse: "lexical:128")
    positions: str = "cache"  # RoPE positions after an eviction (config.Positions: "cache" or "original")

    def __post_init__(self) -> None:
        if self.cache_type not in CACHE_TYPE_BYTES:
            raise ValueError(f"cache_type {self.cache_type!r} is not one of {sorted(CACHE_TYPE_BYTES)}")
        RecallSettings.parse(self.recall)  # fails early on a bad setting
        Positions.parse(self.positions)

    def budget(self, n_doc: int) -> int | None:
        if self.policy == "full":
            return None
        return max(self.n_sink + self.n_recent + 1, round(self.keep * n_doc))

    def l2kv(self, n_doc: int) -> L2KVConfig | None:
        b = self.budget(n_doc)
        if b is None:
            return None
        return L2KVConfig(
            kv_budget=b,
            n_sink=self.n_sink,
            n_recent=self.n_recent,
            policy=self.policy,
            skip_layers=self.skip_layers,
            seed=self.seed,
            keep_system=self.keep_system,
            recall=RecallSettings.parse(self.recall),
            positions=Positions.parse(self.positions),
        )


@dataclass(frozen=True)
class QAResult:
    answer: str
    n_doc_tokens: int
    budget: int | None
    n_evictions: int
    cells_before_question: int
    kv_fraction: float  # KV memory when the question arrives, relative to a full f16 cache of the same tokens


def protocol(policy: str, question_first: bool = False) -> str:
    """The protocol a record of this policy is run under (in its config)."""
    if question_first:
        return PROTOCOL_QUESTION_FIRST
    return PROTOCOL_FULL if policy == "full" else PROTOCOL


def document_tokens(tokenizer: L2KVModel, document: str, question: str, chat: bool) -> int:
    """Tokens of the whole prompt that lie inside the document (with the chat template's preamble when
    chatting): what the cache holds when it is compressed."""
    conv = Conversation(tokenizer, chat=chat)
    conv.add_document(document)
    return conv.document_split(question)[1]


def kv_fraction(m: L2KVModel, comp: Compression, n_cells: int, n_tokens: int) -> float:
    """KV bytes of n_cells entries in comp.cache_type (with their key norms when evicting) over those of
    n_tokens entries in f16; for iSWA models, of the layers under eviction (the window layers are the same
    in every run)."""
    st = m.stats()
    per_cell = st.kv_bytes / st.kv_size
    per_cell_f16 = per_cell * CACHE_TYPE_BYTES["f16"] / CACHE_TYPE_BYTES[comp.cache_type]
    norms = st.norm_bytes / st.kv_size if m.l2kv is not None else 0.0
    return n_cells * (per_cell + norms) / (n_tokens * per_cell_f16)


def run_qa(
    model_path: Path,
    document: str,
    question: str,
    comp: Compression,
    n_doc: int,
    chat: bool,
    n_predict: int,
    n_batch: int = 256,
    question_first: bool = False,
) -> QAResult:
    settings = ModelSettings(
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_ctx=0 if comp.policy != "full" else n_doc + n_predict + 512,
        cache_type_k=comp.cache_type,
        cache_type_v=comp.cache_type,
    )
    with L2KVModel(model_path, settings, comp.l2kv(n_doc)) as m:
        conv = Conversation(m, chat=chat)
        if comp.policy == "full" and not question_first:
            conv.add_document(document)
            answer = "".join(r.text for r in conv.ask(question, GREEDY, n_predict))
            # n_doc (document_tokens) is what the cache holds when the question's tokens come
            return QAResult(answer, n_doc, None, 0, n_doc, kv_fraction(m, comp, n_doc, n_doc))
        conv.load_document(document, next_text=question)  # the whole prompt's tokens inside the document
        if question_first:
            n_prompt = conv.feed_question(question)  # streams in like the document
        n_fed = m.n_past
        if m.l2kv is not None:
            cache.evict_now(m.llm.ctx)
        if not question_first:
            conv.recall(question)  # with recall on, the question searches the archive before it is read
        cells = m.stats().n_cells_used
        fraction = kv_fraction(m, comp, cells, n_fed)
        if question_first:
            answer = "".join(r.text for r in stream_generate(m, [], GREEDY, n_predict, n_prompt_fed=n_prompt))
        else:
            answer = "".join(r.text for r in conv.ask(question, GREEDY, n_predict))
        return QAResult(answer, n_doc, comp.budget(n_doc), m.stats().n_evictions, cells, fraction)
