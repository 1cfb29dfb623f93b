"""FP8 block-scaled checkpoints (DeepSeek-V3.2, GLM-5) kept FP8 in memory, against the same checkpoint
dequantised at load (the reference path).

What a user would notice: an FP8 checkpoint taking 2-4x the memory it should (weights dequantised), or
the FP8 model computing something else than its checkpoint says (a scale on the wrong block, gate and up
swapped, an expert stacked in the wrong row, a linear left out).

Tolerances:
  - with the FP8 GEMM's activation quantisation replaced by its weight-only twin (x @ dequantised w^T,
    monkeypatched), the kept model IS the dequantised model: logits equal bit for bit, through all 61
    layers of the DeepSeek-V3.2 shape;
  - with it (what runs), each FP8 linear's output against the dequantised linear's on the same input:
    relative Frobenius error < 0.06 (e4m3 rounds each activation by at most 2^-4 relative, ~2.5 % rms;
    ~3-4 % seen on these tiny widths); routed experts (the weights dequantised per call, activations
    not quantised) < 1e-5. The whole 61-layer forward is not compared with activation quantisation on:
    random-weight stacks this deep are chaotic (a 1e-3 relative perturbation of the reference model's
    embeddings moves its final hidden states by ~0.7, measured), so only exactness or per-module bounds
    say anything.
"""
import json
import os
import secrets

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from indexcache import kernels
from indexcache.kernels import reference as ref
from indexcache.model import Capture
from indexcache.model.checkpoint import load_checkpoint, save_checkpoint, write_checkpoint
from indexcache.model.dsa import Experts
from indexcache.model.fp8 import FP8_CHECKPOINT_WEIGHTS, FP8BlockLinear, FP8Experts, quantize_checkpoint_tensors
from tiny_models import V32_FP8_CONFIG, write_v32_fp8_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny widths: intra-op threads only add synchronisation (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen(request):
    """Fresh inputs on every run; INDEXCACHE_TEST_SEED=<seed> replays one (as in tests/kernels)."""
    seed = int(os.environ.get("INDEXCACHE_TEST_SEED") or secrets.randbits(31))
    print(f"{request.node.name}: INDEXCACHE_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def weight_only(x, w, w_scale_inv, out_dtype=torch.bfloat16):
    """The FP8 GEMM's weight-only twin: no activation quantisation, so an FP8 model computes exactly what
    its dequantised twin does (same fp32 weights, same F.linear)."""
    return F.linear(x, ref.dequantize_weight_fp8_blocks(w, w_scale_inv, x.dtype)).to(out_dtype)


def spread_weight(gen, rows, cols):
    """Random weight whose 128x128 blocks differ in magnitude (2^-3..2^3): a scale from the wrong block shows."""
    mag = 2.0 ** torch.randint(-3, 4, (-(-rows // 128), -(-cols // 128)), generator=gen).float()
    w = torch.randn(rows, cols, generator=gen) * cols ** -0.5
    return w * mag.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


# --------------------------------------------------------------------------------------------- module


def test_fp8_linear_runs_the_block_scaled_gemm_of_its_weight(gen):
    w8, scale = ref.quantize_weight_fp8_blocks(spread_weight(gen, 300, 200))   # ragged: 3 x 2 blocks
    linear = FP8BlockLinear(200, 300)
    with torch.no_grad():
        linear.weight.copy_(w8)
        linear.weight_scale_inv.copy_(scale)
    x = torch.randn(2, 5, 200, generator=gen)
    y = linear(x)
    assert y.shape == (2, 5, 300) and y.dtype == torch.float32
    assert torch.equal(y, ref.ref_fp8_block_linear(x, w8, scale, torch.float32))
    dense = F.linear(x, ref.dequantize_weight_fp8_blocks(w8, scale))
    assert torch.equal(linear.dequantized(), ref.dequantize_weight_fp8_blocks(w8, scale))
    assert 1e-4 < rel_err(y, dense) < 0.06, "only the 1x128 activation quantisation differs"
    assert linear(x.bfloat16()).dtype == torch.bfloat16
    assert linear.weight.element_size() == 1 and not linear.weight.requires_grad


def test_module_to_dtype_keeps_fp8_weights_and_fp32_scales(gen):
    w8, scale = ref.quantize_weight_fp8_blocks(spread_weight(gen, 130, 64))
    scale = scale * (1 + 2 ** -12)                  # not representable in bf16: a cast would round it
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), FP8BlockLinear(64, 130))
    with torch.no_grad():
        model[1].weight.copy_(w8)
        model[1].weight_scale_inv.copy_(scale)
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16, "the float layers still convert"
    assert model[1].weight.dtype == torch.float8_e4m3fn and torch.equal(model[1].weight.float(), w8.float())
    assert model[1].weight_scale_inv.dtype == torch.float32 and torch.equal(model[1].weight_scale_inv, scale)


# --------------------------------------------------------------------------------------------- loader


@pytest.fixture
def fp8_checkpoint(tmp_path, make_model):
    """The tiny MLA model saved as an FP8 checkpoint (every weight DeepSeek-V3.2 stores in e4m3, with its
    weight_scale_inv); returns (path, file tensors)."""
    model = make_model("mla")
    save_checkpoint(model, tmp_path / "float")
    tensors = quantize_checkpoint_tensors(load_file(tmp_path / "float" / "model.safetensors"))
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    return write_checkpoint(tmp_path / "fp8", config, tensors), tensors


def test_fp8_checkpoint_weights_stay_fp8_in_memory(fp8_checkpoint):
    path, tensors = fp8_checkpoint
    model, _ = load_checkpoint(path)
    kept, _ = load_checkpoint(path, fp8="keep")
    assert model.load_stats["fp8"] == "keep"
    layers = model.model.layers
    for module in (layers[0].self_attn.q_a_proj, layers[0].self_attn.q_b_proj, layers[0].self_attn.o_proj,
                   layers[0].self_attn.kv_a_proj_with_mqa, layers[0].self_attn.indexer.wq_b,
                   layers[0].self_attn.indexer.wk, layers[0].mlp.down_proj, layers[1].mlp.shared_experts.up_proj):
        assert isinstance(module, FP8BlockLinear)
    assert isinstance(layers[1].mlp.experts, FP8Experts)
    assert layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32, "absorbed MLA: dequantised at load"
    assert layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32   # not FP8 in V3.2 either
    # the bytes of the files, in place: a dense weight, an expert's up rows and their block scales
    assert torch.equal(layers[0].self_attn.q_b_proj.weight.view(torch.uint8),
                       tensors["model.layers.0.self_attn.q_b_proj.weight"].view(torch.uint8))
    experts, inter = layers[2].mlp.experts, model.args.moe_inter_dim
    assert torch.equal(experts.gate_up_proj[5, inter:].view(torch.uint8),
                       tensors["model.layers.2.mlp.experts.5.up_proj.weight"].view(torch.uint8))
    assert torch.equal(experts.gate_up_proj_scale_inv[5, 1:], tensors["model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"])
    assert torch.equal(experts.down_proj_scale_inv[7], tensors["model.layers.2.mlp.experts.7.down_proj.weight_scale_inv"])
    stats = model.load_stats
    dequantized, _ = load_checkpoint(path, fp8="dequantize")
    assert stats["weights_mib"] < 0.5 * stats["weights_mib_dequantized"]
    assert stats["weights_mib_dequantized"] == pytest.approx(dequantized.load_stats["weights_mib"])
    assert dequantized.load_stats["fp8_weights_mib"] == 0
    assert kept.load_stats["weights_mib"] == stats["weights_mib"]


def test_fp8_kept_model_is_the_dequantised_model(fp8_checkpoint, monkeypatch):
    path, _ = fp8_checkpoint
    kept, _ = load_checkpoint(path)
    dequantized, _ = load_checkpoint(path, fp8="dequantize")
    x = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp8_logits, want = kept(x), dequantized(x)
        monkeypatch.setattr(kernels, "fp8_block_linear", weight_only)
        assert torch.equal(kept(x), want)
        assert not torch.equal(fp8_logits, want), "what runs quantises the activations (1x128 blocks)"


@pytest.mark.parametrize("naming", ["hf", "deepseek"])
def test_fp8_model_saves_back_to_the_checkpoint_it_came_from(fp8_checkpoint, tmp_path, naming):
    path, tensors = fp8_checkpoint
    model, _ = load_checkpoint(path)
    save_checkpoint(model, tmp_path / "again", naming=naming)
    saved = load_file(tmp_path / "again" / "model.safetensors")
    if naming == "hf":
        dequantised_at_load = {n for n in tensors if ".kv_b_proj." in n}
        assert set(saved) == set(tensors) - {n for n in dequantised_at_load if n.endswith("_scale_inv")}
        for name in set(tensors) - dequantised_at_load:
            assert torch.equal(saved[name].view(torch.uint8), tensors[name].view(torch.uint8)), name
    else:   # DeepSeek's inference/ names: `.scale` for weight_scale_inv
        assert saved["layers.1.ffn.experts.3.w3.weight"].dtype == torch.float8_e4m3fn
        assert "layers.1.ffn.experts.3.w3.scale" in saved and "layers.0.attn.indexer.wq_b.scale" in saved
    again, _ = load_checkpoint(tmp_path / "again")
    x = torch.randint(2, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_fp8_option_is_checked_and_mixed_experts_are_refused(fp8_checkpoint, tmp_path):
    path, tensors = fp8_checkpoint
    with pytest.raises(ValueError, match="fp8='fp16': use 'keep'"):
        load_checkpoint(path, fp8="fp16")
    config = json.loads((path / "config.json").read_text())
    mixed = dict(tensors)
    name = "model.layers.3.mlp.experts.2.down_proj.weight"
    mixed[name] = ref.dequantize_weight_fp8_blocks(mixed[name], mixed.pop(name + "_scale_inv"))
    write_checkpoint(tmp_path / "mixed", config, mixed)
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.experts: 23 of the 24 routed expert matrices are FP8"):
        load_checkpoint(tmp_path / "mixed")
    load_checkpoint(tmp_path / "mixed", fp8="dequantize")


# --------------------------------------------------------------------------------------------- V3.2


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    """The DeepSeek-V3.2-shaped synthetic FP8 checkpoint, loaded kept and dequantised (fp32, CPU)."""
    path = tmp_path_factory.mktemp("v32")
    stored = write_v32_fp8_checkpoint(path)
    kept, pattern = load_checkpoint(path)
    dequantized, _ = load_checkpoint(path, fp8="dequantize")
    return path, stored, kept, dequantized, pattern


def test_v32_synthetic_checkpoint_has_the_release_layout(v32):
    path, stored, _, _, _ = v32
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index) == 92425, "DeepSeek-V3.2's index lists 92,425 tensors (61 layers + 1 MTP, 256 experts)"
    fp8 = {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == {n for n in stored if FP8_CHECKPOINT_WEIGHTS.match(n)}
    for name in fp8:
        rows, cols = stored[name].shape
        scale = stored[name + "_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (-(-rows // 128), -(-cols // 128)), name
        assert index[name] == index[name + "_scale_inv"], "a weight and its scale share a shard"
        assert torch.equal(scale, 2.0 ** torch.log2(scale).round()), "ue8m0: power-of-two scales"
    assert stored["model.layers.4.mlp.gate.weight"].dtype == torch.bfloat16
    assert stored["model.layers.4.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    assert stored["model.layers.61.eh_proj.weight"].dtype == torch.bfloat16        # the MTP layer
    with safe_open(str(path / index["model.layers.0.self_attn.indexer.wq_b.weight"]), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.indexer.wq_b.weight_scale_inv").get_shape() == [8, 1]


def test_v32_loads_with_fp8_kept_and_reports_both_memories(v32):
    _, stored, kept, dequantized, pattern = v32
    args = kept.args
    assert (args.n_layers, args.first_k_dense, args.n_routed_experts, args.n_activated_experts) == (61, 3, 256, 8)
    assert (args.n_expert_groups, args.n_limited_groups, args.index_n_heads, args.index_topk) == (8, 4, 64, 2048)
    assert args.rope_factor == 40 and pattern == "F" * 61
    assert sum(isinstance(m, FP8Experts) for m in kept.modules()) == 58
    n_linear = sum(isinstance(m, FP8BlockLinear) for m in kept.modules())
    n_fp8_files = sum(1 for n, t in stored.items() if t.dtype == torch.float8_e4m3fn and n.startswith("model.layers.")
                      and int(n.split(".")[2]) < 61 and ".experts." not in n and ".kv_b_proj." not in n)
    assert n_linear == n_fp8_files == 61 * 6 + 3 * 3 + 58 * 3      # attention + indexer, dense MLP, shared expert
    stats = kept.load_stats
    fp8_bytes = sum(t.numel() for n, t in stored.items() if t.dtype == torch.float8_e4m3fn
                    and int(n.split(".")[2]) < 61 and ".kv_b_proj." not in n)
    assert stats["fp8_weights_mib"] * 2 ** 20 > fp8_bytes                      # e4m3 bytes + their fp32 scales
    assert stats["weights_mib"] < stats["weights_mib_dequantized"] / 3          # fp32 reference: 4 bytes each
    assert stats["weights_mib_dequantized"] == pytest.approx(dequantized.load_stats["weights_mib"])


def test_v32_fp8_forward_is_the_reference_forward(v32, monkeypatch):
    """All 61 layers: the FP8-kept model with the GEMM's weight-only twin equals the dequantised model
    (plain reference kernels) bit for bit; the indexer scores of every F layer too."""
    _, _, kept, dequantized, _ = v32
    x = torch.randint(2, V32_FP8_CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    kernels.use_triton(False)
    monkeypatch.setattr(kernels, "fp8_block_linear", weight_only)
    try:
        with torch.no_grad():
            got, want = Capture(attention=False, layers={0, 30, 60}), Capture(attention=False, layers={0, 30, 60})
            assert torch.equal(kept(x, capture=got), dequantized(x, capture=want))
    finally:
        kernels.use_triton(None)
    for layer in (0, 30, 60):
        assert torch.equal(got.scores[layer], want.scores[layer])


def test_v32_fp8_modules_match_their_dequantised_twins_on_the_reference_activations(v32):
    """What runs (activations quantised per 1x128 block): every FP8 linear and every layer's FP8 experts,
    fed the inputs their dequantised twins saw in the reference forward."""
    _, _, kept, dequantized, _ = v32
    fp8_modules = {name: m for name, m in kept.named_modules() if isinstance(m, (FP8BlockLinear, FP8Experts))}
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args, out)))
             for name, m in dequantized.named_modules() if name in fp8_modules]
    x = torch.randint(2, V32_FP8_CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            dequantized(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen) == set(fp8_modules)
    linear_errors = []
    with torch.no_grad():
        for name, (args, want) in seen.items():
            got = fp8_modules[name](*args)
            if isinstance(fp8_modules[name], FP8Experts):
                assert isinstance(dequantized.get_submodule(name), Experts)
                assert rel_err(got, want) < 1e-5, name
            else:
                linear_errors.append((rel_err(got, want), name))
    assert max(linear_errors)[0] < 0.06, max(linear_errors)
    assert min(linear_errors)[0] > 1e-3, "the activations are quantised"
