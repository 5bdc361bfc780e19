"""Serve Qwen3-VL over HTTP in OpenAI's chat-completions format, for chat front ends, editors, agents and
scripts in any language.

    python server.py                                  # Qwen/Qwen3-VL-4B-Instruct on http://127.0.0.1:8080
    python server.py --model qwen3-vl-4b-4bit --port 8000 --api-key secret
    python server.py --model Qwen/Qwen3-VL-Embedding-2B     # POST /v1/embeddings (a reranker: /v1/rerank)
    mlx.launch --hostfile hosts.json server.py --model ...    # across Macs: rank 0 serves

Argument parsing only: the server lives in `mlx_qwen3vl/serving/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Light imports only: --help and argument errors answer before MLX and transformers are loaded.
from mlx_qwen3vl import DEFAULT_MODEL, Qwen3VLError
from mlx_qwen3vl.cli import (
    ArgumentParser,
    add_kv_cache_arguments,
    fail,
    join_launched_ranks,
    number,
    quiet_libraries,
)
from mlx_qwen3vl.errors import LostRankError
from mlx_qwen3vl.options import CACHE_GB, DTYPE_NAMES, MAX_BATCH, MAX_MEDIA_BYTES, PORT


def directory(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path.resolve()


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of bytes")
    return value


def origin(text: str) -> str:
    """A web origin as browsers send it: scheme://host[:port], nothing after."""
    scheme, sep, rest = text.partition("://")
    if text != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin (https://example.com[:port], or *)")
    return text


def host_name(text: str) -> str:
    if not text or any(c in text for c in "/@ ") or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name (example.com, or *)")
    return text


def names(check):
    """A comma-separated list, each item checked: the value of an option that may also be repeated."""

    def parse(text: str) -> list[str]:
        return [check(item.strip()) for item in text.split(",") if item.strip()]

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model directory or Hugging Face repo id (%(default)s)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (%(default)s: this machine only)"
    )
    p.add_argument("--port", type=number(PORT), default=8080, help="%(default)s")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)"
    )
    p.add_argument(
        "--max-media-bytes",
        type=number(MAX_MEDIA_BYTES),
        default=20 * 10**6,
        help="largest image or video a request may send or name",
    )
    p.add_argument(
        "--allow-local-files",
        metavar="DIR",
        type=directory,
        help="let requests name files under DIR (off: URLs only)",
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch URLs of this machine and its private networks too (off: public addresses only)",
    )
    p.add_argument(
        "--allowed-origins",
        metavar="ORIGINS",
        type=names(origin),
        action="extend",
        default=[],
        help="web origins whose pages may call the server, comma-separated or repeated ('*': any; "
        "the loopback ones and --host always)",
    )
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        type=names(host_name),
        action="extend",
        default=[],
        help="Host names the server answers to ('*': any; the loopback ones and --host always)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive,
        help="largest request body (default: four media at --max-media-bytes, base64-encoded, and 1 MB)",
    )
    p.add_argument(
        "--cache-gb",
        type=number(CACHE_GB),
        default=2.0,
        help="memory for the KV caches of recent conversations, in GB (%(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=number(MAX_BATCH),
        default=8,
        help="answers decoded together at most; more requests wait their turn (%(default)s)",
    )
    p.add_argument(
        "--task",
        choices=("generate", "embed", "rerank"),
        help="what the model is for: chat (generate), /v1/embeddings (embed) or /v1/rerank (rerank); "
        "default: what its name or converted config says (Qwen3-VL-Embedding, -Reranker)",
    )
    add_kv_cache_arguments(p)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: each rank holds consecutive decoder layers, for slow links (default: "
        "tensor parallel, a slice of every layer on each rank; docs/distributed.md)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        fail(f"the server needs {e.name}: python -m pip install -e '.[server]'")
    from mlx_qwen3vl.serving import serve

    try:
        group = join_launched_ranks()  # under mlx.launch: rank 0 serves, the others follow
        serve(
            args.model,
            args.host,
            args.port,
            api_key=args.api_key,
            dtype=args.dtype,
            task=args.task,
            max_media_bytes=args.max_media_bytes,
            allow_local_files=args.allow_local_files,
            allow_private_urls=args.allow_private_urls,
            allowed_origins=tuple(args.allowed_origins),
            allowed_hosts=tuple(args.allowed_hosts),
            max_request_bytes=args.max_request_bytes,
            cache_bytes=int(args.cache_gb * 10**9),
            max_batch=args.max_batch,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            group=group,
            pipeline=args.pipeline,
        )
    except LostRankError as e:
        fail(str(e), 1)
    except Qwen3VLError as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
