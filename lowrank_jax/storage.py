"""The path layer: every path a user gives may be local or remote (``gs://bucket/...``).

Remote paths go through ``etils.epath`` (fsspec's ``gcsfs`` underneath), the layer orbax, grain
and tensorstore already share; orbax writes checkpoints to ``gs://`` itself through tensorstore.
Two things cannot work on a bucket directly and are mirrored through a local folder under
``data.cache_dir/remote/`` (named by a hash of the URL):

- the run's records (``metrics.jsonl``, ``config.json``, ``results.json``, ``loss.png`` and the
  TensorBoard event files): GCS objects cannot be appended to, so they are written locally and
  uploaded whole by :meth:`OutDir.push` (at checkpoints, every ``PUSH_EVERY_S`` seconds of logging
  and at the end); a resumed run first downloads them (:meth:`OutDir.pull`);
- token shards: the ``array_record`` reader of the PyPI wheel opens local files only (on a
  ``gs://`` path it blocks), so :func:`local_copy` downloads a shard directory once per host,
  checked file by file against its manifest.

Endpoints: ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage) and ``TENSORSTORE_GCS_HTTP_URL``
(tensorstore, hence orbax) point at an emulator; :func:`check_remote` looks at both.

Before anything is written, :func:`check_remote` turns a bad remote path into one line naming the
field: an unknown scheme, no credentials, an unreachable endpoint, a missing bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SCHEMES = ("gs",)  # remote schemes the layer supports
GCS_ENDPOINT = "https://storage.googleapis.com"
PUSH_EVERY_S = 60.0  # the longest a remote out_dir's records lag behind the local ones while logging
REMOTE_CACHE = "remote"  # under data.cache_dir: local mirrors of remote out_dirs and shards
_CHECK_TIMEOUT_S = 10.0


class StorageError(ValueError):
    """A remote path that cannot be used; the message starts with the config field."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def scheme(path: str) -> str:
    return str(path).split("://", 1)[0].lower()


def emulator_settings() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, point tensorstore (orbax's writer) at the same emulator.

    tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` and takes ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as its
    credentials; gcsfs's storage-layout probe (a gRPC control-plane call no emulator serves) is turned
    off. Values already set are kept.
    """
    if not os.environ.get("STORAGE_EMULATOR_HOST", "").strip():
        return
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", gcs_endpoint())
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _fresh_listings() -> None:
    """No cached directory listings for gs:// (fsspec's default): other processes write the same bucket, and a
    stale listing would hide a checkpoint they finished. Applies to the filesystems made after it."""
    import fsspec.config

    for proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)


def as_path(path: str | os.PathLike):
    """``epath.Path`` for a URL, ``pathlib.Path`` (``~`` expanded) for a local path."""
    if is_remote(path):
        from etils import epath

        emulator_settings()
        _fresh_listings()

        return epath.Path(str(path))
    return Path(path).expanduser()


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` as a string, keeping ``gs://`` intact."""
    return str(as_path(base).joinpath(*parts))


def split_gcs(url: str) -> tuple[str, str]:
    """``("bucket", "key/inside")`` of ``gs://bucket/key/inside``."""
    rest = str(url).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def gcs_endpoint() -> str:
    """The GCS JSON API endpoint: an emulator's (``STORAGE_EMULATOR_HOST``) or Google's."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return GCS_ENDPOINT
    return (host if "://" in host else f"http://{host}").rstrip("/")


def _gcs_token(field: str) -> str | None:
    """An OAuth access token for GCS; None for an emulator (it takes anonymous requests)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return None
    try:
        import google.auth
        import google.auth.transport.requests

        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        creds.refresh(google.auth.transport.requests.Request())
    except ImportError:
        raise StorageError(f"{field}: gs:// paths need gcsfs (pip install gcsfs)") from None
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise StorageError(
            f"{field}: no Google Cloud credentials for gs:// ({why}); run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None
    return creds.token


def check_remote(field: str, url: str) -> None:
    """Raise a one-line :class:`StorageError` naming ``field`` unless ``url``'s bucket can be used.

    Checks, in order: the scheme is supported, the gcsfs package is there, credentials exist (not
    for an emulator), the endpoint answers, the bucket exists. Reads only; writes nothing.
    """
    emulator_settings()
    sch = scheme(url)
    if sch not in SCHEMES:
        raise StorageError(
            f"{field}: unknown scheme {sch + '://'!r} in {url!r} (a local path or one of "
            f"{', '.join(s + '://' for s in SCHEMES)})"
        )
    bucket, _ = split_gcs(url)
    if not bucket:
        raise StorageError(f"{field}: {url!r} names no bucket (gs://BUCKET/path)")
    try:
        import gcsfs  # noqa: F401  (epath's backend for gs://)
    except ImportError:
        raise StorageError(f"{field}: gs:// paths need the gcsfs package (pip install gcsfs)") from None
    token = _gcs_token(field)
    endpoint = gcs_endpoint()
    request = urllib.request.Request(f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=_CHECK_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise StorageError(f"{field}: bucket {bucket!r} does not exist ({url})") from None
        if e.code in (401, 403):
            why = f"HTTP {e.code}; check the credentials"
            raise StorageError(f"{field}: no access to bucket {bucket!r} ({why})") from None
        raise StorageError(f"{field}: the storage endpoint {endpoint} answered HTTP {e.code} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or e
        raise StorageError(f"{field}: cannot reach the storage endpoint {endpoint} ({why})") from None


def _cache_key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def mirror_dir(cache_dir: str, url: str) -> Path:
    """The local folder that mirrors the remote ``url`` on this host."""
    return Path(cache_dir).expanduser() / REMOTE_CACHE / _cache_key(url)


def upload_tree(local: Path, url: str) -> None:
    """Copy every file under ``local`` to ``url`` (same relative names), replacing what is there."""
    base = as_path(url)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            dest = base.joinpath(*p.relative_to(local).parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())


def walk_files(url: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative names of every file under ``url`` (those starting with ``skip`` left out), listed folder by
    folder (``epath`` refuses ``**`` on gs://)."""
    base = as_path(url)
    out, todo = [], [base] if base.is_dir() else []
    while todo:
        for p in todo.pop().iterdir():
            rel = str(p)[len(str(base)) :].lstrip("/")
            if rel.startswith(skip):
                continue
            if p.is_dir():
                todo.append(p)
            else:
                out.append(rel)
    return sorted(out)


def download_tree(url: str, local: Path, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under ``url`` into ``local`` (names starting with ``skip`` left out); returns the count."""
    base = as_path(url)
    names = walk_files(url, skip)
    for rel in names:
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base.joinpath(rel).read_bytes())
    return len(names)


class OutDir:
    """Where a run writes: ``local`` (records), ``checkpoints`` (orbax, local or remote), ``remote`` (or None).

    For a local ``out_dir`` the records and checkpoints are both in it and :meth:`push` / :meth:`pull`
    do nothing. For a remote one the records live in a local mirror and are uploaded whole.
    """

    def __init__(self, out_dir: str, cache_dir: str):
        self.url = str(out_dir).rstrip("/")
        self.remote = self.url if is_remote(self.url) else None
        self.local = mirror_dir(cache_dir, self.url) / "out" if self.remote else Path(out_dir).expanduser()
        self.checkpoints = join(self.url, "checkpoints") if self.remote else str(self.local / "checkpoints")
        self._pushed: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) last uploaded
        self._last_push = 0.0

    def __str__(self) -> str:
        return self.url

    def pull(self) -> None:
        """Replace the local mirror with the bucket's records (a resumed run on any host starts from them)."""
        if not self.remote:
            return
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        download_tree(self.url, self.local, skip=("checkpoints",))
        self._pushed = self._stats()

    def clear_mirror(self) -> None:
        """A fresh run: no records of an earlier attempt in the local mirror."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def _stats(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.local.rglob("*"):
            if p.is_file() and not p.name.endswith(".tmp"):
                st = p.stat()
                out[str(p.relative_to(self.local))] = (st.st_size, st.st_mtime_ns)
        return out

    def push(self, force: bool = True) -> None:
        """Upload the records changed since the last push (``force=False``: at most every ``PUSH_EVERY_S``)."""
        if not self.remote or not self.local.is_dir():
            return
        if not force and time.monotonic() - self._last_push < PUSH_EVERY_S:
            return
        stats = self._stats()
        base = as_path(self.url)
        for name, st in sorted(stats.items()):
            if self._pushed.get(name) != st:
                dest = base / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes((self.local / name).read_bytes())
        self._pushed = stats
        self._last_push = time.monotonic()


def write_local(dest: Path, data: bytes) -> None:
    """Write ``data`` to the local file ``dest`` atomically (a hidden ``.part`` file, then a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def local_copy(url: str, cache_dir: str, field: str) -> Path:
    """A local copy of the remote shard directory ``url``, downloaded once and checked against its manifest.

    The copy is reused while its manifest equals the bucket's and every listed file has its size;
    a partial copy is completed, a stale one replaced.
    """
    src = as_path(url)
    manifest_path = src / "manifest.json"
    if not manifest_path.exists():
        raise StorageError(f"{field}: {url!r} has no manifest.json: not a shard directory, or an unfinished prepare")
    text = manifest_path.read_text()
    manifest: dict[str, Any] = json.loads(text)
    local = mirror_dir(cache_dir, url) / "shards"
    if (local / "manifest.json").is_file() and (local / "manifest.json").read_text() != text:
        shutil.rmtree(local)
    local.mkdir(parents=True, exist_ok=True)
    names = [f["name"] for split in manifest["splits"].values() for f in split["files"]]
    sizes = {f["name"]: f["bytes"] for split in manifest["splits"].values() for f in split["files"]}
    names += ["unigram_counts.npy", manifest["tokenizer"]["file"]]
    for name in names:
        dest = local / name
        if dest.is_file() and (name not in sizes or dest.stat().st_size == sizes[name]):
            continue
        write_local(dest, (src / name).read_bytes())
    write_local(local / "manifest.json", text.encode())  # last: a copy with a manifest is complete
    return local


def local_file(url: str, cache_dir: str) -> str:
    """A local copy of the remote file ``url`` (a tokenizer), refreshed when the bucket's bytes differ."""
    data = as_path(url).read_bytes()
    dest = mirror_dir(cache_dir, url) / Path(split_gcs(url)[1]).name
    if not dest.is_file() or dest.read_bytes() != data:
        write_local(dest, data)
    return str(dest)
