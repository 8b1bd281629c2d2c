"""The overtraining study on a list of checkpoints (three tiny Hugging Face directories made here)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from lowrank_jax.analysis import parameter_sensitivity, study_checkpoints
from lowrank_jax.config import ModelConfig
from lowrank_jax.data import eval_batches
from lowrank_jax.hf import export_hf
from lowrank_jax.hf.model_dir import save_model_dir
from lowrank_jax.models import build_model, split_model

REPO = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer(path: Path) -> Path:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"</s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def text(seed: int, n: int, skew: float) -> str:
    p = 1.0 / np.arange(1, len(WORDS) + 1) ** skew
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n, p=p / p.sum()))


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    """Three Hugging Face checkpoints (random weights of growing scale) sharing a tokenizer, and two texts."""
    root = tmp_path_factory.mktemp("ckpts")
    tok = word_tokenizer(root / "tokenizer.json")
    cfg = ModelConfig(vocab_size=64, hidden=32, ffn=48, heads=4, layers=2, num_kv_heads=2, max_seq_len=64)
    dirs = []
    for i, scale in enumerate((1.0, 2.0, 4.0)):
        _, params = split_model(build_model(cfg, i))
        params = jax.tree.map(lambda x, s=scale: np.asarray(x) * s, params)
        save_model_dir(root / f"m{i}", cfg, params, None, str(tok))
        dirs.append(export_hf(root / f"m{i}", root / f"step{i}"))
    (root / "pt.txt").write_text(text(0, 600, 1.0))
    (root / "ft.jsonl").write_text("\n".join(json.dumps({"text": text(s, 150, 0.3)}) for s in range(4)) + "\n")
    return root, dirs


@pytest.mark.slow  # three sensitivity tables and three fine-tunings (~20 s)
def test_study_on_three_checkpoints_end_to_end(study_inputs, tmp_path, monkeypatch):
    root, dirs = study_inputs
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import overtraining

    out = tmp_path / "report"
    argv = ["--part", "checkpoints", "--checkpoints", *map(str, dirs[::-1]), "--tokens", "4e9", "2e9", "1e9"]
    argv += ["--data", str(root / "pt.txt"), "--ft-data", str(root / "ft.jsonl"), "--out", str(out)]
    argv += ["--lambdas", "0.5", "1", "--seeds", "2", "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "256"]
    argv += ["--ft-steps", "3", "--ft-lr", "1e-3"]
    assert overtraining.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    recs = res["checkpoints"]
    assert [r["tokens"] for r in recs] == [1e9, 2e9, 4e9]  # sorted by tokens seen
    assert [Path(r["checkpoint"]).name for r in recs] == ["step0", "step1", "step2"]
    assert (out / "checkpoints.png").stat().st_size > 0 and "tokens seen" in (out / "table.md").read_text()
    for r in recs:
        assert [row["lambda"] for row in r["sensitivity"]["rows"]] == [0.5, 1.0]
        assert len(r["finetune"]["train_losses"]) == 3
    # the sensitivity of the first checkpoint equals parameter_sensitivity run directly on its weights
    from lowrank_jax.hf import load_model

    m = load_model(dirs[0])
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    stream = np.asarray(tok.encode((root / "pt.txt").read_text(), add_special_tokens=False).ids + [0], np.int32)
    direct = parameter_sensitivity(
        m.params, eval_batches(stream, 16, 256, 4), (0.5, 1.0), 2, jax.random.key(20250324), model_cfg=m.cfg
    ).to_dict()
    assert recs[0]["sensitivity"]["clean_loss"] == pytest.approx(direct["clean_loss"], rel=1e-6)
    assert [r["mean_increase"] for r in recs[0]["sensitivity"]["rows"]] == pytest.approx(
        [r["mean_increase"] for r in direct["rows"]], rel=1e-5
    )


def test_study_input_errors(study_inputs, tmp_path):
    root, dirs = study_inputs
    with pytest.raises(ValueError, match="tokens: 2 labels for 3 checkpoints"):
        study_checkpoints(dirs, [1, 2], root / "pt.txt", root / "ft.jsonl")
    other = tmp_path / "other"
    other.mkdir()
    for f in dirs[0].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"w5"', '"w5x"'))
    with pytest.raises(ValueError, match="do not share one tokenizer"):
        study_checkpoints([dirs[0], other], [1, 2], root / "pt.txt", root / "ft.jsonl")
    with pytest.raises(ValueError, match="data: no such file"):
        study_checkpoints(dirs[:1], [1], root / "none.txt", root / "ft.jsonl")
    assert sorted(p.name for p in dirs[0].iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
