"""Weight-only int8 (model/int8.py, `quantization="int8"` of the CPU fast forward) against its twins.

- `int8_linear` (the int8 kernel for <= INT8_KERNEL_MAX_ROWS rows, the dequantised GEMM above) against
  `ref_int8_linear` (dequantise in fp32, multiply in fp32) on fresh random inputs. Tolerance, relative to
  the output's largest magnitude: fp32 1e-5 (summation order only; seen 5e-7); bf16 2^-6, two bf16 ulps
  near the largest output (one ulp is 2^-8..2^-7 of a value; the twin rounds once, the kernel rounds its
  bf16 scale and its output, the dequantised path its weight and its output; seen 7.1e-3).
- Quantisation itself: every weight within half a step (scale / 2) of q * scale, per output channel.
- The int8 fast forward against the reference forward of dsa.py on a model whose linear weights and LM
  head are replaced by their dequantised int8 values (the embedding unchanged, as the fast path keeps it):
  fp32 logits within 1e-4 over the engine-like script of test_cpu_forward (prefill chunks through the
  dequantised GEMM, 1- and 3-row decode steps through the int8 kernel), and the same greedy tokens
  through the engine.
"""
import pytest
import torch

from indexcache.engine import Engine
from indexcache.model.cpu_forward import CPUFastForward
from indexcache.model.dsa import KVCache
from indexcache.model.int8 import (INT8_KERNEL_MAX_ROWS, dequantize_linears, int8_linear, quantize_int8,
                                   ref_int8_linear)

from cpu_forward_scripts import PATTERN, engine_like_steps, greedy_engine_outputs, run_script


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -6)])
def test_int8_linear_matches_its_twin(dtype, rel):
    gen = torch.Generator().manual_seed(0)
    for n, k in [(96, 64), (257, 160)]:
        w = quantize_int8((torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)).to(dtype))
        for rows in (1, 3, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 37):
            x = torch.randn(2, rows, k, generator=gen).to(dtype)[0]                 # (rows, K)
            got, want = int8_linear(x, w), ref_int8_linear(x, w)
            assert got.dtype == dtype and got.shape == (rows, n)
            err = (got.float() - want.float()).abs().max()
            assert err <= rel * want.float().abs().max(), f"{n}x{k}, {rows} rows: error {err}"


def test_quantisation_is_within_half_a_step_per_channel():
    gen = torch.Generator().manual_seed(1)
    # channels of very different ranges: one scale per output channel must follow each
    w = torch.randn(64, 48, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0                                                                       # an all-zero channel
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.q.abs().max() == 127
    step = q.scale.float()[:, None]
    assert ((q.q.float() * step - w).abs() <= step / 2 + 1e-12).all()
    assert (q.dequantized[5] == 0).all()
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        quantize_int8(torch.randn(3, 4, 5))


def test_int8_fast_forward_matches_the_dequantised_reference(make_model):
    torch.manual_seed(1)
    model = make_model("gqa", seed=3, projection_std=0.2, index_topk=8)
    fast = CPUFastForward(model, quantization="int8")
    twin = dequantize_linears(make_model("gqa", seed=3, projection_std=0.2, index_topk=8))
    plain = CPUFastForward(make_model("gqa", seed=3, projection_std=0.2, index_topk=8))
    steps = engine_like_steps(torch.Generator().manual_seed(7), model.args.vocab_size)
    caches = [KVCache(model.args, 3, 64, PATTERN) for _ in range(3)]

    def ref(tokens, starts, slots, at):
        with torch.no_grad():
            return twin(tokens, start_pos=starts, cache=caches[0], slots=slots, pattern=PATTERN, logits_at=at)

    got = run_script(lambda tk, st, sl, at: fast(tk, st, sl, PATTERN, caches[1], at), steps)
    want = run_script(ref, steps)
    unquantised = run_script(lambda tk, st, sl, at: plain(tk, st, sl, PATTERN, caches[2], at), steps)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0, msg=f"step {i}: logits differ")
    # and int8 is a real change of the weights: the unquantised model's logits differ by more than that
    assert max(float((u - w).abs().max()) for u, w in zip(unquantised, want)) > 1e-3


def test_int8_engine_greedy_tokens_match_the_dequantised_reference(make_model):
    fast = greedy_engine_outputs(make_model("gqa", seed=5, projection_std=0.2), quantization="int8")[1]
    twin = greedy_engine_outputs(dequantize_linears(make_model("gqa", seed=5, projection_std=0.2)),
                                 cpu_fast_path=False)[1]
    assert all(len(o) == 12 for o in fast)
    assert fast == twin


def test_int8_refuses_what_it_cannot_do(make_model):
    model = make_model("gqa", seed=5)
    with pytest.raises(ValueError, match="quantization must be one of none, int8"):
        Engine(model, pattern=PATTERN, max_batch_size=1, max_model_len=32, quantization="int4")
    with pytest.raises(ValueError, match="cpu_fast_path=False"):
        Engine(model, pattern=PATTERN, max_batch_size=1, max_model_len=32, quantization="int8", cpu_fast_path=False)
    with pytest.raises(ValueError, match="contiguous slot KV cache"):
        Engine(model, pattern=PATTERN, max_batch_size=1, max_model_len=32, quantization="int8", kv_cache_tokens=64)
    with pytest.raises(ValueError, match="GQA"):
        Engine(make_model("mla"), max_batch_size=1, max_model_len=32, quantization="int8")
