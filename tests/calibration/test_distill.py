"""Training-aware distillation: the multi-layer loss trains each F indexer toward its served layers."""
import json

import pytest
import torch

from indexcache import cli
from indexcache.model.checkpoint import load_checkpoint
from indexcache.offline.distill import (centroid_distill_loss, dense_targets, distill, multi_layer_distill_loss,
                                served_layers)


def random_attention(shape, visible, generator):
    logits = torch.randn(shape, generator=generator) * 2
    return logits.masked_fill(~visible, float("-inf")).softmax(-1)


@pytest.mark.parametrize("served", [1, 2, 4])
def test_gradient_of_the_multi_layer_loss_equals_the_centroid_form(served):
    g = torch.Generator().manual_seed(served)
    B, T, S = 2, 7, 7
    visible = torch.arange(S)[None, None, :] <= torch.arange(T)[None, :, None]   # causal
    visible = visible.expand(B, T, S)
    attention = [random_attention((B, T, S), visible, g) for _ in range(served)]
    rows = torch.ones(B, T, dtype=torch.bool)
    rows[1, 5:] = False  # padding rows do not count
    scores = (torch.randn(B, T, S, generator=g) * 3).masked_fill(~visible, float("-inf")).requires_grad_()
    multi = multi_layer_distill_loss(scores, attention, rows)
    (grad_multi,) = torch.autograd.grad(multi, scores)
    centroid = centroid_distill_loss(scores, attention, rows)
    (grad_centroid,) = torch.autograd.grad(centroid, scores)
    assert torch.isfinite(grad_multi).all()
    torch.testing.assert_close(grad_multi, grad_centroid, rtol=1e-5, atol=1e-7)
    # the gradient is not trivially zero, and padding rows get none
    assert grad_multi[rows].abs().sum() > 1e-3 and grad_multi[~rows].abs().sum() == 0
    # the losses differ by the (score-independent) spread of the served layers around their centroid
    assert multi.item() >= centroid.item() - 1e-6
    if served == 1:
        assert multi.item() == pytest.approx(centroid.item(), rel=1e-6)


def test_loss_is_zero_when_the_indexer_matches_the_centroid():
    g = torch.Generator().manual_seed(0)
    visible = torch.ones(1, 4, 5, dtype=torch.bool)
    p = random_attention((1, 4, 5), visible, g)
    assert float(multi_layer_distill_loss(p.log(), [p, p])) == pytest.approx(0.0, abs=1e-6)


def test_served_layers_follow_the_pattern():
    assert served_layers("FSSFFS") == {0: [0, 1, 2], 3: [3], 4: [4, 5]}


def test_distillation_trains_only_the_f_indexers_and_keeps_more_served_attention(family, make_model, make_tokens):
    model = make_model(family, n_layers=6)
    pattern = "FSSFSS"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = make_tokens(16, lengths=(24, 40), seed=1)
    report = distill(model, pattern, tokens[4:], tokens[:4], steps=30, lr=3e-3, batch_size=4)
    assert report.heldout_loss_after < report.heldout_loss_before * 0.9
    assert sum(report.mass_kept_after.values()) > sum(report.mass_kept_before.values())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("model.layers.0.self_attn.indexer.", "model.layers.3.self_attn.indexer."))
                           for k in changed)
    assert not any(p.requires_grad for p in model.parameters())


def test_distillation_of_an_fp8_checkpoint_trains_float_indexers_and_keeps_the_rest_fp8(tmp_path, make_model,
                                                                                          make_tokens):
    """An FP8 checkpoint loads with its weights kept e4m3; the F layers' indexers it trains become float
    (e4m3 cannot take optimizer steps), everything else stays as it came and saves back FP8."""
    from safetensors.torch import load_file

    from indexcache.model.checkpoint import save_checkpoint, write_checkpoint
    from indexcache.model.fp8 import FP8BlockLinear, quantize_checkpoint_tensors
    save_checkpoint(make_model("mla", n_layers=6), tmp_path / "float")
    tensors = quantize_checkpoint_tensors(load_file(tmp_path / "float" / "model.safetensors"))
    write_checkpoint(tmp_path / "fp8", json.loads((tmp_path / "float" / "config.json").read_text()), tensors)
    model, _ = load_checkpoint(tmp_path / "fp8")
    assert isinstance(model.model.layers[0].self_attn.indexer.wq_b, FP8BlockLinear)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = make_tokens(12, lengths=(24, 40), seed=1)
    report = distill(model, "FSSFSS", tokens[4:], tokens[:4], steps=12, lr=3e-3, batch_size=4)
    assert report.heldout_loss_after < report.heldout_loss_before
    for layer in (0, 3):
        wq_b = model.model.layers[layer].self_attn.indexer.wq_b
        assert type(wq_b) is torch.nn.Linear and wq_b.weight.dtype == torch.float32
        assert not torch.equal(wq_b.weight, before[f"model.layers.{layer}.self_attn.indexer.wq_b.weight"].float())
    assert isinstance(model.model.layers[1].self_attn.indexer.wq_b, FP8BlockLinear), "S layers' indexers untouched"
    unchanged = {k for k, v in model.state_dict().items()
                 if k in before and v.dtype == before[k].dtype and torch.equal(v.float(), before[k].float())}
    assert {k for k in before if ".indexer." not in k} <= unchanged
    save_checkpoint(model, tmp_path / "distilled")
    saved = load_file(tmp_path / "distilled" / "model.safetensors")
    assert saved["model.layers.0.self_attn.indexer.wq_b.weight"].dtype == torch.float32
    assert "model.layers.0.self_attn.indexer.wq_b.weight_scale_inv" not in saved
    assert saved["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert saved["model.layers.2.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    again, _ = load_checkpoint(tmp_path / "distilled")
    tokens = torch.tensor([tokens[0][:20]])
    with torch.no_grad():
        assert torch.equal(again(tokens, pattern="FSSFSS"), model(tokens, pattern="FSSFSS"))


def test_dense_targets_record_every_layer_and_the_f_inputs(make_model, make_tokens):
    model = make_model("gqa", n_layers=4)
    tokens = torch.tensor(make_tokens(2, lengths=(10, 10)))
    targets = dense_targets(model, tokens, torch.tensor([10, 6]), "FSFS")
    assert sorted(targets.attention) == [0, 1, 2, 3] and sorted(targets.attn_inputs) == [0, 2]
    assert torch.allclose(targets.attention[1].sum(-1), torch.ones(2, 10))
    assert targets.rows.tolist()[1] == [True] * 6 + [False] * 4


def test_distill_cli_writes_a_checkpoint_that_serves_the_pattern(tmp_path, checkpoint_dir, make_tokens,
                                                                 write_samples, capsys):
    ckpt, model = checkpoint_dir
    samples = write_samples([{"token_ids": t, "tokenizer": "ckpt"} for t in make_tokens(10, seed=2)])
    out = tmp_path / "distilled"
    pattern = "FSSSFSSS"
    assert cli.main(["distill", "--model", str(ckpt), "--pattern", pattern, "--samples", str(samples),
                     "--out", str(out), "--steps", "3", "--heldout-fraction", "0.2", "--no-progress",
                     "--drop-shared-indexers", "--threads", "1"]) == 0
    loaded, run_pattern = load_checkpoint(out)
    assert run_pattern == pattern and loaded.indexer_layers == {0, 4}
    report = json.loads((out / "distill_report.json").read_text())
    assert len(report["train_losses"]) == 3 and set(report["mass_kept_after"]) == {"0", "4"}
    assert "held-out multi-layer KL" in capsys.readouterr().out
    assert cli.main(["distill", "--model", str(ckpt), "--pattern", "SFFFFFFF", "--samples", str(samples),
                     "--out", str(tmp_path / "x")]) == 2
    assert "must start with 'F'" in capsys.readouterr().err
