"""The CPU fast forward (model/cpu_forward.py) against its twin, the reference forward of dsa.py, on fresh
random GQA models: the same logits and the same KV cache contents, through what the engine runs (prefill
chunks of one request, batched decode across slots), short of top-k (dense) and past it (the indexer
selects); and the same greedy tokens through the engine.

Tolerances: fp32 logits within 1e-4 absolute (summation order only; seen: identical), top-k 8 so that
the script crosses it. bf16 logits within 0.1 absolute for logits of magnitude ~2 (seen: up to 0.06;
8 mantissa bits, and the fast path attends in bf16 where the reference upcasts to fp32), with top-k above
the script's context: past top-k such a rounding difference can flip a near-tie selection, a discrete
change no tolerance covers, so the selection itself is checked in fp32 only. Greedy tokens identical in fp32.
"""
import pytest
import torch

from indexcache.engine import Engine
from indexcache.model.cpu_forward import CPUFastForward, supports
from indexcache.model.dsa import KVCache

from cpu_forward_scripts import PATTERN, engine_like_steps, greedy_engine_outputs, run_script

@pytest.mark.parametrize("dtype,topk,atol", [(torch.float32, 8, 1e-4), (torch.bfloat16, 64, 0.1)])
def test_fast_forward_matches_reference(make_model, dtype, topk, atol):
    torch.manual_seed(1)
    model = make_model("gqa", seed=3, projection_std=0.2, index_topk=topk).to(dtype)
    fast = CPUFastForward(model)
    steps = engine_like_steps(torch.Generator().manual_seed(7), model.args.vocab_size)
    caches = [KVCache(model.args, 3, 64, PATTERN, dtype=dtype) for _ in range(2)]

    def ref(tokens, starts, slots, at):
        with torch.no_grad():
            return model(tokens, start_pos=starts, cache=caches[0], slots=slots, pattern=PATTERN, logits_at=at)

    got = run_script(lambda tk, st, sl, at: fast(tk, st, sl, PATTERN, caches[1], at), steps)
    want = run_script(ref, steps)
    spread = max(float(w.max() - w.min()) for w in want)
    assert spread > 2.0, "the random model's logits are too flat to tell the paths apart"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=f"step {i}: logits differ")
    # what later steps read, written at the same places: elementwise in fp32; in bf16 the error norm within
    # two bf16 ulps (2^-8) of the tensor's norm per layer below (seen: 0 at layer 0, then ~1.6 ulps per layer:
    # the attention rounds in bf16 here, in fp32 in the reference)
    for layer in range(model.args.n_layers):
        pairs = [(caches[1].layers[layer][n], caches[0].layers[layer][n]) for n in ("k", "v")]
        if PATTERN[layer] == "F":
            pairs.append((caches[1].indexer_k[layer], caches[0].indexer_k[layer]))
        for g, w in pairs:
            g, w = g.float(), w.float()
            assert w.norm() > 0
            if dtype == torch.float32:
                torch.testing.assert_close(g, w, atol=atol, rtol=0)
            else:
                assert (g - w).norm() <= 2 * 2 ** -8 * (layer + 1) * w.norm(), f"layer {layer}: cache differs"


def test_past_topk_the_indexer_selects(make_model):
    """Past top-k the fast forward must really select: with the indexer's selection replaced by every key
    (dense attention), its logits move away from the reference's."""
    model = make_model("gqa", seed=4, projection_std=0.3)
    tokens = torch.randint(0, model.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    at = torch.tensor([39])
    with torch.no_grad():
        sparse = model(tokens, cache=KVCache(model.args, 1, 64, PATTERN), slots=[0], pattern=PATTERN, logits_at=at)
        dense = model(tokens, cache=KVCache(model.args, 1, 64, PATTERN), slots=[0], pattern=PATTERN, logits_at=at,
                      attention="dense")
    fast = CPUFastForward(model)(tokens, [0], [0], PATTERN, KVCache(model.args, 1, 64, PATTERN), at)
    assert (sparse - dense).abs().max() > 1e-2
    torch.testing.assert_close(fast, sparse, atol=1e-4, rtol=0)


def test_engine_greedy_tokens_match(make_model):
    """Greedy generation through the engine, fast path on and off: the same tokens (fp32), with prompts
    short of top-k and past it, several requests decoded together."""
    model = make_model("gqa", seed=5, projection_std=0.2)
    outputs = []
    for fast_path in (True, False):
        engine, tokens = greedy_engine_outputs(model, cpu_fast_path=fast_path)
        assert (engine.cpu_fast is not None) == fast_path
        outputs.append(tokens)
    assert all(len(o) == 12 for o in outputs[0])
    assert outputs[0] == outputs[1]


def test_unsupported_models_are_refused(make_model):
    assert supports(make_model("gqa")) is None
    mla = make_model("mla")
    assert "GQA" in supports(mla)
    with pytest.raises(ValueError, match="cpu_fast_path=False"):
        CPUFastForward(mla)
    engine = Engine(mla, max_batch_size=1, max_model_len=32)   # auto: the reference path, no error
    assert engine.cpu_fast is None


def _recording_selections(fast: CPUFastForward) -> list:
    """Wrap fast._indexer to record every selection it returns (None while dense), as (B, T', S) bool whether it
    came as a bool selection or as the additive mask (B, 1, T', S) a prefill chunk's attention adds."""
    calls, inner = [], fast._indexer

    def indexer(*args, **kwargs):
        selected = inner(*args, **kwargs)
        if selected is None:
            calls.append(None)
        else:
            calls.append(selected.clone() if selected.dtype == torch.bool else (selected[:, 0] == 0))
        return selected

    fast._indexer = indexer
    return calls


@pytest.mark.parametrize("topk,gemv_max_rows,amx_min_rows", [(64, 8, 17), (64, 2, 17), (64, 8, 1), (8, 8, 1)])
def test_decode_kernels_match_pytorch_path(make_model, topk, gemv_max_rows, amx_min_rows):
    """Decode positions through the C kernels (kernels/cpu_decode.py: streaming GEMV, fused RMSNorm, RoPE + cache
    write, attention, SiLU-multiply, residual adds) against the same fast forward's PyTorch path, their twin,
    through the engine-like script (prefill chunks of 3-9 tokens: their projections on AMX tiles where the CPU
    has them, RMSNorm, RoPE + cache write and SiLU-multiply in C, attention and the indexer the PyTorch path in
    both; decode steps of 1, 2 and 3
    rows; with gemv_max_rows 2 the 3-row steps take F.linear + in-place adds; amx_min_rows 1: every step on AMX
    tiles where the CPU has them (the LM head of 97 rows, not whole tiles, on the AVX-512 GEMV); 17: the
    AVX-512 GEMV only): logits within 0.1 absolute (seen: up to 0.05; bf16 rounding differences compounding over the layers,
    as in the bf16 reference comparison above). Top-k 64: every step dense. Top-k 8: decode steps past top-k,
    where attention reads the indexer's selection; one bf16 rounding can flip a near-tie selection (seen: one
    key swapped, logits then differ by ~0.5), so steps whose selections differ are left out of the logit
    comparison and at least four past-top-k decode steps must be compared. Greedy tokens through the engine
    (several requests decoding together) are the same at top-k 64; at top-k 8 a flipped selection changes the
    tiny random model's next token and every token after it (seen), so greedy equality is checked dense only."""
    from indexcache.kernels import cpu_decode
    if cpu_decode.available() is not None and "lacks" in cpu_decode.available():
        pytest.skip(f"the decode kernels do not run on this CPU: {cpu_decode.available()}")
    assert cpu_decode.available() is None, cpu_decode.available()   # the CPU has the features: they must build
    model = make_model("gqa", seed=6, projection_std=0.2, index_topk=topk).to(torch.bfloat16)
    fast, twin = CPUFastForward(model, decode_kernels=True), CPUFastForward(model, decode_kernels=False)
    assert fast.decode_kernels and not twin.decode_kernels
    fast.gemv_max_rows, fast.amx_min_rows = gemv_max_rows, amx_min_rows
    if amx_min_rows <= 16 and cpu_decode.amx_available() is None:
        assert fast.amx is not None and fast.amx[0][0] is not None   # the projections really run on AMX
    selections = [_recording_selections(fast), _recording_selections(twin)]
    steps = engine_like_steps(torch.Generator().manual_seed(8), model.args.vocab_size)
    steps += [(torch.randint(0, model.args.vocab_size, (2, 1), generator=torch.Generator().manual_seed(9)),
               [20, 12], [2, 0])]                                   # a two-row decode step
    assert {tk.shape[0] for tk, _, _ in steps if tk.shape[1] == 1} >= {1, 2, 3}
    caches = [KVCache(model.args, 3, 64, PATTERN, dtype=torch.bfloat16) for _ in range(2)]
    got = run_script(lambda tk, st, sl, at: fast(tk, st, sl, PATTERN, caches[0], at), steps)
    want = run_script(lambda tk, st, sl, at: twin(tk, st, sl, PATTERN, caches[1], at), steps)
    assert max(float(w.max() - w.min()) for w in want) > 2.0
    per_step = PATTERN.count("F")
    compared_sparse = 0
    for i, (g, w) in enumerate(zip(got, want)):
        mine, theirs = (calls[i * per_step:(i + 1) * per_step] for calls in selections)
        if any((a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(mine, theirs)):
            continue   # a near-tie selection flipped: a discrete change no tolerance covers
        torch.testing.assert_close(g, w, atol=0.1, rtol=0, msg=f"step {i}: logits differ")
        past = steps[i][0].shape[1] == 1 and any(a is not None for a in mine)
        compared_sparse += past
    assert compared_sparse >= (4 if topk == 8 else 0)
    if topk == 8 or gemv_max_rows != 8 or amx_min_rows != 1:   # greedy: the engine's defaults, dense
        return
    outputs = []
    for kernels in (True, False):
        engine, tokens = greedy_engine_outputs(model, cpu_decode_kernels=kernels)
        assert engine.cpu_fast.decode_kernels == kernels
        outputs.append(tokens)
    assert all(len(o) == 12 for o in outputs[0])
    assert outputs[0] == outputs[1]


def test_decode_kernels_refuse_a_cache_they_cannot_read(make_model):
    """The kernels index the KV cache by raw pointers: a cache in another dtype is refused with a clear error
    before any kernel runs, not read as bf16."""
    from indexcache.kernels import cpu_decode

    if cpu_decode.available() is not None and "lacks" in cpu_decode.available():
        pytest.skip(f"the decode kernels do not run on this CPU: {cpu_decode.available()}")
    assert cpu_decode.available() is None, cpu_decode.available()   # the CPU has the features: they must build
    model = make_model("gqa", seed=6).to(torch.bfloat16)
    fast = CPUFastForward(model, decode_kernels=True)
    cache = KVCache(model.args, 1, 64, PATTERN, dtype=torch.float32)
    with pytest.raises(ValueError, match="contiguous bf16"):
        fast(torch.tensor([[3]]), [0], [0], PATTERN, cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous bf16"):   # a prefill chunk: RoPE writes the cache in C too
        fast(torch.tensor([[3, 4, 5]]), [0], [0], PATTERN, cache, torch.tensor([2]))


def test_packed_prefill_matches_one_forward_per_chunk(make_model):
    """Several requests' prefill chunks in one forward (`prefill_packed`: one GEMM over all their tokens, attention
    per chunk) against the same fast forward run on each chunk alone, its twin: two fresh prompts and one chunk
    after a cached prefix, in slots 2, 0 and 1. Logits within 0.1 absolute (bf16; the packed GEMMs run in
    oneDNN, the lone chunks' on AMX tiles: another summation order), and every K/V and indexer-key row the
    chunks wrote within two bf16 ulps of the tensor's norm per layer, as in the reference comparison above.
    A chunk that crosses top-k is refused (it needs the indexer's selection)."""
    from indexcache.kernels import cpu_decode
    if cpu_decode.available() is not None and "lacks" in cpu_decode.available():
        pytest.skip(f"the C kernels do not run on this CPU: {cpu_decode.available()}")
    model = make_model("gqa", seed=7, projection_std=0.2, index_topk=64).to(torch.bfloat16)
    fast = CPUFastForward(model, decode_kernels=True)
    gen = torch.Generator().manual_seed(17)
    ids = lambda n: torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist()
    prefix, chunks = ids(4), [(ids(5), 0, 2), (ids(12), 0, 0), (ids(6), 4, 1)]   # (tokens, start, slot)
    caches = [KVCache(model.args, 3, 64, PATTERN, dtype=torch.bfloat16) for _ in range(2)]
    for cache in caches:   # slot 1's cached prefix
        fast(torch.tensor([prefix]), [0], [1], PATTERN, cache, torch.tensor([3]))
    got = fast.prefill_packed(chunks, PATTERN, caches[0])
    want = torch.cat([fast(torch.tensor([t]), [s], [slot], PATTERN, caches[1], torch.tensor([len(t) - 1]))
                      for t, s, slot in chunks])
    assert got.shape == want.shape == (3, model.args.vocab_size) and got.dtype == torch.float32
    assert float(want.max() - want.min()) > 2.0
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)
    for layer in range(model.args.n_layers):
        names = [("k", caches[0].layers[layer]["k"], caches[1].layers[layer]["k"]),
                 ("v", caches[0].layers[layer]["v"], caches[1].layers[layer]["v"])]
        if PATTERN[layer] == "F":
            names.append(("indexer k", caches[0].indexer_k[layer], caches[1].indexer_k[layer]))
        for name, g, w in names:
            for _, s, slot in chunks:
                n = len(chunks[[c[2] for c in chunks].index(slot)][0])
                gs, ws = g[slot, : s + n].float(), w[slot, : s + n].float()
                assert ws.norm() > 0
                assert (gs - ws).norm() <= 2 * 2 ** -8 * (layer + 1) * ws.norm(), f"layer {layer} {name} slot {slot}"
    with pytest.raises(ValueError, match="within top-k"):
        fast.prefill_packed([(ids(10), 60, 0)], PATTERN, caches[0])


def test_engine_packs_short_prompts_into_one_prefill_forward(make_model):
    """Three short prompts submitted together: with the C kernels the engine's first step runs their prefill in
    one forward (then one decode forward); without them (the twin) one forward per prompt. The greedy tokens are
    the same either way (checked in test_decode_kernels_match_pytorch_path, whose engine packs too)."""
    from indexcache.engine.sampling import SamplingParams
    from indexcache.kernels import cpu_decode
    if cpu_decode.available() is not None and "lacks" in cpu_decode.available():
        pytest.skip(f"the C kernels do not run on this CPU: {cpu_decode.available()}")
    model = make_model("gqa", seed=6, projection_std=0.2, index_topk=64).to(torch.bfloat16)
    for kernels, prefill_forwards in ((True, 1), (False, 3)):
        engine = Engine(model, pattern=PATTERN, max_batch_size=4, max_model_len=64, chunk_size=64,
                        cpu_decode_kernels=kernels)
        for prompt in ([3, 4, 5], list(range(10, 30)), [7] * 11):
            engine.submit(prompt, SamplingParams(max_new_tokens=4, temperature=0.0), lambda chunk: None)
        engine.step()
        assert engine.forwards == prefill_forwards + 1, kernels   # + the step's decode forward
        assert all(len(r.output) == 2 for r in engine.running)


@pytest.mark.parametrize("topk,index_heads", [(64, 16), (8, 16), (8, 12)])
def test_decode_on_tiles_is_the_wrapped_decode_bit_for_bit(make_model, topk, index_heads):
    """`_decode_on_tiles` (projections on AMX tiles, kernels called straight through ctypes into reused
    buffers) against `_decode` through the kernels' Python wrappers: the same kernels on the same operands, so
    identical logits and caches, dense (top-k 64) and past top-k (8: the indexer selects). With 12 indexer
    heads an F layer's rows past top-k (q|k|v + indexer k|q|weights = 348) are not whole tiles: those
    projections take the AVX-512 GEMV in both, inside the direct loop."""
    from indexcache.kernels import cpu_decode
    if cpu_decode.amx_available() is not None:
        pytest.skip(f"no AMX here: {cpu_decode.amx_available()}")
    model = make_model("gqa", seed=6, projection_std=0.2, index_topk=topk, index_n_heads=index_heads).to(torch.bfloat16)
    fast, wrapped = CPUFastForward(model, decode_kernels=True), CPUFastForward(model, decode_kernels=True)
    assert fast.decode_on_tiles                                                        # the direct path runs
    assert (fast.layers[0].w_in.shape[0] % 16 != 0) == (index_heads == 12)             # F rows past top-k
    wrapped.decode_on_tiles = False                                                    # the wrappers' path
    steps = engine_like_steps(torch.Generator().manual_seed(8), model.args.vocab_size)
    caches = [KVCache(model.args, 3, 64, PATTERN, dtype=torch.bfloat16) for _ in range(2)]
    got = run_script(lambda tk, st, sl, at: fast(tk, st, sl, PATTERN, caches[0], at), steps)
    want = run_script(lambda tk, st, sl, at: wrapped(tk, st, sl, PATTERN, caches[1], at), steps)
    decode_steps = [i for i, (tk, _, _) in enumerate(steps) if tk.shape[1] == 1]
    assert len(decode_steps) >= 7
    for i in decode_steps:
        assert torch.equal(got[i], want[i]), f"step {i}"
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a["k"], b["k"]) and torch.equal(a["v"], b["v"])
