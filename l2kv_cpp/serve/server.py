"""What `l2kv-cpp serve` does: load the model into its slots and run the application under uvicorn."""

from __future__ import annotations

import click

from ..config import L2KVConfig
from ..models import KNOWN_MODELS, resolve_model
from ..sampling import SamplingSettings
from ..session import ModelSettings
from .app import ServerState, create_app
from .metrics import Metrics
from .settings import ServerSettings
from .slots import Scheduler, SlotPool


def serve(
    model: str | None,
    server: ServerSettings,
    model_settings: ModelSettings,
    l2kv: L2KVConfig | None,
    sampling: SamplingSettings,
    n_predict: int,
) -> None:
    import uvicorn

    path = resolve_model(model)
    pool = SlotPool(path, model_settings, l2kv, server.n_slots, server.max_prompt_tokens)
    known = [name for name, k in KNOWN_MODELS.items() if k.path == path]  # "smollm2" however it was given
    ids = tuple(dict.fromkeys(x for x in (server.model_alias, path.stem, path.name, model, *known) if x))
    state = ServerState(
        pool=pool,
        scheduler=Scheduler(pool.slots, server.queue_size),
        settings=server,
        sampling=sampling,
        n_predict=n_predict,
        model_ids=ids,
        metrics=Metrics(),
    )
    budget = f"budget {l2kv.kv_budget} per slot" if l2kv else "full cache"
    click.echo(
        f"l2kv-cpp serve: {ids[0]} on http://{server.host}:{server.port} ({server.n_slots} slot(s), {budget}); "
        "Ctrl-C stops",
        err=True,
    )
    uvicorn.run(create_app(state), host=server.host, port=server.port, log_level="warning")
