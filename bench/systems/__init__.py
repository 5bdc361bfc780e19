"""One module per benchmarked system. Each defines a `System` subclass of `base.System`; the worker
process (bench/worker.py) loads one of them and runs the figures the spec asks for."""

MODULES = {
    "ours": "systems.ours",
    "mlx-vlm": "systems.mlx_vlm_peer",
    "mlx-lm": "systems.mlx_lm_peer",
    "transformers": "systems.transformers_peer",
}
