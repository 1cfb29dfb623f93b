"""The fused glue kernels (kernels/fused.py: RoPE, RMSNorm, per-row FP8 quantisation) against their twins
`ref_rope`, `ref_rms_norm`, `ref_quantize_rows_fp8` on fresh random inputs; the twins against textbook
formulas on the CPU.

Tolerances: fp32 outputs within 1e-6 relative (both compute in fp32; the kernel may fuse a multiply-add);
bf16 outputs within one bf16 step of the twin (2^-7 relative: the step is 2^-7 of the value just above a
power of two, 2^-8 just below), since an fp32 result a hair from a rounding boundary can round the other
way (seen on the H100: 2 of 1.6 M elements, one step apart); FP8: scales within 1e-6 relative and every e4m3 value equal to
the twin's or one e4m3 step (2^-3 relative) away, on at most 0.1 % of the elements.
`gpu`-marked tests run on CUDA, and under Triton's interpreter in CI (test_triton_interpreted.py).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from indexcache import kernels
from indexcache.kernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOW = torch.float32 if INTERPRET else torch.bfloat16    # the interpreter mishandles bf16


def angles(gen, B, T, half):
    radians = torch.rand(B, T, half, generator=gen) * 1000.0                   # positions up to ~1000 rad
    return radians.cos(), radians.sin()


def assert_close_to_twin(out, twin, dtype):
    assert out.dtype == twin.dtype and out.shape == twin.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, twin, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), twin.float(), rtol=2 ** -7, atol=1e-5)


# --------------------------------------------------------------------------------------------- CPU


def test_ref_rope_interleaved_is_complex_multiplication(gen):
    """DeepSeek's form: pairs (2i, 2i+1) are complex numbers multiplied by e^(i*angle_i)."""
    B, T, H, D = 2, 5, 3, 16
    x = torch.randn(B, T, H, D, generator=gen)
    cos, sin = angles(gen, B, T, D // 2)
    rotor = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, :, None]  # (B, T, 1, D/2)
    expected = torch.view_as_real(torch.view_as_complex(x.view(B, T, H, D // 2, 2)) * rotor).flatten(-2)
    torch.testing.assert_close(ref.ref_rope(x, cos, sin, True), expected, rtol=1e-5, atol=1e-5)


def test_ref_rope_rotate_half_is_the_hf_formula_and_copies_the_other_dims(gen):
    """Llama/HF: x * cos + rotate_half(x) * sin on the rotated dims; dims outside [offset, offset + rope)
    come out unchanged."""
    B, T, H, D, offset, rope = 2, 4, 2, 24, 8, 12
    x = torch.randn(B, T, H, D, generator=gen)
    cos, sin = angles(gen, B, T, rope // 2)
    part = x[..., offset: offset + rope]
    x1, x2 = part.chunk(2, dim=-1)
    rotate_half = torch.cat([-x2, x1], dim=-1)
    cos_full, sin_full = torch.cat([cos, cos], -1)[:, :, None], torch.cat([sin, sin], -1)[:, :, None]
    out = ref.ref_rope(x, cos, sin, False, offset, rope)
    torch.testing.assert_close(out[..., offset: offset + rope], part * cos_full + rotate_half * sin_full)
    assert torch.equal(out[..., :offset], x[..., :offset]) and torch.equal(out[..., offset + rope:], x[..., offset + rope:])


def test_ref_rms_norm_is_the_textbook_formula(gen):
    x, w = torch.randn(6, 40, generator=gen), torch.randn(40, generator=gen)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ref.ref_rms_norm(x, w, 1e-6), expected, rtol=1e-5, atol=1e-6)


def test_ref_quantize_rows_fp8_round_trips_within_e4m3_precision(gen):
    x = torch.randn(9, 128, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
    x8, scale = ref.ref_quantize_rows_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (9,)
    assert float(x8.float().abs().amax()) == 448.0                       # each row's amax maps to e4m3's max
    back = x8.float() * scale[:, None]
    assert float(((back - x).abs() / x.abs().amax(-1, keepdim=True)).max()) < 2 ** -4


def test_the_model_twins_are_what_the_cpu_runs(gen):
    """On the CPU the dispatchers return the twins' results exactly (the readable path is the served one)."""
    x = torch.randn(2, 3, 4, 64, generator=gen)
    cos, sin = angles(gen, 2, 3, 16)
    assert torch.equal(kernels.rope(x, cos, sin, True, 32), ref.ref_rope(x, cos, sin, True, 32))
    w = torch.randn(64, generator=gen)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), ref.ref_rms_norm(x, w, 1e-5))
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(kernels.quantize_rows_fp8(x), ref.ref_quantize_rows_fp8(x)))


# --------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("case", ["mla_q", "latent", "indexer_q", "indexer_k", "gqa"])
def test_fused_rope_matches_its_twin(gen, dev, interleaved, case):
    """The shapes the model calls it with: MLA q (rope on the last 64 of 192 dims, a non-contiguous view),
    the latent row (rope after 512 dims, one head), the indexer's q and k (rope on the first 64 of 128)
    and GQA's whole head dim."""
    small = INTERPRET
    B, T = (1, 3) if small else (2, 33)
    H, D, offset, rope = {"mla_q": (8 if small else 128, 192, 128, 64), "latent": (1, 576, 512, 64),
                          "indexer_q": (4 if small else 64, 128, 0, 64), "indexer_k": (1, 128, 0, 64),
                          "gqa": (3, 64, 0, 64)}[case]
    wide = torch.randn(B, T, H, D + 16, generator=gen).to(LOW)
    x = wide[..., 8: 8 + D].to(dev)                                     # strided: not contiguous
    cos, sin = angles(gen, B, T, rope // 2)
    twin = ref.ref_rope(x.cpu().float(), cos, sin, interleaved, offset, rope).to(LOW)
    from indexcache.kernels.fused import rope as fused_rope
    out = fused_rope(x, cos.to(dev), sin.to(dev), interleaved, offset, rope)
    assert out.is_contiguous()
    assert_close_to_twin(out.cpu(), twin, LOW)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [576, 1536, 7168])
def test_fused_rms_norm_matches_its_twin(gen, dev, dim):
    rows = 3 if INTERPRET else 257
    x = (torch.randn(rows, dim, generator=gen) * 3).to(LOW)
    w = (torch.rand(dim, generator=gen) + 0.5).to(LOW)
    from indexcache.kernels.fused import rms_norm as fused_rms_norm
    out = fused_rms_norm(x.to(dev), w.to(dev), 1e-6)
    assert_close_to_twin(out.cpu(), ref.ref_rms_norm(x, w, 1e-6), LOW)


@pytest.mark.gpu
def test_fused_quantize_rows_matches_its_twin(gen, dev):
    rows = 5 if INTERPRET else 4096
    x = (torch.randn(rows, 128, generator=gen) * torch.logspace(-2, 2, rows)[:, None]).to(LOW)
    from indexcache.kernels.fused import quantize_rows_fp8 as fused_quantize
    x8, scale = fused_quantize(x.to(dev))
    t8, tscale = ref.ref_quantize_rows_fp8(x)
    torch.testing.assert_close(scale.cpu(), tscale, rtol=1e-6, atol=0)
    a, b = x8.cpu().float(), t8.float()
    differ = a != b
    assert float(differ.float().mean()) <= 1e-3, f"{int(differ.sum())} of {a.numel()} e4m3 values differ"
    assert bool(((a - b).abs() <= b.abs() * 2 ** -3 + 2 ** -9)[differ].all())


@pytest.mark.gpu
def test_fused_quantize_indexer_fp8_matches_its_twin(gen, dev):
    """The model's FP8 indexer quantisation through the dispatcher: q per (token, head), k per key, the q
    scale folded into the head weights."""
    B, T, H, D = (1, 2, 4, 128) if INTERPRET else (2, 16, 64, 128)
    q = torch.randn(B, T, H, D, generator=gen).to(LOW)
    k = torch.randn(B, T, D, generator=gen).to(LOW)
    w = torch.randn(B, T, H, generator=gen)
    kernels.use_triton(True)
    try:
        q8, k8, wq, ks = kernels.quantize_indexer_fp8(q.to(dev), k.to(dev), w.to(dev))
    finally:
        kernels.use_triton(None)
    tq8, tk8, twq, tks = ref.quantize_indexer_fp8(q, k, w)
    torch.testing.assert_close(wq.cpu(), twq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ks.cpu(), tks, rtol=1e-6, atol=0)
    for a, b in ((q8, tq8), (k8, tk8)):
        assert a.dtype == torch.float8_e4m3fn and a.shape == b.shape
        a, b = a.cpu().float(), b.float()
        differ = a != b
        assert float(differ.float().mean()) <= 1e-3


def test_fused_kernels_step_aside_under_autograd():
    """Training on the GPU differentiates through RoPE and RMSNorm: with grad enabled and a tensor that
    requires it, the dispatchers use the differentiable twins (here on the CPU, the same rule)."""
    x = torch.randn(1, 2, 1, 8, requires_grad=True)
    cos, sin = torch.ones(1, 2, 4), torch.zeros(1, 2, 4)
    kernels.use_triton(True)
    try:
        out = kernels.rope(x, cos, sin, True)
        norm = kernels.rms_norm(x, torch.ones(8), 1e-6)
    finally:
        kernels.use_triton(None)
    (out.sum() + norm.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert F.mse_loss(out, x).item() == 0.0          # zero angles: the identity rotation
