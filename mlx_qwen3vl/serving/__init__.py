"""An OpenAI-compatible HTTP server for Qwen3-VL: `python server.py` (the command line), `serve()` (from
Python). The web layer (app.py) checks requests (protocol.py) and fetches their media (media.py); the
engine (engine.py) owns the model, continues each request from its store of prefix caches and
decodes the answers of concurrent requests together (batch.py)."""

from __future__ import annotations

from ..options import DEFAULT_KV_GROUP_SIZE, KVCacheOptions


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    api_key: str | None = None,
    dtype: str | None = None,
    max_media_bytes: int = 20 * 10**6,
    allow_local_files: bool = False,
    cache_bytes: int = 2 * 10**9,
    max_batch: int = 8,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    log_level: str = "info",
) -> None:
    """Load the model once and serve it until interrupted: up to `max_batch` answers decoded together.
    `kv_bits` (8 or 4): every request's KV cache holds keys and values quantized (`stream_generate`); its
    answers then advance together a forward pass each (serving/batch.py)."""
    import uvicorn

    from ..loading import load
    from .app import create_app
    from .engine import Engine
    from .media import MediaPolicy

    kv_cache = KVCacheOptions(kv_bits, kv_group_size)  # checked before the model loads
    model, processor = load(model_path, dtype=dtype)
    engine = Engine(
        model,
        processor,
        cache_bytes=cache_bytes,
        max_batch=max_batch,
        kv_cache=kv_cache,
    )
    engine.start()
    policy = MediaPolicy(max_bytes=max_media_bytes, allow_local_files=allow_local_files)
    app = create_app(engine, model_name=str(model_path), api_key=api_key, policy=policy)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
