"""The streaming bf16 GEMV of CPU decode (kernels/cpu_gemv.py) against its twin, the fp32 product rounded
once, on fresh random operands: every row count the decode path can send (1-8, remainders of the 4-row
blocks), output widths that are not multiples of the kernel's 4-row blocks, both output dtypes, 1 and 2
threads. Tolerance: fp32 output within 1e-5 of the output's scale (only the summation order differs); bf16
output within one bf16 rounding step (2^-8 relative) where the two sums straddle a rounding boundary."""
import pytest
import torch

from indexcache.kernels import cpu_gemv

if cpu_gemv.available() is not None and "lacks" in cpu_gemv.available():
    pytest.skip(f"CPU without AVX-512 BF16: {cpu_gemv.available()}", allow_module_level=True)


def test_kernel_builds_here():
    """On a CPU with AVX-512 BF16 the kernel must build (a C compiler is part of setup): otherwise CPU decode
    silently falls back to the slower F.linear."""
    assert cpu_gemv.available() is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(37, 64), (576, 576), (130, 1536)])
def test_gemv_matches_twin(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * k ** -0.5).bfloat16()
    for threads in (1, 2):
        got32 = cpu_gemv.gemv_bf16(x, w, threads, torch.float32)
        want32 = cpu_gemv.ref_gemv_bf16(x, w, torch.float32)
        assert got32.dtype == torch.float32 and got32.shape == (rows, n)
        torch.testing.assert_close(got32, want32, atol=1e-5 * float(want32.abs().max()), rtol=0)
        got = cpu_gemv.gemv_bf16(x, w, threads)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want32, rtol=2 ** -8, atol=1e-6)
        # identical to the twin wherever the fp32 sums round to the same bf16 (nearly everywhere)
        assert (got == cpu_gemv.ref_gemv_bf16(x, w)).float().mean() > 0.95


def test_leading_dims_and_noncontiguous_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g).bfloat16().t()[:, None, :]        # (2, 1, 64), not contiguous
    w = torch.randn(40, 64, generator=g).bfloat16()
    got = cpu_gemv.gemv_bf16(x, w, 2)
    assert got.shape == (2, 1, 40)
    torch.testing.assert_close(got.float(), cpu_gemv.ref_gemv_bf16(x, w, torch.float32), rtol=2 ** -8, atol=1e-6)


def test_refuses_what_it_cannot_take():
    w = torch.randn(8, 48).bfloat16()
    with pytest.raises(ValueError, match="K % 32"):
        cpu_gemv.gemv_bf16(torch.randn(1, 48).bfloat16(), w, 1)
    with pytest.raises(ValueError, match="bf16"):
        cpu_gemv.gemv_bf16(torch.randn(1, 64), torch.randn(8, 64), 1)
