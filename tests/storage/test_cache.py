"""The model cache under `indexcache fetch` (what the operator's init containers run), as real processes:
a fetch killed mid-download (HTTP, S3 behind a stalling relay, the Hub) is resumed by the next one and ends
with a complete, verified model; two initialisers started together download once; a damaged entry is never
loaded; offline serves the cache."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from indexcache.model.storage import MANIFEST, FetchError, check_manifest, parse_uri, resolve
from model_sources import FakeHub, FileServer, StallingProxy, clean_env, sha256, tarball, tiny_checkpoint_files

SERVING_DIR = str(Path(__file__).resolve().parents[2] / "serving")
FILES = tiny_checkpoint_files()
DATA = tarball(FILES)
URL_PATH = "/tiny-dsa.tar.gz"


def fetch_cmd(uri, cache):
    return [sys.executable, "-m", "indexcache.cli", "fetch", uri, "--cache", str(cache)]


def start_fetch(uri, cache, **env):
    return subprocess.Popen(fetch_cmd(uri, cache), env=clean_env(PYTHONPATH=SERVING_DIR, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def model_files(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.name != MANIFEST}


def test_killed_fetch_is_resumed_and_ends_complete_and_verified(tmp_path):
    with FileServer({URL_PATH: DATA}, hold_at=len(DATA) // 2) as server:
        uri = f"{server.url}{URL_PATH}#sha256={sha256(DATA)}"
        first = start_fetch(uri, tmp_path)
        try:
            assert server.held.wait(60), "the first fetch never got half way"
            def archive_size():
                found = list(tmp_path.glob("*.partial/archive"))
                return found[0].stat().st_size if found else 0
            # the client has written what the server sent before it stopped (one 16 KiB chunk may be in flight)
            wait_for(lambda: archive_size() >= len(DATA) // 2 - (1 << 14), "the partial archive")
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
            server.release.set()
        kept = archive_size()
        assert 0 < kept < len(DATA)
        # nothing usable yet: the half model is not an entry, and offline mode says so
        with pytest.raises(FetchError) as offline:
            resolve(uri, tmp_path, offline=True)
        assert offline.value.reason == "NotCached"

        second = subprocess.run(fetch_cmd(uri, tmp_path), env=clean_env(PYTHONPATH=SERVING_DIR),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        out = json.loads(second.stdout)
        assert server.gets(URL_PATH) == [None, f"bytes={kept}-"]   # the restart asked only for the rest
        assert "resuming" in second.stderr
    assert out["revision"] == sha256(DATA) and out["downloaded_bytes"] == sum(map(len, FILES.values()))
    assert model_files(out["path"]) == FILES
    assert check_manifest(Path(out["path"]), verify_hashes=True) is None
    assert not list(tmp_path.glob("*.partial"))


def kill_mid_transfer(uri, cache, server, on_disk, **env):
    """Start `indexcache fetch`, let it download until the server stalls it, wait until on_disk() sees what
    it has written so far, SIGKILL it (no cleanup can run), then let the server go on."""
    proc = start_fetch(uri, cache, **env)
    try:
        assert server.held.wait(60), "the fetch never got half way"
        wait_for(on_disk, "the partial download on disk")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.release.set()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(FetchError) as offline:   # the half model is not an entry: offline mode says so
        resolve(uri, cache, offline=True)
    assert offline.value.reason == "NotCached"


def restart_fetch(uri, cache, **env):
    done = subprocess.run(fetch_cmd(uri, cache), env=clean_env(PYTHONPATH=SERVING_DIR, **env),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert model_files(out["path"]) == FILES
    assert check_manifest(Path(out["path"]), verify_hashes=True) is None
    assert not list(Path(cache).glob("*.partial"))
    return out, done.stderr


WEIGHTS = "model.safetensors"


def test_killed_s3_fetch_resumes_from_the_byte_it_reached(tmp_path, s3):
    """moto behind a relay that stalls the weights half way: the restart asks S3 only for the rest (Range,
    with If-Match on the listed ETag) and leaves the finished small files alone."""
    key = f"/{s3.bucket}/{s3.prefix}/{WEIGHTS}"
    with StallingProxy(s3.url, hold_path=key, hold_at=len(FILES[WEIGHTS]) // 2) as proxy:
        env = s3.env(AWS_ENDPOINT_URL_S3=proxy.url)
        uri = f"s3://{s3.bucket}/{s3.prefix}"

        def on_disk(name):
            found = list(tmp_path.glob(f"*.partial/model/{name}"))
            return found[0].stat().st_size if found else 0
        # the small files complete, the weights have their first 256 KiB chunks written (storage.WRITE_CHUNK)
        kill_mid_transfer(uri, tmp_path, proxy, lambda: on_disk(WEIGHTS) > 0 and all(
            on_disk(name) == len(FILES[name]) for name in set(FILES) - {WEIGHTS}), **env)
        kept = on_disk(WEIGHTS)
        assert 0 < kept <= len(FILES[WEIGHTS]) // 2
        out, log = restart_fetch(uri, tmp_path, **env)
        assert proxy.gets(key) == [None, f"bytes={kept}-"]
        for name in set(FILES) - {WEIGHTS}:   # complete before the kill: not fetched again
            assert len(proxy.gets(f"/{s3.bucket}/{s3.prefix}/{name}")) == 1, name
    assert "resuming" in log and out["revision"].startswith("s3-")


def test_killed_hub_fetch_keeps_the_files_it_finished(tmp_path, monkeypatch):
    """huggingface_hub starts an interrupted file over (it never reuses its partial files) but keeps the files
    it completed: the restart downloads the weights again, whole, and nothing else; the killed run's partial
    file is gone from the entry."""
    repo = FakeHub.make_repo(FILES, token="hf_secret")
    hub_env = dict(HF_TOKEN="hf_secret", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    with FakeHub({"acme/tiny-dsa": repo}, hold=(WEIGHTS, len(FILES[WEIGHTS]) // 2)) as hub:
        uri, cache = "hf://acme/tiny-dsa", tmp_path / "cache"

        def small_files_done_weights_begun():
            model = next(cache.glob("*.partial/model"), None)
            # a finished file counts once huggingface_hub has written its metadata, which it does after moving
            # the file into place; a file moved but not yet recorded is downloaded again by the next run
            recorded = model / ".cache" / "huggingface" / "download" if model is not None else None
            return model is not None and all((model / n).is_file() and (recorded / f"{n}.metadata").is_file()
                                             for n in set(FILES) - {WEIGHTS}) \
                and any(model.rglob("*.incomplete"))   # named after a hash of the file name
        kill_mid_transfer(uri, cache, hub, small_files_done_weights_begun, HF_ENDPOINT=hub.url, **hub_env)
        out, _ = restart_fetch(uri, cache, HF_ENDPOINT=hub.url, **hub_env)
        resolve_path = f"/acme/tiny-dsa/resolve/{repo['commit']}/"
        assert hub.gets(resolve_path + WEIGHTS) == [None, None]
        for name in set(FILES) - {WEIGHTS}:
            assert hub.gets(resolve_path + name) == [None], name
    assert out["revision"] == repo["commit"] and out["downloaded_bytes"] == sum(map(len, FILES.values()))
    assert not list(cache.rglob("*.incomplete"))


def test_a_fetch_killed_after_the_whole_archive_arrived_finishes_without_downloading_again(tmp_path):
    """The server answers 416 to a range past the end; the archive is then checked and unpacked."""
    from indexcache.model.storage import HttpSource, entry_dir

    with FileServer({URL_PATH: DATA}) as server:
        uri = f"{server.url}{URL_PATH}#sha256={sha256(DATA)}"
        work = entry_dir(tmp_path, HttpSource(f"{server.url}{URL_PATH}", None), sha256(DATA))
        work = work.with_name(work.name + ".partial")
        work.mkdir(parents=True)
        (work / "archive").write_bytes(DATA)
        model = resolve(uri, tmp_path)
        assert server.gets(URL_PATH) == [f"bytes={len(DATA)}-"]
    assert model_files(model.path) == FILES and check_manifest(model.path, verify_hashes=True) is None


def test_a_read_only_cache_is_read_without_a_lock(tmp_path, monkeypatch):
    """Replicas and Jobs mount the cache read-only: the bundled models resolve there without a lock file."""
    import errno as errno_module

    from indexcache.model import storage

    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno_module.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    built = resolve("tiny", tmp_path).path
    monkeypatch.setattr(storage.os, "open", read_only_open)
    with storage.cache_lock(tmp_path / "x.lock", "tiny"):
        pass
    assert resolve("tiny", tmp_path).path == built


def test_two_initialisers_started_together_download_once(tmp_path):
    with FileServer({URL_PATH: DATA}, hold_at=len(DATA) // 2) as server:
        uri = f"{server.url}{URL_PATH}#sha256={sha256(DATA)}"
        first = start_fetch(uri, tmp_path)
        second = None
        try:
            assert server.held.wait(60), "the first fetch never started downloading"
            second = start_fetch(uri, tmp_path)
            # the second one reports that it waits for the first (stderr), then the first may finish
            waiting = []
            reader = threading.Thread(target=lambda: waiting.extend(iter(second.stderr.readline, "")), daemon=True)
            reader.start()
            wait_for(lambda: any("waiting for another process" in line for line in waiting), "the second to wait")
            server.release.set()
            out1, err1 = first.communicate(timeout=120)
            out2 = second.stdout.read()
            second.wait(120)
            reader.join(10)
        finally:
            server.release.set()
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.kill()
        assert first.returncode == 0, err1
        assert second.returncode == 0, "".join(waiting)
        assert server.gets(URL_PATH) == [None]     # one download between them
    r1, r2 = json.loads(out1), json.loads(out2)
    assert r1["path"] == r2["path"] and r1["downloaded_bytes"] > 0 and r2["downloaded_bytes"] == 0
    assert model_files(r1["path"]) == FILES


def test_a_damaged_entry_is_fetched_again_never_loaded(tmp_path):
    with FileServer({URL_PATH: DATA}) as server:
        uri = f"{server.url}{URL_PATH}#sha256={sha256(DATA)}"
        model = resolve(uri, tmp_path)
        weights = model.path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])     # a truncated file, e.g. a disk that filled up
        assert "model.safetensors" in check_manifest(model.path)
        with pytest.raises(FetchError) as offline:           # offline: refused, not loaded
            resolve(uri, tmp_path, offline=True)
        assert offline.value.reason == "NotCached" and "damaged" in str(offline.value)
        again = resolve(uri, tmp_path)                        # online: fetched again
        assert again.path == model.path and again.downloaded_bytes > 0
        assert len(server.gets(URL_PATH)) == 2
    assert model_files(again.path) == FILES

    # same size, different bytes: only the sha256 check (--verify-hashes) sees it
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert check_manifest(again.path) is None
    assert "sha256" in check_manifest(again.path, verify_hashes=True)


def test_no_space_is_a_disk_full_error_before_downloading(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with FileServer({URL_PATH: DATA}) as server:
        with pytest.raises(FetchError) as full:
            resolve(f"{server.url}{URL_PATH}#sha256={sha256(DATA)}", tmp_path)
    assert full.value.reason == "DiskFull" and "cacheVolume" in str(full.value)
    assert not (tmp_path / "archive").exists() and not [p for p in tmp_path.iterdir() if p.is_dir()
                                                          and not p.name.endswith(".partial")]


def test_fetch_prints_path_and_revision_as_json_and_refuses_unsupported_schemes(tmp_path):
    """stdout and the termination message (what `kubectl describe pod` shows) carry the result or the error."""
    message = tmp_path / "termination-log"
    env = clean_env(PYTHONPATH=SERVING_DIR, INDEXCACHE_TERMINATION_LOG=str(message))
    done = subprocess.run(fetch_cmd("tiny", tmp_path / "cache"), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) == {"uri", "path", "revision", "name", "downloaded_bytes"}
    assert Path(out["path"]).parent == tmp_path / "cache" and (Path(out["path"]) / "tokenizer.json").is_file()
    assert json.loads(message.read_text()) == out

    gs = subprocess.run(fetch_cmd("gs://bucket/model", tmp_path / "cache"), env=env, capture_output=True, text=True,
                        timeout=120)
    assert gs.returncode == 2 and gs.stdout == ""
    last = gs.stderr.strip().splitlines()[-1]   # the pod's log, and its termination message should it crash
    assert "error (Unsupported)" in last and "s3://bucket/prefix" in last and "hf://org/name" in last
    assert message.read_text().startswith("error (Unsupported): gs://bucket/model")


def test_fetch_starts_without_torch(tmp_path):
    """Init containers run it before every replica and Job: no torch import (seconds) for a download."""
    code = ("import sys; from indexcache.cli import main; rc = main(['fetch', sys.argv[1]]); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=clean_env(PYTHONPATH=SERVING_DIR),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(tmp_path)


@pytest.mark.parametrize("uri,reason,hint", [
    ("gs://b/m", "Unsupported", "s3://"),
    ("ftp://host/m", "Unsupported", "hf://"),
    ("hf://", "Invalid", "hf://org/name"),
    ("s3:///prefix", "Invalid", "s3://bucket/prefix"),
    ("https://h/m.tar.gz#md5=abc", "Invalid", "#sha256="),
    ("pvc://Bad_Claim/x", "Invalid", "claim"),
    ("pvc://claim/../etc", "Invalid", ".."),
])
def test_bad_uris_name_the_accepted_forms(uri, reason, hint):
    with pytest.raises(FetchError) as bad:
        parse_uri(uri)
    assert bad.value.reason == reason and hint in str(bad.value)


def test_pvc_and_paths_resolve_in_place(tmp_path, monkeypatch):
    (tmp_path / "claims" / "models" / "tiny").mkdir(parents=True)
    monkeypatch.setenv("INDEXCACHE_PVC_ROOT", str(tmp_path / "claims"))
    assert resolve("pvc://models/tiny").path == tmp_path / "claims" / "models" / "tiny"
    assert resolve(str(tmp_path / "claims")).path == tmp_path / "claims"
    with pytest.raises(FetchError) as missing:
        resolve("pvc://models/other")
    assert missing.value.reason == "NotFound" and str(tmp_path / "claims") in str(missing.value)


def test_bundled_tiny_checkpoint_is_the_in_memory_tiny_model(tmp_path):
    """`tiny` written as a checkpoint (what `calibrate/generate --model tiny` load) has the weights and the
    tokenizer of the in-memory tiny model that `serve --tiny` runs: same logits, same token ids."""
    import random

    import torch

    from indexcache.model.checkpoint import load_checkpoint
    from indexcache.model.tiny import CHARS, CharTokenizer, tiny_model
    from indexcache.model.tokenizer import load_tokenizer

    path = resolve("tiny", tmp_path).path
    loaded, _ = load_checkpoint(path)
    ids = torch.randint(2, loaded.args.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), tiny_model(seed=0)(ids), rtol=0, atol=0)
    chars, files = CharTokenizer(), load_tokenizer(path)
    rng = random.Random()
    for _ in range(50):
        text = "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 60)))
        assert files.encode(text) == chars.encode(text)
        assert files.decode(files.encode(text)) == text
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello\n"}]
    assert files.apply_chat_template(messages) == chars.apply_chat_template(messages)
    assert files.stop_token_ids == chars.stop_token_ids
    built = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve("tiny", tmp_path).path == path and (path / "model.safetensors").stat().st_mtime_ns == built
