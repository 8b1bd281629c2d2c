"""The path layer against a real GCS emulator: files, shards, tokenizer, globs, and bad remote paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from lowrank_jax import storage
from lowrank_jax.config import DataConfig
from lowrank_jax.data import load_shards
from lowrank_jax.data.corpus import glob_files, stream_corpus
from lowrank_jax.data.shards import open_shards, prepare_shards

TINY = {"source": "pydoc", "vocab_size": 512, "tokenizer_train_chars": 60_000, "val_fraction": 0.1}


def test_remote_files_round_trip(gcs, tmp_path):
    p = storage.as_path(gcs.url("a/b.txt"))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("hello")
    assert storage.as_path(gcs.url("a/b.txt")).read_text() == "hello"
    assert not (tmp_path / "gs:").exists()
    storage.check_remote("out_dir", gcs.url("run"))  # the bucket exists: no error


def test_shards_prepared_to_gcs_read_back_equal(gcs, tmp_path):
    """prepare to gs:// then train-side load: the same tokens as shards prepared on local disk."""
    cfg = DataConfig(**TINY, cache_dir=str(tmp_path / "cache"))
    local = prepare_shards(cfg, out=tmp_path / "local", log=lambda _: None, block_tokens=4096, blocks_per_file=4)
    url = gcs.url("shards")
    assert prepare_shards(cfg, out=url, log=lambda _: None, block_tokens=4096, blocks_per_file=4) == url
    assert storage.as_path(url + "/manifest.json").exists()
    other = DataConfig(**TINY, cache_dir=str(tmp_path / "cache2"), shards=url)  # another host's cache
    remote = load_shards(other, log=lambda _: None)
    want = open_shards(local)
    assert remote.digest == want.digest and remote.manifest["splits"] == want.manifest["splits"]
    np.testing.assert_array_equal(remote.train.read(0, remote.train.n_tokens), want.train.read(0, want.train.n_tokens))
    np.testing.assert_array_equal(remote.unigram_counts(), want.unigram_counts())
    # the remote tokenizer (data.tokenizer=gs://...) is the shards' tokenizer
    tok_url = url + "/" + want.manifest["tokenizer"]["file"]
    again = load_shards(DataConfig(**TINY, cache_dir=str(tmp_path / "cache3"), shards=url, tokenizer=tok_url))
    assert again.tokenizer.fingerprint == want.tokenizer.fingerprint


def test_remote_globs_read_the_same_corpus(gcs, tmp_path):
    texts = {f"docs/{i:02d}.txt": f"document {i} " * (20 + i) for i in range(40)}
    for name, text in texts.items():
        (tmp_path / "local" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "local" / name).write_text(text)
        storage.as_path(gcs.url(name)).parent.mkdir(parents=True, exist_ok=True)
        storage.as_path(gcs.url(name)).write_text(text)
    assert glob_files([gcs.url("docs/*.txt")]) == sorted(gcs.url(n) for n in texts)
    local = stream_corpus(DataConfig(source="files", paths=(str(tmp_path / "local/docs/*.txt"),), val_fraction=0.3))
    remote = stream_corpus(DataConfig(source="files", paths=(gcs.url("docs/*.txt"),), val_fraction=0.3))
    assert remote.digest() == local.digest()
    assert list(remote.texts("train")) == list(local.texts("train"))


def _bad(args, env, tmp_path):
    res = run_cli(*args, env=env, cwd=tmp_path, timeout=120)
    return res


BAD = {
    "missing bucket": ("out_dir=gs://no-such-bucket/run", "out_dir: bucket 'no-such-bucket' does not exist"),
    "unknown scheme": ("out_dir=ftp://host/run", "out_dir: unknown scheme 'ftp://'"),
    "unreachable endpoint": ("data.tokenizer=gs://b/tok.json", "data.tokenizer: cannot reach the storage endpoint"),
    "no credentials": ("data.shards=gs://b/shards", "data.shards: no Google Cloud credentials"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_remote_paths_are_one_line_exit_2_nothing_written(case, gcs, tmp_path):
    override, message = BAD[case]
    env = dict(gcs.env)
    if case == "unreachable endpoint":
        from lowrank_jax.train.launch import free_port

        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    if case == "no credentials":  # real GCS, no credentials anywhere
        env = {"STORAGE_EMULATOR_HOST": "", "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json")}
        env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")
    env.update({"TENSORSTORE_GCS_HTTP_URL": "", "GOOGLE_AUTH_TOKEN_FOR_TESTING": ""})
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    res = _bad(["train", "tiny", override, "steps=2", f"data.cache_dir={tmp_path / 'cache'}"], env, run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert list(run_dir.iterdir()) == []  # nothing written locally, no directory named "gs:"
    assert not (tmp_path / "cache").exists()
    bucket_objects = json.loads(
        __import__("urllib.request").request.urlopen(f"{gcs.emulator.endpoint}/storage/v1/b/{gcs.name}/o").read()
    )
    assert bucket_objects.get("items", []) == []  # nothing written remotely
