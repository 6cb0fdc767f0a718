"""The Metal readiness check (source inspection of the pinned ggml-metal supports_op) passes on the
pinned source and fails when an op the patch needs is no longer accepted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from l2kv_cpp.upstream import cache_dir

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_metal_ops.py"
sys.path.insert(0, str(SCRIPT.parent))

from check_metal_ops import USES  # noqa: E402


def _metal_source() -> Path:
    trees = sorted((cache_dir() / "src").glob("*/vendor/llama.cpp"))
    assert trees, "the build script's patched source tree is missing (run scripts/build_patched.py)"
    return trees[0] / "ggml" / "src" / "ggml-metal" / "ggml-metal-device.m"


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)


def test_every_added_op_is_accepted_in_the_pinned_source():
    src = _metal_source()
    res = _run(src.parents[3])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(USES)} of {len(USES)} ops accepted" in res.stdout
    # the key-cosine graph's ops are part of the check
    assert {"GGML_OP_L2_NORM", "GGML_OP_PERMUTE", "GGML_OP_MUL"} <= {u.op for u in USES}


def test_a_rejected_op_fails_the_check(tmp_path):
    text = _metal_source().read_text()
    # pretend upstream dropped F32 from the unary ops that SQR falls into
    broken = text.replace("case GGML_OP_SQR:\n", "case GGML_OP_SQR:\n            return false;\n", 1)
    assert broken != text
    dst = tmp_path / "ggml" / "src" / "ggml-metal" / "ggml-metal-device.m"
    dst.parent.mkdir(parents=True)
    dst.write_text(broken)
    res = _run(tmp_path)
    assert res.returncode == 1
    assert "FAIL GGML_OP_SQR" in res.stdout
