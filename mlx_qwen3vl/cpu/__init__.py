"""MLX's CPU backend: what it needs done differently from the plain model, swapped into a loaded model.

This subpackage exists for the machines where MLX has no GPU backend: Linux users, and the tests, which
run there. MLX's CPU backend computes exponentials one value at a time, runs its quantized kernel on one
core and materialises whole attention score matrices, so the plain model files (language.py, vision.py)
are several times slower there and hold far more memory; each replacement here computes the same
function, and the tests compare both paths with the reference. A Mac does not need it: MLX's default
device there is the GPU, so `load` takes the plain model and never imports the replacements (`backend.py`
makes that one decision). To switch it off on a CPU, load with `backend="gpu"`, which runs the plain model on
whatever device MLX has; to keep MLX's bundled BLAS, set MLX_QWEN3VL_OPENBLAS=0 before importing the
package (`openblas.py`).

`specialize(model, dtype)` (swap.py) is the one entry, called by `backend.py`. The package imports this
subpackage first of all, for `use_system_openblas`, which must run before MLX is imported: so nothing
here imports MLX until `specialize` is first used.

- openblas.py: binding the system OpenBLAS before MLX; its sgemm on the calling thread
- scheduling.py: blocks evaluated one at a time; products over a stream per core; numpy tasks per core
- quantized.py: the quantized layers, products on every core, many float32 rows through BLAS
- widening.py: layers that widen bfloat16 to float32 for their products
- activations.py: the SiLU gate and the GELUs with base-2 exponentials (MLX), and in place (numpy)
- vision_mlp.py: the vision MLPs for many float32 rows with numpy
- attention.py: the decoder's and the vision tower's attention, which path for which call
- numpy_attention.py: long float32 attention with numpy in tiles
- rope.py: the decoder's rope through tables
- swap.py: which part of a model gets which of these
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .openblas import use_system_openblas

if TYPE_CHECKING:
    from .swap import specialize

__all__ = ["specialize", "use_system_openblas"]


def __getattr__(name: str):
    if name != "specialize":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .swap import specialize  # imports MLX: only once a model is loaded

    globals()["specialize"] = specialize
    return specialize
