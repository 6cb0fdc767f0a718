#!/usr/bin/env python3
"""Check, in the pinned llama.cpp source, that Metal's supports_op accepts every op l2kv adds to a graph.

    python scripts/check_metal_ops.py [path/to/llama.cpp]   # default: the build script's patched tree

Metal cannot be built or run here, so this is a source inspection of
ggml/src/ggml-metal/ggml-metal-device.m (ggml_metal_device_supports_op): for each (op, types)
that native/src/llama-kv-cache-l2.cpp builds, it finds the `case GGML_OP_X:` block and checks
that the branch taken for our types returns true (the conditions are read from the source and
listed). Exit code 1 and a message per failing op when the source changed in a way that breaks
an op; rerun after every upstream bump.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l2kv_cpp.upstream import cache_dir  # noqa: E402


@dataclass(frozen=True)
class OpUse:
    op: str  # GGML_OP_*
    src0: str  # type of src[0]
    dst: str  # type of the result
    why: str  # where l2kv builds it
    must_mention: tuple[str, ...]  # tokens that must appear in the branch that decides for these types


# every node of the key-norm store (cpy_k_norm), the key-cosine graph (KeyDiff, hybrid) and the
# compaction graph (evict)
USES = [
    OpUse("GGML_OP_SQR", "F32", "F32", "cpy_k_norm: k^2", ("GGML_TYPE_F32", "ggml_is_contiguous_rows")),
    OpUse("GGML_OP_SUM_ROWS", "F32", "F32", "cpy_k_norm: sum over the head", ("ggml_is_contiguous_rows",)),
    OpUse(
        "GGML_OP_SET_ROWS", "F32", "F32", "cpy_k_norm store; compaction writes (F32 byte aliases)", ("GGML_TYPE_F32",)
    ),
    OpUse("GGML_OP_GET_ROWS", "F32", "F32", "compaction reads (F32 byte aliases)", ()),
    OpUse("GGML_OP_RESHAPE", "F32", "F32", "cpy_k_norm views", ("return true",)),
    OpUse("GGML_OP_VIEW", "F32", "F32", "cpy_k_norm views", ("return true",)),
    OpUse("GGML_OP_CONT", "F32", "F32", "cpy_k_norm, only if k_cur is not contiguous", ("GGML_TYPE_F32",)),
    OpUse("GGML_OP_CPY", "F16", "F32", "cpy_k_norm cast, only if k_cur is F16", ("GGML_TYPE_F16", "GGML_TYPE_F32")),
    # the key-cosine graph reads the cache itself: get_rows dequantizes every cache type to F32
    *[
        OpUse("GGML_OP_GET_ROWS", t, "F32", "key cosines: the cached keys as F32", ("src[0]->type",))
        for t in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
    ],
    OpUse("GGML_OP_L2_NORM", "F32", "F32", "key cosines: unit keys, unit mean key", ("ggml_is_contiguous_rows",)),
    OpUse("GGML_OP_PERMUTE", "F32", "F32", "key cosines: cells to dim 0 before the sum", ("return true",)),
    OpUse("GGML_OP_MUL", "F32", "F32", "key cosines: key x mean key, broadcast", ("GGML_TYPE_F32",)),
]


def find_source(root: Path | None) -> Path:
    if root is None:
        trees = sorted((cache_dir() / "src").glob("*/vendor/llama.cpp"))
        if not trees:
            raise SystemExit("no patched source tree: run scripts/build_patched.py first, or pass a llama.cpp path")
        root = trees[0]
    f = root / "ggml" / "src" / "ggml-metal" / "ggml-metal-device.m"
    if not f.is_file():
        raise SystemExit(f"{f} not found")
    return f


def supports_op_body(text: str) -> str:
    start = text.index("bool ggml_metal_device_supports_op(")
    depth, i = 0, text.index("{", start)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i : j + 1]
    raise ValueError("unbalanced braces")


def case_block(body: str, op: str) -> str:
    """The code from `case OP:` to the end of its branch (up to the next top-level case group)."""
    m = re.search(rf"case {op}:", body)
    if m is None:
        raise KeyError(op)
    rest = body[m.end() :]
    # skip the other labels that fall through into the same branch
    rest = re.sub(r"^(\s*case GGML_OP_\w+:)+", "", rest)
    depth = 0
    for j, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return rest[:j]
        elif depth == 0 and rest.startswith("case GGML_OP_", j) and "return" in rest[:j]:
            return rest[:j]
    return rest


def type_branch(block: str, src0: str, dst: str) -> str:
    """For blocks that switch on types, the part that decides for (src0, dst); else the whole block."""
    m = re.search(rf"case GGML_TYPE_{src0}:\s*(switch \(op->type\) \{{.*?\}})", block, re.S)
    if m:
        return m.group(1) if f"GGML_TYPE_{dst}" in m.group(1) else ""
    return block


def main(argv: list[str]) -> int:
    src = find_source(Path(argv[1]) if len(argv) > 1 else None)
    body = supports_op_body(src.read_text())
    failures = 0
    for use in USES:
        try:
            block = case_block(body, use.op)
        except KeyError:
            print(f"FAIL {use.op}: no case in ggml_metal_device_supports_op ({use.why})")
            failures += 1
            continue
        branch = type_branch(block, use.src0, use.dst)
        missing = [t for t in use.must_mention if t not in branch]
        rejected = re.search(r"return false;\s*$", branch.strip()) and "return true" not in branch
        if not branch or missing or rejected:
            print(f"FAIL {use.op} {use.src0}->{use.dst}: branch does not accept it (missing {missing}) ({use.why})")
            failures += 1
            continue
        cond = " ".join(branch.split())[:160]
        print(f"ok   {use.op:<17} {use.src0}->{use.dst}  {use.why}\n     {cond}")
    print(f"{len(USES) - failures} of {len(USES)} ops accepted by Metal's supports_op in {src}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
