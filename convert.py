"""Convert Qwen3-VL into an MLX model directory, optionally quantized, for `load()` and chat.py.

    python convert.py --hf-path Qwen/Qwen3-VL-4B-Instruct --mlx-path qwen3-vl-4b-4bit -q
    python convert.py --hf-path Qwen/Qwen3-VL-4B-Instruct --mlx-path qwen3-vl-4b-8bit --q-bits 8
    python convert.py --hf-path path/to/model --mlx-path out --q-recipe mixed_4_6 --quantize-vision
    python convert.py --hf-path path/to/model --mlx-path out --q-recipe auto --target-bits 4.5

A quantized output is compared with its source after writing (`mlx_qwen3vl/check.py`): a table on the
terminal, quantization_report.json in the output, exit status 1 naming the tensor when a bound fails.

Argument parsing and terminal output only: the conversion lives in `mlx_qwen3vl/convert.py`.
"""

from __future__ import annotations

import argparse

# Light imports only: --help and argument errors answer before MLX is loaded.
from mlx_qwen3vl import DEFAULT_MODEL, Qwen3VLError
from mlx_qwen3vl.cli import ArgumentParser, fail, quiet_libraries
from mlx_qwen3vl.options import AUTO_RECIPE, BITS, DTYPE_NAMES, GROUP_SIZES, RECIPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hf-path",
        "--model",
        default=DEFAULT_MODEL,
        help=f"source: a model directory or a Hugging Face repo id (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--mlx-path", required=True, help="the output directory to create")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize (4-bit, group size 64)")
    parser.add_argument(
        "--q-bits", type=int, help=f"bits per weight: {', '.join(map(str, BITS))} (implies -q)"
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        help=f"quantization group size: {', '.join(map(str, GROUP_SIZES))} (implies -q)",
    )
    parser.add_argument(
        "--q-recipe",
        choices=(*RECIPES, AUTO_RECIPE),
        help="mixed bits mixed_<low>_<high>: embedding, lm_head and the most sensitive layers' v_proj and "
        "down_proj at <high> bits; auto: each layer's bits (2, 3, 4, 6, 8) measured on the calibration set "
        "for --target-bits on average (implies -q)",
    )
    parser.add_argument(
        "--target-bits", type=float, help="with --q-recipe auto: the average bits per weight, e.g. 4.5"
    )
    parser.add_argument(
        "--q-layer",
        action="append",
        metavar="PATH=BITS",
        help="quantize the module at PATH (e.g. model.language_model.layers.0.mlp.down_proj) at BITS; "
        "repeatable (implies -q)",
    )
    parser.add_argument(
        "--quantize-vision",
        action="store_true",
        help="quantize the vision tower too (default: it stays in --dtype; implies -q)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="bfloat16", help="dtype of what is not quantized (bfloat16)"
    )
    parser.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    parser.add_argument(
        "--no-check", action="store_true", help="skip comparing the quantized output with the source"
    )
    args = parser.parse_args(argv)
    args.q_layer_bits = None
    if args.q_layer:
        try:
            args.q_layer_bits = {
                path: int(bits) for path, _, bits in (a.rpartition("=") for a in args.q_layer)
            }
        except ValueError:
            parser.error("--q-layer takes PATH=BITS, e.g. model.language_model.layers.0.mlp.down_proj=8")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    from mlx_qwen3vl.convert import convert

    try:
        convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_recipe=args.q_recipe,
            target_bits=args.target_bits,
            q_layer_bits=args.q_layer_bits,
            quantize_vision=args.quantize_vision,
            dtype=args.dtype,
            force=args.force,
            check=not args.no_check,
        )
    except Qwen3VLError as e:
        fail(str(e))
    except OSError as e:  # the source unreadable: the system's own one-line message says it
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; no output directory was written", code=130)


if __name__ == "__main__":
    main()
