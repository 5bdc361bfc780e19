"""The matmul paths a decoder layer can take on this backend, in GFLOP/s: dense float32 (with and without
the system OpenBLAS), dense bfloat16, and 4-bit affine (group 64) with float32 or bfloat16 activations,
for one token (decode) and a 64-token chunk (prefill), at the 4B model's MLP shape (2560 -> 9728); the
4-bit product with float32 activations and a bfloat16 checkpoint's scales and biases (kept so under float32
compute, `loading.in_compute_dtype`); and this package's quantized layer (on the CPU, many float32 rows go
through BLAS, and the kernel's products are split over the cores, `cpu/scheduling.py`).

    python bench/matmul.py            # both BLAS settings, each in its own process

This is the evidence for the compute-dtype choice per backend (README, "Compute dtype and path").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

K, N = 2560, 9728
ROWS = (1, 64)  # 64 rows stand for a prefill chunk: 512 would take minutes on the slow paths
OURS = "4-bit, mlx_qwen3vl layer"
NARROW = "4-bit, bfloat16 scales and biases"


def measure() -> list[dict]:
    import mlx.core as mx

    from mlx_qwen3vl.cpu.quantized import CpuQuantizedLinear

    # What the CPU backend loads (cpu.specialize); its BLAS path only where a fast BLAS is bound.
    QuantizedLinear = CpuQuantizedLinear

    def best(fn, repeats: int) -> float:
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        return min(times)

    rows = []
    for dtype in (mx.float32, mx.bfloat16):
        w = (mx.random.normal((N, K)) * 0.02).astype(dtype)
        wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
        mx.eval(w, wq, scales, biases)
        for m in ROWS:
            x = mx.random.normal((m, K)).astype(dtype)
            mx.eval(x)
            slow = m > 1 and (dtype == mx.bfloat16 or os.environ.get("MLX_QWEN3VL_OPENBLAS") == "0")
            repeats = 1 if slow else 5
            dense = best(lambda x=x, w=w: x @ w.T, repeats)
            q = (wq, scales, biases)
            quant = best(
                lambda x=x, q=q: mx.quantized_matmul(x, *q, transpose=True, group_size=64, bits=4),
                1 if m > 1 else 5,
            )
            flops = 2 * m * N * K
            name = str(dtype).split(".")[-1]
            rows.append({"activations": name, "rows": m, "path": "dense", "gflops": flops / dense / 1e9})
            rows.append({"activations": name, "rows": m, "path": "4-bit", "gflops": flops / quant / 1e9})
            if dtype == mx.float32:
                # A bfloat16 checkpoint's scales and biases, kept under float32 compute (what ours loads)
                narrow = (wq, *(a.astype(mx.bfloat16) for a in (scales, biases)))
                kept = best(
                    lambda x=x, q=narrow: mx.quantized_matmul(x, *q, transpose=True, group_size=64, bits=4),
                    1 if m > 1 else 5,
                )
                rows.append({"activations": name, "rows": m, "path": NARROW, "gflops": flops / kept / 1e9})
            layer = QuantizedLinear(K, N, bias=False, group_size=64, bits=4)
            layer.weight, layer.scales, layer.biases = q
            ours = best(lambda x=x, layer=layer: layer(x), 1 if slow else 5)
            rows.append({"activations": name, "rows": m, "path": OURS, "gflops": flops / ours / 1e9})
    return rows


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
        import mlx_qwen3vl  # noqa: F401  (loads the system OpenBLAS unless MLX_QWEN3VL_OPENBLAS=0)
        from mlx_qwen3vl.cpu import openblas

        print(json.dumps({"openblas": openblas.loaded, "rows": measure()}))
        return
    print(f"| BLAS | activations | path | GFLOP/s, 1 row (decode) | GFLOP/s, {ROWS[1]} rows (prefill) |")
    print("|---|---|---|---:|---:|")
    for blas in ("1", "0"):
        env = {**os.environ, "MLX_QWEN3VL_OPENBLAS": blas}
        out = subprocess.run(
            [sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        label = "system OpenBLAS" if result["openblas"] else "MLX's bundled"
        table = {(r["activations"], r["path"], r["rows"]): r["gflops"] for r in result["rows"]}
        for activations in ("float32", "bfloat16"):
            for path in ("dense", "4-bit", NARROW, OURS):
                if (activations, path, 1) not in table:
                    continue
                one, many = table[(activations, path, 1)], table[(activations, path, ROWS[1])]
                print(f"| {label} | {activations} | {path} | {one:.2f} | {many:.2f} |")


if __name__ == "__main__":
    main()
