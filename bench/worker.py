"""One benchmarked system in its own process: `python bench/worker.py SPEC.json OUT.json`.

A process per system keeps peak memory and the BLAS library per system: MLX binds `cblas_sgemm` when
mlx.core is first imported, to the system OpenBLAS only if it was loaded before (mlx_qwen3vl/cpu/openblas.py).
The spec's "openblas" decides that here, before anything imports mlx.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    if spec["openblas"]:
        os.environ.pop("MLX_QWEN3VL_OPENBLAS", None)
        from mlx_qwen3vl.cpu import use_system_openblas  # the package loads it on import

        use_system_openblas()
    else:
        os.environ["MLX_QWEN3VL_OPENBLAS"] = "0"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if spec.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))

    from inputs import Inputs
    from measure import backend, mlx_bandwidth_gbs, system_openblas
    from systems import MODULES
    from systems.base import run

    module = importlib.import_module(MODULES[spec["system"]])
    system = module.System(spec, Inputs(Path(spec["inputs"])))
    result = run(system, spec)
    result["config"] = {k: spec[k] for k in ("dtype", "bits", "openblas")}
    result["info"]["openblas"] = system_openblas()
    result["info"]["backend"], result["info"]["device"] = backend()
    if spec["system"] == "ours" and result["info"]["backend"] != "cpu":
        result["info"]["device_bandwidth_gbs"] = mlx_bandwidth_gbs()
    out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
