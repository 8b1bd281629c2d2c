"""Where a model comes from: an imported model directory, a Hugging Face checkpoint or a training run.

``lowrank-jax import-hf`` writes a *model directory*: ``lowrank_model.json`` (the
:class:`~lowrank_jax.config.ModelConfig`), ``params.safetensors`` (the model's pure-dict params, keys
joined by ``/``, kernels ``(in, out)``, blocks stacked on the ``layers`` axis) and the checkpoint's
tokenizer files. :func:`load_model` also reads a Hugging Face directory directly (``config.json``
with ``model_type``, one or several safetensors shards) and a training run (``config.json`` and
``checkpoints/``, the newest step or ``RUN/checkpoints/STEP``), so ``generate``, ``eval``,
``export-hf`` and ``init_from`` take any of the three.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lowrank_jax.config import ConfigError, ModelConfig
from lowrank_jax.data import load_corpus
from lowrank_jax.data.tokenizer import get_tokenizer
from lowrank_jax.hf import safetensors_io
from lowrank_jax.hf.convert import CheckpointFormatError, model_config_from_hf, numpy_dtype, params_from_hf

MODEL_JSON, PARAMS_FILE = "lowrank_model.json", "params.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class LoadedModel:
    """A model's config, its params (pure dict of NumPy arrays) and its ``tokenizer.json`` (or None)."""

    cfg: ModelConfig
    params: dict[str, Any]
    tokenizer: str | None
    source: str  # "model_dir" | "hf" | "run"
    directory: Path


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + "/") if isinstance(v, dict) else {key: np.asarray(v)})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = v
    return out


def read_hf_dir(directory: Path, **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """``(ModelConfig, params)`` of a Hugging Face LLaMA checkpoint directory (checked, one-line errors)."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointFormatError(f"{directory}: no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointFormatError(f"{cfg_path}: not valid JSON") from None
    files = _shard_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(safetensors_io.load_file(f))
    floats = {t.dtype for t in tensors.values()}
    dtype = "bfloat16" if floats == {numpy_dtype("bfloat16")} else "float32"
    cfg = model_config_from_hf(hf, param_dtype=dtype, **overrides)
    return cfg, params_from_hf(tensors, cfg, numpy_dtype(dtype))


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointFormatError(f"{index}: no weight_map") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointFormatError(f"{index}: shard {missing[0]!r} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointFormatError(f"{directory}: no *.safetensors weights (PyTorch .bin files are not read)")
    return files


def _read_model_dir(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        cfg = ModelConfig(**json.loads((directory / MODEL_JSON).read_text())["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointFormatError(f"{directory / MODEL_JSON}: {e}") from None
    path = directory / PARAMS_FILE
    if not path.is_file():
        raise CheckpointFormatError(f"{directory}: no {PARAMS_FILE}")
    return cfg, _unflatten(safetensors_io.load_file(path))


def _run_tokenizer(cfg: Any) -> str | None:
    """The ``tokenizer.json`` a run trained with, if it is one (a trained BPE is found again from its corpus)."""
    d = cfg.data
    if d.tokenizer:
        return d.tokenizer if d.tokenizer.endswith(".json") else None
    try:
        path = getattr(get_tokenizer(d, load_corpus(d)), "path", None)
    except (ValueError, OSError):
        return None
    return path if path and str(path).endswith(".json") else None


def load_model(path: str | Path) -> LoadedModel:
    """Load a model directory, a Hugging Face directory or a run (``RUN`` or ``RUN/checkpoints/STEP``)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointFormatError(f"{path}: no such directory")
    if (p / MODEL_JSON).is_file():
        cfg, params = _read_model_dir(p)
        tok = p / "tokenizer.json"
        return LoadedModel(cfg, params, str(tok) if tok.is_file() else None, "model_dir", p)
    run_dir = p.parent.parent if p.name.isdigit() and p.parent.name == "checkpoints" else p
    if (run_dir / "checkpoints").is_dir():
        from lowrank_jax.analysis.finetune import load_params  # lazy: analysis imports train, which imports hf

        try:
            params, run_cfg, _ = load_params(p)
        except (ValueError, ConfigError) as e:
            raise CheckpointFormatError(str(e)) from None
        params = jax.tree.map(np.asarray, params)
        return LoadedModel(run_cfg.model, params, _run_tokenizer(run_cfg), "run", run_dir)
    if (p / "config.json").is_file():
        cfg, params = read_hf_dir(p)
        tok = p / "tokenizer.json"
        return LoadedModel(cfg, params, str(tok) if tok.is_file() else None, "hf", p)
    raise CheckpointFormatError(f"{path}: neither a model directory, a Hugging Face checkpoint nor a training run")


def check_new_output(out: str | Path) -> Path:
    """``out`` as a Path that does not exist yet or is an empty directory (else a one-line error)."""
    o = Path(out).expanduser()
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise CheckpointFormatError(f"{out}: already exists and is not an empty directory")
    return o


def write_atomically(out: Path, write) -> None:
    """Run ``write(tmp_dir)`` then move the finished directory to ``out`` (nothing left behind on failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src_dir: Path | None, tokenizer: str | None, dst: Path) -> None:
    """Copy the tokenizer files next to ``tokenizer`` (or in ``src_dir``) into ``dst``."""
    if src_dir is not None:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, dst / name)
    if tokenizer and not (dst / "tokenizer.json").exists():
        shutil.copyfile(tokenizer, dst / "tokenizer.json")


def save_model_dir(out: Path, cfg: ModelConfig, params: dict[str, Any], src_dir: Path | None, tokenizer: str | None):
    """Write a model directory (see the module docstring) at ``out`` atomically."""

    def write(tmp: Path) -> None:
        (tmp / MODEL_JSON).write_text(json.dumps({"model": dataclasses.asdict(cfg)}, indent=2) + "\n")
        safetensors_io.save_file(tmp / PARAMS_FILE, _flatten(params), {"format": "lowrank-jax"})
        copy_tokenizer_files(src_dir, tokenizer, tmp)

    write_atomically(out, write)
