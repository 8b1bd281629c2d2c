"""The SLTrain, ternary and overtraining Colab notebooks, executed top to bottom on CPU at the ``smoke`` size.

A module of its own so that xdist (``--dist loadscope``) runs these on the other worker than :mod:`test_colab`.
"""

from __future__ import annotations

import json
import re

import pytest
from test_colab import NUM, grab, grab_all, run_notebook, smoke_env


@pytest.mark.slow  # 34 s on 2 cores
def test_sltrain_notebook(tmp_path, monkeypatch, data_cache):
    run = run_notebook("sltrain", tmp_path, monkeypatch, smoke_env(data_cache))
    t = run.text
    # the support: round(δ·in·out) distinct sorted entries, binomially spread over the rows
    nnz, expected = grab(r"support: ([\d,]+) entries \(δ·in·out = ([\d,]+)\), distinct: True, sorted: True", t)
    assert nnz == expected == f"{round(0.03 * 256 * 512):,}"
    mean, std, binom = map(float, grab(rf"mean {NUM}, std {NUM} \(binomial: {NUM}\)", t))
    assert abs(mean - 0.03 * 512) < 0.1 and 0.7 * binom < std < 1.3 * binom
    # three matmul paths agree with the reference; only the reference keeps W (0.52 MB) for the backward pass
    w_mb = float(grab(rf"W is {NUM} MB in float32", t)[0])
    saved, errors = {}, {}
    for name in ("reference (materialised W)", "xla (recompute W)", "pallas (W tiles on chip)"):
        label = re.escape(name)
        row = grab(rf"{label}\s+fwd\+bwd\s+{NUM} ms \| saved for backward\s+{NUM} MB"
                   rf".*?loss {NUM}, grads x/a/b/values {NUM}/{NUM}/{NUM}/{NUM}", t)  # fmt: skip
        saved[name] = float(row[1])
        errors[name] = [float(x) for x in row[2:]]
    assert all(e < 1e-4 for errs in errors.values() for e in errs), errors
    assert saved["reference (materialised W)"] > saved["xla (recompute W)"] + 0.9 * w_mb
    assert saved["pallas (W tiles on chip)"] == saved["xla (recompute W)"]
    assert "ran in the interpreter" in t
    # training, then the spectra of block 0's MLP up (64 x 160) with SL rank 8
    for name in ("full-rank", "SLTrain"):
        first, last = map(float, grab(rf"\n{name}\s+loss {NUM} -> {NUM}", t))
        assert last < first - 0.5
    ranks = dict(grab_all(r"\n((?:full-rank|SL ) [^\n]*?)\s+numerical rank\s+(\d+) / 64", t))
    ranks = {k.strip(): int(v) for k, v in ranks.items()}
    assert ranks["SL  low-rank ABs"] == 8
    assert ranks["full-rank W(t)"] == ranks["full-rank W(0)"] == ranks["SL  W = ABs + S"] == 64
    assert ranks["SL  sparse S"] >= 56  # random sparse: (almost) full rank
    assert run.images >= 2


@pytest.mark.slow  # 56 s; the default suite runs the other notebooks and tests noise_step in tests/noise_step
def test_ternary_notebook(tmp_path, monkeypatch):
    run = run_notebook("ternary", tmp_path, monkeypatch, {"LRJ_COLAB_SIZE": "smoke"})
    t = run.text
    assert "train 4000, test 1000 images of 784 pixels" in t  # MNIST-5k, 20% of each class held out
    bit_acc = float(grab(rf"BitLinear \+ Adam: 100 steps in {NUM} s, test accuracy {NUM}", t)[1])
    assert bit_acc > 0.9
    latent, packed = (int(x.replace(",", "")) for x in grab(r"latent float32 ([\d,]+) B -> packed 2-bit ([\d,]+) B", t))
    assert latent / packed > 15
    for impl in ("auto", "pallas"):
        acc, ref, diff = map(float, grab(rf"packed \({impl}\) on \d+ test images: accuracy {NUM} \(latent {NUM}\), "
                                         rf"max abs logit diff {NUM}", t))  # fmt: skip
        assert acc == ref and diff < 1e-4
    ns_acc = float(grab(rf"noise_step: 100 steps in {NUM} s, test accuracy {NUM}", t)[1])
    assert ns_acc > 0.65  # measured 0.763 at 100 steps (the full run's curve: 0.766 at step 100); chance is 0.1
    assert "values [-1, 0, 1]" in t
    ckpt, dense2 = (
        int(x.replace(",", ""))
        for x in grab(r"seed checkpoint: ([\d,]+) B .*?dense at 2 bits: ([\d,]+) B", t.replace("\n", " "))
    )
    assert ckpt < dense2 / 5  # 100 steps x 128 terns at 5 per byte, plus the header
    replayed = grab(rf"bit-exact (True|False), test accuracy {NUM}", t)
    assert replayed[0] == "True" and float(replayed[1]) == ns_acc
    for impl in ("auto", "pallas"):
        diff, _ = map(float, grab(rf"packed ternary_matmul \({impl}\) on \d+ test images: max abs logit diff {NUM}, "
                                  rf"accuracy {NUM}", t))  # fmt: skip
        assert diff < 1e-4
    assert run.images >= 1


@pytest.mark.slow  # 34 s on 2 cores
def test_overtraining_notebook(tmp_path, monkeypatch, data_cache):
    env = {**smoke_env(data_cache), "LRJ_COLAB_OUT": str(tmp_path / "runs")}
    run = run_notebook("overtraining", tmp_path, monkeypatch, env)
    t = run.text
    # the toy learns its modes in order; the perturbed error has its minimum in the predicted window, then rises
    half = json.loads(grab(r"step at which each mode reaches half its value: (\[[\d, ]+\])", t)[0])
    assert len(half) == 6 and all(b > a > 0 for a, b in zip(half, half[1:], strict=False))
    infl = grab_all(rf"γ = {NUM}: .*?window \((\d+), (\d+)\)\), observed (\d+), rise after the minimum {NUM}", t)
    assert len(infl) == 3
    for _, lo, hi, observed, rise in infl:
        assert int(lo) <= int(observed) <= int(hi) and float(rise) > 0
    observed = [int(i[3]) for i in infl]
    assert observed == sorted(observed, reverse=True)  # a larger γ bends earlier
    # pretraining checkpoints, their sensitivity and their fine-tuning
    assert "checkpoints at steps [20, 40, 60]" in t
    sens = grab_all(rf"step +(\d+): clean val loss {NUM}; loss increase λ=1: {NUM}, λ=4: {NUM}", t)
    assert [int(s[0]) for s in sens] == [20, 40, 60]
    for _, _clean, d1, d4 in sens:
        assert float(d4) > float(d1) and float(d4) > 0.1
    clean = [float(s[1]) for s in sens]
    assert clean[-1] < clean[0]
    ft = grab_all(rf"step +(\d+): pydoc {NUM} -> {NUM}; stdlib {NUM} -> {NUM} \(forgetting {NUM}\)", t)
    assert [int(f[0]) for f in ft] == [20, 40, 60]
    for _, before, after, pt_before, pt_after, forgetting in ft:
        assert float(after) < float(before)  # fine-tuning helps on the second domain
        assert abs(float(pt_after) - float(pt_before) - float(forgetting)) < 2e-3
    assert run.images >= 3
