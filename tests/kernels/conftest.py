"""Kernel tests: make Triton's CPU interpreter usable with NumPy >= 2.4 (TRITON_INTERPRET=1 only), and the
fixtures every kernel test file shares: `gen` (fresh seeded inputs per run) and `dev` (where gpu-marked
tests run: CUDA, or the CPU under the interpreter).

The interpreter turns a scalar loop bound into a Python int with int(array); its scalars are
1-element arrays, which NumPy 2.4 refuses to convert. On the GPU nothing here applies.
"""
import os
import secrets

import pytest
import torch

from indexcache.kernels.interpreter import patch_for_numpy2

patch_for_numpy2()

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def dev():
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA GPU (or TRITON_INTERPRET=1 for a CPU run)")
    return torch.device("cuda")


@pytest.fixture
def gen(request):
    """Fresh inputs on every run; the seed is printed (pytest shows it with a failure) and
    INDEXCACHE_TEST_SEED=<seed> replays that run."""
    seed = int(os.environ.get("INDEXCACHE_TEST_SEED") or secrets.randbits(31))
    print(f"{request.node.name}: INDEXCACHE_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
