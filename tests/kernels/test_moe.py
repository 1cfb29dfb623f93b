"""Routed experts (kernels/moe.py) against the one-pair-at-a-time twin `ref_moe_routed`.

CPU tests (unmarked): the twin against a per-expert HF-style MLP (the (E, 2I, D) gate-then-up layout), the
plain-PyTorch grouped path (torch._grouped_mm on the CPU, and the gathered fallback) in fp32, bf16 and FP8,
no host-reading call on the grouped path, the path choice and the input errors. The `gpu`-marked tests run
the Triton gather kernels (and on CUDA the grouped path and graph capture) at the 30B shape (E=64, k=4,
D=2048, I=1536) and DeepSeek-V3.2's (E=256, k=8, D=7168, I=2048) on the H200, and under Triton's
interpreter at small sizes in CI (tests/kernels/test_triton_interpreted.py).

Tolerances (relative Frobenius error against the fp32 twin on the same inputs):
  - gather path: < 1e-5 in fp32 under the interpreter, < 1e-4 on the GPU (both multiply the same bf16 /
    e4m3 values exactly in fp32; only the summation order over K = 7168 differs, ~1e-6);
  - grouped path: < 1e-5 in fp32; < 2e-2 in bf16 (x, the gate|up product, the activation, the output and,
    for FP8 experts, the dequantised weights are each rounded to bf16, 2^-9 relative: ~5e-3 seen).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from indexcache import kernels
from indexcache.kernels import moe
from indexcache.kernels import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL = INTERPRET
LOW = torch.float32 if INTERPRET else torch.bfloat16    # the interpreter mishandles bf16


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def routing(gen, N, E, k, dev="cpu"):
    """Softmax-top-k routing of N tokens; the last token picks the last expert (and k-1 low ones)."""
    top_w, top_e = torch.randn(N, E, generator=gen).softmax(-1).topk(k, dim=-1)        # (N, k), (N, k)
    top_e[-1] = torch.cat([torch.tensor([E - 1]), torch.arange(k - 1)])
    return top_w.to(dev), top_e.to(dev)


def experts(gen, E, D, I, dtype=torch.float32, dev="cpu"):
    """Random (E, 2I, D) gate|up and (E, D, I) down weights scaled so activations stay O(1)."""
    w_gate_up = torch.randn(E, 2 * I, D, generator=gen) * D ** -0.5
    w_down = torch.randn(E, D, I, generator=gen) * I ** -0.5
    return w_gate_up.to(dtype).to(dev), w_down.to(dtype).to(dev)


def fp8_experts(w_gate_up, w_down):
    g8, gs = ref.quantize_weight_fp8_blocks(w_gate_up)
    d8, ds = ref.quantize_weight_fp8_blocks(w_down)
    return g8, d8, {"gate_up_scale_inv": gs, "down_scale_inv": ds}


# --------------------------------------------------------------------------------------------- CPU


def test_twin_is_the_hf_expert_mlp_weighted_by_the_router(gen):
    """Stacking HF gate_proj / up_proj rows as (E, 2I, D) and down_proj as (E, D, I): the twin and the
    grouped path give, per token, sum_j w_j * down(silu(gate(x)) * up(x)) of its experts."""
    E, k, D, I, N = 4, 2, 24, 16, 6
    gate = [torch.randn(I, D, generator=gen) for _ in range(E)]
    up = [torch.randn(I, D, generator=gen) for _ in range(E)]
    down = [torch.randn(D, I, generator=gen) for _ in range(E)]
    x = torch.randn(N, D, generator=gen)
    top_w, top_e = routing(gen, N, E, k)
    mlp = lambda v, e: F.linear(F.silu(F.linear(v, gate[e])) * F.linear(v, up[e]), down[e])   # noqa: E731
    want = torch.stack([sum(float(top_w[n, j]) * mlp(x[n], e) for j, e in enumerate(top_e[n].tolist()))
                        for n in range(N)])
    w_gate_up = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
    w_down = torch.stack(down)
    assert rel_err(ref.ref_moe_routed(x, top_w, top_e, w_gate_up, w_down), want) < 1e-6
    assert rel_err(moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down), want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "gathered"])
def test_grouped_path_matches_the_twin(gen, monkeypatch, dtype, grouped_mm):
    """torch._grouped_mm over the sorted pairs (what the CPU runs) and the gathered fallback (what runs
    where _grouped_mm would sync), the latter in several chunks of pairs; some experts get no token."""
    E, k, D, I, N = 16, 4, 64, 48, 9
    if not grouped_mm:
        monkeypatch.setattr(moe, "grouped_mm_runs", lambda device, dtype: False)
        monkeypatch.setattr(moe, "_GATHER_ELEMENTS", 5 * 3 * I * D)                 # 5 pairs per chunk
    x = torch.randn(N, D, generator=gen).to(dtype)
    top_w, top_e = routing(gen, N, E, k)
    w_gate_up, w_down = experts(gen, E, D, I, dtype)
    got = moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down)
    assert got.shape == (N, D) and got.dtype == torch.float32
    want = ref.ref_moe_routed(x, top_w, top_e, w_gate_up, w_down)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "gathered"])
def test_grouped_path_runs_fp8_experts(gen, monkeypatch, dtype, grouped_mm):
    """FP8 experts (e4m3, 128x128 block scales): dequantised per call in chunks of experts for
    _grouped_mm, per gathered chunk of pairs otherwise; the twin dequantises each expert first."""
    E, k, D, I, N = 6, 2, 256, 128, 5
    monkeypatch.setattr(moe, "_GATHER_ELEMENTS", 2 * 2 * I * D)                     # 2 experts / chunk
    if not grouped_mm:
        monkeypatch.setattr(moe, "grouped_mm_runs", lambda device, dtype: False)
    x = torch.randn(N, D, generator=gen).to(dtype)
    top_w, top_e = routing(gen, N, E, k)
    g8, d8, scales = fp8_experts(*experts(gen, E, D, I))
    got = moe.moe_grouped(x, top_w, top_e, g8, d8, **scales)
    want = ref.ref_moe_routed(x, top_w, top_e, g8, d8, **scales)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


def ragged_checkpoint_experts(gen, E, D, I):
    """Per-expert gate/up/down matrices quantised one matrix at a time, as an FP8 checkpoint holds them
    (each with its own 128x128 blocks), with random per-block magnitudes (2^-2..2^2) so that a scale
    read from the wrong block shows; stacked the way the loader stacks them."""
    def checkpoint_matrix(rows, cols):
        w = torch.randn(rows, cols, generator=gen) * cols ** -0.5
        mag = 2.0 ** torch.randint(-2, 3, (-(-rows // 128), -(-cols // 128)), generator=gen).float()
        return ref.quantize_weight_fp8_blocks(w * mag.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols])
    gate, up, down = ([checkpoint_matrix(r, c) for _ in range(E)] for r, c in ((I, D), (I, D), (D, I)))
    g8 = torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)])                    # (E, 2I, D)
    gs = torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)])                    # (E, 2 nb, kb)
    d8, ds = torch.stack([d[0] for d in down]), torch.stack([d[1] for d in down])
    real = [[ref.dequantize_weight_fp8_blocks(*m[e]) for m in (gate, up, down)] for e in range(E)]
    return g8, d8, {"gate_up_scale_inv": gs, "down_scale_inv": ds}, real


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "gathered"])
def test_ragged_fp8_experts_use_each_checkpoint_matrix_blocks(gen, monkeypatch, grouped_mm):
    """moe_inter_dim and hidden size not multiples of 128 (tiny test models): gate_proj and up_proj keep
    their own row blocks in the stacked scales (the up half starts a new block at row I, not at 128). The
    twin is the HF expert MLP on the per-matrix dequantised weights; the grouped path matches it."""
    E, k, D, I, N = 5, 2, 200, 80, 7
    if not grouped_mm:
        monkeypatch.setattr(moe, "grouped_mm_runs", lambda device, dtype: False)
    g8, d8, scales, real = ragged_checkpoint_experts(gen, E, D, I)
    assert scales["gate_up_scale_inv"].shape == (E, 2, 2) and scales["down_scale_inv"].shape == (E, 2, 1)
    # quantize_experts_fp8 quantises the halves as a checkpoint does: the same bytes from the float stack
    float_stack = torch.stack([torch.cat([gate, up]) for gate, up, _ in real])
    q8, qs, _, _ = ref.quantize_experts_fp8(float_stack, torch.stack([down for _, _, down in real]))
    assert torch.equal(q8.float(), g8.float()) and torch.equal(qs, scales["gate_up_scale_inv"])
    assert torch.equal(ref.dequantize_experts_fp8(g8, qs, gate_up=True), float_stack)
    x = torch.randn(N, D, generator=gen)
    top_w, top_e = routing(gen, N, E, k)
    mlp = lambda v, e: F.linear(F.silu(F.linear(v, real[e][0])) * F.linear(v, real[e][1]), real[e][2])  # noqa: E731
    want = torch.stack([sum(float(top_w[n, j]) * mlp(x[n], e) for j, e in enumerate(top_e[n].tolist()))
                        for n in range(N)])
    twin = ref.ref_moe_routed(x, top_w, top_e, g8, d8, **scales)
    assert rel_err(twin, want) < 1e-6
    assert rel_err(moe.moe_grouped(x, top_w, top_e, g8, d8, **scales), twin) < 1e-5
    assert rel_err(kernels.moe_routed(x, top_w, top_e, g8, d8, **scales), twin) < 1e-5


class _NoHostReads(TorchFunctionMode):
    """Fails on any call that reads a tensor's values on the host (a device sync on CUDA, and a graph
    capture error): .item(), .tolist(), int()/bool(), bincount, nonzero, unique, .cpu()."""
    FORBIDDEN = {"item", "tolist", "__int__", "__bool__", "__index__", "__float__", "bincount", "nonzero",
                 "unique", "cpu", "numpy"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            raise AssertionError(f"host read of a tensor: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "gathered"])
def test_grouped_path_never_reads_tensor_values_on_the_host(gen, monkeypatch, grouped_mm):
    if not grouped_mm:
        monkeypatch.setattr(moe, "grouped_mm_runs", lambda device, dtype: False)
    E, k, D, I, N = 6, 2, 128, 128, 4
    x = torch.randn(N, D, generator=gen)
    top_w, top_e = routing(gen, N, E, k)
    w_gate_up, w_down = experts(gen, E, D, I)
    g8, d8, scales = fp8_experts(w_gate_up, w_down)
    with _NoHostReads():
        moe.moe_grouped(x, top_w, top_e, g8, d8, **scales)
        moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down)
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        torch.bincount(top_e.flatten())                                  # the guard itself works


def test_sort_pairs_groups_pairs_by_expert(gen):
    E, k, N = 7, 3, 11
    top_e = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    order, offs = moe.sort_pairs(top_e, E)
    flat = top_e.flatten()
    assert torch.equal(flat[order], flat.sort(stable=True).values)
    assert offs.dtype == torch.int32
    assert torch.equal(offs.long(), torch.bincount(flat, minlength=E).cumsum(0))


def test_auto_path_takes_gather_only_for_few_pairs_on_cuda():
    pytest.importorskip("triton")
    assert moe.resolved_moe_path("auto", "cuda", moe.GATHER_MAX_PAIRS) == "gather"
    assert moe.resolved_moe_path("auto", "cuda", moe.GATHER_MAX_PAIRS + 1) == "grouped"
    assert moe.resolved_moe_path("auto", "cpu", 1) == "grouped"
    assert moe.resolved_moe_path("gather", "cpu", 1000) == "gather"
    with pytest.raises(ValueError, match="path='loop'"):
        moe.resolved_moe_path("loop", "cpu", 1)


def test_moe_inputs_are_checked_with_the_field_named(gen):
    E, k, D, I, N = 4, 2, 128, 128, 3
    x = torch.randn(N, D, generator=gen)
    top_w, top_e = routing(gen, N, E, k)
    w_gate_up, w_down = experts(gen, E, D, I)
    with pytest.raises(ValueError, match=r"w_down: expected \(E, D, I\)"):
        moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down.transpose(1, 2)[:, :, :64])
    with pytest.raises(ValueError, match="w_gate_up: expected"):
        moe.moe_grouped(x, top_w, top_e, w_gate_up[:, :, :64], w_down)
    with pytest.raises(ValueError, match="top_w"):
        moe.moe_grouped(x, top_w[:, :1], top_e, w_gate_up, w_down)
    g8, d8, scales = fp8_experts(w_gate_up, w_down)
    with pytest.raises(ValueError, match="gate_up_scale_inv.*got None"):
        moe.moe_grouped(x, top_w, top_e, g8, d8, down_scale_inv=scales["down_scale_inv"])
    with pytest.raises(ValueError, match="down_scale_inv: given for unquantised"):
        moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down, down_scale_inv=scales["down_scale_inv"])
    # ragged experts (I = 48): the stacked (2I, D) matrix's blocks are not the checkpoint's layout, which
    # keeps gate_proj's and up_proj's own blocks (2 row blocks, not 1)
    g8r, d8r, scales_r = fp8_experts(*experts(gen, E, D, 48))
    with pytest.raises(ValueError, match=r"gate_up_scale_inv: expected \(4, 2, 1\) float32.*got torch.float32 \(4, 1, 1\)"):
        moe.moe_grouped(x, top_w, top_e, g8r, d8r, **scales_r)
    with pytest.raises(ValueError, match="moe_gather needs CUDA tensors"):
        moe.moe_gather(x, top_w, top_e, g8, d8, **scales)


def test_switch_runs_the_grouped_path_on_the_cpu(gen, monkeypatch):
    E, k, D, I, N = 8, 2, 32, 16, 5
    x = torch.randn(N, D, generator=gen)
    top_w, top_e = routing(gen, N, E, k)
    w_gate_up, w_down = experts(gen, E, D, I)
    for mode in ("auto", "torch"):
        monkeypatch.setenv("INDEXCACHE_KERNELS", mode)
        got = kernels.moe_routed(x, top_w, top_e, w_gate_up, w_down)
        assert torch.equal(got, moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down))


# --------------------------------------------------------------------------------------------- GPU

# (E, k, D, I): the 30B shape and DeepSeek-V3.2's; under the interpreter a small one (FP8 needs 128s)
GPU_SHAPES = [(8, 2, 256, 128)] if SMALL else [(64, 4, 2048, 1536), (256, 8, 7168, 2048)]


def _gpu_case(gen, dev, E, k, D, I, N, fp8):
    """Inputs made on the device (22.5 GB of bf16 experts at E=256 would take minutes from a CPU RNG).
    FP8 experts are random e4m3 values with random positive block scales, as a checkpoint holds."""
    g = torch.Generator(device=dev).manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
    x = torch.randn(N, D, generator=g, device=dev).to(LOW)
    top_w, top_e = routing(gen, N, E, k, dev)
    randn = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=LOW)           # noqa: E731
    if not fp8:
        return x, top_w, top_e, randn(E, 2 * I, D).mul_(D ** -0.5), randn(E, D, I).mul_(I ** -0.5), {}
    e4m3 = lambda *s: randn(*s).mul_(64).clamp_(-448, 448).to(torch.float8_e4m3fn)   # noqa: E731
    scale = lambda *s, fan_in: torch.rand(*s, generator=g, device=dev) * (2 / 64) * fan_in ** -0.5  # noqa: E731
    w_gate_up, w_down = e4m3(E, 2 * I, D), e4m3(E, D, I)
    scales = {"gate_up_scale_inv": scale(E, 2 * I // 128, D // 128, fan_in=D),
              "down_scale_inv": scale(E, D // 128, I // 128, fan_in=I)}
    return x, top_w, top_e, w_gate_up, w_down, scales


def _assert_replays_in_a_cuda_graph(run, top_w, top_e, new_w, new_e):
    """No host sync on the path: captured once, replayed on new routing, the same result as eager."""
    run()                                                                       # compile / warm up
    out = torch.empty_like(run())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(run())
    top_w.copy_(new_w)
    top_e.copy_(new_e)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run()), "the replay must follow the new routing like an eager call"


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "E{}k{}D{}I{}".format(*s))
def test_gather_and_grouped_paths_match_the_twin(dev, gen, shape, fp8):
    """Decode (1 and 8 tokens: the gather path "auto" picks on CUDA) and a prefill chunk (grouped only):
    each path against the twin; on CUDA "auto" is the gather path for few pairs and both paths replay
    in a CUDA graph (no host sync)."""
    E, k, D, I = shape
    for N in (1, 4) if SMALL else (1, 8, 512):
        x, top_w, top_e, w_gate_up, w_down, scales = _gpu_case(gen, dev, E, k, D, I, N, fp8)
        want = ref.ref_moe_routed(x, top_w, top_e, w_gate_up, w_down, **scales)
        for path in ("grouped", "gather") if N * k <= 128 else ("grouped",):
            run = lambda: moe.moe_routed(x, top_w, top_e, w_gate_up, w_down, path, **scales)  # noqa: E731
            got = run()
            assert got.shape == (N, D) and got.dtype == torch.float32
            tol = (1e-5 if SMALL else 1e-4) if path == "gather" else (1e-5 if LOW == torch.float32 else 2e-2)
            assert rel_err(got, want) < tol, f"{path} N={N}: {rel_err(got, want):.2e}"
            if dev.type == "cuda" and N == 8:
                # on copies of the routing: the replay check rewrites it in place, and the next path is
                # compared with `want`, made from this routing (done on the originals, it failed the gather
                # path at N=8 on the H200 at ff0d04a)
                tw, te = top_w.clone(), top_e.clone()
                replay = lambda: moe.moe_routed(x, tw, te, w_gate_up, w_down, path, **scales)  # noqa: E731
                _assert_replays_in_a_cuda_graph(replay, tw, te, *routing(gen, N, E, k, dev))
        if dev.type == "cuda" and N * k <= moe.GATHER_MAX_PAIRS:
            auto = moe.moe_routed(x, top_w, top_e, w_gate_up, w_down, **scales)
            assert torch.equal(auto, moe.moe_routed(x, top_w, top_e, w_gate_up, w_down, "gather", **scales)), \
                "auto must take the gather path for few token-expert pairs on CUDA"


@pytest.mark.gpu
def test_ragged_fp8_experts_take_the_grouped_path_on_device(dev, gen):
    """Tiny FP8 models (moe_inter_dim not a multiple of 128): the switch sends even one decode token to the
    FP8 grouped GEMM (kernels/moe_fp8.py), since the gather kernels assume 128-row blocks; moe_gather
    refuses them by name."""
    E, k, D, I = 6, 2, 200, 80
    g8, d8, scales, _ = ragged_checkpoint_experts(gen, E, D, I)
    g8, d8 = g8.to(dev), d8.to(dev)
    scales = {name: s.to(dev) for name, s in scales.items()}
    x = torch.randn(1, D, generator=gen).to(LOW).to(dev)
    top_w, top_e = routing(gen, 1, E, k, dev)
    kernels.use_triton(True)
    try:
        got = kernels.moe_routed(x, top_w, top_e, g8, d8, **scales)
    finally:
        kernels.use_triton(None)
    err = rel_err(got, ref.ref_moe_routed(x, top_w, top_e, g8, d8, **scales))
    assert err < (1e-5 if LOW == torch.float32 else 2e-2), f"{err:.2e}"
    with pytest.raises(ValueError, match="moe_inter_dim 80 .*use moe_grouped"):
        moe.moe_gather(x, top_w, top_e, g8, d8, **scales)


@pytest.mark.gpu
def test_switch_runs_the_gather_path_on_device(dev, gen):
    E, k, D, I = GPU_SHAPES[0]
    x, top_w, top_e, w_gate_up, w_down, _ = _gpu_case(gen, dev, E, k, D, I, 2, False)
    kernels.use_triton(True)
    try:
        got = kernels.moe_routed(x, top_w, top_e, w_gate_up, w_down)
    finally:
        kernels.use_triton(None)
    path = moe.resolved_moe_path("auto", dev, top_e.numel())
    assert path == ("gather" if dev.type == "cuda" else "grouped")
    assert torch.equal(got, moe.moe_routed(x, top_w, top_e, w_gate_up, w_down, path))
