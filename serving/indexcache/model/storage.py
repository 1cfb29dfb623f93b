"""Model delivery: one resolver from a model URI to a verified local checkpoint directory.

    hf://org/name[@revision]           the Hugging Face Hub (or HF_ENDPOINT), token from HF_TOKEN
    s3://bucket/prefix                 S3 or a compatible store (AWS_ENDPOINT_URL_S3 for MinIO and friends),
                                       credentials from the AWS environment (keys, IRSA, profiles)
    http(s)://host/model.tar.gz#sha256=<hex>
                                       a tarball; without the fragment, <url>.sha256 is read
    pvc://claim/path                   a volume claim mounted at $INDEXCACHE_PVC_ROOT/claim (default /mnt/pvc)
    /abs/dir, rel/dir                  a directory on this machine
    smollm2, tiny                      the bundled models (converted or built once into the cache)

Remote models land in `<cache>/<key>/`, key = sha256 of the URI and the resolved revision (a Hub commit, a
digest of the S3 listing, the tarball's sha256), so a moved branch or a changed prefix is a new entry and
an old one is never overwritten in place. Who fills an entry:
  - holds `<key>.lock` (a POSIX lock: released by the kernel when its holder dies; a second process waits
    and then uses the first one's result),
  - downloads into `<key>.partial/` (what a killed run left there is resumed: HTTP and S3 from the byte they
    stopped at, with Range requests; the Hub per file: huggingface_hub keeps the files it completed and
    starts an interrupted one over), checks sizes and checksums against what the source published,
  - writes `.indexcache-manifest.json` (every file with its size and sha256) and renames the directory into
    place: an entry either is complete with its manifest or does not exist.
A reader checks the manifest (file list and sizes; sha256 too with verify_hashes) before every use; a
failed check is refetched, never loaded. Offline (INDEXCACHE_OFFLINE=1 or HF_HUB_OFFLINE=1) serves from the
cache only, using the revision the last online fetch of the same URI resolved (`<cache>/refs/`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

SUPPORTED = ("hf://org/name[@revision], s3://bucket/prefix, http(s)://host/model.tar.gz#sha256=<64 hex>, "
             "pvc://claim/path, a directory path, or a bundled model name (smollm2, tiny)")
BUNDLED = ("smollm2", "tiny")
MANIFEST = ".indexcache-manifest.json"
OFFLINE_ENV = ("INDEXCACHE_OFFLINE", "HF_HUB_OFFLINE")
PVC_ROOT_ENV, DEFAULT_PVC_ROOT = "INDEXCACHE_PVC_ROOT", "/mnt/pvc"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
DNS1123_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CHUNK = 1 << 20
# Downloads write what has arrived at most this far behind: a killed fetch keeps nearly all it received.
WRITE_CHUNK = 1 << 18


class FetchError(RuntimeError):
    """A model that cannot be had. `reason` is one word for a status condition: Unsupported, Invalid,
    NotFound, Auth, Network, Checksum, DiskFull or NotCached."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ResolvedModel:
    uri: str
    path: Path                  # the checkpoint directory to load
    revision: str | None        # what the URI resolved to (Hub commit, listing digest, sha256); None for paths
    name: str                   # a short display name (the repository / prefix / directory name)
    downloaded_bytes: int = 0   # 0 when the cache already held it

    def to_json(self) -> dict:
        return {"uri": self.uri, "path": str(self.path), "revision": self.revision, "name": self.name,
                "downloaded_bytes": self.downloaded_bytes}


def offline_mode() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV)


def default_cache_dir() -> Path:
    """INDEXCACHE_MODEL_CACHE, else $INDEXCACHE_HOME/models (default ~/.cache/indexcache/models)."""
    if os.environ.get("INDEXCACHE_MODEL_CACHE"):
        return Path(os.environ["INDEXCACHE_MODEL_CACHE"])
    return Path(os.environ.get("INDEXCACHE_HOME") or Path.home() / ".cache" / "indexcache") / "models"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------
# progress, locks, free space
# ---------------------------------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):   # a file renamed away between listing and stat
                total += os.lstat(os.path.join(root, f)).st_size
    return total


class DirProgress:
    """Logs the bytes under a directory every `interval` seconds while a download writes there: one
    counter for every source (the Hub's client, S3, HTTP), resumed bytes included."""

    def __init__(self, path: Path, label: str, total: int | None = None, interval: float = 5.0):
        self.path, self.label, self.total, self.interval = path, label, total, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="indexcache-fetch-progress", daemon=True)
        self.start_bytes = 0
        self.started = time.monotonic()

    def line(self) -> str:
        done = _dir_bytes(self.path)
        rate = (done - self.start_bytes) / max(time.monotonic() - self.started, 1e-6)
        of = f" / {_human(self.total)} ({100 * done / self.total:.0f} %)" if self.total else ""
        return f"fetch {self.label}: {_human(done)}{of}, {_human(rate)}/s"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            log.info(self.line())

    def __enter__(self) -> "DirProgress":
        self.start_bytes = _dir_bytes(self.path)
        if self.start_bytes:
            log.info("fetch %s: resuming, %s already here", self.label, _human(self.start_bytes))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def cache_lock(path: Path, label: str, poll: float = 0.5, report_every: float = 30.0):
    """Exclusive POSIX lock on `path` (created if missing). POSIX locks work across pods on NFS-backed
    volumes and are dropped by the kernel when the holder dies, so a killed fetch never wedges the next."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        # a cache mounted read-only (the replicas' and Jobs' view of it) has nobody to exclude
        yield
        return
    try:
        waited, last_report = 0.0, 0.0
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if waited - last_report >= report_every or waited == 0:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                log.info("fetch %s: waiting for another process that is fetching it (%s; lock %s)",
                         label, holder or "unknown", path)
                last_report = waited
            time.sleep(poll)
            waited += poll
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


def ensure_space(where: Path, needed: int, label: str) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise FetchError("DiskFull", f"{label} needs {_human(needed)} more but {where} has {_human(free)} free: "
                         "give the model cache more space (spec.model.cacheVolume) or free some")


# ---------------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_files(model_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file under model_dir, sorted; the manifest excluded."""
    out = []
    for root, _, files in os.walk(model_dir):
        for f in files:
            rel = Path(root, f).relative_to(model_dir).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def build_manifest(model_dir: Path, uri: str, revision: str,
                   expected: dict[str, tuple[int, str | None]]) -> dict:
    """Hash every file (and fsync it: the rename that follows must not publish data still in page cache);
    compare with what the source published: `expected` maps path -> (size, sha256 or None). A wrong file
    is deleted so that the next attempt fetches it again."""
    files = []
    for rel in model_files(model_dir):
        path = model_dir / rel
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(path, 0o644)   # readable by every pod sharing the cache, whatever wrote it (tempfiles are 0600)
        files.append({"path": rel, "size": path.stat().st_size, "sha256": _file_sha256(path)})
    have = {f["path"]: f for f in files}
    missing = sorted(set(expected) - set(have))
    if missing:
        raise FetchError("Checksum", f"{uri}: the download lacks {len(missing)} files the source lists "
                         f"({', '.join(missing[:5])}); fetch again")
    for rel, (size, sha) in expected.items():
        got = have[rel]
        if got["size"] != size or (sha is not None and got["sha256"] != sha):
            (model_dir / rel).unlink()
            what = f"{got['size']} bytes, expected {size}" if got["size"] != size else \
                f"sha256 {got['sha256'][:12]}..., expected {sha[:12]}..."
            raise FetchError("Checksum", f"{uri}: {rel} arrived corrupt ({what}); removed, fetch again")
    if "config.json" not in have:
        raise FetchError("Invalid", f"{uri} holds no config.json at its top level, so it is not an HF-format "
                         f"checkpoint directory (files: {', '.join(list(have)[:5]) or 'none'})")
    return {"format": 1, "uri": uri, "revision": revision,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_bytes": sum(f["size"] for f in files), "files": files}


def check_manifest(model_dir: Path, verify_hashes: bool = False) -> str | None:
    """None if model_dir is a complete cache entry, else what is wrong with it."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    listed = {f["path"] for f in files}
    extra = sorted(set(model_files(model_dir)) - listed)
    if extra:
        return f"files not in the manifest: {', '.join(extra[:5])}"
    for f in files:
        path = model_dir / f["path"]
        if not path.is_file():
            return f"{f['path']} is missing"
        if path.stat().st_size != f["size"]:
            return f"{f['path']} has {path.stat().st_size} bytes, the manifest says {f['size']}"
        if verify_hashes and _file_sha256(path) != f["sha256"]:
            return f"{f['path']} does not match its sha256"
    return None


# ---------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalSource:
    path: Path


@dataclass(frozen=True)
class BundledSource:
    name: str


@dataclass(frozen=True)
class HubSource:
    """hf://org/name[@revision]: huggingface_hub's snapshot_download into the entry's partial directory.
    Routes it uses (HF_ENDPOINT): GET /api/models/{repo}/revision/{rev}, GET /api/models/{repo}/tree/{commit},
    HEAD and GET /{repo}/resolve/{commit}/{file}."""
    repo_id: str
    revision: str | None

    @property
    def canonical(self) -> str:
        return f"hf://{self.repo_id}"

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]

    @property
    def pinned_revision(self) -> str | None:
        return self.revision if self.revision and COMMIT_RE.fullmatch(self.revision) else None

    def _api(self):
        from huggingface_hub import HfApi
        return HfApi(endpoint=_hub_endpoint(), token=_hub_token())

    def resolve_revision(self) -> str:
        with _hub_errors(self.canonical):
            return self._api().model_info(self.repo_id, revision=self.revision or "main").sha

    def fetch_into(self, work: Path, revision: str) -> tuple[Path, dict]:
        from huggingface_hub import RepoFile, snapshot_download

        label = f"{self.canonical}@{revision[:12]}"
        with _hub_errors(self.canonical):
            listing = {f.path: (f.size, f.lfs.sha256 if f.lfs is not None else None)
                       for f in self._api().list_repo_tree(self.repo_id, recursive=True, revision=revision)
                       if isinstance(f, RepoFile)}
            model = work / "model"
            model.mkdir(exist_ok=True)
            _drop_stale_hub_downloads(model)
            total = sum(size for size, _ in listing.values())
            ensure_space(work, total - _dir_bytes(model), label)
            with DirProgress(model, label, total):
                snapshot_download(self.repo_id, revision=revision, local_dir=model, endpoint=_hub_endpoint(),
                                  token=_hub_token(), max_workers=4)
        # huggingface_hub's resume bookkeeping, not part of the model
        shutil.rmtree(model / ".cache" / "huggingface", ignore_errors=True)
        with contextlib.suppress(OSError):
            (model / ".cache").rmdir()
        return model, listing


def _drop_stale_hub_downloads(model: Path) -> None:
    """huggingface_hub downloads each file into `<name>.<random>.incomplete` and never reuses one (it starts an
    interrupted file over): what a killed fetch left there only takes space, and would count as done bytes."""
    for stale in (model / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _hub_endpoint() -> str | None:
    # read per call: huggingface_hub reads HF_ENDPOINT once, at its import
    return os.environ.get("HF_ENDPOINT") or None


def _hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _is_transport_error(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError)) or \
        type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


@contextlib.contextmanager
def _hub_errors(uri: str):
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        yield
    except GatedRepoError as exc:
        raise FetchError("Auth", f"{uri} is gated: accept its terms on the Hub with an account and give that "
                         f"account's token (HF_TOKEN; spec.model.credentialsSecret) ({exc})") from None
    except RepositoryNotFoundError:
        raise FetchError("NotFound", f"{uri}: no such repository, or it is private and HF_TOKEN is missing or "
                         "has no access (spec.model.credentialsSecret)") from None
    except RevisionNotFoundError:
        raise FetchError("NotFound", f"{uri}: no such revision (branch, tag or commit after '@')") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise FetchError("Auth", f"{uri}: the Hub refused the token ({status}); check HF_TOKEN") from None
        if status == 404:
            raise FetchError("NotFound", f"{uri}: not found on the Hub ({exc})") from None
        raise FetchError("Network", f"{uri}: the Hub answered {status}: {exc}") from None
    except FetchError:
        raise
    except Exception as exc:
        if _is_transport_error(exc):
            raise FetchError("Network", f"{uri}: cannot reach the Hub at {_hub_endpoint() or 'huggingface.co'} "
                             f"({type(exc).__name__}: {exc}); set HF_HUB_OFFLINE=1 to use the cache only") from None
        raise


@dataclass(frozen=True)
class S3Object:
    key: str
    rel: str
    size: int
    etag: str


class S3Source:
    """s3://bucket/prefix: every object under prefix/, fetched with boto3 (ranged GETs resume a partial
    file; If-Match on the listed ETag refuses an object that changed since the listing)."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._listing: list[S3Object] | None = None

    @property
    def canonical(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1] or self.bucket

    pinned_revision = None

    def _client(self):
        import boto3
        from botocore.config import Config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # MinIO and most S3-compatible stores want path-style addressing (no bucket.host DNS)
        config = Config(retries={"max_attempts": 5, "mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint else {})
        # a new session per fetch: boto3's default session keeps the credentials it first read
        return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)

    def listing(self) -> list[S3Object]:
        if self._listing is None:
            prefix = f"{self.prefix}/" if self.prefix else ""
            objects = []
            with _s3_errors(self.canonical):
                pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
                for page in pages:
                    for obj in page.get("Contents", []):
                        rel = obj["Key"][len(prefix):]
                        if not rel or rel.endswith("/"):   # "directory" markers
                            continue
                        parts = PurePosixPath(rel).parts
                        if ".." in parts or rel.startswith("/"):
                            raise FetchError("Invalid", f"{self.canonical}: object key {obj['Key']!r} would "
                                             "land outside the model directory")
                        objects.append(S3Object(obj["Key"], rel, obj["Size"], obj["ETag"]))
            if not objects:
                raise FetchError("NotFound", f"{self.canonical}: no objects under s3://{self.bucket}/{prefix} "
                                 "(check the bucket and prefix)")
            self._listing = sorted(objects, key=lambda o: o.key)
        return self._listing

    def resolve_revision(self) -> str:
        """A digest of the listing (key, size, ETag): S3 has no commits, but a changed object is a new entry."""
        lines = "".join(f"{o.key}\t{o.size}\t{o.etag}\n" for o in self.listing())
        return "s3-" + _sha(lines)[:24]

    def fetch_into(self, work: Path, revision: str) -> tuple[Path, dict]:
        objects = self.listing()
        if self.resolve_revision() != revision:
            raise FetchError("Network", f"{self.canonical} changed while it was being fetched; fetch again")
        model = work / "model"
        model.mkdir(exist_ok=True)
        total = sum(o.size for o in objects)
        label = self.canonical
        ensure_space(work, total - _dir_bytes(model), label)
        client = self._client()
        with DirProgress(model, label, total), _s3_errors(label), ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda o: self._fetch_object(client, o, model / o.rel), objects))
        return model, {o.rel: (o.size, None) for o in objects}

    def _fetch_object(self, client, obj: S3Object, dest: Path) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        if dest.exists() and have == obj.size:
            return
        if have > obj.size:
            have = 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"Bucket": self.bucket, "Key": obj.key, "IfMatch": obj.etag}
        if have:
            kwargs["Range"] = f"bytes={have}-"
        body = client.get_object(**kwargs)["Body"]
        with open(dest, "ab" if have else "wb") as f:
            for chunk in body.iter_chunks(WRITE_CHUNK):
                f.write(chunk)


@contextlib.contextmanager
def _s3_errors(uri: str):
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise FetchError("Auth", f"{uri}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (spec.model.credentialsSecret) or a service account role (IRSA)"
                         ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                    "InvalidToken", "AllAccessDisabled") or status in (401, 403):
            raise FetchError("Auth", f"{uri}: access denied ({code or status}); check the AWS credentials "
                             "(spec.model.credentialsSecret) and their permissions on the bucket") from None
        if code in ("NoSuchBucket", "NoSuchKey") or status == 404:
            raise FetchError("NotFound", f"{uri}: {code or 'not found'}") from None
        if code == "PreconditionFailed" or status == 412:
            raise FetchError("Network", f"{uri}: an object changed while it was being fetched; fetch again") from None
        raise FetchError("Network", f"{uri}: S3 error {code or status}: {exc}") from None
    except EndpointConnectionError as exc:
        raise FetchError("Network", f"{uri}: cannot reach S3 ({exc}); AWS_ENDPOINT_URL_S3 sets the endpoint") from None


class HttpSource:
    """http(s)://.../model.tar[.gz|.bz2|.xz]#sha256=<hex>: one tarball, verified against its sha256 (from the
    fragment, else from <url>.sha256), resumed with Range requests, unpacked with tarfile's "data" filter."""

    def __init__(self, url: str, sha256: str | None):
        self.url, self.sha256 = url, sha256

    @property
    def canonical(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        base = PurePosixPath(urllib.parse.urlsplit(self.url).path).name
        for ext in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
            if base.endswith(ext):
                return base[: -len(ext)]
        return base or "model"

    @property
    def pinned_revision(self) -> str | None:
        return self.sha256

    def resolve_revision(self) -> str:
        try:
            with _http_errors(self.url + ".sha256"), urllib.request.urlopen(self.url + ".sha256", timeout=30) as r:
                text = r.read(4096).decode(errors="replace")
        except FetchError as exc:
            if exc.reason != "NotFound":
                raise
            raise FetchError("Invalid", f"{self.url}: an http(s) model needs its sha256: append #sha256=<64 hex> "
                             "to the URI (sha256sum model.tar.gz), or publish it at <url>.sha256") from None
        digest = text.split()[0].lower() if text.split() else ""
        if not SHA256_RE.fullmatch(digest):
            raise FetchError("Invalid", f"{self.url}.sha256 does not start with a sha256 (64 hex digits)")
        return digest

    def fetch_into(self, work: Path, revision: str) -> tuple[Path, dict]:
        archive = work / "archive"
        have = archive.stat().st_size if archive.exists() else 0
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={have}-"} if have else {})
        with _http_errors(self.url), contextlib.ExitStack() as stack:
            try:
                response = stack.enter_context(urllib.request.urlopen(request, timeout=60))
            except urllib.error.HTTPError as exc:
                if exc.code != 416 or not have:
                    raise
                response = None   # nothing after byte `have`: a killed fetch had the whole archive already
            if response is not None:
                resumed = response.status == 206
                length = int(response.headers.get("Content-Length") or 0)
                total = (have if resumed else 0) + length
                if length:
                    ensure_space(work, 2 * length, self.url)   # the archive and its unpacked copy
                if have and not resumed:
                    log.info("fetch %s: the server ignored the range request; starting over", self.url)
                    archive.unlink()
                with DirProgress(work, self.url, total or None), open(archive, "ab" if resumed else "wb") as f:
                    while chunk := response.read1(CHUNK):   # what has arrived, not a full MiB
                        f.write(chunk)
        got = _file_sha256(archive)
        if got != revision:
            archive.unlink()
            raise FetchError("Checksum", f"{self.url}: sha256 {got} does not match the expected {revision}; the "
                             "file changed or the sha256 given is wrong")
        model = work / "model"
        shutil.rmtree(model, ignore_errors=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(model, filter="data")   # refuses absolute paths, '..', devices, links out
        except (tarfile.TarError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise
            archive.unlink()
            raise FetchError("Invalid", f"{self.url}: not a readable tar archive ({exc})") from None
        archive.unlink()
        entries = list(model.iterdir())
        if len(entries) == 1 and entries[0].is_dir() and not (model / "config.json").exists():
            return entries[0], {}   # model.tar.gz holding one top directory
        return model, {}


@contextlib.contextmanager
def _http_errors(url: str):
    try:
        yield
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise FetchError("Auth", f"{url}: the server refused access ({exc.code}); use a URL it accepts "
                             "(e.g. a presigned one)") from None
        if exc.code == 404:
            raise FetchError("NotFound", f"{url}: not found (404)") from None
        raise FetchError("Network", f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise FetchError("Network", f"{url}: cannot connect ({exc.reason})") from None
    except (ConnectionError, TimeoutError) as exc:
        raise FetchError("Network", f"{url}: connection lost ({exc})") from None


def parse_uri(uri: str):
    """The source a model URI names; FetchError("Unsupported"/"Invalid") with the accepted forms otherwise."""
    if not uri or not uri.strip():
        raise FetchError("Invalid", f"empty model URI; give one of: {SUPPORTED}")
    uri = uri.strip()
    if uri in BUNDLED:
        return BundledSource(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return LocalSource(Path(uri))
    scheme = scheme.lower()
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        repo = repo.strip("/")
        if not HUB_REPO_RE.fullmatch(repo):
            raise FetchError("Invalid", f"{uri}: a Hub model is hf://org/name[@revision]")
        return HubSource(repo, revision or None)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise FetchError("Invalid", f"{uri}: an S3 model is s3://bucket/prefix")
        return S3Source(bucket, prefix)
    if scheme in ("http", "https"):
        url, _, fragment = uri.partition("#")
        sha = None
        if fragment:
            key, _, value = fragment.partition("=")
            if key != "sha256" or not SHA256_RE.fullmatch(value.lower()):
                raise FetchError("Invalid", f"{uri}: the fragment must be #sha256=<64 hex digits>")
            sha = value.lower()
        return HttpSource(url, sha)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not DNS1123_RE.fullmatch(claim):
            raise FetchError("Invalid", f"{uri}: a volume model is pvc://claim/path with a valid claim name")
        if ".." in PurePosixPath(sub).parts:
            raise FetchError("Invalid", f"{uri}: the path inside the claim may not contain '..'")
        return LocalSource(Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT) / claim / sub)
    if scheme == "gs":
        raise FetchError("Unsupported", f"{uri}: gs:// is not supported (no way to test it here); copy the model "
                         f"to S3 (GCS speaks S3 at https://storage.googleapis.com with HMAC keys) or use: {SUPPORTED}")
    raise FetchError("Unsupported", f"{uri}: unknown scheme {scheme}://; use one of: {SUPPORTED}")


# ---------------------------------------------------------------------------------------------------
# the resolver
# ---------------------------------------------------------------------------------------------------
def entry_dir(cache: Path, source, revision: str) -> Path:
    return cache / _sha(f"{source.canonical}\n{revision}")[:32]


def _ref_path(cache: Path, uri: str) -> Path:
    return cache / "refs" / _sha(uri)[:32]


def _read_ref(cache: Path, uri: str) -> str | None:
    with contextlib.suppress(OSError):
        return _ref_path(cache, uri).read_text().strip() or None
    return None


def _write_ref(cache: Path, uri: str, revision: str) -> None:
    path = _ref_path(cache, uri)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(revision + "\n")
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve(uri: str, cache_dir: str | Path | None = None, *, offline: bool | None = None,
            verify_hashes: bool = False) -> ResolvedModel:
    """The checkpoint directory `uri` names, fetched into the cache first if it is remote."""
    source = parse_uri(uri)
    if isinstance(source, LocalSource):
        path = source.path
        if not path.is_dir():
            hint = (f"is the claim mounted under {os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT} ({PVC_ROOT_ENV})?"
                    if uri.startswith("pvc://") else f"give a checkpoint directory or one of: {SUPPORTED}")
            raise FetchError("NotFound", f"model directory {path} does not exist; {hint}")
        return ResolvedModel(uri, path, None, path.resolve().name)
    if isinstance(source, BundledSource):
        return _bundled(source.name, cache_dir)

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    offline = offline_mode() if offline is None else offline
    revision = source.pinned_revision or (_read_ref(cache, uri) if offline else None)
    state = f"not in the model cache {cache}"
    if revision is not None:
        final = entry_dir(cache, source, revision)
        damage = check_manifest(final, verify_hashes)
        if damage is None:
            return ResolvedModel(uri, final, revision, source.name)
        if final.exists():
            state = f"damaged in the model cache {cache} ({damage}; not loaded)"
    if offline:
        raise FetchError("NotCached", f"{uri} is {state} and offline mode is on "
                         f"({'/'.join(OFFLINE_ENV)}): run `indexcache fetch {uri} --cache {cache}` where the "
                         "source is reachable, or turn offline mode off")
    if revision is None:
        revision = source.resolve_revision()
    final = entry_dir(cache, source, revision)
    label = f"{uri} ({revision[:16]})"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with cache_lock(final.with_name(final.name + ".lock"), label):
        problem = check_manifest(final, verify_hashes)
        work = final.with_name(final.name + ".partial")
        if problem is None:   # another process fetched it while this one waited
            log.info("fetch %s: already in the cache at %s", label, final)
            shutil.rmtree(work, ignore_errors=True)   # left by a fetch killed between its rename and cleanup
            _write_ref(cache, uri, revision)
            return ResolvedModel(uri, final, revision, source.name)
        if final.exists():
            log.warning("fetch %s: discarding the cache entry %s (%s)", label, final, problem)
            shutil.rmtree(final)
        work.mkdir(exist_ok=True)
        try:
            model, expected = source.fetch_into(work, revision)
            manifest = build_manifest(model, uri, revision, expected)
            (model / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.rename(model, final)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise FetchError("DiskFull", f"{uri}: no space left in {cache}; give the model cache more space "
                                 "(spec.model.cacheVolume)") from None
            raise
        shutil.rmtree(work, ignore_errors=True)
        _fsync_dir(cache)
        _write_ref(cache, uri, revision)
    seconds = time.monotonic() - started
    log.info("fetch %s: %s in %d files, %.1f s (%s/s) -> %s", label, _human(manifest["total_bytes"]),
             len(manifest["files"]), seconds, _human(manifest["total_bytes"] / max(seconds, 1e-6)), final)
    return ResolvedModel(uri, final, revision, source.name, downloaded_bytes=manifest["total_bytes"])


def _bundled(name: str, cache_dir: str | Path | None) -> ResolvedModel:
    """The bundled models are built from what the package ships (no network, so offline mode does not
    matter): smollm2 through offline.smollm2.bundled_checkpoint (the serving app's own), tiny by writing
    model.tiny's random model (seed 0) and its character tokenizer as a checkpoint."""
    if name == "smollm2":
        from ..offline.smollm2 import bundled_checkpoint
        root = cache_dir or os.environ.get("INDEXCACHE_MODEL_CACHE")   # None: bundled_checkpoint's own home
        if root is None:
            path = bundled_checkpoint(None)
        else:   # a shared cache: one pod converts (~20 s), the others wait for its result
            Path(root).mkdir(parents=True, exist_ok=True)
            with cache_lock(Path(root) / "smollm2.lock", name):
                path = bundled_checkpoint(root)
        return ResolvedModel(name, path, path.name.rsplit("-", 1)[-1], "smollm2-dsa")
    from .tiny import TINY_CONFIG, TINY_MODEL_NAME, save_char_tokenizer, tiny_model
    from .checkpoint import save_checkpoint

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    revision = _sha(json.dumps(TINY_CONFIG, sort_keys=True) + "seed=0")[:12]
    final = cache / f"tiny-{revision}"
    if (final / "config.json").is_file():
        return ResolvedModel(name, final, revision, TINY_MODEL_NAME)
    cache.mkdir(parents=True, exist_ok=True)
    with cache_lock(final.with_name(final.name + ".lock"), name):
        if not (final / "config.json").is_file():
            work = final.with_name(final.name + ".partial")
            shutil.rmtree(work, ignore_errors=True)
            save_checkpoint(tiny_model(seed=0), work)
            save_char_tokenizer(work)
            os.rename(work, final)
    return ResolvedModel(name, final, revision, TINY_MODEL_NAME)
