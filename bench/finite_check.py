"""What the check for non-finite logits costs a prompt (generation.py `logits_are_finite`): the first
token's sampling from a prompt's last logits, evaluated with and without the check's reduction over the
vocabulary, alternately, many times.

    python bench/finite_check.py                 # the published vocabulary (151,936), float32
    python bench/finite_check.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from mlx_qwen3vl.generation import logits_are_finite


def first_token(logits: mx.array, check: bool) -> float:
    """Seconds to sample greedily from `logits` (as a prompt's first token is), with or without the
    finite check evaluated alongside."""
    tic = time.perf_counter()
    token = mx.argmax(logits, axis=-1)
    outputs = [token, logits_are_finite(logits)] if check else [token]
    mx.eval(*outputs)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.runs):
        logits = mx.random.normal((1, args.vocab)).astype(getattr(mx, args.dtype))
        mx.eval(logits)  # as the prompt's logits are: computed by the model before sampling
        check = bool(i % 2)
        times[check].append(first_token(logits, check))
    without, with_check = (statistics.median(times[c]) * 1e6 for c in (False, True))
    runs = args.runs // 2
    print(f"{mx.default_device()}, vocabulary {args.vocab}, {args.dtype}, {runs} runs each (median)")
    print(f"first token without the check: {without:8.1f} us")
    print(f"first token with the check:    {with_check:8.1f} us  ({with_check - without:+.1f} us per prompt)")


if __name__ == "__main__":
    main()
