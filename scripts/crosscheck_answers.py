#!/usr/bin/env python3
"""The evaluation's full-cache answers against llama-cpp-python's own completion path.

For every full-cache record of a task (protocol v2: the whole prompt read in one go, f16) the same
document and question go through
`Llama.create_chat_completion` (models with a chat template) or `Llama.create_completion` (base
models), greedy, with as many tokens; the answers must be the same text. Someone else's tokenizer
call, template rendering, batching and sampling loop: a disagreement is a bug in ours, or numerical
noise from another batch split (this prints both answers to tell).

    python scripts/crosscheck_answers.py --model smollm2 --task niah --results docs/results/records
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402  (load libllama before numpy-heavy modules, see l2kv_cpp/_lib.py)

from l2kv_cpp.eval import niah, passkey  # noqa: E402
from l2kv_cpp.eval.qa import PROTOCOL_FULL  # noqa: E402
from l2kv_cpp.eval.results import ResultStore  # noqa: E402
from l2kv_cpp.eval.tasks import NIAH_N_PREDICT, PASSKEY_N_PREDICT, niah_document, uses_chat  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.session import open_tokenizer  # noqa: E402

N_PREDICT = {"passkey": PASSKEY_N_PREDICT, "niah": NIAH_N_PREDICT}  # what the evaluation generates per task


def document(task: str, config: dict, tok) -> tuple[str, str]:
    chat = bool(config["chat"])
    if task == "passkey":
        case = passkey.PasskeyCase(config["n_junk"], config["depth"], config["seed"])
        return passkey.build_document(case), passkey.question(chat)
    return niah_document(tok, niah.NiahCase(config["n_tokens"], config["depth"])), niah.question(chat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", choices=sorted(N_PREDICT), default="niah")
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--n-batch", type=int, default=256, help="as the evaluation's runs")
    args = ap.parse_args()

    path = resolve_model(args.model)
    chat = uses_chat(path)
    records = [
        r
        for r in ResultStore(args.results / f"{args.task}.jsonl").records()
        if r["model"] == path.name
        and r["config"]["policy"] == "full"
        and r["config"]["protocol"] == PROTOCOL_FULL
        and r["config"].get("cache_type", "f16") == "f16"
    ]
    if not records:
        print(f"no full-cache f16 records of protocol v2 for {path.name} in {args.results}", file=sys.stderr)
        return 1
    same = 0
    with open_tokenizer(path) as tok:
        for r in records:
            doc, question = document(args.task, r["config"], tok)
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=r["n_doc_tokens"] + N_PREDICT[args.task] + 512,
                n_batch=args.n_batch,
                n_ubatch=args.n_batch,
                flash_attn=True,
                verbose=False,
            )
            greedy = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": N_PREDICT[args.task]}
            try:
                if chat:
                    messages = [{"role": "user", "content": f"{doc}\n\n{question}"}]
                    ref = llm.create_chat_completion(messages=messages, **greedy)["choices"][0]["message"]["content"]
                else:
                    ref = llm.create_completion(doc + question, **greedy)["choices"][0]["text"]
            finally:
                llm.close()
            ok = ref == r["answer"]
            same += ok
            case = {k: v for k, v in r["config"].items() if k in ("n_junk", "n_tokens", "depth", "seed")}
            print(f"{'same' if ok else 'DIFFERENT'} {case}: ours {r['answer']!r}" + ("" if ok else f" | ref {ref!r}"))
    print(f"{path.name} {args.task}: {same} of {len(records)} full-cache answers equal llama-cpp-python's")
    return 0 if same == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
