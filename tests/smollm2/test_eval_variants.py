"""`indexcache eval` with named pattern variants, task selection and the real-prose retrieval task (issue 23)."""
import json

import pytest

from indexcache.offline import corpora, evaluate
from indexcache.model.pattern import uniform_pattern


def test_retrieval_prompt_hides_the_key_in_held_out_prose(tokenizer):
    key, context = 4817263, 600
    prompt = evaluate.retrieval_prompt(tokenizer, context, 0.5, key, offset=200)
    assert len(prompt) == context - evaluate.RETRIEVAL_NEW_TOKENS      # room for the answer in the context
    text = tokenizer.decode(prompt)
    assert text.count(str(key)) == 2 and text.endswith("The secret number is")
    needle_at = text.index(f"The secret number is {key}")
    assert 0.35 < needle_at / len(text) < 0.65
    # the haystack is held-out essay text (never trained on), not the passkey's repeated filler
    heldout = "".join(d.text for d in corpora.heldout_essays())
    before = text[len(evaluate.RETRIEVAL_INTRO) + 50: needle_at - 20]
    assert before.strip() and before in heldout
    assert "The grass is green" not in text
    # different offsets give different haystacks
    other = tokenizer.decode(evaluate.retrieval_prompt(tokenizer, context, 0.5, key, offset=1200))
    assert other != text


def test_retrieval_trials_are_seeded_with_a_haystack_each():
    trials = evaluate.retrieval_trials([1024, 2048])
    assert trials == evaluate.retrieval_trials([1024, 2048]) and len(trials) == 6
    assert len({t["offset"] for t in trials}) == 6 and all(1_000_000 <= t["key"] <= 9_999_999 for t in trials)


def test_eval_named_variants_and_selected_tasks(small_checkpoint, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", str(small_checkpoint), "--out", str(out), "--contexts", "160", "--topk", "16",
            "--variant", "greedy=FS", "--variant", "uniform=uniform:1", "--variant", "full=all-F",
            "--tasks", "perplexity,retrieval", "--no-baselines", "--dtype", "float32", "--device", "cpu"]
    assert evaluate.main_eval(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["variants"] == {"greedy": "FS", "uniform": uniform_pattern(2, 1), "full": "FF"}
    assert set(result["perplexity"]["160"]) == {"greedy", "uniform", "full"}
    assert result["passkey"] == {} and "indexer" not in result                  # tasks not asked for
    assert {name: r["total"] for name, r in result["retrieval"].items()} == {"greedy": 3, "uniform": 3, "full": 3}
    # "FS" and the uniform pattern with one F layer are the same pattern here: the same numbers
    assert result["perplexity"]["160"]["greedy"] == result["perplexity"]["160"]["uniform"]
    report = (out / "eval.md").read_text()
    assert "Retrieval from real prose" in report and "| greedy | `FS` | 1 |" in report


def test_eval_depths_place_the_needles(small_checkpoint, tmp_path, capsys):
    """--depths: more needle positions per context, for a finer passkey/retrieval comparison."""
    out = tmp_path / "eval"
    argv = ["--model", str(small_checkpoint), "--out", str(out), "--contexts", "160", "--topk", "16",
            "--tasks", "passkey,retrieval", "--depths", "0.2,0.4,0.8", "--dtype", "float32", "--device", "cpu"]
    assert evaluate.main_eval(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    for task in ("passkey", "retrieval"):
        assert [t["depth"] for t in result[task]["dense"]["trials"]] == [0.2, 0.4, 0.8]
    with pytest.raises(SystemExit):
        evaluate.main_eval(argv[:-6] + ["--depths", "0.5,1.5"])
    assert "expected fractions in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--variant", "nameonly"], "expected NAME=PATTERN"),
    (["--variant", "x=SF"], "must start with 'F'"),
    (["--variant", "x=uniform:9"], "num_full must be in 1..2"),
    (["--variant", "dense=FF"], "is taken"),
    (["--tasks", "perplexity,speed"], "unknown task"),
])
def test_bad_variants_and_tasks_are_refused(small_checkpoint, tmp_path, capsys, argv, message):
    base = ["--model", str(small_checkpoint), "--out", str(tmp_path), "--contexts", "160", "--device", "cpu"]
    assert evaluate.main_eval(base + argv) == 2
    assert message in capsys.readouterr().err


def test_variant_forms_resolve_to_patterns(tmp_path):
    """What bench/h200_smollm.sh issue23-calibrate passes: a calibration result file, uniform:N, all-F, and the
    checkpoint's own pattern."""
    result = {"pattern": "FSFS", "full_layers": 2, "num_layers": 4, "target_full": 0.5, "loss_all_full": 1.0,
              "loss": 1.1, "loss_delta": 0.1, "step_losses": [1.05, 1.1], "uniform_pattern": "FSFS",
              "uniform_loss": 1.1, "uniform_loss_delta": 0.1, "overlap": {}, "num_samples": 1, "num_tokens": 8,
              "model_id": "m", "duration_s": 0.1, "passes": 4, "passes_saved": 1, "version": "0.1.0"}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    got = evaluate.parse_variants([f"greedy=calibrated:{path}", "uniform=uniform:2", "full=F*", "own=checkpoint"],
                                  4, "FFSS")
    assert got == {"greedy": "FSFS", "uniform": uniform_pattern(4, 2), "full": "FFFF", "own": "FFSS"}
    with pytest.raises(ValueError, match="given twice"):
        evaluate.parse_variants(["a=FFFF", "a=FSSS"], 4, "FFFF")
    with pytest.raises(ValueError, match="4 entries but the model has 3 layers"):
        evaluate.parse_variants([f"greedy=calibrated:{path}"], 3, "FFF")
