"""The FP8 grouped MoE GEMM (kernels/moe_fp8.py) against the one-pair-at-a-time twin `ref_moe_routed`.

CPU test (unmarked): the expert blocks (sorted pairs cut into blocks of one expert each) cover every pair
exactly once. `gpu`-marked: the kernels at the 30B shape (E=64, k=4, D=2048, I=1536) and DeepSeek-V3.2's
(E=256, k=8, D=7168, I=2048) on the H200, in bf16, with CUDA-graph replay; under Triton's interpreter in CI
at small aligned and ragged (moe_inter_dim 80: the up half's own scale rows) sizes, in fp32.

Tolerances (relative Frobenius error against the fp32 twin on the same e4m3 experts): < 1e-5 in fp32 under
the interpreter (exact e4m3 products, fp32 sums); < 2e-2 with bf16 activations on the GPU (x and the
SwiGLU activation rounded to bf16, 2^-9 relative each, as moe.moe_grouped does).
"""
import os

import pytest
import torch

from indexcache import kernels
from indexcache.kernels import reference as ref
from indexcache.kernels.moe_fp8 import expert_blocks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL = INTERPRET
LOW = torch.float32 if INTERPRET else torch.bfloat16    # the interpreter mishandles bf16


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def routing(gen, N, E, k, dev="cpu"):
    """Softmax-top-k routing of N tokens; the last token picks the last expert (and k-1 low ones)."""
    top_w, top_e = torch.randn(N, E, generator=gen).softmax(-1).topk(k, dim=-1)
    top_e[-1] = torch.cat([torch.tensor([E - 1]), torch.arange(k - 1)])
    return top_w.to(dev), top_e.to(dev)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_expert_blocks_cover_each_sorted_pair_once_within_one_expert(gen, block_m):
    E, k, N = 9, 3, 13
    top_e = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    top_e[:, 0] = 2                                     # one crowded expert; several get none
    order, blk_e, blk_start, blk_rows = expert_blocks(top_e, E, block_m)
    flat = top_e.flatten()
    assert blk_e.numel() == -(-N * k // block_m) + E and (blk_rows <= block_m).all()
    covered = torch.zeros(N * k, dtype=torch.int64)
    for b in range(blk_e.numel()):
        rows = range(int(blk_start[b]), int(blk_start[b]) + int(blk_rows[b]))
        for r in rows:
            covered[r] += 1
            assert flat[order[r]] == blk_e[b], "a block holds one expert's pairs only"
    assert (covered == 1).all()
    assert int((blk_rows > 0).sum()) == int(sum(-(-int(c) // block_m) for c in torch.bincount(flat, minlength=E)))


# --------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def dev():
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA GPU (or TRITON_INTERPRET=1 for a CPU run)")
    return torch.device("cuda")


def fp8_case(gen, dev, E, k, D, I, N):
    """Random e4m3 experts with random positive block scales in the checkpoint layout (made on the device:
    V3.2's 11 G expert elements would take minutes from a CPU RNG), bf16 (fp32 interpreted) tokens."""
    g = torch.Generator(device=dev).manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
    nb = lambda n: -(-n // 128)                                                   # noqa: E731
    def e4m3(*s):   # one expert at a time: V3.2's (256, 4096, 7168) in fp32 would take 30 GB at once
        out = torch.empty(*s, dtype=torch.float8_e4m3fn, device=dev)
        for e in range(s[0]):
            out[e] = (torch.randn(*s[1:], generator=g, device=dev) * 64).clamp_(-448, 448).to(torch.float8_e4m3fn)
        return out
    scale = lambda *s, fan_in: torch.rand(*s, generator=g, device=dev) * (2 / 64) * fan_in ** -0.5  # noqa: E731
    scales = {"gate_up_scale_inv": scale(E, 2 * nb(I), nb(D), fan_in=D), "down_scale_inv": scale(E, nb(D), nb(I), fan_in=I)}
    x = torch.randn(N, D, generator=g, device=dev).to(LOW)
    top_w, top_e = routing(gen, N, E, k, dev)
    return x, top_w, top_e, e4m3(E, 2 * I, D), e4m3(E, D, I), scales


SHAPES = ([(6, 2, 256, 128), (5, 2, 200, 80)] if SMALL else [(64, 4, 2048, 1536), (256, 8, 7168, 2048)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}k{}D{}I{}".format(*s))
def test_fp8_grouped_gemm_matches_the_twin(dev, gen, shape):
    from indexcache.kernels.moe_fp8 import moe_fp8_grouped
    E, k, D, I = shape
    for N in (1, 5, 40) if SMALL else (2, 64, 512):
        x = top_w = top_e = w_gate_up = w_down = scales = None              # the last case's experts freed first
        x, top_w, top_e, w_gate_up, w_down, scales = fp8_case(gen, dev, E, k, D, I, N)
        got = moe_fp8_grouped(x, top_w, top_e, w_gate_up, w_down, **scales)
        assert got.shape == (N, D) and got.dtype == torch.float32
        want = ref.ref_moe_routed(x, top_w, top_e, w_gate_up, w_down, **scales)
        err = rel_err(got, want)
        assert err < (1e-5 if LOW == torch.float32 else 2e-2), f"N={N}: {err:.2e}"
        if dev.type == "cuda" and N == 64:
            run = lambda: moe_fp8_grouped(x, top_w, top_e, w_gate_up, w_down, **scales)   # noqa: E731
            run()
            out = torch.empty_like(got)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out.copy_(run())
            new_w, new_e = routing(gen, N, E, k, dev)
            top_w.copy_(new_w)
            top_e.copy_(new_e)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, run()), "no host sync: the replay follows the new routing"


@pytest.mark.gpu
def test_switch_sends_many_fp8_pairs_to_the_fp8_grouped_gemm(dev, gen, monkeypatch):
    from indexcache.kernels import moe, moe_fp8
    E, k, D, I = SHAPES[0]
    n_tokens = moe.GATHER_MAX_PAIRS // k + 1           # more pairs than "auto" sends to the gather kernels
    x, top_w, top_e, w_gate_up, w_down, scales = fp8_case(gen, dev, E, k, D, I, n_tokens)
    calls = []
    real = moe_fp8.moe_fp8_grouped
    monkeypatch.setattr(moe_fp8, "moe_fp8_grouped", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kernels.use_triton(True)
    try:
        got = kernels.moe_routed(x, top_w, top_e, w_gate_up, w_down, **scales)
    finally:
        kernels.use_triton(None)
    assert calls == [1]
    assert torch.equal(got, real(x, top_w, top_e, w_gate_up, w_down, **scales))
