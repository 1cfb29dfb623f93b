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
