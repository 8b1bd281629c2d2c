"""eval (perplexity on a local file) and the lm-evaluation-harness adapter, against transformers' logits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import hf_logits, torch, word_text

from lowrank_jax.hf.evaluate import perplexity, token_windows
from lowrank_jax.hf.lm_eval_adapter import JaxLM
from lowrank_jax.train.cli import main


def reference_nll(hf_model, stream: np.ndarray, seq_len: int) -> tuple[float, int]:
    """Σ NLL over windows of ``seq_len + 1`` overlapping by one, from transformers' float32 logits (float64 sums)."""
    total, count = 0.0, 0
    for s in range(0, len(stream) - 1, seq_len):
        w = stream[s : s + seq_len + 1]
        logp = torch.log_softmax(torch.tensor(hf_logits(hf_model, w[None, :-1])[0], dtype=torch.float64), -1)
        total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return total, count


def test_token_windows_predict_each_token_once():
    windows, mask = token_windows(np.arange(11), 4)
    assert windows.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 0, 0]]
    assert mask.sum() == 10 and mask[2].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="fewer than two tokens"):
        token_windows(np.arange(1), 4)


def test_eval_cli_perplexity_on_jsonl_and_text(with_tokenizer, tmp_path, capsys):
    src, hf_model = with_tokenizer
    docs = [word_text(i, 30 + 7 * i) for i in range(3)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    assert main(["eval", str(src), f"data={data}", "seq_len=16", "batch_size=2"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    ids = {w: i + 2 for i, w in enumerate(sorted({w for d in docs for w in d.split()}, key=lambda w: int(w[1:])))}
    stream = np.asarray([t for d in docs for t in [*(int(w[1:]) + 2 for w in d.split()), 0]])
    assert ids  # the word-level tokenizer maps w{i} to id i + 2 and </s> to 0
    total, count = reference_nll(hf_model, stream, 16)
    assert got["tokens"] == count == len(stream) - 1
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    text = tmp_path / "doc.txt"
    text.write_text(docs[0])
    assert main(["eval", str(src), f"data={text}", "seq_len=64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_errors(with_tokenizer, tmp_path, capsys):
    src = str(with_tokenizer[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\nnot json\n')
    for argv, msg in [
        ([f"data={tmp_path / 'none.txt'}"], "no such file"),
        ([f"data={bad}"], "line 2 is not JSON"),
        (["seq_len=4"], "data: give the file"),
        ([f"data={bad}", "seq_len=x"], "seq_len: expected an integer"),
        ([f"data={bad}", "stride=3"], "expected key=value"),
    ]:
        assert main(["eval", src, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    from lowrank_jax.hf import load_model

    model = load_model(src)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(model.cfg, model.params, np.asarray([1, 2, 500]), 8)
    with pytest.raises(ValueError, match="seq_len: must be in"):
        perplexity(model.cfg, model.params, np.asarray([1, 2, 5]), 1000)


def test_adapter_loglikelihood_and_generation(with_tokenizer):
    src, hf_model = with_tokenizer
    lm = JaxLM(src)
    context, continuation = "w3 w9 w1 w4", "w7 w2"
    (ll, greedy), (ll_empty, _) = lm.loglikelihood([(context, continuation), ("", "w5")])
    ids = [5, 11, 3, 6, 9, 4]
    logp = torch.log_softmax(torch.tensor(hf_logits(hf_model, np.asarray([ids[:-1]]))[0], dtype=torch.float64), -1)
    assert ll == pytest.approx(float(logp[3, 9] + logp[4, 4]), abs=1e-4)
    assert greedy == bool(logp[3].argmax() == 9 and logp[4].argmax() == 4)
    logp0 = torch.log_softmax(torch.tensor(hf_logits(hf_model, np.asarray([[0]]))[0, 0], dtype=torch.float64), -1)
    assert ll_empty == pytest.approx(float(logp0[7]), abs=1e-4)
    (rolling,) = lm.loglikelihood_rolling([(context,)])
    logpr = torch.log_softmax(
        torch.tensor(hf_logits(hf_model, np.asarray([[0, 5, 11, 3]]))[0], dtype=torch.float64), -1
    )
    assert rolling == pytest.approx(float(logpr[np.arange(4), [5, 11, 3, 6]].sum()), abs=1e-4)
    (text,) = lm.generate_until([(context, {"until": ["w0"], "max_gen_toks": 6})])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([[5, 11, 3, 6]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0, attention_mask=torch.ones(1, 4, dtype=torch.long))  # fmt: skip
    words = " ".join("</s>" if t == 0 else "<unk>" if t == 1 else f"w{t - 2}" for t in ref[0, 4:].tolist())
    assert text == words[: words.find("w0")] if "w0" in words else text == words


@pytest.mark.slow  # imports the harness and its datasets stack (~11 s)
def test_lm_eval_harness_runs_a_local_task(with_tokenizer, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lowrank_jax.hf.lm_eval_adapter import harness_lm

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    rows = [{"q": "w3 w4", "choices": ["w5", "w6 w7", "w8"], "label": i % 3} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    lm = harness_lm(with_tokenizer[0])
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=False
    )
    acc = results["results"]["tiny_mc"]["acc,none"]
    # the harness's accuracy equals the adapter's own argmax over the choices' log-likelihoods
    lls = lm.impl.loglikelihood([("w3 w4", " " + c) for c in rows[0]["choices"]])
    pick = int(np.argmax([ll for ll, _ in lls]))
    assert acc == pytest.approx(np.mean([pick == r["label"] for r in rows]))
