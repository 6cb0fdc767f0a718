"""A conversation whose KV cache holds exactly the tokens of the whole conversation.

At every turn the whole conversation is rendered (the chat template, or the plain text for base
models) and tokenized whole, and the cache is brought to those tokens by their common prefix with
what it holds, as llama.cpp's server does: only the new suffix is decoded. Tokenizing the new text
on its own would not do: BPE merges at the boundary differ from the whole prompt's (SmolLM2 reads
"document\\n\\n" as one token when it ends the text and as two when a question follows), and the
model would read a token sequence it never saw in training.

- Answers keep the tokens the model sampled: the rendered answer text is replaced by those tokens
  (that a re-tokenization of the text would differ is no reason to re-evaluate).
- A loaded document is fed without its last tokens that may still merge with the text that
  follows (or, when that text is given, exactly the tokens of the whole prompt inside the
  document); they are fed with the question.
- Where the whole prompt's tokens diverge from the cache (a template that rewrites earlier turns,
  an interrupted turn), the cache goes back to the divergence; when an eviction already compacted
  that part, the conversation is re-evaluated from its history, with a warning in the log.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from . import archive, cache
from .errors import ModelError
from .generate import GenerationResponse, stream_generate
from .prompt_tokens import common_prefix_len, stable_prefix_len, tokens_within
from .recall import (
    archived_blocks,
    choose_spans,
    combine_scores,
    lexical_block_scores,
    query_block_scores,
)
from .sampling import SamplingSettings
from .session import L2KVModel, ProgressFn

log = logging.getLogger(__name__)

# stand-ins rendered in place of an answer (its sampled tokens go there) and of the text that will
# follow a loaded document: invisible separators around a random tag, so that no user text matches
_MARK_TAG = secrets.token_hex(8)
_ANSWER_MARK = f"\u2063{_MARK_TAG}A{{}}\u2063"
_NEXT_MARK = f"\u2063{_MARK_TAG}N\u2063"
_ANSWER_SPLIT = re.compile(f"\u2063{_MARK_TAG}A(\\d+)\u2063")

Piece = str | list[int]  # rendered text, or an answer's sampled tokens


@dataclass(frozen=True)
class TurnTokens:
    """The tokens a turn must leave in the cache, split where its last text piece starts."""

    head: list[int]  # tokens of everything before the last text piece (earlier turns, answers)
    text: str  # the last text piece (tokenized whole)
    tail: list[int]  # its tokens

    @property
    def tokens(self) -> list[int]:
        return self.head + self.tail


@dataclass
class Conversation:
    model: L2KVModel
    chat: bool | None = None  # None: the chat template when the model has one
    system: str | None = None  # system prompt (chat only)
    messages: list[dict[str, str]] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)  # sampled tokens of each assistant message, no end token
    tokens: list[int] = field(default_factory=list)  # what the cache holds: position i holds tokens[i]
    document: str | None = None  # loaded document, prefixed to the next user message
    n_reevaluations: int = 0
    last_prompt_tokens_per_second: float = 0.0
    last_recall: list[tuple[int, int]] = field(default_factory=list)  # spans the last user turn recalled

    def __post_init__(self) -> None:
        if self.chat is None:
            self.chat = self.model.has_chat_template
        if self.chat and not self.model.has_chat_template:
            raise ModelError("the model has no chat template; use --no-chat for a plain completion")
        if self.system and self.chat:
            self.messages.append({"role": "system", "content": self.system})
        self._formatter = None
        self._piece_tokens: dict[tuple[str, bool], list[int]] = {}  # (text piece, at start) -> its tokens
        self.n_sink = self.model.l2kv.n_sink if self.model.l2kv is not None else 0  # first positions never evicted
        self._recalled_for: str | None = None  # the user text the archive was last searched with
        self._budgeted_layers: list[tuple[int, int, int]] | None = None  # (il, n_head_kv, n_embd_head_k)
        self._protect_system_turn()
        if self.recall_enabled and self.model.l2kv.recall.uses_queries:  # type: ignore[union-attr]
            archive.capture_queries(self.model.llm.ctx, self.model.settings.n_ubatch)

    def _protect_system_turn(self) -> None:
        """With keep_system (the default), raise n_sink to the rendered system turn and the first user turn's
        header, so that no eviction drops them (24 tokens with SmolLM2's default system turn)."""
        l2kv = self.model.l2kv
        if not (self.chat and l2kv is not None and l2kv.keep_system):
            return
        system = [m for m in self.messages if m["role"] == "system"]
        text = self._render([*system, {"role": "user", "content": _NEXT_MARK}], add_generation_prompt=True)
        n = len(self._tokenize(text[: text.index(_NEXT_MARK)], at_start=True))
        limit = l2kv.kv_budget - l2kv.n_recent - 1
        if n > limit:
            log.warning("the system turn (%d tokens) does not fit the budget: its first %d are protected", n, limit)
            n = limit
        if n > self.n_sink:
            cache.set_n_sink(self.model.llm.ctx, n)
            self.n_sink = n

    # rendering

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = self.model.llm
            self._formatter = Jinja2ChatFormatter(
                template=llm.metadata["tokenizer.chat_template"],
                eos_token=self.model.token_text(llm.token_eos()).decode(errors="replace"),
                bos_token=self.model.token_text(llm.token_bos()).decode(errors="replace"),
                add_generation_prompt=True,
            )
        self._formatter.add_generation_prompt = add_generation_prompt
        return self._formatter(messages=messages).prompt

    def _user_content(self, text: str) -> str:
        if self.document is None:
            return text
        return f"{self.document}\n\n{text}" if self.chat else self.document + text

    def _pieces(self, pending: str | None) -> list[Piece]:
        """The whole conversation, plus a pending user message awaiting an answer, as text pieces and
        the answers' sampled tokens (in order)."""
        messages = [*self.messages, *([{"role": "user", "content": pending}] if pending is not None else [])]
        marked: list[dict[str, str]] = []
        k = 0
        for m in messages:
            if m["role"] == "assistant":
                m = {**m, "content": _ANSWER_MARK.format(k)}
                k += 1
            marked.append(m)
        if self.chat:
            text = self._render(marked, add_generation_prompt=pending is not None)
        else:
            text = "".join(m["content"] for m in marked)
        parts = _ANSWER_SPLIT.split(text)  # text, answer index, text, ...
        pieces: list[Piece] = []
        for i, part in enumerate(parts):
            pieces.append(part if i % 2 == 0 else list(self.answers[int(part)]))
        return pieces

    def _tokenize(self, text: str, at_start: bool) -> list[int]:
        """Tokens of one text piece; a BOS first when it starts the sequence and the model wants one
        (unless the template wrote its own)."""
        add_bos = at_start and self.model.add_bos
        if add_bos and self.chat and text.startswith(self._bos_text()):
            add_bos = False
        return self.model.tokenize(text, add_bos=add_bos, special=bool(self.chat))

    def _bos_text(self) -> str:
        return self.model.token_text(self.model.llm.token_bos()).decode(errors="replace")

    def _turn_tokens(self, pieces: list[Piece]) -> TurnTokens:
        head: list[int] = []
        known, self._piece_tokens = self._piece_tokens, {}
        for p in pieces[:-1]:
            if isinstance(p, list):
                head += p
            elif p:  # earlier turns repeat every turn: their tokens are kept from the last render
                key = (p, not head)
                self._piece_tokens[key] = known[key] if key in known else self._tokenize(p, at_start=not head)
                head += self._piece_tokens[key]
        last = pieces[-1]
        assert isinstance(last, str)  # the split always ends with text, possibly empty
        return TurnTokens(head, last, self._tokenize(last, at_start=not head) if last else [])

    def _n_bos(self, head: Sequence[int], tail: Sequence[int]) -> int:
        """1 when the tokenizer put a BOS in front of the last text piece (its tokens `tail`)."""
        return int(not head and bool(tail) and self.model.add_bos and tail[0] == self.model.llm.token_bos())

    # the cache

    def _sync(self, target: list[int], progress: ProgressFn | None, need_logits: bool) -> int:
        """Bring the cache to `target`: keep the common prefix, go back to where they diverge, feed the
        rest. need_logits: the last token is decoded again when nothing new is left to feed. Returns the
        tokens fed. On Ctrl-C the cache keeps what was fed (the next turn goes on from there)."""
        # the cache holds model.n_past tokens; only those this conversation knows can be kept (a decode
        # interrupted in the middle of an answer may leave one it does not)
        n = common_prefix_len(self.tokens[: self.model.n_past], target)
        if need_logits and target and n == len(target):
            n -= 1  # the logits of the last decode may belong to another token
        if n < self.model.n_past and not self.model.rewind(n):  # (tokens follow the cache below)
            log.warning(
                "the conversation's tokens differ from the cache at position %d, inside what an eviction "
                "already compacted (%d evictions); re-evaluating the conversation from its history (%d tokens)",
                n,
                self.model.stats().n_evictions,
                len(target),
            )
            self.model.reset()
            self.n_reevaluations += 1
            n = 0
        todo = target[n:]
        t0 = time.perf_counter()
        try:
            self.model.feed(todo, progress)
        finally:
            self.tokens = list(target[: self.model.n_past])  # what the cache holds, also after Ctrl-C
        dt = time.perf_counter() - t0
        self.last_prompt_tokens_per_second = len(todo) / dt if todo and dt > 0 else 0.0
        return len(todo)

    # recall (l2kv_cpp.recall)

    @property
    def recall_enabled(self) -> bool:
        return self.model.l2kv is not None and self.model.l2kv.recall.enabled

    def recall_limit(self) -> int:
        """The most positions one recall may bring back (llama_l2kv_recall's limit)."""
        l2kv = self.model.l2kv
        assert l2kv is not None
        return max(0, min(l2kv.slack(self.model.settings.n_batch), l2kv.kv_budget - self.n_sink - l2kv.n_recent))

    def recall(self, text: str, progress: ProgressFn | None = None) -> list[tuple[int, int]]:
        """Before the user turn `text` is processed: bring back the evicted spans it matches (recall on).

        The cache first goes to its common prefix with the turn (a rewind of the newest tokens must
        happen before the recall's eviction compacts them); a document loaded with the turn, too long
        for the budget, is fed first, so that the search sees it. Runs once per turn; returns the spans."""
        if not self.recall_enabled or self._recalled_for == text:
            return []
        return self._recall(text, self.turn_tokens(text), progress)

    def _recall(self, text: str, target: list[int], progress: ProgressFn | None) -> list[tuple[int, int]]:
        """recall() with the turn's tokens (turn_tokens(text)) already computed."""
        if not self.recall_enabled or self._recalled_for == text:
            return []
        self._recalled_for = text
        l2kv = self.model.l2kv
        assert l2kv is not None
        if self.document is not None:
            tokens, n_doc = self.document_split(text)
            if n_doc > l2kv.kv_budget:
                self._sync(tokens[:n_doc], progress, need_logits=False)
        n = common_prefix_len(self.tokens[: self.model.n_past], target)
        if n == len(target):
            n -= 1  # the turn's last token is decoded again for its logits
        if n < self.model.n_past:
            self._sync(target[:n], progress, need_logits=False)
        ctx = self.model.llm.ctx
        if archive.stats(ctx).n_entries == 0:
            self.last_recall = []
            return []
        settings = l2kv.recall
        n_pos = len(self.tokens)
        n_blocks = (n_pos + settings.block - 1) // settings.block
        # the new text's attention (None when the turn is too long to be read twice: its words only then)
        query = self._query_scores(target[n:], n_blocks, progress) if settings.uses_queries else None
        lexical = None
        if settings.mode in ("lexical", "both") or (settings.uses_queries and query is None):
            words = self.model.token_pieces(self.model.tokenize(text, add_bos=False, special=False))
            lexical = lexical_block_scores(self.model.token_pieces(self.tokens), words, settings.block)
        if lexical is not None and query is not None:
            scores = combine_scores(lexical, query)
        else:
            scores = list(lexical if lexical is not None else query or [])
        counts, _ = archive.coverage(ctx, n_pos)
        archived = archived_blocks(counts, n_pos, settings.block)
        spans = choose_spans(scores, archived, settings, n_pos, self.recall_limit())
        if spans:
            archive.recall(ctx, spans)
            if not l2kv.recall.grow:
                cache.evict_now(ctx)  # back to the budget: the recalled spans are pinned, others leave
        self.last_recall = spans
        return spans

    def _query_scores(self, todo: list[int], n_blocks: int, progress: ProgressFn | None) -> list[float] | None:
        """Read the new turn's tokens `todo` once with their queries kept, score the archive's blocks with
        them (recall.query_block_scores), and take the tokens back out of the cache. None when the turn
        does not fit in the slack (it would trigger an eviction that compacts it)."""
        m, l2kv = self.model, self.model.l2kv
        assert l2kv is not None
        ctx = m.llm.ctx
        n_ubatch = m.settings.n_ubatch
        if not todo or len(todo) > l2kv.slack(m.settings.n_batch):
            return None
        cache.evict_now(ctx)  # room for the turn without an eviction in the middle of it
        n0 = m.n_past
        m.feed(todo, progress)
        n_last = (len(todo) - 1) % min(n_ubatch, m.settings.n_batch) + 1  # the tokens of the last ubatch
        groups = []
        for il, n_head_kv, d in self._layers():
            q = archive.read_queries(ctx, il, n_last, d)  # [token, head, d]
            r = q.shape[1] // n_head_kv  # query heads per KV head
            for g in range(n_head_kv if l2kv.per_head else 1):
                pos, keys = archive.read_keys(ctx, il, g, m.settings.cache_type_k, d)  # [n, heads, d]
                for j in range(keys.shape[1]):
                    h = g if l2kv.per_head else j
                    groups.append((pos, keys[:, j, :], q[:, h * r : (h + 1) * r, :].reshape(-1, d)))
        if not m.rewind(n0):
            raise ModelError("internal error: the turn read for recall could not be taken back out of the cache")
        return list(query_block_scores(groups, n_blocks, l2kv.recall.block))

    def _layers(self) -> list[tuple[int, int, int]]:
        """(layer, KV heads, head size) of every layer under eviction."""
        if self._budgeted_layers is None:
            from .info import read_model_info

            info = read_model_info(self.model.path)
            self._budgeted_layers = [(lay.il, lay.n_head_kv, lay.n_embd_head_k) for lay in info.full_layers]
        return self._budgeted_layers

    # public API

    def load_document(self, text: str, progress: ProgressFn | None = None, next_text: str | None = None) -> int:
        """Process a (long) document now; the next question is asked about it. Returns the tokens fed.

        The document's last tokens can depend on the text that follows it. With `next_text` (the
        question, when already known), exactly the whole prompt's tokens that lie inside the document
        are fed; otherwise those that no continuation changes, and the rest come with the question.
        """
        self.add_document(text)
        tokens, n = self.document_split(next_text)
        return self._sync(tokens[:n], progress, need_logits=False)

    def add_document(self, text: str) -> None:
        """Put a document before the next question without processing it now: it is read with the
        question, as one prompt, in the same batches as llama.cpp's server or create_chat_completion."""
        self.document = text if self.document is None else self._user_content(text)

    def document_split(self, next_text: str | None) -> tuple[list[int], int]:
        """(tokens, n): the conversation's tokens with the loaded document and `next_text` after it,
        and how many of them to feed before `next_text` is known (see load_document). With next_text
        None, `tokens` ends where the document does."""
        marked = self._turn_tokens(self._pieces(self._user_content(_NEXT_MARK)))
        prefix = marked.text[: marked.text.index(_NEXT_MARK)]
        if next_text is None:
            own = self._tokenize(prefix, at_start=not marked.head)
            pieces = self.model.token_pieces(own)
            tokenize = lambda t: self._tokenize(t, at_start=False)  # noqa: E731
            n = stable_prefix_len(tokenize, prefix, own, pieces, skip=self._n_bos(marked.head, own))
            return marked.head + own, len(marked.head) + n
        whole = self._turn_tokens(self._pieces(self._user_content(next_text)))
        n = tokens_within(self.model.token_pieces(whole.tail), whole.text, prefix, self._n_bos(whole.head, whole.tail))
        if n is None:  # the pieces do not spell the text: as far as the prefix's own tokens agree
            n = common_prefix_len(whole.tail, self._tokenize(prefix, at_start=not whole.head))
        return whole.tokens, len(whole.head) + n

    def turn_tokens(self, text: str) -> list[int]:
        """The tokens the cache holds once the user turn `text` is fed (the whole conversation so far)."""
        return self._turn_tokens(self._pieces(self._user_content(text))).tokens

    def prefill_steps(self, text: str, progress: ProgressFn | None = None) -> Iterator[int]:
        """Read the user turn `text` one batch at a time before ask(text), which then only reads its last
        batch and answers: yields the cache's length after each batch, so that a caller can do other work
        in between (the server's slots). Recall runs first, as in ask()."""
        target = self.turn_tokens(text)
        self._recall(text, target, progress)
        n_batch = self.model.settings.n_batch
        start = common_prefix_len(self.tokens[: self.model.n_past], target)
        for end in range(start + n_batch, len(target), n_batch):
            self._sync(target[:end], progress, need_logits=False)
            yield end

    def ask(
        self, text: str, sampling: SamplingSettings, max_tokens: int = -1, progress: ProgressFn | None = None
    ) -> Iterator[GenerationResponse]:
        """Stream the answer to `text`. Stopping early (or Ctrl-C) keeps what was generated so far."""
        content = self._user_content(text)
        target = self.turn_tokens(text)  # (the whole conversation rendered and tokenized: once per turn)
        self._recall(text, target, progress)
        n_prompt = self._sync(target, progress, need_logits=True)
        answer: list[str] = []
        sampled: list[int] = []
        try:
            for resp in stream_generate(self.model, [], sampling, max_tokens, n_prompt_fed=n_prompt):
                self.tokens.append(resp.token)  # every yielded token is in the cache
                if not self.model.is_eog(resp.token):
                    sampled.append(resp.token)
                answer.append(resp.text)
                yield resp
        finally:
            self._record_turn(content, "".join(answer), sampled)

    def feed_question(self, text: str, progress: ProgressFn | None = None) -> int:
        """Feed a user turn (with the generation prompt) without generating; returns the tokens fed.

        For protocols that compress the cache between the question and the answer; the turn is
        recorded with an empty answer.
        """
        content = self._user_content(text)
        target = self.turn_tokens(text)
        self._recall(text, target, progress)
        n = self._sync(target, progress, need_logits=True)
        self._record_turn(content, "", [])
        return n

    def _record_turn(self, content: str, answer: str, sampled: Sequence[int]) -> None:
        self.document = None
        self._recalled_for = None
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        self.answers.append(list(sampled))

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.model.reset()
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.answers = []
        self.tokens = []
        self.document = None
        self._recalled_for = None
