"""source=tfds: a tiny text dataset is built in TFDS ArrayRecord format (no TensorFlow) and read back.

The builder is not registered (``skip_registration=True``), so ``load_corpus`` finds it by
``name/config:version`` in ``data_dir`` exactly as it finds a prepared C4 (whose builder does not
register without TensorFlow).
"""

from __future__ import annotations

from typing import ClassVar

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from lowrank_jax.config import DataConfig  # noqa: E402
from lowrank_jax.data import load_corpus  # noqa: E402

TRAIN = [f"train doc {i}: {'naïve café ' * (i % 4)}end" for i in range(23)]
VAL = [f"validation doc {i} ✓" for i in range(7)]


class LrjToyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Two splits of short UTF-8 documents under a C4-like ``lrj_toy_text/en:1.0.0`` name."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: ClassVar = [tfds.core.BuilderConfig(name="en")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "validation": self._generate_examples(VAL)}

    def _generate_examples(self, docs):
        for i, text in enumerate(docs):
            yield f"doc{i}", {"text": text}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    LrjToyText(data_dir=str(root), config="en", file_format="array_record").download_and_prepare()
    assert list((root / "lrj_toy_text" / "en" / "1.0.0").glob("*.array_record-*"))
    return str(root)


def cfg(data_dir: str, **kw) -> DataConfig:
    return DataConfig(**{"source": "tfds", "tfds_name": "lrj_toy_text/en:1.0.0", "tfds_data_dir": data_dir, **kw})


def test_reads_both_splits_in_record_order(data_dir):
    corpus = load_corpus(cfg(data_dir))
    assert sorted(corpus.train) == sorted(TRAIN) and sorted(corpus.val) == sorted(VAL)
    for split, docs in (("train", corpus.train), ("validation", corpus.val)):
        source = tfds.data_source("lrj_toy_text/en:1.0.0", data_dir=data_dir, split=split)
        assert docs == [source[i]["text"].decode("utf-8") for i in range(len(source))]
    assert corpus.name == "tfds:lrj_toy_text/en:1.0.0"
    assert corpus.digest == load_corpus(cfg(data_dir)).digest


def test_max_docs_and_split_names(data_dir):
    full = load_corpus(cfg(data_dir))
    capped = load_corpus(cfg(data_dir, max_docs=5))
    assert capped.train == full.train[:5] and capped.val == full.val[:5]
    sliced = load_corpus(cfg(data_dir, tfds_split="train[:10]", tfds_val_split="train[10:]"))
    assert sliced.train + sliced.val == full.train


def test_missing_dataset_and_split_raise(data_dir):
    with pytest.raises(ValueError, match=r"data\.tfds_name: no prepared dataset 'lrj_missing:1\.0\.0'"):
        load_corpus(DataConfig(source="tfds", tfds_name="lrj_missing:1.0.0", tfds_data_dir=data_dir))
    with pytest.raises(ValueError, match=r"data\.tfds_name"):
        load_corpus(cfg(data_dir, tfds_name="lrj_toy_text/en:2.0.0"))
    with pytest.raises(ValueError, match=r"nosuchsplit"):
        load_corpus(cfg(data_dir, tfds_val_split="nosuchsplit"))


def test_a_gcs_data_dir_reads_the_same_corpus(data_dir, gcs, tmp_path):
    """data.tfds_data_dir=gs://...: the prepared dataset, copied to a bucket, reads back as the local one (staged
    into data.cache_dir, since ArrayRecord opens local files only); a second read copies nothing."""
    from pathlib import Path

    from lowrank_jax import storage

    storage.upload_tree(Path(data_dir), gcs.url("tfds"))
    remote = load_corpus(cfg(gcs.url("tfds"), cache_dir=str(tmp_path)))
    local = load_corpus(cfg(data_dir))
    assert remote.train == local.train and remote.val == local.val and remote.digest == local.digest
    staged = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert staged and all(p.name.endswith(".json") or ".array_record-" in p.name for p in staged), staged
    mtimes = [p.stat().st_mtime_ns for p in staged]
    assert load_corpus(cfg(gcs.url("tfds"), cache_dir=str(tmp_path))).digest == local.digest
    assert [p.stat().st_mtime_ns for p in staged] == mtimes
    with pytest.raises(ValueError, match=r"data\.tfds_name: no prepared dataset 'lrj_missing:1\.0\.0'"):
        load_corpus(DataConfig(source="tfds", tfds_name="lrj_missing:1.0.0", tfds_data_dir=gcs.url("tfds"),
                               cache_dir=str(tmp_path)))  # fmt: skip
