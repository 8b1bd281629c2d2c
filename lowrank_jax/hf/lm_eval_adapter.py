"""An lm-evaluation-harness model: any model ``load_model`` reads, scored by this project's forward pass.

EleutherAI's lm-evaluation-harness (Gao et al., "A framework for few-shot language model evaluation",
github.com/EleutherAI/lm-evaluation-harness) asks a model for three things, implemented here:

- ``loglikelihood``: for ``(context, continuation)``, ``Σ log p(continuation tokens | context)`` and
  whether every continuation token is the argmax (multiple-choice tasks);
- ``loglikelihood_rolling``: the log-likelihood of a whole string in windows of ``max_length``
  (perplexity tasks);
- ``generate_until``: greedy (or sampled) text after a context, cut at the first stop string.

Context and continuation are tokenized separately (no special tokens; an empty context starts from
the end-of-text token), so the continuation's tokens are exactly its own. Sequences are padded on
the right to a power-of-two length so that few shapes are compiled; causal attention makes the
padding invisible to the scored positions. :class:`JaxLM` works without lm-eval installed (the
three methods take plain tuples); :func:`harness_lm` wraps it in the harness's ``LM`` base class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.hf.generate import generate
from lowrank_jax.hf.model_dir import load_model
from lowrank_jax.models import abstract_params


def _args(request: Any) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class JaxLM:
    """The harness's three request types for the model at ``path`` (a run, model or HF directory)."""

    def __init__(self, path: str | Path, max_length: int | None = None, max_gen_toks: int = 64):
        import tokenizers

        self.model = load_model(path)
        if self.model.tokenizer is None:
            raise ValueError(f"{path}: no tokenizer.json to encode the tasks' text")
        self.tok = tokenizers.Tokenizer.from_file(self.model.tokenizer)
        cfg = self.model.cfg
        self.max_length = min(max_length or cfg.max_seq_len, cfg.max_seq_len)
        self.max_gen_toks = max_gen_toks
        self.eot = next(
            (
                i
                for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
                if (i := self.tok.token_to_id(t)) is not None
            ),
            0,
        )
        graphdef, _ = abstract_params(cfg)
        self.params = jax.tree.map(jnp.asarray, self.model.params)
        self._logp = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(graphdef, p)(x), axis=-1))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _log_probs(self, ids: Sequence[int]) -> np.ndarray:
        """``log p(ids[t+1] | ids[:t+1])`` rows ``(len(ids) - 1, vocab)``."""
        n = len(ids) - 1
        length = 1 << max(n - 1, 0).bit_length()
        x = np.zeros((1, length), np.int32)
        x[0, :n] = ids[:-1]
        return np.asarray(self._logp(self.params, jnp.asarray(x)))[0, :n]

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        logp = self._log_probs(ids)[-len(continuation) :]
        picked = logp[np.arange(len(continuation)), continuation]
        return float(picked.sum(dtype=np.float64)), bool((logp.argmax(-1) == np.asarray(continuation)).all())

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = _args(req)[:2]
            ctx = self.encode(context) if context else [self.eot]
            out.append(self._score(ctx, self.encode(continuation)))
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        out = []
        for req in requests:
            ids = [self.eot, *self.encode(_args(req)[0])]
            total = 0.0
            for start in range(0, len(ids) - 1, self.max_length):
                window = ids[start : start + self.max_length + 1]
                logp = self._log_probs(window)
                total += float(logp[np.arange(len(window) - 1), window[1:]].sum(dtype=np.float64))
            out.append(total)
        return out

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = _args(req)[:2]
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = (self.encode(context) or [self.eot])[-(self.max_length - 1) :]
            room = self.model.cfg.max_seq_len - len(ids)
            n = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), room))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            new, _ = generate(self.model.cfg, self.params, np.asarray([ids]), n, temperature=temperature, timed=False)
            text = self.tok.decode(new[0].tolist())
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out


def harness_lm(path: str | Path, **kwargs: Any) -> Any:
    """A :class:`JaxLM` as an ``lm_eval.api.model.LM`` (needs ``pip install lm-eval``)."""
    from lm_eval.api.model import LM

    class LowrankJaxLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.impl = JaxLM(path, **kwargs)

        def loglikelihood(self, requests):
            return self.impl.loglikelihood(requests)

        def loglikelihood_rolling(self, requests):
            return self.impl.loglikelihood_rolling(requests)

        def generate_until(self, requests):
            return self.impl.generate_until(requests)

    return LowrankJaxLM()
