"""An OpenAI-compatible HTTP server for Qwen3-VL: `python server.py` (the command line), `serve()` (from
Python). The web layer (app.py) checks requests (protocol.py) and fetches their media (media.py); the
engine (engine.py) owns the model, continues each request from the prompt cache (prompt_cache.py) and
decodes the answers of concurrent requests together (batch.py)."""

from __future__ import annotations


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    api_key: str | None = None,
    dtype: str | None = None,
    max_media_bytes: int = 20 * 10**6,
    allow_local_files: bool = False,
    cache_entries: int = 8,
    cache_bytes: int = 2 * 10**9,
    max_batch: int = 8,
    log_level: str = "info",
) -> None:
    """Load the model once and serve it until interrupted: up to `max_batch` answers decoded together."""
    import uvicorn

    from ..loading import load
    from .app import create_app
    from .engine import Engine
    from .media import MediaPolicy

    model, processor = load(model_path, dtype=dtype)
    engine = Engine(
        model, processor, cache_entries=cache_entries, cache_bytes=cache_bytes, max_batch=max_batch
    )
    engine.start()
    policy = MediaPolicy(max_bytes=max_media_bytes, allow_local_files=allow_local_files)
    app = create_app(engine, model_name=str(model_path), api_key=api_key, policy=policy)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
