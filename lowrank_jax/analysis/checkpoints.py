"""The overtraining study on a list of checkpoints: sensitivity and fine-tune degradation vs tokens seen.

Springer, Goyal, Wen, Kumar, Yue, Malladi, Neubig, Raghunathan, "Overtrained Language Models Are
Harder to Fine-Tune", ICML 2025, arXiv 2503.19206, measure progressive sensitivity and catastrophic
overtraining on the *intermediate checkpoints of a public model* (OLMo-1B at growing token budgets).
:func:`study_checkpoints` does the same for any list of checkpoints that
:func:`lowrank_jax.hf.load_model` reads (Hugging Face LLaMA directories such as a public family's
intermediate checkpoints saved locally, model directories, or runs of this project), each labelled
with the number of pretraining tokens it has seen:

1. **sensitivity** (:func:`~lowrank_jax.analysis.sensitivity.parameter_sensitivity`): the mean rise of
   the loss on the pretraining-domain text under ``θ_i + λ σ_i z_i``, σ_i the tensor's init std (the
   checkpoint's ``initializer_range``), common random numbers across checkpoints;
2. **fine-tune degradation** (:func:`~lowrank_jax.analysis.finetune.finetune_degradation`): every
   checkpoint fine-tuned with the same AdamW hyperparameters on the fine-tuning text, reporting
   fine-tune-domain loss and the pretraining-domain loss before and after (forgetting).

Both texts are local files (plain text, one document; or jsonl, one ``text`` per line) tokenized with
the checkpoints' tokenizer (they must share one: the same ``tokenizer.json`` content). The fine-tuning
text is split into train (the first 90% of its tokens) and validation (the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lowrank_jax import config as config_lib
from lowrank_jax.analysis.finetune import finetune_degradation
from lowrank_jax.analysis.sensitivity import parameter_sensitivity
from lowrank_jax.data import eval_batches
from lowrank_jax.hf.evaluate import read_documents
from lowrank_jax.hf.model_dir import load_model


def _encode(tokenizer_path: str, path: str | Path) -> np.ndarray:
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(tokenizer_path)
    eos = next((i for t in ("</s>", "<|endoftext|>", "<|end_of_text|>") if (i := tok.token_to_id(t)) is not None), None)
    stream: list[int] = []
    for enc in tok.encode_batch(read_documents(path), add_special_tokens=False):
        stream += enc.ids + ([eos] if eos is not None else [])
    return np.asarray(stream, np.int32)


def _check(checkpoints: Sequence[str], tokens: Sequence[float]) -> None:
    if not checkpoints:
        raise ValueError("checkpoints: give at least one checkpoint directory")
    if len(tokens) != len(checkpoints):
        raise ValueError(f"tokens: {len(tokens)} labels for {len(checkpoints)} checkpoints (one each)")
    if any(t < 0 for t in tokens):
        raise ValueError("tokens: the tokens-seen labels must be >= 0")


def study_checkpoints(
    checkpoints: Sequence[str | Path],
    tokens: Sequence[float],
    pretrain_text: str | Path,
    finetune_text: str | Path,
    *,
    lambdas: Sequence[float] = (0.5, 1.0, 2.0),
    n_seeds: int = 2,
    key: int = 20250324,
    seq_len: int = 128,
    batch_size: int = 8,
    eval_tokens: int = 8192,
    ft_steps: int = 20,
    ft_lr: float = 1e-4,
    ft_eval_every: int = 0,
) -> list[dict[str, Any]]:
    """One record per checkpoint, in order of ``tokens``: ``{"checkpoint", "tokens", "sensitivity", "finetune"}``."""
    _check([str(c) for c in checkpoints], tokens)
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    models = {i: load_model(checkpoints[i]) for i in order}
    tokenizers_ = {Path(m.tokenizer).read_bytes() if m.tokenizer else None for m in models.values()}
    if None in tokenizers_:
        raise ValueError("checkpoints: every checkpoint needs its tokenizer.json")
    if len(tokenizers_) > 1:
        raise ValueError("checkpoints: the checkpoints do not share one tokenizer")
    tok_path = models[order[0]].tokenizer
    pt_stream, ft_stream = _encode(tok_path, pretrain_text), _encode(tok_path, finetune_text)
    cut = int(len(ft_stream) * 0.9)
    ft_data = (ft_stream[:cut], ft_stream[cut:])
    records = []
    for i in order:
        model = models[i]
        cfg = model.cfg
        if max(pt_stream.max(), ft_stream.max()) >= cfg.vocab_size:
            raise ValueError(
                f"checkpoints: {checkpoints[i]} has a vocabulary of {cfg.vocab_size}, smaller than its tokenizer's"
            )
        batches = eval_batches(pt_stream, seq_len, eval_tokens, batch_size)
        sens = parameter_sensitivity(model.params, batches, lambdas, n_seeds, jax.random.key(key), model_cfg=cfg)
        pre_cfg = config_lib.replace(
            config_lib.load_config("tiny"), model=cfg, batch_size=batch_size, seq_len=seq_len, eval_tokens=eval_tokens
        )
        ft = finetune_degradation(
            checkpoints[i],
            ft_data,
            pt_stream,
            ft_steps,
            ft_lr,
            eval_every=ft_eval_every,
            loaded=(model.params, pre_cfg, 0),
        )
        ft = {k: v for k, v in ft.items() if k not in ("checkpoint_step", "pretrain_tokens")}  # labels are `tokens`
        records.append(
            {
                "checkpoint": str(checkpoints[i]),
                "tokens": float(tokens[i]),
                "sensitivity": sens.to_dict(),
                "finetune": ft,
            }
        )
    return records
