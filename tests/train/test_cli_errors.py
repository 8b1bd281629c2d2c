"""Bad input: one line naming the field, exit status 2, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import pytest
from helpers import run_cli

from lowrank_jax.config import ConfigError, load_config
from lowrank_jax.train.cli import main


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")} if root.exists() else {}


CASES = {
    # id: (config, overrides, field named in the message)
    "unknown_config": ("no_such_config", [], "config"),
    "unknown_key": ("tiny", ["learning_rate=0.1"], "learning_rate"),
    "unknown_section_key": ("tiny", ["model.hiden=64"], "model.hiden"),
    "section_without_field": ("tiny", ["model=3"], "model"),
    "wrong_type_int": ("tiny", ["steps=abc"], "steps"),
    "wrong_type_bool": ("tiny", ["resume=maybe"], "resume"),
    "float_for_int": ("tiny", ["batch_size=2.5"], "batch_size"),
    "negative_lr": ("tiny", ["optim.lr=-0.1"], "optim.lr"),
    "zero_steps": ("tiny", ["steps=0"], "steps"),
    "setting_apollo_does_not_read": ("tiny", ["optim.name=apollo_adamw", "galore.rank=16"], "galore.rank"),
    "setting_fira_does_not_read": ("tiny", ["optim.name=fira_adamw", "galore.rank=16"], "galore.rank"),
    "lora_rank_without_lora": ("tiny", ["model.lora_rank=8"], "model.lora_rank"),
    "seq_len_exceeds_model": ("tiny", ["seq_len=512"], "seq_len"),
    "heads_do_not_divide_hidden": ("tiny", ["model.heads=3"], "model.heads"),
    "empty_corpus_glob": ("tiny", ["data.source=files", "data.paths=/nonexistent/**/*.txt"], "data.paths"),
    "files_without_paths": ("tiny", ["data.source=files"], "data.paths"),
    "override_without_equals": ("tiny", ["steps"], "steps"),
    "unknown_dtype": ("tiny", ["model.dtype=float16"], "model.dtype"),
    "unknown_dense_kind": ("tiny", ["model.dense=magic"], "model.dense"),
    "missing_tokenizer_file": ("tiny", ["data.tokenizer=/no/such/t5.model"], "data.tokenizer"),
    "unknown_source": ("tiny", ["data.source=web"], "data.source"),
    "val_fraction_out_of_range": ("tiny", ["data.val_fraction=1.5"], "data.val_fraction"),
    "grad_accum_not_dividing_batch": ("tiny", ["grad_accum=3"], "grad_accum"),
    "tfds_without_data_dir": ("tiny", ["data.source=tfds"], "data.tfds_data_dir"),
    "unknown_optimizer": ("tiny", ["optim.name=sgdx"], "optim.name"),
    "bad_mesh": ("tiny", ["mesh=2,-1,-1"], "mesh"),
    "mesh_needs_more_devices": ("tiny", ["mesh=64,1,1"], "mesh"),
    "warmup_ratio_out_of_range": ("tiny", ["optim.warmup_ratio=1.0"], "optim.warmup_ratio"),
    "vocab_too_small_to_train": ("tiny", ["data.vocab_size=100"], "data.vocab_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    config, overrides, fld = CASES[case]
    out = tmp_path / "out"
    code = main(["train", config, *overrides, f"out_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"lowrank-jax: error: {fld}"), err[0]
    assert not out.exists()


def test_malformed_yaml_and_base_chain(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["train", str(bad), f"out_dir={tmp_path / 'o'}"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    assert main(["train", str(loop)]) == 2
    assert "base" in capsys.readouterr().err
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nsteps: 7\nmodel:\n  layers: 2\n")
    cfg = load_config(str(child), ["model.hidden=64", "model.ffn=160"])
    assert (cfg.steps, cfg.model.layers, cfg.model.hidden, cfg.model.heads) == (7, 2, 64, 4)


def test_out_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "tiny", f"out_dir={f}"]) == 2
    assert capsys.readouterr().err.startswith("lowrank-jax: error: out_dir")
    assert f.read_text() == "x"


def test_resume_without_checkpoint(tmp_path, capsys, small_overrides):
    out = tmp_path / "run"
    assert main(["train", "tiny", *small_overrides, f"out_dir={out}", "resume=true"]) == 2
    assert capsys.readouterr().err.startswith("lowrank-jax: error: resume")
    assert not out.exists()


def test_unreadable_checkpoint_dir(tmp_path, capsys, small_overrides):
    """Every checkpoint damaged: resume fails with one error line and the directory is left untouched."""
    out = tmp_path / "run"
    (out / "checkpoints" / "5").mkdir(parents=True)
    (out / "checkpoints" / "5" / "garbage").write_text("not a checkpoint")
    before = _snapshot(out)
    assert main(["train", "tiny", *small_overrides, "steps=10", f"out_dir={out}", "resume=true"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowrank-jax: error: resume") and "unreadable" in last
    assert _snapshot(out) == before


def test_model_vocab_smaller_than_tokenizer(tmp_path, capsys, small_overrides):
    out = tmp_path / "run"
    assert main(["train", "tiny", *small_overrides, "model.vocab_size=300", f"out_dir={out}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lowrank-jax: error: model.vocab_size")
    assert not out.exists()


def test_process_exit_status_is_2(tmp_path):
    proc = run_cli("train", "tiny", "steps=-1", f"out_dir={tmp_path / 'o'}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["lowrank-jax: error: steps: must be positive, got -1"]
    assert not (tmp_path / "o").exists()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="^optim.b2"):
        load_config("tiny", {"optim.b2": 1.0})


def test_cli_lists_configs_and_reports_params(capsys):
    assert main(["configs"]) == 0
    names = capsys.readouterr().out.split()
    assert {"tiny", "llama_60m", "llama_7b"} <= set(names)
    assert main(["params", "llama_60m"]) == 0
    out = capsys.readouterr().out
    assert '"params": 58073600' in out and '"formula_params": 58073600' in out


def test_float_fields_accept_exponent_without_dot(tmp_path):
    cfg = load_config("tiny", ["optim.eps=1e-6", "optim.lr=3E-3"])
    assert cfg.optim.eps == 1e-6 and cfg.optim.lr == 3e-3
    f = tmp_path / "c.yaml"
    f.write_text("base: tiny\noptim:\n  eps: 1e-6\n")
    assert load_config(str(f)).optim.eps == 1e-6
    with pytest.raises(ConfigError, match="^optim.eps"):
        load_config("tiny", ["optim.eps=tiny"])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, data_cache):
    """Shards of the small pydoc corpus, written by `lowrank-jax prepare`."""
    out = tmp_path_factory.mktemp("prepared") / "shards"
    args = ["data.source=pydoc", "data.vocab_size=512", "data.tokenizer_train_chars=200000"]
    assert main(["prepare", "tiny", *args, f"data.cache_dir={data_cache}", f"data.shards={out}"]) == 0
    return out


def _partial_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shard = next(dst.glob("train-*.arrayrecord"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return dst


SHARD_CASES = {
    # id: (overrides given the prepared dir and tmp_path, field named in the message)
    "missing_shard_dir": (lambda d, t: [f"data.shards={t / 'absent'}"], "data.shards"),
    "dir_without_manifest": (lambda d, t: [f"data.shards={(t / 'empty').mkdir() or t / 'empty'}"], "data.shards"),
    "partial_shard": (lambda d, t: [f"data.shards={_partial_copy(d, t / 'partial')}"], "data.shards"),
    "tokenizer_differs_from_manifest": (
        lambda d, t: [f"data.shards={d}", f"data.tokenizer={_other_tokenizer(d, t)}"],
        "data.tokenizer",
    ),
    "tokenizer_file_is_not_a_tokenizer": (lambda d, t: [f"data.tokenizer={_garbage(t)}"], "data.tokenizer"),
}


def _other_tokenizer(d: Path, t: Path) -> Path:
    other = t / "other.json"
    other.write_text((d / "tokenizer.json").read_text().replace('"<|eos|>"', '"<|eos|>" ', 1))
    return other


def _garbage(t: Path) -> Path:
    bad = t / "tokenizer.json"
    bad.write_text("this is a README, not a tokenizer\n" * 22)
    return bad


def _one_line_exit_2(argv: list[str], fld: str, root: Path, capsys) -> None:
    """``main(argv)`` fails with one line naming ``fld``, exit 2, and leaves ``root`` as it was."""
    before = _snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"lowrank-jax: error: {fld}"), err[0]
    assert _snapshot(root) == before


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_bad_shard_input_is_one_line_exit_2_and_writes_nothing(case, shard_dir, tmp_path, capsys):
    make, fld = SHARD_CASES[case]
    overrides = make(shard_dir, tmp_path)
    _one_line_exit_2(
        ["train", "tiny", *overrides, "data.source=pydoc", f"out_dir={tmp_path / 'out'}"], fld, tmp_path, capsys
    )


def test_prepare_with_a_file_that_is_not_a_tokenizer(tmp_path, capsys):
    bad = _garbage(tmp_path)
    argv = ["prepare", "tiny", "data.source=pydoc", f"data.tokenizer={bad}", f"data.shards={tmp_path / 'shards'}"]
    _one_line_exit_2(argv, "data.tokenizer", tmp_path, capsys)


def test_process_count_not_dividing_the_batch(shard_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    argv = ["train", "tiny", f"data.shards={shard_dir}", "batch_size=8", "mesh=-1,1,1", f"out_dir={tmp_path / 'out'}"]
    _one_line_exit_2(argv, "batch_size: 8 rows do not split evenly over 3 processes", tmp_path, capsys)
