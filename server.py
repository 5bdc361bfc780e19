"""Serve Qwen3-VL over HTTP in OpenAI's chat-completions format, for chat front ends, editors, agents and
scripts in any language.

    python server.py                                  # Qwen/Qwen3-VL-4B-Instruct on http://127.0.0.1:8080
    python server.py --model qwen3-vl-4b-4bit --port 8000 --api-key secret

Argument parsing only: the server lives in `mlx_qwen3vl/serving/`.
"""

from __future__ import annotations

import argparse

# Light imports only: --help and argument errors answer before MLX and transformers are loaded.
from mlx_qwen3vl import DEFAULT_MODEL, Qwen3VLError
from mlx_qwen3vl.cli import ArgumentParser, add_kv_cache_arguments, fail, number, quiet_libraries
from mlx_qwen3vl.options import DTYPE_NAMES, MAX_BATCH


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model directory or Hugging Face repo id (%(default)s)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (%(default)s: this machine only)"
    )
    p.add_argument("--port", type=int, default=8080, help="%(default)s")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)"
    )
    p.add_argument(
        "--max-media-bytes",
        type=int,
        default=20 * 10**6,
        help="largest image or video a request may send or name",
    )
    p.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let requests name files of this machine (off: URLs only)",
    )
    p.add_argument(
        "--cache-gb",
        type=float,
        default=2.0,
        help="memory for the KV caches of recent conversations, in GB (%(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=number(MAX_BATCH),
        default=8,
        help="answers decoded together at most; more requests wait their turn (%(default)s)",
    )
    add_kv_cache_arguments(p)
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
        serve(
            args.model,
            args.host,
            args.port,
            api_key=args.api_key,
            dtype=args.dtype,
            max_media_bytes=args.max_media_bytes,
            allow_local_files=args.allow_local_files,
            cache_bytes=int(args.cache_gb * 10**9),
            max_batch=args.max_batch,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
        )
    except Qwen3VLError as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
