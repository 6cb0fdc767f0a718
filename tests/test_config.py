"""Settings dataclasses: validation on creation, and Python defaults pinned to the C library's."""

from __future__ import annotations

import pytest

from l2kv_cpp import cache
from l2kv_cpp.config import L2KVConfig, Policy
from l2kv_cpp.errors import InvalidParamsError
from l2kv_cpp.sampling import SamplingSettings
from l2kv_cpp.session import ModelSettings


def test_python_defaults_equal_the_c_defaults(native):
    assert L2KVConfig() == cache.default_config()
    p = native.lib.llama_l2kv_default_params()
    assert (p.kv_budget, p.n_sink, p.n_recent, p.policy, bool(p.per_head), p.n_skip_layers) == (
        4096,
        4,
        32,
        int(Policy.KEY_DIFF),
        True,
        -1,
    )
    assert L2KVConfig().effective_skip_layers == ()
    assert L2KVConfig(policy="keep-low-norm").effective_skip_layers == (0, 1)


def test_config_round_trips_through_the_c_struct(native):
    cfg = L2KVConfig(kv_budget=300, n_sink=2, n_recent=7, policy="random", per_head=False, seed=99, skip_layers=(0, 3))
    params, _keep = cfg.to_c(native.ffi)
    assert (params.kv_budget, params.n_sink, params.n_recent, params.policy, params.per_head, params.seed) == (
        300,
        2,
        7,
        int(Policy.RANDOM),
        False,
        99,
    )
    assert [params.skip_layers[i] for i in range(params.n_skip_layers)] == [0, 3]
    none, _ = L2KVConfig(skip_layers=()).to_c(native.ffi)
    assert none.n_skip_layers == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_budget": 0}, "kv_budget must be >= 1"),
        ({"kv_budget": 30, "n_sink": 10, "n_recent": 20}, "n_sink \\+ n_recent must be < kv_budget"),
        ({"n_sink": -1}, "must be >= 0"),
        ({"policy": "best"}, "policy 'best' is not one of"),
        ({"skip_layers": (-1,)}, "skip_layers must be >= 0"),
        ({"seed": -5}, "seed must fit in 64 bits"),
    ],
)
def test_invalid_config_is_rejected(kwargs, message):
    with pytest.raises(InvalidParamsError, match=message):
        L2KVConfig(**kwargs)


def test_policy_names():
    assert Policy.parse("keep-low-norm") is Policy.KEEP_LOW_NORM
    assert Policy.parse("l2") is Policy.KEEP_LOW_NORM
    assert Policy.parse("streaming") is Policy.WINDOW
    assert Policy.parse(1) is Policy.KEEP_HIGH_NORM


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_invalid_sampling_is_rejected(kwargs, message):
    with pytest.raises(InvalidParamsError, match=message):
        SamplingSettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache_type_v": "q8_0", "flash_attn": False}, "needs flash attention"),
        ({"cache_type_k": "q3_k"}, "unknown cache type"),
        ({"n_batch": 64, "n_ubatch": 128}, "n_ubatch \\(128\\) must be <= n_batch"),
    ],
)
def test_invalid_model_settings_are_rejected(kwargs, message):
    with pytest.raises(InvalidParamsError, match=message):
        ModelSettings(**kwargs)
