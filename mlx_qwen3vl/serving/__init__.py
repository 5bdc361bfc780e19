"""An OpenAI-compatible HTTP server for Qwen3-VL: `python server.py` (the command line), `serve()` (from
Python). The web layer (app.py) admits requests (guard.py), checks them (protocol.py) and fetches their
media (media.py, fetch.py); the
engine (engine.py) owns the model, continues each request from its store of prefix caches and
decodes the answers of concurrent requests together (batch.py)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..errors import LostRankError, Qwen3VLError
from ..options import CACHE_BYTES, DEFAULT_KV_GROUP_SIZE, MAX_MEDIA_BYTES, PORT, KVCacheOptions
from .allocator import return_large_blocks

# Seconds uvicorn waits, once asked to stop, for requests that are not over; then it cancels them. Answers
# in flight are ended at once (`Engine.end_all`): this bounds what is left, such as a media download.
GRACEFUL_SHUTDOWN = 3
SHUTTING_DOWN = "the server is shutting down"
# Seconds the answers in flight are given to send their error before a process whose engine waits on a
# rank gone forever is ended (distributed/watch.py).
ANSWERS_ENDING = 0.5


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, opened before the model loads: an address that is in use, not this
    machine's or not resolvable is refused at once, in one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:  # socket.gaierror included
        raise Qwen3VLError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    api_key: str | None = None,
    dtype: str | None = None,
    max_media_bytes: int = 20 * 10**6,
    allow_local_files: str | Path | None = None,
    allow_private_urls: bool = False,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = (),
    max_request_bytes: int | None = None,
    cache_bytes: int = 2 * 10**9,
    max_batch: int = 8,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    log_level: str = "info",
    task: str | None = None,
    group=None,
    pipeline: bool = False,
) -> None:
    """Load the model once and serve it until interrupted: up to `max_batch` answers decoded together;
    an embedding model or a reranker answers `/v1/embeddings` or `/v1/rerank` instead (retrieval.py).
    `kv_bits` (8 or 4): every request's KV cache holds keys and values quantized (`stream_generate`); its
    answers then advance together a forward pass each (serving/batch.py). `allow_local_files`: the
    directory whose files requests may name; `allow_private_urls`: URLs of this machine and its networks
    fetched too; `allowed_origins`, `allowed_hosts`: web origins and Host names allowed besides the
    loopback ones and `host` ("*": any; guard.py); `max_request_bytes`: the largest request body.

    `group`: the ranks `mlx.launch` started (`mx.distributed.init()`), each holding its part of the model
    (tensor parallel, or with `pipeline` consecutive layers: docs/distributed.md). Rank 0 serves; on the
    others this call runs rank 0's engine steps (serving/lockstep.py) until rank 0 stops."""
    import uvicorn

    from ..distributed import before_exit, is_primary, lost_peer
    from ..distributed.interrupt import follow_rank_0_interrupts
    from ..loading import load
    from .app import create_app
    from .engine import Engine
    from .guard import Access
    from .media import MediaPolicy

    return_large_blocks()  # before the first large block is freed (allocator.py)
    # Everything is checked before the model loads.
    kv_cache = KVCacheOptions(kv_bits, kv_group_size)
    PORT.check(port)
    MAX_MEDIA_BYTES.check(max_media_bytes)
    CACHE_BYTES.check(cache_bytes)
    serving = is_primary(group)
    listening = listen(host, port) if serving else None
    try:
        model, processor = load(model_path, dtype=dtype, task=task, group=group, pipeline=pipeline)
    except BaseException as e:
        if listening is not None:
            listening.close()
        if group is not None and (line := lost_peer(e, group)) is not None:  # one line, not a traceback
            raise LostRankError(line) from None
        raise
    if not serving:
        follow_rank_0_interrupts(group)  # rank 0 takes the Ctrl-C, and its stop ends this
        engine = Engine(model, processor, cache_bytes=cache_bytes, max_batch=max_batch, kv_cache=kv_cache)
        engine.follow()
        if engine.lost is not None:
            raise LostRankError(engine.lost)
        return
    policy = MediaPolicy(
        max_bytes=max_media_bytes,
        allow_local_files=None if allow_local_files is None else Path(allow_local_files),
        allow_private_urls=allow_private_urls,
    )
    access = Access(tuple(allowed_origins), tuple(allowed_hosts), host, max_request_bytes)
    name = str(model_path)
    if model.task != "generate":  # an embedding model or a reranker: no engine, no caches
        from .retrieval import create_retrieval_app

        engine = None
        app = create_retrieval_app(model, processor, name, api_key=api_key, policy=policy, access=access)
    else:
        engine = Engine(model, processor, cache_bytes=cache_bytes, max_batch=max_batch, kv_cache=kv_cache)
        app = create_app(engine, model_name=name, api_key=api_key, policy=policy, access=access)

    class Server(uvicorn.Server):
        """uvicorn's server, whose first Ctrl-C (or SIGTERM) also ends the answers in flight: uvicorn
        waits for open connections to close, and a streamed answer keeps its own open to its end."""

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit and engine is not None:
                engine.end_all(SHUTTING_DOWN)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN
    )
    server = Server(config)
    if engine is not None:
        # A rank gone (across ranks): the engine has ended the answers in flight; the server stops too
        # (not through `handle_exit`, whose signal uvicorn raises again once it has stopped).
        engine.on_lost = lambda: setattr(server, "should_exit", True)
        if group is not None:  # the engine stuck on a rank gone (distributed/watch.py): end the answers
            before_exit(lambda line: engine.end_all(line) or time.sleep(ANSWERS_ENDING))
        engine.start()
    try:
        server.run(sockets=[listening])
    finally:
        listening.close()
        if engine is not None:
            engine.stop()
    if engine is not None and engine.lost is not None:
        raise LostRankError(engine.lost)
