"""The Triton kernels against their PyTorch twins on the CPU, in CI: the GPU-marked kernel tests run
under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is imported, hence a child
pytest per file) at the small sizes they choose there. On an H200 they run natively: `pytest -m gpu tests/kernels`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("tests", ["test_triton_kernels.py", "test_fp8_gemm.py", "test_moe.py", "test_moe_fp8.py",
                                   "test_model_fast_path.py", "test_fp8_model.py", "test_fused.py",
                                   "test_paged_fast_path.py"])
def test_triton_kernels_match_their_references_under_the_interpreter(tests):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          str(HERE / tests)],
                         cwd=HERE.parent.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail and "error" not in tail.lower(), tail
