"""The whole chain on a real (2-layer) SmolLM2 on CPU: convert -> train-indexer -> eval, a few hundred tokens."""
import json

import torch
from safetensors.torch import load_file

from indexcache import evaluate, train_indexer


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
    from indexcache.smollm2 import convert_smollm2
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
