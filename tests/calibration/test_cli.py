"""`indexcache calibrate` end to end: samples in, the contract's result JSON and a summary table out."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from indexcache import __version__, cli
from indexcache.offline.calibration import checkpoint_identity
from indexcache.model.pattern import uniform_pattern

CONTRACT_KEYS = {"pattern": str, "full_layers": int, "num_layers": int, "target_full": float,
                 "loss_all_full": float, "loss": float, "loss_delta": float, "step_losses": list,
                 "uniform_pattern": str, "uniform_loss": float, "uniform_loss_delta": float, "overlap": dict,
                 "num_samples": int, "num_tokens": int, "model_id": str, "duration_s": float, "passes": int,
                 "passes_saved": int, "version": str}


def token_lines(make_tokens, n=10, tokenizer="ckpt", seed=0):
    return [{"token_ids": t, "tokenizer": tokenizer} for t in make_tokens(n, seed=seed)]


def run_cli(*argv):
    return cli.main(["calibrate", *map(str, argv), "--no-progress", "--threads", "1"])


def test_calibrate_writes_the_contract_result_and_prints_a_summary(tmp_path, checkpoint_dir, make_tokens,
                                                                   write_samples, capsys):
    ckpt, _ = checkpoint_dir
    lines = token_lines(make_tokens)
    samples = write_samples(lines)
    out = tmp_path / "result.json"
    assert run_cli("--model", ckpt, "--samples", samples, "--target-full", "0.25", "--out", out) == 0
    result = json.loads(out.read_text())
    for key, kind in CONTRACT_KEYS.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert result["num_layers"] == 8 and result["full_layers"] == 2 == result["pattern"].count("F")
    assert result["pattern"][0] == "F" and len(result["step_losses"]) == 6
    assert result["loss"] == result["step_losses"][-1]
    assert result["loss_delta"] == pytest.approx(result["loss"] - result["loss_all_full"])
    assert result["uniform_pattern"] == uniform_pattern(8, 2)
    assert result["uniform_loss_delta"] == pytest.approx(result["uniform_loss"] - result["loss_all_full"])
    assert result["num_samples"] == 10 and result["num_tokens"] == sum(len(l["token_ids"]) for l in lines)
    assert result["model_id"] == checkpoint_identity(ckpt) and result["version"] == __version__
    assert 0 < result["passes_saved"] < result["passes"] + result["passes_saved"]
    assert 0 <= result["overlap"]["shared_mean"] <= 1 and len(result["overlap"]["per_layer"]) == 6
    table = capsys.readouterr().out
    assert f"greedy pattern  {result['pattern']}" in table
    assert f"{result['loss']:.4f}" in table and f"{result['uniform_loss']:.4f}" in table


def test_model_identity_changes_with_any_weight(checkpoint_dir, tmp_path):
    from indexcache.model.checkpoint import save_checkpoint
    ckpt, model = checkpoint_dir
    before = checkpoint_identity(ckpt)
    with torch.no_grad():
        model.model.layers[3].self_attn.indexer.wk.weight[0, 0] += 1e-3
    assert checkpoint_identity(save_checkpoint(model, tmp_path / "other")) != before
    assert checkpoint_identity(save_checkpoint(model, tmp_path / "again")) == checkpoint_identity(tmp_path / "other")


def test_bad_lines_are_skipped_with_counts_or_stop_the_run_by_line_number(tmp_path, checkpoint_dir, make_tokens,
                                                                            write_samples, capsys):
    ckpt, _ = checkpoint_dir
    good = token_lines(make_tokens, n=4)
    samples = write_samples([good[0], '{"token_ids": [1, 2', "", {"token_ids": [3] * 300, "tokenizer": "ckpt"},
                             {"token_ids": [3, 4, 5], "tokenizer": "gpt2"}, {"token_ids": [3, 500], "tokenizer": "ckpt"},
                             {"prompt": "text needs a tokenizer"}, *good[1:]])
    out = tmp_path / "r.json"
    assert run_cli("--model", ckpt, "--samples", samples, "--target-full", "0.5", "--out", out) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 4 and result["skipped_samples"] == 6
    err = capsys.readouterr().err
    assert "skipped 6 lines" in err and "1 malformed_json" in err and "1 over_context" in err
    assert "1 wrong_tokenizer" in err

    out.unlink()
    assert run_cli("--model", ckpt, "--samples", samples, "--out", out, "--on-error", "stop") == 2
    err = capsys.readouterr().err
    assert f"{samples}:2: malformed_json" in err and not out.exists()


@pytest.mark.parametrize("content", ["", "\n\n", '{"token_ids": [1, 2], "tokenizer": "gpt2"}\n'])
def test_no_usable_sample_is_an_error_never_an_all_full_result(tmp_path, checkpoint_dir, write_samples, capsys,
                                                               content):
    ckpt, _ = checkpoint_dir
    samples = tmp_path / "s.jsonl"
    samples.write_text(content)
    out = tmp_path / "r.json"
    assert run_cli("--model", ckpt, "--samples", samples, "--out", out) == 2
    assert "no usable calibration samples" in capsys.readouterr().err
    assert not out.exists()


def test_missing_samples_path_and_bad_target_are_clear_errors(tmp_path, checkpoint_dir, capsys):
    ckpt, _ = checkpoint_dir
    assert run_cli("--model", ckpt, "--samples", tmp_path / "nope") == 2
    assert "does not exist" in capsys.readouterr().err
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"token_ids": [5, 6, 7], "tokenizer": "ckpt"}\n')
    assert run_cli("--model", ckpt, "--samples", samples, "--target-full", "2", "--out", tmp_path / "r") == 2
    assert "--target-full must be a fraction in (0, 1]" in capsys.readouterr().err


# --- --report-configmap against a fake Kubernetes API on loopback ----------------------------------------
class FakeConfigMapAPI(BaseHTTPRequestHandler):
    """create (409 if it exists) and merge-patch of core/v1 ConfigMaps; `store` keeps what was written."""
    store: dict = {}
    refuse: bool = False

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_POST(self):  # /api/v1/namespaces/{ns}/configmaps
        ns = self.path.split("/")[4]
        body = self._body()
        if self.refuse:
            return self._reply(403, {"kind": "Status", "message": "configmaps is forbidden", "code": 403})
        key = (ns, body["metadata"]["name"])
        if key in self.store:
            return self._reply(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
        self.store[key] = body
        self._reply(201, body)

    def do_PATCH(self):  # /api/v1/namespaces/{ns}/configmaps/{name}
        parts = self.path.split("?")[0].split("/")
        key = (parts[4], parts[6])
        self.store[key]["data"].update(self._body()["data"])
        self._reply(200, self.store[key])

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    FakeConfigMapAPI.store, FakeConfigMapAPI.refuse = {}, False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeConfigMapAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        "users": [{"name": "t", "user": {"token": "x"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield FakeConfigMapAPI
    server.shutdown()


def test_result_is_reported_to_the_configmap_the_operator_reads(tmp_path, checkpoint_dir, make_tokens,
                                                                write_samples, fake_api):
    ckpt, _ = checkpoint_dir
    samples = write_samples(token_lines(make_tokens, n=4))
    out = tmp_path / "result.json"
    args = ("--model", ckpt, "--samples", samples, "--target-full", "0.5", "--out", out,
            "--report-configmap", "team-a/llm-recal-1234abcd-result")
    assert run_cli(*args) == 0
    stored = fake_api.store[("team-a", "llm-recal-1234abcd-result")]
    assert json.loads(stored["data"]["result.json"]) == json.loads(out.read_text())
    # a retried Job finds the ConfigMap already there and replaces its result
    stored["data"]["result.json"] = "{}"
    assert run_cli(*args, "--fresh") == 0
    assert json.loads(fake_api.store[("team-a", "llm-recal-1234abcd-result")]["data"]["result.json"])["pattern"]


def test_a_failed_report_keeps_the_result_file_and_fails_the_job(tmp_path, checkpoint_dir, make_tokens,
                                                                 write_samples, fake_api, capsys):
    ckpt, _ = checkpoint_dir
    fake_api.refuse = True
    samples = write_samples(token_lines(make_tokens, n=4))
    out = tmp_path / "result.json"
    assert run_cli("--model", ckpt, "--samples", samples, "--target-full", "0.5", "--out", out,
                   "--report-configmap", "team-a/x-result") == 3
    err = capsys.readouterr().err
    assert "could not write ConfigMap team-a/x-result" in err and str(out) in err
    assert json.loads(out.read_text())["full_layers"] == 4
    out.unlink()
    assert run_cli("--model", ckpt, "--samples", samples, "--out", out, "--report-configmap", "no-slash") == 2
    assert "NAMESPACE/NAME" in capsys.readouterr().err and not out.exists()  # refused before searching


def test_the_same_command_line_reproduces_the_same_pattern(tmp_path, checkpoint_dir, make_tokens, write_samples):
    """What bench/RESULTS.md records for the shipped SmolLM2 pattern: re-running the calibrate command line
    (same samples, same --seed, a fresh search) gives the same pattern and the same per-step losses."""
    ckpt, _ = checkpoint_dir
    samples = write_samples(token_lines(make_tokens, n=12, seed=4))
    results = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.json"
        assert run_cli("--model", ckpt, "--samples", samples, "--target-full", "0.25", "--seed", "0",
                       "--max-samples", "8", "--fresh", "--out", out) == 0
        results.append({k: v for k, v in json.loads(out.read_text()).items() if k != "duration_s"})
    assert results[0] == results[1]
    assert results[0]["seed"] == 0 and results[0]["pattern"].count("F") == 2
