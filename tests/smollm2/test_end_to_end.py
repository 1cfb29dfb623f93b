"""The whole chain on a real (2-layer) SmolLM2 on CPU: convert -> train-indexer -> eval, a few hundred tokens."""
import json

import torch
from safetensors.torch import load_file

from indexcache.offline import evaluate, train_indexer


def test_convert_train_eval_chain(small_checkpoint, tmp_path):
    run = tmp_path / "run"
    argv = ["--model", str(small_checkpoint), "--out", str(run), "--steps", "12", "--seq-len", "192",
            "--lr", "1e-2", "--warmup", "2", "--checkpoint-every", "6", "--lm-dtype", "float32",
            "--device", "cpu", "--no-progress"]
    assert train_indexer.main_train(argv) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    history = [h["kl"] for h in manifest["kl_history"]]
    # Training lowers the KL: the mean of the last 3 steps is clearly below the first 3.
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3, history
    assert manifest["command"].startswith("indexcache train-indexer --model")
    assert "HotpotQA" in manifest["data"]["training"] and manifest["tokens_seen"] == 12 * 192
    trained = load_file(str(run / "indexer.safetensors"))
    assert sorted({k.split(".")[2] for k in trained}) == ["0", "1"]
    assert all(".self_attn.indexer." in k for k in trained)

    # The trained indexer installs into a fresh conversion (what `convert --indexer PATH` does).
    from indexcache.offline.smollm2 import convert_smollm2
    installed = convert_smollm2(tmp_path / "installed", num_layers=2, tokenizer=False,
                                indexer=run / "indexer.safetensors")
    cfg = json.loads((installed / "config.json").read_text())
    assert (cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_rope_head_dim"]) == (4, 32, 16)
    name = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert torch.equal(load_file(str(installed / "model.safetensors"))[name], trained[name].float())

    out = tmp_path / "eval"
    eval_argv = ["--model", str(small_checkpoint), "--out", str(out), "--indexer", str(run / "indexer.safetensors"),
                 "--contexts", "160", "--passkey-contexts", "160", "--topk", "16", "--pattern", "FS",
                 "--dtype", "float32", "--device", "cpu"]
    assert evaluate.main_eval(eval_argv) == 0
    result = json.loads((out / "eval.json").read_text())
    ppl = result["perplexity"]["160"]
    for variant in ("dense", "dsa_all_f", "indexcache"):
        for source in ("essays", "shakespeare"):
            assert ppl[variant][source] > 1.0 and ppl[variant][source] == ppl[variant][source]  # finite, not NaN
    # 2 of 30 layers make no language model (the final norm and head expect layer 30's output, so
    # perplexity is huge), but sparse attention over 16 keys must stay close to the same model dense.
    assert 0.5 < ppl["dsa_all_f"]["essays"] / ppl["dense"]["essays"] < 2
    assert result["passkey"]["dense"]["total"] == 3
    layers = result["indexer"]["per_layer"]
    assert [r["layer"] for r in layers] == [0, 1]
    # The trained indexer keeps more attention mass than 16 random keys of ~120 would (~13 %).
    assert result["indexer"]["indexer_topk_mass_mean"] > 0.3
    assert len(result["overlap"]["indexer"]["matrix"]) == 2
    assert (out / "overlap.png").stat().st_size > 1000 and (out / "eval.md").read_text().startswith("# Evaluation")


def test_resume_continues_where_it_stopped(small_checkpoint, tmp_path):
    run = tmp_path / "run"
    base = ["--model", str(small_checkpoint), "--out", str(run), "--seq-len", "96", "--warmup", "1",
            "--checkpoint-every", "2", "--lm-dtype", "float32", "--device", "cpu", "--no-progress"]
    assert train_indexer.main_train(base + ["--steps", "2"]) == 0
    first = load_file(str(run / "indexer.safetensors"))
    assert train_indexer.main_train(base + ["--steps", "4", "--resume"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert [h["step"] for h in manifest["kl_history"]][-1] == 4 and manifest["tokens_seen"] == 4 * 96
    resumed = load_file(str(run / "indexer.safetensors"))
    name = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert not torch.equal(first[name], resumed[name])
    state = torch.load(run / "train_state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["history"]) == 4


def test_bad_arguments_are_refused_with_the_flag_named(small_checkpoint, tmp_path, capsys):
    assert train_indexer.main_train(["--model", str(small_checkpoint), "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert train_indexer.main_train(["--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert evaluate.main_eval(["--model", str(small_checkpoint), "--out", str(tmp_path), "--topk", "0"]) == 2
    assert "--topk" in capsys.readouterr().err


def test_init_indexer_continues_from_earlier_weights(small_checkpoint, tmp_path):
    """--init-indexer (short-window weights continued on longer windows) starts where the earlier run ended:
    its first KL is the earlier run's, not the random initialisation's, and the manifest names the file."""
    base = ["--seq-len", "96", "--warmup", "1", "--lm-dtype", "float32", "--device", "cpu", "--no-progress",
            "--model", str(small_checkpoint)]
    assert train_indexer.main_train(base + ["--out", str(tmp_path / "a"), "--steps", "6", "--lr", "5e-3"]) == 0
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    init = tmp_path / "a" / "indexer.safetensors"
    assert train_indexer.main_train(base + ["--out", str(tmp_path / "b"), "--steps", "1", "--init-indexer", str(init)]) == 0
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert second["kl_first"] < first["kl_first"] - 0.05 * first["kl_first"]
    assert second["init_indexer"]["path"] == str(init) and len(second["init_indexer"]["sha256"]) == 64
    assert train_indexer.main_train(base + ["--out", str(tmp_path / "c"), "--init-indexer", str(tmp_path / "no")]) == 2


def test_layers_trains_only_the_named_layers(small_checkpoint, tmp_path):
    """--layers 1 (a targeted run on a weak layer): layer 1's indexer learns (its KL falls), every other
    indexer tensor comes out bit-identical to the starting file, and the manifest says which layers."""
    base = ["--seq-len", "96", "--warmup", "1", "--lm-dtype", "float32", "--device", "cpu", "--no-progress",
            "--model", str(small_checkpoint), "--artifact-dtype", "float32"]
    assert train_indexer.main_train(base + ["--out", str(tmp_path / "a"), "--steps", "1"]) == 0
    init = tmp_path / "a" / "indexer.safetensors"
    out = tmp_path / "b"
    assert train_indexer.main_train(base + ["--out", str(out), "--steps", "8", "--lr", "5e-3", "--layers", "1",
                                            "--init-indexer", str(init)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers_trained"] == [1] and manifest["kl_last_10_mean"] < manifest["kl_first"]
    before, after = load_file(str(init)), load_file(str(out / "indexer.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (".layers.1." not in name), name
    for bad in ("7", "x", "-1"):
        assert train_indexer.main_train(base + ["--out", str(tmp_path / "c"), "--layers", bad]) == 2


def test_init_indexer_with_fewer_heads_widens_without_changing_the_scores(small_checkpoint, tmp_path, capsys):
    """A 4-head indexer continued on a model converted with 8 heads: the widened indexer scores exactly
    as the 4-head one did (new heads start at zero weight), so training starts where it ended; then the
    new heads learn. A wider file into a narrower model is refused with the flag that fixes it."""
    from indexcache.model.checkpoint import load_checkpoint
    from indexcache.offline.smollm2 import convert_smollm2

    base = ["--seq-len", "96", "--warmup", "1", "--lm-dtype", "float32", "--device", "cpu", "--no-progress",
            "--artifact-dtype", "float32", "--lr", "5e-3"]
    narrow = tmp_path / "narrow"
    assert train_indexer.main_train(base + ["--model", str(small_checkpoint), "--out", str(narrow), "--steps", "4"]) == 0
    init = narrow / "indexer.safetensors"
    wide_model = convert_smollm2(tmp_path / "wide", index_n_heads=8, index_head_dim=32, index_topk=16, seed=1,
                                 num_layers=2)

    tensors = load_file(str(init))
    widened, old_heads = train_indexer.widen_indexer_heads(tensors, 8, 32)
    assert old_heads == 4 and widened["model.layers.1.self_attn.indexer.wq_b.weight"].shape[0] == 8 * 32
    m4, _ = load_checkpoint(small_checkpoint, extra_state=tensors)
    m8, _ = load_checkpoint(wide_model, extra_state=widened)
    assert m8.args.index_n_heads == 8
    tokens = torch.randint(0, m4.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer in range(2):
            x = torch.randn(1, 64, m4.args.dim, generator=torch.Generator().manual_seed(layer))
            ctx4, _ = m4.context(tokens, pattern="FF", attention="dense")
            ctx8, _ = m8.context(tokens, pattern="FF", attention="dense")
            s4 = train_indexer.index_scores(m4, layer, x, ctx4)
            s8 = train_indexer.index_scores(m8, layer, x, ctx8)
            finite = torch.isfinite(s4)
            assert torch.equal(finite, torch.isfinite(s8))
            torch.testing.assert_close(s8[finite], s4[finite], rtol=1e-5, atol=1e-5)

    # Continuing on the same windows: the first KL is the narrow run's at that step, not a fresh start's.
    ref = tmp_path / "ref"
    assert train_indexer.main_train(base + ["--model", str(small_checkpoint), "--out", str(ref), "--steps", "1",
                                            "--init-indexer", str(init)]) == 0
    wide = tmp_path / "widened"
    assert train_indexer.main_train(base + ["--model", str(wide_model), "--out", str(wide), "--steps", "6",
                                            "--init-indexer", str(init)]) == 0
    ref_m = json.loads((ref / "manifest.json").read_text())
    wide_m = json.loads((wide / "manifest.json").read_text())
    assert abs(wide_m["kl_first"] - ref_m["kl_first"]) < 1e-4 * ref_m["kl_first"] + 1e-6
    assert wide_m["init_indexer"]["widened_from_heads"] == 4 and wide_m["model"]["index_n_heads"] == 8
    trained = load_file(str(wide / "indexer.safetensors"))
    new_weights = trained["model.layers.0.self_attn.indexer.weights_proj.weight"][4:]
    assert new_weights.abs().max() > 0            # the new heads left zero: they are trained, not dead
    capsys.readouterr()

    # A wider file cannot go into a narrower model: the error names the flag that fixes it.
    assert train_indexer.main_train(base + ["--model", str(small_checkpoint), "--out", str(tmp_path / "bad"),
                                            "--steps", "1", "--init-indexer", str(wide / "indexer.safetensors")]) == 2
    assert "--index-n-heads 8" in capsys.readouterr().err
