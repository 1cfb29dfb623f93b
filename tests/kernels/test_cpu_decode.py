"""The streaming bf16 GEMV of CPU decode (kernels/cpu_decode.py) against its twin, the fp32 product rounded
once, on fresh random operands: every row count the decode path can send (1-8, remainders of the 4-row
blocks), output widths that are not multiples of the kernel's 4-row blocks, both output dtypes, 1 and 2
threads. Tolerance: fp32 output within 1e-5 of the output's scale (only the summation order differs); bf16
output within one bf16 rounding step (2^-8 relative) where the two sums straddle a rounding boundary.
The fused small ops (RMSNorm, SiLU-multiply, RoPE + cache write, one-position attention) round where their
twins round, so they agree to one bf16 step (2^-8 relative) elementwise, attention to 2e-2 absolute on unit-
scale values (fp32 softmax on both sides, different summation order and the reference's einsum). The indexer's
top-k (index_select_bf16) sums its scores in the twin's order, so its selection equals the twin's exactly, ties
included (the lowest key index wins a tie at the k-th score, as a stable sort orders them)."""
import pytest
import torch

from indexcache.kernels import cpu_decode

if cpu_decode.available() is not None and "lacks" in cpu_decode.available():
    pytest.skip(f"CPU without AVX-512 BF16: {cpu_decode.available()}", allow_module_level=True)


def test_kernel_builds_here():
    """On a CPU with AVX-512 BF16 the kernel must build (a C compiler is part of setup): otherwise CPU decode
    silently falls back to the slower F.linear."""
    assert cpu_decode.available() is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(37, 64), (576, 576), (130, 1536)])
def test_gemv_matches_twin(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * k ** -0.5).bfloat16()
    for threads in (1, 2):
        got32 = cpu_decode.gemv_bf16(x, w, threads, torch.float32)
        want32 = cpu_decode.ref_gemv_bf16(x, w, torch.float32)
        assert got32.dtype == torch.float32 and got32.shape == (rows, n)
        torch.testing.assert_close(got32, want32, atol=1e-5 * float(want32.abs().max()), rtol=0)
        got = cpu_decode.gemv_bf16(x, w, threads)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want32, rtol=2 ** -8, atol=1e-6)
        # identical to the twin wherever the fp32 sums round to the same bf16 (nearly everywhere)
        assert (got == cpu_decode.ref_gemv_bf16(x, w)).float().mean() > 0.95


def test_leading_dims_and_noncontiguous_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g).bfloat16().t()[:, None, :]        # (2, 1, 64), not contiguous
    w = torch.randn(40, 64, generator=g).bfloat16()
    got = cpu_decode.gemv_bf16(x, w, 2)
    assert got.shape == (2, 1, 40)
    torch.testing.assert_close(got.float(), cpu_decode.ref_gemv_bf16(x, w, torch.float32), rtol=2 ** -8, atol=1e-6)


def test_refuses_what_it_cannot_take():
    w = torch.randn(8, 48).bfloat16()
    with pytest.raises(ValueError, match="K % 32"):
        cpu_decode.gemv_bf16(torch.randn(1, 48).bfloat16(), w, 1)
    with pytest.raises(ValueError, match="bf16"):
        cpu_decode.gemv_bf16(torch.randn(1, 64), torch.randn(8, 64), 1)


def _bf16(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def test_gemv_add_matches_twin():
    g = torch.Generator().manual_seed(11)
    for rows in (1, 3, 6):
        x, w, res = _bf16(g, rows, 192), _bf16(g, 70, 192, scale=192 ** -0.5), _bf16(g, rows, 70)
        want = cpu_decode.ref_gemv_add_bf16(x, w, res)
        got = cpu_decode.gemv_add_bf16(x, w, res.clone(), 2)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
        assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("rows,threads", [(5, 1), (3, 2), (97, 2)])   # 97: a prefill chunk, rows over 2 threads
def test_rms_norm_and_silu_mul_match_twins(rows, threads):
    g = torch.Generator().manual_seed(12 + rows)
    x, w = _bf16(g, rows, 576, scale=3.0), _bf16(g, 576) + 1
    torch.testing.assert_close(cpu_decode.rms_norm_bf16(x, w, 1e-5, threads=threads).float(),
                               cpu_decode.ref_rms_norm_bf16(x, w, 1e-5).float(), rtol=2 ** -7, atol=1e-6)
    gu = _bf16(g, rows, 2 * 96, scale=3.0)
    torch.testing.assert_close(cpu_decode.silu_mul_bf16(gu, threads=threads).float(),
                               cpu_decode.ref_silu_mul_bf16(gu).float(), rtol=2 ** -7, atol=1e-6)


def _rope_tables(max_len, dh):
    ang = torch.arange(max_len)[:, None] * (10000 ** (-torch.arange(dh // 2) / (dh // 2)))[None]
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([-ang.sin(), ang.sin()], -1)


def test_rope_writes_the_cache_like_its_twin():
    g = torch.Generator().manual_seed(13)
    hq, hkv, dh, slots_n, max_len = 9, 3, 64, 4, 40
    cos, sin = _rope_tables(max_len, dh)
    proj = _bf16(g, 3, (hq + 2 * hkv) * dh + 24)            # [q | k | v | indexer rows]
    positions, slots = torch.tensor([0, 17, 39]), torch.tensor([2, 0, 3])
    caches = [[torch.zeros(slots_n, max_len, hkv, dh, dtype=torch.bfloat16) for _ in range(2)] for _ in range(2)]
    q = cpu_decode.rope_qkv_bf16(proj, hq, hkv, cos, sin, positions, slots, *caches[0])
    want_q = cpu_decode.ref_rope_qkv_bf16(proj, hq, hkv, cos, sin, positions, slots, *caches[1])
    torch.testing.assert_close(q.float(), want_q.float(), rtol=2 ** -7, atol=1e-6)
    for got, want in zip(caches[0], caches[1]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_decode.rope_qkv_bf16(proj, hq, hkv, cos, sin, torch.tensor([0, 1, 40]), slots, *caches[0])


def test_rope_of_a_prefill_chunk_matches_its_twin():
    """A prefill chunk: 70 consecutive positions of one slot from position 5, rows split over 2 threads."""
    g = torch.Generator().manual_seed(16)
    hq, hkv, dh, slots_n, max_len, T = 9, 3, 64, 3, 96, 70
    cos, sin = _rope_tables(max_len, dh)
    proj = _bf16(g, T, (hq + 2 * hkv) * dh + 8)
    positions, slots = torch.arange(5, 5 + T), torch.full((T,), 1)
    caches = [[torch.zeros(slots_n, max_len, hkv, dh, dtype=torch.bfloat16) for _ in range(2)] for _ in range(2)]
    q = cpu_decode.rope_qkv_bf16(proj, hq, hkv, cos, sin, positions, slots, *caches[0], threads=2)
    want_q = cpu_decode.ref_rope_qkv_bf16(proj, hq, hkv, cos, sin, positions, slots, *caches[1])
    torch.testing.assert_close(q.float(), want_q.float(), rtol=2 ** -7, atol=1e-6)
    for got, want in zip(caches[0], caches[1]):
        assert want[1, 5: 5 + T].abs().sum() > 0 and want[0].abs().sum() == 0
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_attend_matches_twin(masked):
    g = torch.Generator().manual_seed(14 + masked)
    hq, hkv, dh, max_len = 9, 3, 64, 700
    kc, vc = _bf16(g, 4, max_len, hkv, dh), _bf16(g, 4, max_len, hkv, dh)
    q = _bf16(g, 3, hq * dh)
    slots, kv_lens = torch.tensor([3, 0, 1]), torch.tensor([1, 650, 37])
    allowed = None
    if masked:
        allowed = torch.rand(3, 650, generator=g) < 0.3
        allowed[torch.arange(3), kv_lens - 1] = True                 # a query always sees itself
    for threads in (1, 2):
        got = cpu_decode.attend_bf16(q, kc, vc, slots, kv_lens, allowed, 0.125, threads)
        want = cpu_decode.ref_attend_bf16(q, kc, vc, slots, kv_lens, allowed, 0.125)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    # the mask matters: without it the long row's output moves
    if masked:
        free = cpu_decode.attend_bf16(q, kc, vc, slots, kv_lens, None, 0.125, 2)
        assert (free[1].float() - got[1].float()).abs().max() > 0.05


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16, 17, 40, 64])
def test_amx_gemv_matches_twin(rows):
    """The AMX GEMV (weights packed once into tiles; 1-4 row tiles, the last one partial or whole) against the fp32 product rounded once, plain and added to a
    residual; a prefix of the packed tiles is the packing of the weight's first rows (what the decode step
    uses for the projections of S layers). Tolerances as for the AVX-512 GEMV."""
    if cpu_decode.amx_available() is not None and "lacks" in cpu_decode.amx_available():
        pytest.skip(f"no AMX here: {cpu_decode.amx_available()}")   # else: a build or OS failure fails the test
    g = torch.Generator().manual_seed(20 + rows)
    x, w = _bf16(g, rows, 576), _bf16(g, 96, 576, scale=576 ** -0.5)
    packed = cpu_decode.pack_amx(w)
    for threads in (1, 2):
        got = cpu_decode.amx_gemv_bf16(x, packed, threads)
        want = cpu_decode.ref_gemv_bf16(x, w, torch.float32)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)
        assert (got == cpu_decode.ref_gemv_bf16(x, w)).float().mean() > 0.95
    head = cpu_decode.amx_gemv_bf16(x, packed[:2], 2)                     # the first 32 rows of w
    torch.testing.assert_close(head.float(), cpu_decode.ref_gemv_bf16(x, w[:32], torch.float32), rtol=2 ** -8, atol=1e-6)
    res = _bf16(g, rows, 96)
    added = cpu_decode.amx_gemv_bf16(x, packed, 2, residual=res.clone())
    torch.testing.assert_close(added.float(), cpu_decode.ref_gemv_add_bf16(x, w, res).float(), rtol=2 ** -7, atol=1e-3)
    with pytest.raises(ValueError, match="N % 16"):
        cpu_decode.pack_amx(w[:40])


def test_amx_can_be_turned_off_by_the_environment():
    """INDEXCACHE_CPU_AMX=0: the decode kernels still run, on the AVX-512 GEMV instead of AMX tiles (the switch an
    operator uses where AMX measures slower through the server, bench/RESULTS.md round 4)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if cpu_decode.amx_available() is not None and "lacks" in cpu_decode.amx_available():
        pytest.skip(f"no AMX here: {cpu_decode.amx_available()}")
    serving = Path(cpu_decode.__file__).resolve().parents[2]
    code = "from indexcache.kernels import cpu_decode as c; print(c.available()); print(c.amx_available())"
    env = {**os.environ, "INDEXCACHE_CPU_AMX": "0", "PYTHONPATH": str(serving)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["None", "turned off by INDEXCACHE_CPU_AMX=0"]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("M,S,k,threads", [(1, 15, 8, 1), (37, 300, 64, 2), (488, 1000, 512, 2), (3, 40, 40, 1)])
def test_index_select_matches_twin(M, S, k, threads, ties):
    """The indexer's scores, top-k and mask in one call against its twin (scores head by head, a stable sort):
    rows that see fewer keys than k (all visible chosen), rows past it, S not a multiple of 16; with ties,
    logits on a coarse grid and one head's weight negative, so many scores are equal (zeros from the ReLU
    among them) and the k-th score is often tied. Both output forms: the bool selection and the additive mask."""
    g = torch.Generator().manual_seed(M * 7 + S + k + ties)
    hi = 4
    logits = torch.randn(M, hi, S, generator=g)
    w = torch.randn(M, hi, generator=g)
    if ties:
        logits, w = (logits * 2).round(), w.round() + 0.5
        w[:, 1] = -w[:, 1].abs()
    logits = logits.bfloat16()
    n_visible = torch.randint(1, S + 1, (M,), generator=g)
    n_visible[0] = S                                              # one row sees every key
    for additive in (False, True):
        got = cpu_decode.index_select_bf16(logits, w, n_visible, k, threads, additive=additive)
        want = cpu_decode.ref_index_select_bf16(logits, w, n_visible, k, additive=additive)
        assert got.dtype == want.dtype and torch.equal(got, want)
    chosen = cpu_decode.index_select_bf16(logits, w, n_visible, k, threads)
    assert torch.equal(chosen.sum(1), n_visible.clamp(max=k))     # k keys, or every visible one
    assert not chosen[torch.arange(S)[None, :] >= n_visible[:, None]].any()


def test_index_select_refuses_what_it_cannot_take():
    logits, w, n = torch.zeros(2, 4, 16, dtype=torch.bfloat16), torch.zeros(2, 4), torch.full((2,), 16)
    with pytest.raises(ValueError, match="logits"):
        cpu_decode.index_select_bf16(logits.float(), w, n, 4, 1)
    with pytest.raises(ValueError, match="w must be"):
        cpu_decode.index_select_bf16(logits, w[:, :3], n, 4, 1)
    with pytest.raises(ValueError, match="out must be"):
        cpu_decode.index_select_bf16(logits, w, n, 4, 1, additive=True, out=torch.empty(2, 16, dtype=torch.bool))
