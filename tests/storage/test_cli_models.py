"""The offline commands take a model URI or a bundled name as --model (the recalibration Job runs
`indexcache calibrate --model <spec.model.uri>`): the model is fetched into INDEXCACHE_MODEL_CACHE first,
and what runs is the model the URI names."""
import json

from indexcache.cli import main
from indexcache.engine.generate import generate
from indexcache.engine.sampling import SamplingParams
from indexcache.model.tiny import CharTokenizer, tiny_model
from model_sources import FileServer, sha256, tarball


def test_generate_from_an_http_tarball_is_the_model_in_the_tarball(tmp_path, monkeypatch, capsys, tiny_files):
    monkeypatch.setenv("INDEXCACHE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("INDEXCACHE_OFFLINE", raising=False)
    data = tarball(tiny_files)
    chars = CharTokenizer()
    expected = chars.decode(generate(tiny_model(seed=0), [chars.encode("key-value cache")],
                                     SamplingParams(max_new_tokens=8, temperature=0.0))[0])
    with FileServer({"/tiny.tar.gz": data}) as server:
        rc = main(["generate", "--model", f"{server.url}/tiny.tar.gz#sha256={sha256(data)}",
                   "--prompt", "key-value cache", "--max-tokens", "8"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.rstrip("\n") == expected
    assert "fetch http://127.0.0.1" in out.err        # byte counter / summary line of the download


def test_calibrate_the_bundled_tiny_model_on_text_samples(tmp_path, monkeypatch, capsys):
    """What the chart's recalibration Job does with a bundled name: no checkpoint directory to hand, text
    samples as the traffic sampler writes them."""
    monkeypatch.setenv("INDEXCACHE_MODEL_CACHE", str(tmp_path / "cache"))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"sample {i}: sparse attention keeps the top-k keys. " * 3})
                               + "\n" for i in range(4)))
    rc = main(["calibrate", "--model", "tiny", "--samples", str(samples), "--target-full", "0.5",
               "--out", str(tmp_path / "result.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["pattern"]) == 6 and result["pattern"].count("F") == 3 and result["pattern"][0] == "F"
    assert "4 usable samples" in err
