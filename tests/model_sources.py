"""Real servers on loopback that hold a model, for the model delivery tests (indexcache.model.storage).

- `FileServer`: a stdlib HTTP server for tarballs (GET/HEAD with Range, a request log).
- `FakeHub`: a Hugging Face Hub-compatible endpoint (HF_ENDPOINT) serving exactly the routes that
  huggingface_hub's model_info + list_repo_tree + snapshot_download call:
      GET  /api/models/{repo}/revision/{revision}         -> {"id", "sha", "siblings"}
      GET  /api/models/{repo}/tree/{commit}?recursive=... -> [{"type": "file", "path", "size", "oid", "lfs"}]
      HEAD /{repo}/resolve/{commit}/{path}                -> X-Repo-Commit, ETag, Content-Length
      GET  /{repo}/resolve/{commit}/{path}                -> the bytes (Range honoured)
  Any other route answers 404 and is logged, so a test sees a client that calls something new. A private
  repository wants `Authorization: Bearer <token>`: no token -> 401 RepoNotFound (what the Hub answers),
  a wrong one -> 401 "Invalid credentials in Authorization header".
- `MotoS3`: moto's S3 server in its own process, with IAM authentication switched on after setup (a
  read-only user's keys work; anything else is refused).
- `StallingProxy`: an HTTP relay in front of another loopback server (moto), byte for byte (SigV4 signatures
  stay valid: the Host header travels unchanged), that can stall one object mid-transfer.
Every server can stall a download after its first `hold_at` bytes (`held` is set) until the test sets
`release`, so that a test kills or races a client mid-transfer without guessing at timings.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint_files() -> dict[str, bytes]:
    """The bundled `tiny` model (random weights, seed 0) with its tokenizer, as file name -> bytes."""
    import tempfile

    from indexcache.model.checkpoint import save_checkpoint
    from indexcache.model.tiny import save_char_tokenizer, tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tiny_model(seed=0), tmp)
        save_char_tokenizer(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}


def tarball(files: dict[str, bytes], top: str | None = "model") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):   # quiet; the request log is the server's `requests`
        pass

    def do_HEAD(self):
        self.server.owner.handle(self, head=True)

    def do_GET(self):
        self.server.owner.handle(self, head=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "LoopbackServer"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):   # a killed client: expected
            super().handle_error(request, client_address)


class LoopbackServer:
    """hold_at=N: a GET of a path that `holds(path)` stops after byte N of the file until `release` is set."""

    def __init__(self, hold_at: int | None = None):
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range header)
        self.hold_at = hold_at
        self.held, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def holds(self, path: str) -> bool:
        return True

    def hold_before(self, path: str):
        """before_chunk for send_bytes: stall at hold_at (an offset in the whole file) until released."""
        if self.hold_at is None or not self.holds(path):
            return None

        def maybe_hold(offset: int) -> None:
            if offset >= self.hold_at and not self.release.is_set():
                self.held.set()
                self.release.wait(60)
        return maybe_hold

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of `path` (None: the whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and urlsplit(p).path == path]

    def log(self, handler, head: bool) -> None:
        with self.lock:
            self.requests.append(("HEAD" if head else "GET", handler.path, handler.headers.get("Range")))

    def send_bytes(self, handler, data: bytes, head: bool, headers: dict | None = None,
                   chunk: int = 1 << 16, before_chunk=None) -> None:
        """200 or, for `Range: bytes=N-`, 206 with the rest; written in chunks, before_chunk(offset) first."""
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if m and int(m.group(1)) >= len(data):
            return self.send_error(handler, 416, {"Content-Range": f"bytes */{len(data)}"})
        if m:
            start, status = int(m.group(1)), 206
        handler.send_response(status)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if head:
            return
        try:
            for i in range(start, len(data), chunk):
                if before_chunk is not None:
                    before_chunk(i)
                handler.wfile.write(data[i:i + chunk])
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):   # the client was killed mid-download
            pass

    def send_error(self, handler, status: int, headers: dict | None = None) -> None:
        handler.send_response(status)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


class FileServer(LoopbackServer):
    """Serves `files` (URL path -> bytes); hold_at stalls every file's download at that byte."""

    def __init__(self, files: dict[str, bytes], hold_at: int | None = None, chunk: int = 1 << 14):
        super().__init__(hold_at)
        self.files, self.chunk = files, chunk

    def handle(self, handler, head: bool) -> None:
        self.log(handler, head)
        path = urlsplit(handler.path).path
        if path not in self.files:
            return self.send_error(handler, 404)
        self.send_bytes(handler, self.files[path], head, chunk=self.chunk, before_chunk=self.hold_before(path))


class FakeHub(LoopbackServer):
    """repos: repo_id -> {"files": {path: bytes}, "commit": 40 hex, "branches": {"main": commit},
    "token": None or the token a private repo wants}. hold=(file name, N) stalls that file's download at
    byte N."""

    def __init__(self, repos: dict[str, dict], hold: tuple[str, int] | None = None):
        super().__init__(hold[1] if hold else None)
        self.repos, self.hold_file = repos, hold[0] if hold else None
        self.chunk = 1 << 14

    def holds(self, path: str) -> bool:
        return self.hold_file is not None and "/resolve/" in path and path.endswith(f"/{self.hold_file}")

    @staticmethod
    def make_repo(files: dict[str, bytes], token: str | None = None, lfs: tuple[str, ...] = (".safetensors",)):
        commit = hashlib.sha1(json.dumps(sorted((p, sha256(d)) for p, d in files.items())).encode()).hexdigest()
        return {"files": files, "commit": commit, "branches": {"main": commit}, "token": token, "lfs": lfs}

    def _auth(self, handler, repo: dict) -> bool:
        if repo["token"] is None:
            return True
        given = handler.headers.get("Authorization")
        if given == f"Bearer {repo['token']}":
            return True
        if given:
            self.send_error(handler, 401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        else:
            self.send_error(handler, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        return False

    def _entry(self, repo: dict, path: str) -> dict:
        data = repo["files"][path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if path.endswith(repo["lfs"]):
            entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
        return entry

    def handle(self, handler, head: bool) -> None:
        self.log(handler, head)
        path = unquote(urlsplit(handler.path).path)
        if m := re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path):
            if head or m.group(1) not in self.repos:
                return self.send_error(handler, 404, {"X-Error-Code": "RepoNotFound"})
            repo = self.repos[m.group(1)]
            if not self._auth(handler, repo):
                return
            commit = repo["branches"].get(m.group(2)) or (m.group(2) if m.group(2) == repo["commit"] else None)
            if commit is None:
                return self.send_error(handler, 404, {"X-Error-Code": "RevisionNotFound"})
            body = {"id": m.group(1), "modelId": m.group(1), "sha": commit, "private": repo["token"] is not None,
                    "siblings": [{"rfilename": p} for p in repo["files"]]}
            return self.send_bytes(handler, json.dumps(body).encode(), head, {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/api/models/(.+?)/tree/([0-9a-f]{40})", path):
            repo = self.repos.get(m.group(1))
            if head or repo is None or m.group(2) != repo["commit"]:
                return self.send_error(handler, 404, {"X-Error-Code": "RevisionNotFound"})
            if not self._auth(handler, repo):
                return
            body = [self._entry(repo, p) for p in sorted(repo["files"])]
            return self.send_bytes(handler, json.dumps(body).encode(), head, {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/(.+?)/resolve/([0-9a-f]{40})/(.+)", path):
            repo = self.repos.get(m.group(1))
            if repo is None or m.group(2) != repo["commit"] or m.group(3) not in repo["files"]:
                return self.send_error(handler, 404, {"X-Error-Code": "EntryNotFound"})
            if not self._auth(handler, repo):
                return
            entry = self._entry(repo, m.group(3))
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            return self.send_bytes(handler, repo["files"][m.group(3)], head,
                                   {"X-Repo-Commit": repo["commit"], "ETag": f'"{etag}"'},
                                   chunk=self.chunk, before_chunk=self.hold_before(path))
        self.send_error(handler, 404)

    def routes(self) -> set[str]:
        """The requests seen, with repo, revision and file names replaced by placeholders."""
        out = set()
        for method, path, _ in self.requests:
            path = unquote(urlsplit(path).path)
            path = re.sub(r"^/api/models/[^/]+/[^/]+/revision/[^/]+$", "/api/models/{repo}/revision/{revision}", path)
            path = re.sub(r"^/api/models/[^/]+/[^/]+/tree/[0-9a-f]{40}$", "/api/models/{repo}/tree/{commit}", path)
            path = re.sub(r"^/[^/]+/[^/]+/resolve/[0-9a-f]{40}/.+$", "/{repo}/resolve/{commit}/{path}", path)
            out.add(f"{method} {path}")
        return out


class StallingProxy(LoopbackServer):
    """Relays GET/HEAD to `upstream` (http://host:port) with every request header unchanged (Host included,
    so a SigV4 signature made for the proxy's address still verifies upstream) and the answer's status,
    headers and body back. A GET of `hold_path` stalls at byte hold_at of the object (a ranged GET counts
    from its Content-Range start) until `release` is set."""

    HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

    def __init__(self, upstream: str, hold_path: str | None = None, hold_at: int | None = None):
        super().__init__(hold_at)
        self.upstream = urlsplit(upstream)
        self.hold_path = hold_path

    def holds(self, path: str) -> bool:
        return path == self.hold_path

    def handle(self, handler, head: bool) -> None:
        import http.client

        self.log(handler, head)
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        handler.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in self.HOP_BY_HOP:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if head:
            return
        start = int(m.group(1)) if (m := re.match(r"bytes (\d+)-", answer.getheader("Content-Range") or "")) else 0
        hold = self.hold_before(urlsplit(handler.path).path)
        try:
            for i in range(0, len(body), 1 << 14):
                if hold is not None:
                    hold(start + i)
                handler.wfile.write(body[i:i + (1 << 14)])
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):   # the client was killed mid-download
            pass


class MotoS3:
    """moto's server (`python -m moto.server`) on loopback with a bucket holding `files` under `prefix`;
    after setup, IAM authentication is on: `credentials` (a user allowed s3:GetObject and s3:ListBucket)
    work, anything else gets InvalidAccessKeyId / AccessDenied."""

    def __init__(self, bucket: str, prefix: str, files: dict[str, bytes]):
        self.bucket, self.prefix, self.files = bucket, prefix, files
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.credentials: dict[str, str] = {}

    def __enter__(self):
        import boto3

        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        admin = dict(endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="model-reader")
        iam.put_user_policy(UserName="model-reader", PolicyName="read-models", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="model-reader")["AccessKey"]
        self.credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket=self.bucket)
        for name, data in self.files.items():
            s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)
        # from now on every request must be signed by a known user whose policy allows it
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"})).read()
        return self

    def env(self, **overrides) -> dict[str, str]:
        """The environment a client of this S3 gets (as an init container would from a Secret)."""
        return {"AWS_ENDPOINT_URL_S3": self.url, "AWS_DEFAULT_REGION": "us-east-1", **self.credentials, **overrides}

    def __exit__(self, *exc):
        self.proc.kill()   # a throwaway test server: nothing to flush (SIGTERM took moto ~6 s)
        self.proc.wait()


def clean_env(**extra) -> dict[str, str]:
    """This environment minus any AWS/HF settings of the machine, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "HF_", "HUGGING", "INDEXCACHE_"))}
    env.update(extra)
    return env
