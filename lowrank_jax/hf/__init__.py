"""Hugging Face interoperability: LLaMA checkpoints in and out, generation, evaluation.

- :mod:`~lowrank_jax.hf.safetensors_io`: the safetensors file format, checked on read;
- :mod:`~lowrank_jax.hf.convert`: ``config.json`` and tensor names/layouts of ``LlamaForCausalLM``;
- :mod:`~lowrank_jax.hf.model_dir`: model directories, and loading any model source;
- :mod:`~lowrank_jax.hf.transfer`: ``import-hf`` / ``export-hf`` (factored layers merged);
- :mod:`~lowrank_jax.hf.generate`: jitted decoding with a KV cache;
- :mod:`~lowrank_jax.hf.evaluate`: perplexity on a local text or jsonl file;
- :mod:`~lowrank_jax.hf.lm_eval_adapter`: an lm-evaluation-harness ``LM``;
- :mod:`~lowrank_jax.hf.finetune`: ``train … init_from=DIR``.
"""

from lowrank_jax.hf.convert import CheckpointFormatError, hf_config_from_model, model_config_from_hf
from lowrank_jax.hf.model_dir import LoadedModel, load_model
from lowrank_jax.hf.transfer import export_hf, import_hf

__all__ = [
    "CheckpointFormatError",
    "LoadedModel",
    "export_hf",
    "hf_config_from_model",
    "import_hf",
    "load_model",
    "model_config_from_hf",
]
