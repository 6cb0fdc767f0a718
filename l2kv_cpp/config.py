"""Eviction settings: one frozen dataclass, the Python view of `struct llama_l2kv_params`.

The defaults come from the C library (`llama_l2kv_default_params()`); a test pins them to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

from .errors import InvalidParamsError
from .recall import RecallSettings

_E = TypeVar("_E", bound="_CliEnum")


class _CliEnum(IntEnum):
    """An enum of the C API that the command line and the evaluation records name in lower case, "-" for "_"."""

    @property
    def cli_name(self) -> str:
        """The name used on the command line and in evaluation records, e.g. "keep-low-norm"."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        """Other accepted names (upper case) -> member names."""
        return {}

    @classmethod
    def parse(cls: type[_E], value: str | int | _E) -> _E:
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().replace("-", "_")
        try:
            return cls[cls._aliases().get(name, name)]
        except KeyError:
            choices = ", ".join(p.cli_name for p in cls)
            raise InvalidParamsError(f"{cls.__name__.lower()} {value!r} is not one of: {choices}") from None


class Policy(_CliEnum):
    """Which entries survive an eviction (enum llama_l2kv_policy)."""

    KEEP_LOW_NORM = 0  # the paper's rule: keep the lowest key norms
    KEEP_HIGH_NORM = 1  # the paper's negative control
    RANDOM = 2  # seeded; depends only on (seed, layer, head, position)
    WINDOW = 3  # sinks + most recent tokens (StreamingLLM)
    KEY_DIFF = 4  # KeyDiff: keep the keys least similar to their head's mean key
    HYBRID = 5  # rank fusion: lowest sum of the ranks by key norm and by key cosine

    @property
    def default_skip_layers(self) -> tuple[int, ...]:
        """Layers kept by recency unless set: the paper's (0, 1) for its rule, its control and random; none else."""
        return (0, 1) if self in (Policy.KEEP_LOW_NORM, Policy.KEEP_HIGH_NORM, Policy.RANDOM) else ()

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {
            "L2": "KEEP_LOW_NORM",
            "LOW": "KEEP_LOW_NORM",
            "HIGH": "KEEP_HIGH_NORM",
            "STREAMING": "WINDOW",
            "KEYDIFF": "KEY_DIFF",
        }


class Positions(_CliEnum):
    """The RoPE positions of the kept keys after an eviction (enum llama_l2kv_positions)."""

    ORIGINAL = 0  # each key keeps its position in the text: distances grow past the training context
    CACHE = 1  # StreamingLLM's rule: kept keys renumbered 0..n-1 per (layer, head) and re-rotated


@dataclass(frozen=True)
class L2KVConfig:
    kv_budget: int = 4096  # entries kept per layer and KV head after an eviction
    n_slack: int = 0  # entries held past kv_budget before an eviction; 0: n_batch, else >= n_batch
    n_sink: int = 4  # first tokens never evicted
    n_recent: int = 32  # newest tokens never evicted
    policy: Policy = Policy.KEY_DIFF  # chosen by the evaluation (docs/results.md); KEEP_LOW_NORM is the paper's
    per_head: bool = True  # False: one choice per layer, by the sum of the heads' key norms
    seed: int = 0  # for Policy.RANDOM
    skip_layers: tuple[int, ...] | None = None  # None: the policy's default (see default_skip_layers); (): none
    # RoPE positions after an eviction: inside the cache by default (docs/results.md, "Past the training context")
    positions: Positions = Positions.CACHE
    # chat: never evict the rendered system turn (n_sink raised to its length by Conversation, as llama.cpp's
    # --keep protects the initial prompt); not part of the C struct
    keep_system: bool = True
    # what comes back from the archive of evicted entries when new user text arrives (l2kv_cpp.recall): by
    # default the spans that share the turn's rarest words (docs/results.md); not part of the C struct: the
    # archive is enabled by L2KVModel, spans are chosen by Conversation
    recall: RecallSettings = RecallSettings(mode="lexical")

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        object.__setattr__(self, "positions", Positions.parse(self.positions))
        if self.kv_budget < 1:
            raise InvalidParamsError(f"kv_budget must be >= 1 (got {self.kv_budget})")
        if self.n_slack < 0:
            raise InvalidParamsError(f"n_slack must be >= 0 (got {self.n_slack})")
        if self.n_sink < 0 or self.n_recent < 0:
            raise InvalidParamsError(f"n_sink and n_recent must be >= 0 (got {self.n_sink}, {self.n_recent})")
        if self.n_sink + self.n_recent >= self.kv_budget:
            raise InvalidParamsError(
                f"n_sink + n_recent must be < kv_budget (got {self.n_sink} + {self.n_recent} >= {self.kv_budget})"
            )
        if not 0 <= self.seed < 2**64:
            raise InvalidParamsError(f"seed must fit in 64 bits (got {self.seed})")
        if self.skip_layers is not None:
            layers = tuple(int(i) for i in self.skip_layers)
            if any(i < 0 for i in layers):
                raise InvalidParamsError(f"skip_layers must be >= 0 (got {layers})")
            object.__setattr__(self, "skip_layers", layers)

    def slack(self, n_batch: int) -> int:
        """The entries the cache holds past kv_budget before it evicts (n_slack, else one batch)."""
        return self.n_slack or n_batch

    def max_cells(self, n_batch: int) -> int:
        """The cells the cache grows to before it evicts (the context needs at least these)."""
        return self.kv_budget + self.slack(n_batch)

    @property
    def effective_skip_layers(self) -> tuple[int, ...]:
        return self.policy.default_skip_layers if self.skip_layers is None else self.skip_layers

    def to_c(self, ffi: Any) -> tuple[Any, Any]:
        """A `struct llama_l2kv_params *` and the array it points to (keep both alive during the call)."""
        params = ffi.new("struct llama_l2kv_params *")
        params.kv_budget = self.kv_budget
        params.n_slack = self.n_slack
        params.n_sink = self.n_sink
        params.n_recent = self.n_recent
        params.policy = int(self.policy)
        params.per_head = self.per_head
        params.seed = self.seed
        skip = ffi.NULL
        if self.skip_layers is None:
            params.n_skip_layers = -1
        else:
            params.n_skip_layers = len(self.skip_layers)
            if self.skip_layers:
                skip = ffi.new("int32_t[]", list(self.skip_layers))
        params.skip_layers = skip
        params.positions = int(self.positions)
        return params, skip
