"""Regression tests for the RM training path of scripts/train_tiny.py (issue 19): a working Bradley-Terry fit must
overfit a tiny fixed pair set, and every scoring path must read the closing </s> on right- and left-padded batches;
the recorded command line and settings hold no absolute paths."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def tt():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tt):
    from qalign_repro.models.tiny import assets_dir, build_tokenizer
    from qalign_repro.tasks.arith import Arith

    torch.set_num_threads(1)
    tok = build_tokenizer()
    enc = tt.Encoder(tok)
    task = Arith(yaml.safe_load(tt.DEFAULT_DATASET.read_text()))
    lm = LlamaForCausalLM.from_pretrained(assets_dir("tiny-lm")).eval()
    docs = task.load_split("rm_train", 64)
    pairs = tt.synthetic_pairs(task, docs, 1, random.Random(0))[:32]  # (doc, gold chain, one-error chain)
    assert len(pairs) == 32
    return tok, enc, task, lm, pairs


def _pairwise(tt, rm, enc, task, pairs):
    good = tt.score(rm, [enc.chat(task.prompt(d), g) for d, g, _ in pairs], enc.pad)
    bad = tt.score(rm, [enc.chat(task.prompt(d), b) for d, _, b in pairs], enc.pad)
    return float(np.mean(good > bad))


@pytest.mark.slow  # ~20-35 s on 1 thread
def test_bt_fit_overfits_a_tiny_fixed_pair_set(tt, setup):
    """32 fixed pairs, one batch, 20 steps at the default lr: training pairwise accuracy must reach >= 0.95
    (measured 2026-12-02 on on-policy pairs: 1.000 after 10 steps at lr 1e-3, 3e-4 and 3e-3; ~20 s on 1 thread)."""
    tok, enc, task, lm, pairs = setup
    args = tt.parse_args(["--rm-init", "lm", "--rm-epochs", "20", "--rm-batch", "32", "--rm-lr", "1e-3",
                          "--log-every", "1000"])
    rm = tt.build_rm(args, tok, lm)
    before = _pairwise(tt, rm, enc, task, pairs)
    tt.fit_rm(args, tok, enc, task, lm, pairs, rm=rm)
    after = _pairwise(tt, rm, enc, task, pairs)
    assert after >= 0.95, (before, after)


def test_score_reads_closing_eos_on_right_and_left_padding(tt, setup):
    tok, enc, task, lm, pairs = setup
    args = tt.parse_args(["--rm-init", "lm"])
    rm = tt.build_rm(args, tok, lm).eval()
    assert rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    seqs = [enc.chat(task.prompt(d), x) for d, g, b in pairs[:8] for x in (g, b)]
    assert all(s[-1] == tok.eos_token_id and s.count(tok.eos_token_id) == 1 for s in seqs)
    with torch.no_grad():
        single = np.array([rm(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])
        width = max(len(s) for s in seqs)
        left = torch.tensor([[enc.pad] * (width - len(s)) + s for s in seqs])
        mask = (left != enc.pad).long()
        read = (torch.arange(width) * mask).argmax(-1)  # the index transformers' head reads
        assert (left[torch.arange(len(seqs)), read] == tok.eos_token_id).all()
        left_scores = rm(input_ids=left, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(tt.score(rm, seqs, enc.pad), single, atol=1e-5)  # right padding
    np.testing.assert_allclose(left_scores, single, atol=1e-5)  # left padding + mask


def test_fit_rm_gathers_the_closing_eos_of_each_right_padded_row(tt, setup):
    """fit_rm reads the head at index len(seq) - 1 of the right-padded batch: that index is the row's only </s>,
    and the per-position head there equals the unpadded score (fp32)."""
    tok, enc, task, lm, pairs = setup
    rm = tt.build_rm(tt.parse_args(["--rm-init", "lm"]), tok, lm).eval()
    seqs = [enc.chat(task.prompt(d), x) for d, g, b in pairs[:6] for x in (g, b)]
    ids = tt.right_pad(seqs, enc.pad)
    last = torch.tensor([len(s) - 1 for s in seqs])
    assert len({len(s) for s in seqs}) > 1 and (ids[torch.arange(len(seqs)), last] == tok.eos_token_id).all()
    assert ((ids == tok.eos_token_id).sum(1) == 1).all() and (ids[ids != tok.eos_token_id] >= 0).all()
    with torch.no_grad():
        per_pos = rm.score(rm.model(input_ids=ids).last_hidden_state)[..., 0]
        single = np.array([rm(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])
    np.testing.assert_allclose(per_pos[torch.arange(len(seqs)), last].numpy(), single, atol=1e-5)


def test_recorded_paths_are_relative_to_the_repository(tt, tmp_path):
    """--out / --dataset / --lm-from are recorded repo-relative inside the repository and as "<outside repo>/NAME"
    outside it, in argv (both "--flag value" and "--flag=value") and in the settings."""
    inside = str(REPO / "conf" / "dataset" / "arith.yaml")
    argv = ["--out", str(tmp_path / "x"), f"--dataset={inside}", "--lm-from", "src/qalign_repro/assets/tiny-lm",
            "--steps", "5"]
    rec = tt._record_argv(argv)
    assert rec == ["--out", "<outside repo>/x", "--dataset=conf/dataset/arith.yaml", "--lm-from",
                   "src/qalign_repro/assets/tiny-lm" if Path.cwd().resolve() == REPO.resolve()
                   else rec[3], "--steps", "5"]
    settings = tt._settings(tt.parse_args(["--out", str(tmp_path / "x"), "--dataset", inside]))
    assert settings["out"] == "<outside repo>/x" and settings["dataset"] == "conf/dataset/arith.yaml"
    assert not any(str(v).startswith("/") for v in [*rec, *settings.values()])


def test_written_metrics_hold_no_absolute_path(tt, tmp_path):
    """What save() writes for a run's record (the metrics.json of both models) contains no absolute path."""
    import json

    from qalign_repro.models.tiny import build_tokenizer

    tok = build_tokenizer()
    args = tt.parse_args(["--out", str(tmp_path / "run"), "--dataset", str(tt.DEFAULT_DATASET)])
    metrics = {"argv": tt._record_argv(["--out", str(tmp_path / "run"), "--dataset", str(tt.DEFAULT_DATASET)]),
               "settings": tt._settings(args)}
    lm = tt.LlamaForCausalLM(tt.llama_config(tok, hidden=16, layers=1, heads=2))
    tt.save(lm, tok, tmp_path / "run" / "tiny-lm", "# card\n", metrics)
    text = (tmp_path / "run" / "tiny-lm" / "metrics.json").read_text()
    strings = []

    def walk(v):
        if isinstance(v, dict):
            [walk(u) for u in v.values()]
        elif isinstance(v, list):
            [walk(u) for u in v]
        elif isinstance(v, str):
            strings.append(v)

    walk(json.loads(text))
    assert strings and not [v for v in strings if v.startswith("/") or str(tmp_path) in v], strings
