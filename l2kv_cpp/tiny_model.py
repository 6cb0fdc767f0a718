"""Seeded random-weight llama GGUF models for fast, deterministic tests.

The weights mean nothing, but the graph is a real llama graph (RMSNorm, RoPE, GQA attention,
SwiGLU FFN), so everything the KV cache does can be tested in milliseconds. The tokenizer is a
SentencePiece-style vocabulary of byte tokens plus single characters, so any text tokenizes.
The same config always gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# SentencePiece token types, as llama.cpp reads them (llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


@dataclass(frozen=True)
class TinyModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2  # GQA: n_head must be a multiple of it
    head_dim: int = 32
    n_ff: int = 128
    n_ctx_train: int = 4096
    rope_freq_base: float = 10000.0
    weight_type: str = "f16"  # "f16", "f32" or "q4_0" for the matrices (norms are always f32)
    seed: int = 0
    n_vocab: int | None = None  # None: the small character vocabulary; larger pads it with filler tokens
    share_layer_weights: bool = False  # every layer gets the same matrices: fast to write, same kernels

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "n_ctx_train"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE (got {self.head_dim})")
        if self.weight_type not in ("f16", "f32", "q4_0"):
            raise ValueError(f"weight_type must be 'f16', 'f32' or 'q4_0' (got {self.weight_type!r})")
        if self.n_vocab is not None and self.n_vocab < len(tiny_vocab()[0]):
            raise ValueError(f"n_vocab must be at least {len(tiny_vocab()[0])} (got {self.n_vocab})")

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_dim


def tiny_vocab(n_vocab: int | None = None) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: <unk> <s> </s>, 256 byte tokens, ▁ and single characters, then (to reach
    n_vocab) filler tokens that no text produces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    pieces = ["\u2581"] + list(_CHARS) + ["\u2581" + c for c in _CHARS]
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    n_fill = 0 if n_vocab is None else n_vocab - len(tokens)
    tokens += [f"<filler{i}>" for i in range(n_fill)]
    types += [_NORMAL] * n_fill
    scores += [-1e9] * n_fill
    return tokens, scores, types


# the shapes of the speed benchmarks (random Q4_0 weights: the values do not change the kernels)
SYNTHETIC_SHAPES = {
    "llama-3.2-1b": TinyModelConfig(
        n_layer=16,
        n_head=32,
        n_head_kv=8,
        head_dim=64,
        n_ff=8192,
        n_ctx_train=131072,
        rope_freq_base=500000.0,
        weight_type="q4_0",
        n_vocab=128256,
        share_layer_weights=True,
    ),
    "llama-3-8b": TinyModelConfig(
        n_layer=32,
        n_head=32,
        n_head_kv=8,
        head_dim=128,
        n_ff=14336,
        n_ctx_train=131072,
        rope_freq_base=500000.0,
        weight_type="q4_0",
        n_vocab=128256,
        share_layer_weights=True,
    ),
}


def write_tiny_model(path: str | Path, config: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write a random-weight llama GGUF to `path` and return it."""
    import gguf
    from gguf.quants import quantize

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = config
    rng = np.random.default_rng(c.seed)
    tokens, scores, types = tiny_vocab(c.n_vocab)
    n_vocab = len(tokens)
    shared: dict[tuple[int, int], np.ndarray] = {}

    def mat(rows: int, cols: int) -> np.ndarray:  # numpy (out, in) = ggml ne (in, out)
        if c.share_layer_weights and (rows, cols) in shared:
            return shared[(rows, cols)]
        if c.weight_type == "q4_0":  # float32 draws: the 8B shape's embedding alone has 525M values
            m = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols))
            m = quantize(m, gguf.GGMLQuantizationType.Q4_0)
        else:  # float64 draws, as the test models have always been written (same bytes for the same config)
            m = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(
                np.float16 if c.weight_type == "f16" else np.float32
            )
        shared[(rows, cols)] = m
        return m

    def add_mat(name: str, rows: int, cols: int) -> None:
        raw = gguf.GGMLQuantizationType.Q4_0 if c.weight_type == "q4_0" else None
        w.add_tensor(name, mat(rows, cols), raw_dtype=raw)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{c.n_layer}L-{c.n_head}H-{c.n_head_kv}KV-seed{c.seed}")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.n_ctx_train)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "f32": gguf.LlamaFileType.ALL_F32,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[c.weight_type]
    )
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    add_mat("token_embd.weight", n_vocab, c.n_embd)
    n_kv = c.n_head_kv * c.head_dim
    for i in range(c.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm(c.n_embd))
        add_mat(f"blk.{i}.attn_q.weight", c.n_embd, c.n_embd)
        add_mat(f"blk.{i}.attn_k.weight", n_kv, c.n_embd)
        add_mat(f"blk.{i}.attn_v.weight", n_kv, c.n_embd)
        add_mat(f"blk.{i}.attn_output.weight", c.n_embd, c.n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm(c.n_embd))
        add_mat(f"blk.{i}.ffn_gate.weight", c.n_ff, c.n_embd)
        add_mat(f"blk.{i}.ffn_up.weight", c.n_ff, c.n_embd)
        add_mat(f"blk.{i}.ffn_down.weight", c.n_embd, c.n_ff)
    w.add_tensor("output_norm.weight", norm(c.n_embd))
    shared.pop((n_vocab, c.n_embd), None)  # the output matrix is not the embedding
    add_mat("output.weight", n_vocab, c.n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
