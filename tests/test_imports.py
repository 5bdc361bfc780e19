"""What importing the package does: nothing heavy until a name is used (so the command-line tools answer
`--help` and argument errors at once), and on Linux the system OpenBLAS bound before MLX, or one line
saying why it could not be."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_qwen3vl.cpu import openblas

ROOT = Path(__file__).resolve().parent.parent


def python(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


HEAVY_MODULES = ("mlx.core", "mlx_lm", "transformers", "torch", "cv2", "fastapi", "uvicorn")
IMPORTS_AFTER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print([m for m in {heavy!r} if m in sys.modules])
"""


@pytest.mark.parametrize(
    "args",
    [
        ("chat.py", "--help"),
        ("chat.py", "--temperature", "-1"),
        ("convert.py", "--help"),
        ("convert.py",),
        ("server.py", "--help"),
        ("server.py", "--port", "http"),
        ("server.py", "--max-batch", "0"),
    ],
    ids=[
        "chat help",
        "chat bad argument",
        "convert help",
        "convert missing argument",
        "server help",
        "server port",
        "server batch",
    ],
)
def test_help_and_argument_errors_answer_before_the_heavy_imports(args):
    """--help and argument errors need none of MLX, mlx-lm, transformers or OpenCV: they answer at once."""
    result = python(IMPORTS_AFTER.format(heavy=HEAVY_MODULES), *args)
    exit_line, loaded = result.stdout.strip().splitlines()[-2:]
    assert exit_line == f"exit {0 if '--help' in args else 2}", result.stderr
    assert loaded == "[]"
    if "--help" not in args:  # one line naming the problem
        assert len(result.stderr.strip().splitlines()) == 1 and "(see --help)" in result.stderr, result.stderr


def test_importing_the_package_loads_nothing_heavy():
    script = f"import sys, mlx_qwen3vl; print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    result = python(script)
    assert result.stdout.strip() == "[]", result.stderr


SYSTEM_OPENBLAS = [p for p in openblas._CANDIDATES if os.path.exists(p)]
TOO_LATE = "mlx was imported first, so MLX's CPU matmuls use its slow bundled BLAS"


@pytest.mark.parametrize("order", ["mlx first", "package first"])
def test_importing_mlx_first_is_reported_once(order):
    """With the system OpenBLAS installed (Linux), importing mlx before the package loses it: one line
    says so and what to do. In the right order, without an OpenBLAS to bind, or opted out of it
    (MLX_QWEN3VL_OPENBLAS=0), nothing is said."""
    imports = (
        "import mlx.core; import mlx_qwen3vl" if order == "mlx first" else "import mlx_qwen3vl, mlx.core"
    )
    result = python(f"{imports}; import mlx_qwen3vl.loading")
    opted_out = os.environ.get("MLX_QWEN3VL_OPENBLAS") == "0"  # inherited by the child: nothing to bind
    expected = order == "mlx first" and bool(SYSTEM_OPENBLAS) and sys.platform.startswith("linux")
    expected = expected and not opted_out
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(TOO_LATE) == (1 if expected else 0), result.stderr
    assert len(result.stderr.splitlines()) == result.stderr.count(TOO_LATE)
    assert python(imports, env={"MLX_QWEN3VL_OPENBLAS": "0"}).stderr == ""
