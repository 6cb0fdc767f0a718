"""On a GPU build: the same inputs keep the same tokens with the model on the GPU as on the CPU.

Skipped where llama.cpp has no GPU backend (CI, this project's CPU machines); run it on a GPU machine
after `python scripts/build_patched.py --cuda`. Together with `L2KV_TEST_N_GPU_LAYERS=-1 python -m
pytest` (the whole suite with the model offloaded) it is the CUDA validation.
"""

from __future__ import annotations

import pytest
from conftest import make_llm, random_tokens

from l2kv_cpp import _lib, cache
from l2kv_cpp.config import L2KVConfig, Policy
from l2kv_cpp.decode import decode
from l2kv_cpp.session import ggml_type_id

pytestmark = pytest.mark.skipif(
    not _lib.llama_cpp().llama_supports_gpu_offload(),
    reason="no GPU backend in this llama.cpp build (CI has no GPU); run on a GPU machine with a --cuda build",
)


def _kept(model, n_gpu_layers: int, policy: Policy, cache_type: str) -> dict[tuple[int, int], set[int]]:
    types = {"type_k": ggml_type_id(cache_type), "type_v": ggml_type_id(cache_type)}
    llm = make_llm(model, n_ctx=256, n_batch=64, n_gpu_layers=n_gpu_layers, **types)
    try:
        cache.enable(llm.ctx, L2KVConfig(kv_budget=128, n_sink=2, n_recent=4, policy=policy))
        decode(llm, random_tokens(4 * 64), 0)  # two evictions while streaming
        cache.evict_now(llm.ctx)
        n_layer = int(llm.metadata["llama.block_count"])
        out = {}
        for il in range(n_layer):
            _, pos = cache.read_layer(llm.ctx, il)
            for h in range(pos.shape[1]):
                out[(il, h)] = set(pos[:, h].tolist())
        return out
    finally:
        llm.close()


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
@pytest.mark.parametrize("policy", [Policy.KEY_DIFF, Policy.KEEP_LOW_NORM])
def test_gpu_keeps_the_same_tokens_as_the_cpu(tiny_model_hd64, policy, cache_type):
    cpu = _kept(tiny_model_hd64, 0, policy, cache_type)
    gpu = _kept(tiny_model_hd64, -1, policy, cache_type)
    # the backends compute keys with different kernels, so entries whose scores (nearly) tie may swap
    # at the cut: allow 2% of the kept positions to differ
    differ = sum(len(cpu[k] ^ gpu[k]) for k in cpu)
    total = sum(len(v) for v in cpu.values())
    assert differ <= 0.02 * total, f"{differ} of {total} kept positions differ"
