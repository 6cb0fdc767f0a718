#!/usr/bin/env python3
"""Which evaluation documents protocol v1 fed with other tokens than the whole prompt's.

Protocol v1 tokenized the document (through the chat template up to the question) and the question
separately; v2 tokenizes the whole prompt (l2kv_cpp/eval/qa.py). Where both give the same tokens, a
v1 record ran exactly what v2 runs. Tokenizer only, seconds:

    python scripts/compare_protocol_tokens.py            # both demo models, every documented grid
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_cpp  # noqa: E402,F401  (load libllama before numpy-heavy modules, see l2kv_cpp/_lib.py)
from eval_sweep import GRIDS  # noqa: E402

from l2kv_cpp.chat import Conversation  # noqa: E402
from l2kv_cpp.eval import niah, passkey  # noqa: E402
from l2kv_cpp.eval.tasks import niah_document, uses_chat  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.session import L2KVModel, open_tokenizer  # noqa: E402


def v1_tokens(tok: L2KVModel, conv: Conversation, doc: str, question: str) -> tuple[list[int], list[int]]:
    """(document, question) tokens as protocol v1 fed them."""
    if conv.chat:
        rendered = conv._render([{"role": "user", "content": doc + "\n\nX"}], add_generation_prompt=True)
        cut = rendered.rindex("X")
        before = tok.tokenize(rendered[:cut], add_bos=tok.add_bos, special=True)
        return before, tok.tokenize(question + rendered[cut + 1 :], add_bos=False, special=True)
    return tok.tokenize(doc, add_bos=tok.add_bos, special=False), tok.tokenize(question, add_bos=False, special=False)


def main() -> int:
    for name in ("smollm2", "gemma3-270m"):
        path = resolve_model(name)
        chat = uses_chat(path)
        with open_tokenizer(path) as tok:
            corpus = niah.corpus_text()
            docs = [(passkey.build_document(c), passkey.question(chat)) for c in GRIDS["default"]["passkey"]]
            cases = [*GRIDS["default"]["niah"], *GRIDS["long"]["niah"], *GRIDS["32k"]["niah"]]
            docs += [(niah_document(tok, c, corpus), niah.question(chat)) for c in cases]
            same = 0
            for doc, question in docs:
                conv = Conversation(tok, chat=chat)
                conv.add_document(doc)
                whole, n_doc = conv.document_split(question)
                before, after = v1_tokens(tok, conv, doc, question)
                same += before + after == whole and len(before) == n_doc
            print(f"{path.name}: {same} of {len(docs)} documents fed the whole prompt's tokens under protocol v1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
