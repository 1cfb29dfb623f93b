import subprocess
import sys

from indexcache.model.checkpoint import save_checkpoint
from indexcache.cli import main
from indexcache.engine import SamplingParams
from indexcache.engine.generate import generate


def test_generate_command_prints_the_models_tokens(tmp_path, make_model, capsys):
    model = make_model("mla")
    save_checkpoint(model, tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "5,6,7,8", "--max-tokens", "5",
                 "--pattern", "FSFSSF"]) == 0
    out = capsys.readouterr()
    expected = generate(model, [[5, 6, 7, 8]], SamplingParams(max_new_tokens=5, stop_token_ids=(1,)), pattern="FSFSSF")[0]
    assert out.out.strip() == ",".join(map(str, expected))
    assert "pattern FSFSSF (3/6 F layers)" in out.err


def test_generate_command_rejects_a_bad_pattern_with_a_clear_message(tmp_path, make_model):
    save_checkpoint(make_model("gqa"), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "indexcache.cli", "generate", "--model", str(tmp_path),
                           "--prompt-ids", "5,6", "--pattern", "SFFFFF"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2] / "serving")})
    assert proc.returncode == 2
    assert "must start with 'F'" in proc.stderr


def test_generate_keeps_fp8_weights_or_dequantises_them_on_request(tmp_path, make_model, capsys, monkeypatch):
    """--fp8 keep (default) and --fp8 dequantize: the tokens of the model loaded each way."""
    import json

    from safetensors.torch import load_file

    from indexcache.model import checkpoint
    from indexcache.model.checkpoint import load_checkpoint, write_checkpoint
    from indexcache.model.fp8 import quantize_checkpoint_tensors
    loaded = []

    def recording_load(*args, **kwargs):                  # what the command loaded, kept for the check below
        model, pattern = load_checkpoint(*args, **kwargs)
        loaded.append(model)
        return model, pattern

    monkeypatch.setattr(checkpoint, "load_checkpoint", recording_load)
    save_checkpoint(make_model("mla"), tmp_path / "float")
    tensors = quantize_checkpoint_tensors(load_file(tmp_path / "float" / "model.safetensors"))
    path = write_checkpoint(tmp_path / "fp8", json.loads((tmp_path / "float" / "config.json").read_text()), tensors)
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(1,))
    for mode in ("keep", "dequantize"):
        assert main(["generate", "--model", str(path), "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
                     "--fp8", mode]) == 0
        assert loaded[-1].load_stats["fp8"] == mode, "the command loaded the model the way --fp8 said"
        model, pattern = load_checkpoint(path, fp8=mode)
        expected = generate(model, [[5, 6, 7, 8]], params, pattern=pattern)[0]
        assert capsys.readouterr().out.strip() == ",".join(map(str, expected))
