"""Fine-tune degradation end to end on a tiny run: pretrain (pydoc), fine-tune on a second domain (this
repository's Python files, encoded with the pretraining tokenizer), report both domains' losses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from lowrank_jax.analysis.finetune import (
    finetune_degradation,
    finetune_token_data,
    load_params,
    resolve_checkpoint,
    run_config,
)
from lowrank_jax.config import load_config
from lowrank_jax.data import prepare_data
from lowrank_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def pretrained(small_overrides, tmp_path_factory):
    from lowrank_jax.train.loop import train

    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = load_config(
        "tiny",
        [*small_overrides, f"out_dir={out}", "steps=20", "checkpoint_every=10", "eval_every=10", "optim.lr=0.01"],
    )
    train(cfg, log=lambda *_: None)
    return out


@pytest.mark.slow  # 16 s on 2 cores
def test_finetune_degradation_end_to_end(pretrained):
    pre_cfg = run_config(pretrained)
    assert pre_cfg.data.source == "pydoc" and pre_cfg.model.vocab_size == 512
    ft = finetune_token_data(pre_cfg, "files", paths=(str(REPO / "lowrank_jax" / "**" / "*.py"),), val_fraction=0.3)
    pre = prepare_data(pre_cfg.data)
    # The second domain is encoded with the pretraining tokenizer.
    assert ft.info["tokenizer"] == pre.info["tokenizer"] and ft.digest != pre.digest
    res = finetune_degradation(pretrained / "checkpoints" / "10", ft, pre.val, steps=6, lr=3e-3, eval_every=3)
    for key in ("ft_loss_before", "ft_loss_after", "pt_loss_before", "pt_loss_after", "forgetting", "ft_gain"):
        assert math.isfinite(res[key]), key
    assert res["checkpoint_step"] == 10 and res["pretrain_tokens"] == 10 * 8 * 32
    # Before fine-tuning, the pretraining-domain loss is the loop's own validation loss at step 10.
    logged = {r["step"]: r["val_loss"] for r in read_metrics(pretrained / "metrics.jsonl") if "val_loss" in r}
    assert res["pt_loss_before"] == pytest.approx(logged[10], rel=1e-5)
    assert res["forgetting"] == pytest.approx(res["pt_loss_after"] - res["pt_loss_before"], abs=1e-12)
    assert res["ft_gain"] == pytest.approx(res["ft_loss_before"] - res["ft_loss_after"], abs=1e-12)
    # Fine-tuning on the new domain lowers its loss; the curve has the requested evaluations.
    assert res["ft_loss_after"] < res["ft_loss_before"]
    assert [c["step"] for c in res["curve"]] == [0, 3, 6]
    assert len(res["train_losses"]) == 6 and res["skipped_steps"] == 0
    assert res["settings"]["finetune_dense_kind"] == "dense"


def test_checkpoint_resolution_and_errors(rng, pretrained, tmp_path):
    assert resolve_checkpoint(pretrained) == (pretrained, 20)
    assert resolve_checkpoint(pretrained / "checkpoints" / "10") == (pretrained, 10)
    params, cfg, step = load_params(pretrained)
    assert step == 20 and cfg.model.vocab_size == 512
    assert np.asarray(params["embed"]).shape == (512, cfg.model.hidden)
    stream = rng.integers(0, 512, 4000)
    pair = (stream[:3000], stream[3000:])
    with pytest.raises(ValueError, match="checkpoint"):
        finetune_degradation(tmp_path / "nothing", pair, stream, steps=2, lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        finetune_degradation(pretrained, pair, stream, steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        finetune_degradation(pretrained, pair, stream, steps=2, lr=-1.0)
    with pytest.raises(ValueError, match="finetune_data"):
        finetune_degradation(pretrained, stream, stream, steps=2, lr=1e-3)
    with pytest.raises(ValueError, match="pretrain_eval_data"):
        finetune_degradation(pretrained, pair, stream.astype(np.float32), steps=2, lr=1e-3)
    with pytest.raises(ValueError, match="finetune_data"):
        finetune_degradation(pretrained, (stream + 512, stream), stream, steps=2, lr=1e-3)
    with pytest.raises(ValueError, match="parameterisation"):
        finetune_degradation(pretrained, pair, stream, steps=2, lr=1e-3, parameterisation="factors")
    with pytest.raises(ValueError, match="checkpoint"):
        run_config(Path(tmp_path))
