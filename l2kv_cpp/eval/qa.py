"""One question-answering case under a compression setting, shared by the passkey and needle tasks.

Protocol (stated in every record as `protocol`):
1. the document is processed in batches of n_batch tokens; with eviction, the cache evicts down to
   the budget whenever budget + n_batch entries would be exceeded (the product's streaming mode);
2. after the document, the cache is compressed to exactly the budget (`evict_now`);
3. the question is appended after compression and the answer, including its first token, is
   generated from the compressed cache (stricter than the paper's code, which took the first
   token from the uncompressed pass). With `question_first`, the question is part of the prompt
   that streams in and is compressed; generation still starts after the compression.
The budget is `round(keep * n_document_tokens)`; `policy = "full"` runs with no eviction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import cache
from ..chat import Conversation
from ..config import L2KVConfig, Policy
from ..generate import stream_generate
from ..sampling import SamplingSettings
from ..session import L2KVModel, ModelSettings

PROTOCOL = "stream-evict-then-compress; question after compression; first answer token after eviction"
PROTOCOL_QUESTION_FIRST = (
    "stream-evict-then-compress; question before compression (compressed with the "
    "document); first answer token after eviction"
)
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
        )


@dataclass(frozen=True)
class QAResult:
    answer: str
    n_doc_tokens: int
    budget: int | None
    n_evictions: int
    cells_before_question: int


def document_tokens(tokenizer: L2KVModel, document: str, chat: bool) -> int:
    """Tokens the document occupies in the cache (with the chat template's preamble when chatting)."""
    conv = Conversation(tokenizer, chat=chat)
    if chat:
        rendered = conv._render([{"role": "user", "content": document + "\n\nX"}], add_generation_prompt=True)
        text = rendered[: rendered.rindex("X")]
        return len(tokenizer.tokenize(text, add_bos=tokenizer.add_bos, special=True))
    return len(tokenizer.tokenize(document, add_bos=tokenizer.add_bos, special=False))


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
        n_batch=n_batch, n_ubatch=n_batch, n_ctx=0 if comp.policy != "full" else n_doc + n_predict + 512
    )
    with L2KVModel(model_path, settings, comp.l2kv(n_doc)) as m:
        conv = Conversation(m, chat=chat)
        if question_first:
            conv.load_document(document)
            n_prompt = conv.feed_question(question)  # streams in like the document
            if m.l2kv is not None:
                cache.evict_now(m.llm.ctx)
            cells = m.stats().n_cells_used
            answer = "".join(r.text for r in stream_generate(m, [], GREEDY, n_predict, n_prompt_fed=n_prompt))
            return QAResult(answer, n_doc, comp.budget(n_doc), m.stats().n_evictions, cells)
        conv.load_document(document)
        if m.l2kv is not None:
            cache.evict_now(m.llm.ctx)
        cells = m.stats().n_cells_used
        answer = "".join(r.text for r in conv.ask(question, GREEDY, n_predict))
        return QAResult(answer, n_doc, comp.budget(n_doc), m.stats().n_evictions, cells)
