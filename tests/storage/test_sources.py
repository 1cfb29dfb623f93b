"""Model delivery against real servers on loopback: the Hub (a Hub-compatible endpoint, routes listed in
model_sources.FakeHub), S3 (moto's server with IAM authentication on) and HTTP tarballs (a stdlib server).
What a user notices: the model arrives whole and verified, credentials matter, the revision is pinned, a
failure says why, and offline mode serves what the cache holds."""
import json

import pytest

from indexcache.model.storage import MANIFEST, FetchError, check_manifest, resolve
from model_sources import FakeHub, FileServer, sha256, tarball, tiny_checkpoint_files

FILES = tiny_checkpoint_files()


def assert_same_files(path, files):
    got = {p.name: p.read_bytes() for p in path.iterdir() if p.name != MANIFEST}
    assert got == files
    manifest = json.loads((path / MANIFEST).read_text())
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == \
        {name: (len(data), sha256(data)) for name, data in files.items()}
    assert check_manifest(path, verify_hashes=True) is None


@pytest.fixture
def offline_off(monkeypatch):
    for var in ("INDEXCACHE_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)


# ---- the Hub ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_hub_telemetry(monkeypatch):
    """huggingface_hub also fetches a telemetry registry (GET /api/agent-harnesses, at most daily) from the
    endpoint it read at import, which in this process may be the real Hub: off, so that only loopback is
    reached and the routes below are those of the download."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


def test_hub_private_repo_with_token_revision_pinned_then_offline(tmp_path, monkeypatch, offline_off):
    repo = FakeHub.make_repo(FILES, token="hf_secret")
    with FakeHub({"acme/tiny-dsa": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

        with pytest.raises(FetchError) as no_token:
            resolve("hf://acme/tiny-dsa", tmp_path / "cache")
        assert no_token.value.reason == "NotFound" and "HF_TOKEN" in str(no_token.value)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(FetchError) as wrong:
            resolve("hf://acme/tiny-dsa", tmp_path / "cache")
        assert wrong.value.reason == "Auth"

        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        model = resolve("hf://acme/tiny-dsa", tmp_path / "cache")
        assert model.revision == repo["commit"] and model.downloaded_bytes == sum(map(len, FILES.values()))
        assert model.path.parent == tmp_path / "cache" and model.name == "tiny-dsa"
        assert_same_files(model.path, FILES)
        # exactly the routes the module docstring of model_sources states, nothing else
        assert hub.routes() == {"GET /api/models/{repo}/revision/{revision}", "GET /api/models/{repo}/tree/{commit}",
                                "HEAD /{repo}/resolve/{commit}/{path}", "GET /{repo}/resolve/{commit}/{path}"}

        downloads = sum(1 for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p)
        again = resolve("hf://acme/tiny-dsa", tmp_path / "cache")
        assert again.path == model.path and again.downloaded_bytes == 0
        assert sum(1 for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p) == downloads

        with pytest.raises(FetchError) as bad_rev:
            resolve("hf://acme/tiny-dsa@no-such-branch", tmp_path / "cache")
        assert bad_rev.value.reason == "NotFound"

    # the Hub is gone: offline mode serves the revision the last online fetch resolved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("hf://acme/tiny-dsa", tmp_path / "cache").path == model.path
    assert resolve(f"hf://acme/tiny-dsa@{repo['commit']}", tmp_path / "cache").path == model.path
    with pytest.raises(FetchError) as not_cached:
        resolve("hf://acme/other", tmp_path / "cache")
    assert not_cached.value.reason == "NotCached" and "indexcache fetch hf://acme/other" in str(not_cached.value)


def test_hub_moved_branch_is_a_new_entry_and_the_old_one_stays(tmp_path, monkeypatch, offline_off):
    old = FakeHub.make_repo(FILES)
    with FakeHub({"acme/tiny-dsa": old}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        first = resolve("hf://acme/tiny-dsa@main", tmp_path)
        changed = {**FILES, "config.json": FILES["config.json"].replace(b"{", b'{\n  "note": "v2",', 1)}
        hub.repos["acme/tiny-dsa"] = FakeHub.make_repo(changed)
        second = resolve("hf://acme/tiny-dsa@main", tmp_path)
    assert second.revision != first.revision and second.path != first.path
    assert_same_files(second.path, changed)
    assert_same_files(first.path, FILES)


# ---- S3 ---------------------------------------------------------------------------------------------------
def test_s3_with_credentials_from_the_environment(tmp_path, monkeypatch, s3, offline_off):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    model = resolve("s3://models/tiny-dsa", tmp_path)
    assert model.revision.startswith("s3-") and model.name == "tiny-dsa"
    assert_same_files(model.path, FILES)
    again = resolve("s3://models/tiny-dsa/", tmp_path)   # the same objects: the same entry, nothing fetched
    assert again.path == model.path and again.downloaded_bytes == 0

    with pytest.raises(FetchError) as empty:
        resolve("s3://models/no-such-prefix", tmp_path)
    assert empty.value.reason == "NotFound" and "s3://models/no-such-prefix/" in str(empty.value)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(FetchError) as denied:
        resolve("s3://models/tiny-dsa", tmp_path / "other-cache")
    assert denied.value.reason == "Auth" and "credentials" in str(denied.value)
    assert not (tmp_path / "other-cache").exists() or not any((tmp_path / "other-cache").iterdir())


# ---- HTTP tarballs ----------------------------------------------------------------------------------------
def test_http_tarball_checked_against_its_sha256(tmp_path, offline_off):
    data = tarball(FILES)
    flat = tarball(FILES, top=None)   # built once: gzip stamps the time, a second build a second later differs
    with FileServer({"/tiny-dsa.tar.gz": data, "/tiny-dsa.tar.gz.sha256": f"{sha256(data)}  tiny-dsa.tar.gz\n".encode(),
                     "/flat.tar.gz": flat}) as server:
        pinned = resolve(f"{server.url}/tiny-dsa.tar.gz#sha256={sha256(data)}", tmp_path)
        assert pinned.revision == sha256(data) and pinned.name == "tiny-dsa"
        assert_same_files(pinned.path, FILES)
        published = resolve(f"{server.url}/tiny-dsa.tar.gz", tmp_path)      # the sha256 from <url>.sha256
        assert published.path == pinned.path and published.downloaded_bytes == 0
        assert_same_files(resolve(f"{server.url}/flat.tar.gz#sha256={sha256(flat)}", tmp_path).path, FILES)

        wrong = "0" * 64
        with pytest.raises(FetchError) as corrupt:
            resolve(f"{server.url}/tiny-dsa.tar.gz#sha256={wrong}", tmp_path)
        assert corrupt.value.reason == "Checksum" and sha256(data) in str(corrupt.value)
        with pytest.raises(FetchError) as unpinned:
            resolve(f"{server.url}/flat.tar.gz", tmp_path)
        assert unpinned.value.reason == "Invalid" and "#sha256=" in str(unpinned.value)
        with pytest.raises(FetchError) as missing:
            resolve(f"{server.url}/nothing.tar.gz#sha256={wrong}", tmp_path)
        assert missing.value.reason == "NotFound"
    entries = {p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "refs"}
    assert len([e for e in entries if not e.endswith(".partial")]) == 2   # the two good tarballs only
