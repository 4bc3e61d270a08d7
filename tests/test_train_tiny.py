"""scripts/train_tiny.py: a tiny-budget run yields loadable HF models, deterministically; its sampler and its
Bradley–Terry fit do what they claim."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.slow  # trains and samples real tiny models: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_tiny.py"
SMALL = [
    "--steps", "6", "--batch", "8", "--hidden", "32", "--layers", "1", "--heads", "2",
    "--rm-prompts", "20", "--rm-samples", "3", "--rm-batch", "4", "--rm-fit-eval", "4",
    "--test-n", "12", "--diag-prompts", "4", "--diag-k", "4", "--max-new-tokens", "40",
    "--log-every", "3", "--eval-every", "3", "--eval-n", "4", "--rm-init", "lm", "--rm-fresh-prompts", "4",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tt():
    return _load_script()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *SMALL],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_smoke_run_produces_loadable_hf_models(run_dir):
    out = run_dir
    tok = AutoTokenizer.from_pretrained(out / "tiny-lm")
    lm = AutoModelForCausalLM.from_pretrained(out / "tiny-lm")
    rm = AutoModelForSequenceClassification.from_pretrained(out / "tiny-rm")
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 32
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    tok_cfg = json.loads((out / "tiny-lm" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the shipped policy's generate() defaults are pure sampling (QAlign's proposal must be the model)
    gc = lm.generation_config
    assert (gc.do_sample, gc.temperature, gc.top_k, gc.top_p) == (True, 1.0, 0, 1.0)
    chat = tok.apply_chat_template([{"role": "user", "content": "Ann has 3 pens."},
                                    {"role": "assistant", "content": "The answer is 3."}], tokenize=False)
    ids = torch.tensor([tok(chat, add_special_tokens=False).input_ids])
    assert ids[0, -1].item() == tok.eos_token_id
    with torch.no_grad():
        assert rm(input_ids=ids).logits.shape == (1, 1)
        assert lm(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    for kind in ("tiny-lm", "tiny-rm"):
        metrics = json.loads((out / kind / "metrics.json").read_text())
        assert metrics["lm"]["test"]["n"] == 12 and 0.0 <= metrics["lm"]["test"]["accuracy"] <= 1.0
        assert metrics["settings"]["steps"] == 6 and metrics["wall_s"]["total"] > 0
        assert [c["step"] for c in metrics["lm"]["val_curve"]] == [3, 6]
        # the record names no absolute path: repo-relative inside the repo, "<outside repo>/NAME" outside it
        settings = metrics["settings"]
        assert settings["out"] == f"<outside repo>/{out.name}" == metrics["argv"][1]
        assert str(out) not in (out / kind / "metrics.json").read_text()
        assert not settings["dataset"].startswith("/")
        card = (out / kind / "README.md").read_text()
        assert "seed 0" in card and "pairwise accuracy" in card


def test_lm_training_is_deterministic(tt, tmp_path):
    from qalign_repro.models.tiny import build_tokenizer
    from qalign_repro.tasks.arith import Arith

    args = tt.parse_args(["--out", str(tmp_path), *SMALL, "--eval-every", "0"])
    task = Arith(yaml.safe_load((ROOT / "conf" / "dataset" / "arith.yaml").read_text()))
    tok = build_tokenizer()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # must not matter: the script seeds itself
        lm, info = tt.train_lm(args, tok, tt.Encoder(tok), task)
        runs.append((lm.state_dict(), info["train_tokens"]))
    (a, tokens_a), (b, tokens_b) = runs
    assert tokens_a == tokens_b > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    args.seed = 1
    other, _ = tt.train_lm(args, tok, tt.Encoder(tok), task)
    assert not torch.equal(other.state_dict()["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_lm_from_reproduces_the_one_shot_run(run_dir, tmp_path):
    """Redoing only the RM stage from a saved LM gives the one-shot run's RM and figures exactly (which also
    shows the RM stage is deterministic)."""
    a = run_dir
    flags = [f for f in SMALL if f not in ("--steps", "6")]  # the LM flags must come from the saved run
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--lm-from", str(a / "tiny-lm"),
                           "--steps", "99", *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wa, wc = load_file(a / "tiny-rm" / "model.safetensors"), load_file(tmp_path / "tiny-rm" / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    ma = json.loads((a / "tiny-rm" / "metrics.json").read_text())
    mc = json.loads((tmp_path / "tiny-rm" / "metrics.json").read_text())
    assert mc["settings"]["steps"] == 6 and mc["lm_argv"] == ma["argv"]
    assert (mc["lm"], mc["rm"]["heldout"]) == (ma["lm"], ma["rm"]["heldout"])
    assert "--lm-from" in (tmp_path / "tiny-lm" / "README.md").read_text()


def test_sampler_logprobs_match_an_unpadded_forward(tt):
    """The KV-cached, left-padded sampler must see exactly what one full forward of prompt + sample sees."""
    from qalign_repro.models.tiny import build_tokenizer, llama_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = tt.LlamaForCausalLM(llama_config(tok, hidden=32, layers=2, heads=2)).eval()
    prompts = [tok("<|user|>Ann has 3 pens.<|assistant|>").input_ids, tok("<|user|>Hi<|assistant|>").input_ids]
    g = torch.Generator().manual_seed(1)
    res = tt.sample(lm, prompts, max_new=20, eos=tok.eos_token_id, pad=tok.pad_token_id, generator=g)
    assert len(res) == 2
    for prompt, (ids, stopped, lps) in zip(prompts, res):
        seq = prompt + ids + ([tok.eos_token_id] if stopped else [])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        ref = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(seq[len(prompt) :])]
        assert len(ref) == len(lps) > 0
        assert ref == pytest.approx(lps, abs=1e-4)


@pytest.mark.parametrize("dense", [0.0, 1.0])
def test_bradley_terry_fit_learns_to_prefer_the_correct_answer(dense, tt):
    """BT training must rank the preferred side first (a sign or pairing bug would push this towards 0).

    The rejected side is the gold chain cut before its final sentence, which a 1-layer RM can tell apart in a
    few steps; whether an RM can check arithmetic is the shipped model's test, not this one."""
    from qalign_repro.models.tiny import build_tokenizer
    from qalign_repro.tasks.arith import Arith

    cfg = yaml.safe_load((ROOT / "conf" / "dataset" / "arith.yaml").read_text())
    task = Arith(cfg)
    docs = task.load_split("rm_train", 96)
    pairs = [(d, task.solution(d), task.solution(d).split(" The answer")[0]) for d in docs]
    tok = build_tokenizer()
    enc = tt.Encoder(tok)
    args = Namespace(seed=0, hidden=32, layers=1, heads=2, context=512, rm_init="scratch", rm_extra_layers=0,
                     rm_freeze_base=False, rm_lr=3e-3, rm_batch=16, rm_epochs=4, bf16=False, log_every=1000,
                     rm_dense_weight=dense, rm_dense_labels="prefix", rm_extra_init="random")
    torch.manual_seed(0)
    rm = tt.fit_rm(args, tok, enc, task, None, pairs)
    rows = [[{"text": good, "correct": True}, {"text": bad, "correct": False}] for _, good, bad in pairs]
    acc = tt.pairwise_accuracy(rm, enc, task, docs, rows)
    assert acc["n_pairs"] == 96 and acc["n_prompts"] == 96
    assert acc["pairwise_accuracy"] >= 0.9


def test_make_pairs_uses_only_prompts_with_both_outcomes(tt):
    import random

    rows = [
        [{"text": "a", "correct": True}, {"text": "b", "correct": False}, {"text": "c", "correct": False}],
        [{"text": "d", "correct": True}, {"text": "d", "correct": True}],
        [{"text": "e", "correct": False}],
    ]
    docs = [{"id": "p0"}, {"id": "p1"}, {"id": "p2"}]
    pairs = tt.make_pairs(docs, rows, 2, random.Random(0))
    assert sorted((d["id"], g, b) for d, g, b in pairs) == [("p0", "a", "b"), ("p0", "a", "c")]


def test_corrupt_makes_one_local_error_that_changes_the_answer(tt):
    """Every synthetic negative is a well-formed chain whose final answer is wrong, with exactly one line whose
    arithmetic or copied operand departs from the gold (the lines after it are right given the wrong value)."""
    import random
    import re

    from qalign_repro.tasks.arith import Arith

    task = Arith(yaml.safe_load((ROOT / "conf" / "dataset" / "arith.yaml").read_text()))
    rng = random.Random(0)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    step = r"(\d+)([+\-*])(\d+)=(\d+)\."
    made = 0
    for doc in task.load_split("rm_train", 200):
        gold = task.solution(doc)
        bad = tt.corrupt(gold, rng)
        if bad is None:
            continue
        made += 1
        assert task.extract(bad) is not None and not task.same(task.extract(bad), task.gold(doc))
        gold_steps, bad_steps = re.findall(step, gold), re.findall(step, bad)
        assert len(bad_steps) == len(gold_steps)
        wrong_result = [ops[op](int(a), int(b)) != int(c) for a, op, b, c in bad_steps]
        miscopied = [(op, b) != (gop, gb) for (_, op, b, _), (_, gop, gb, _) in zip(bad_steps, gold_steps)]
        assert sum(wrong_result) + sum(miscopied) == 1, (gold, bad)
        chained = all(bad_steps[j + 1][0] == bad_steps[j][3] for j in range(len(bad_steps) - 1))
        assert chained and bad.endswith(f"The answer is {bad_steps[-1][3]}.")
    assert made >= 190


def test_synthetic_stage_and_extra_layers_run_and_are_recorded(tmp_path):
    """--rm-synthetic-prompts trains on (gold, one-error) pairs first; --rm-extra-layers adds layers on a frozen
    LM (--rm-freeze-base); the held-out curve and the settings land in metrics.json, and the RM still loads."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "syn"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *SMALL, "--rm-synthetic-prompts", "8",
                           "--rm-synthetic-per-prompt", "2", "--rm-extra-layers", "1", "--rm-freeze-base",
                           "--rm-eval-every", "2"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rm_info = json.loads((out / "tiny-rm" / "metrics.json").read_text())["rm"]
    assert rm_info["synthetic_pairs"] == 16 and rm_info["extra_layers"] == 1 and rm_info["freeze_base"] is True
    assert [c["step"] for c in rm_info["heldout_curve"] if c["stage"] == "synthetic"] == [2, 4]
    rm = AutoModelForSequenceClassification.from_pretrained(out / "tiny-rm")
    assert rm.config.num_hidden_layers == 2  # the LM's 1 layer + 1 extra


def test_mixed_stage_one_with_per_layer_inits_runs_and_is_recorded(tmp_path):
    """--rm-synthetic-mix trains stage 1 on synthetic + on-policy pairs with its own dense weight / lr;
    --rm-extra-inits gives each extra layer its init; the record holds the stage-1 steps and the RM loads."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "mix"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *SMALL, "--rm-synthetic-prompts", "8",
                           "--rm-synthetic-per-prompt", "2", "--rm-synthetic-mix", "--rm-synthetic-dense-weight", "2",
                           "--rm-synthetic-lr", "1e-3", "--rm-dense-weight", "1", "--rm-dense-labels", "first-error",
                           "--rm-extra-layers", "2", "--rm-extra-inits", "random,pool"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "tiny-rm" / "metrics.json").read_text())
    rm_info, s = m["rm"], m["settings"]
    assert rm_info["synthetic_pairs"] == 16 and rm_info["extra_layers"] == 2
    assert rm_info["stage1_steps"] == -(-(16 + rm_info["train_pairs"]) // 4)  # ceil over batch 4, one epoch
    assert (s["rm_extra_inits"], s["rm_synthetic_mix"], s["rm_synthetic_dense_weight"]) == ("random,pool", True, 2.0)
    assert AutoModelForSequenceClassification.from_pretrained(out / "tiny-rm").config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="random\\|pool"):
        _load_script()._extra_inits(Namespace(rm_extra_inits="pool", rm_extra_init="random", rm_extra_layers=2))


def test_prefix_labels_mark_the_first_departure_from_the_gold_chain(tt):
    """1 while the completion is still the gold chain, 0 from its first wrong token on; the closing token
    carries the grade; prompt positions are ignored (-1)."""
    gold = [1, 2, 3, 4, 5, 6, 9]
    wrong = [1, 2, 3, 4, 7, 6, 9]
    assert tt.prefix_labels(wrong, gold, 2, False) == [-1, -1, 1, 1, 0, 0, 0]
    assert tt.prefix_labels(gold, gold, 2, True) == [-1, -1, 1, 1, 1, 1, 1]
    # a longer completion that starts with the whole gold chain is off from the first extra token
    assert tt.prefix_labels(gold[:-1] + [8, 9], gold, 2, False) == [-1, -1, 1, 1, 1, 1, 0, 0]
    # a chain that departs but lands on the right answer: the grade wins at the end
    assert tt.prefix_labels(wrong, gold, 2, True)[-1] == 1
    # first-error labels: only the departing token is a negative, the tokens after it are not counted
    assert tt.prefix_labels(wrong, gold, 2, False, sticky=False) == [-1, -1, 1, 1, 0, -1, 0]


def test_smoke_run_with_the_surprise_rm(tmp_path):
    """The circuit RM (``--rm-init surprise``, the default until the learned RM) on a two-layer LM: it trains,
    saves, and loads as a plain HF sequence classifier with attention/MLP biases (what vLLM loads too)."""
    small = [a for a in SMALL if a not in ("--rm-init", "lm")]
    small[small.index("--hidden") + 1], small[small.index("--layers") + 1] = "64", "2"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *small, "--rm-init", "surprise",
                           "--rm-circuit-prompts", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny-rm")
    assert rm.config.num_hidden_layers == 5 and rm.config.attention_bias and rm.config.mlp_bias
    info = json.loads((tmp_path / "tiny-rm" / "metrics.json").read_text())["rm"]
    assert info["init"] == "surprise" and info["circuit"]["layers"] == {"code_writer": 1, "carry": 3, "pool": 4}


def test_surprise_circuit_on_the_shipped_lm_prefers_gold_chains(tt):
    """Built on the shipped LM from its gold chains, the circuit alone (before any Bradley-Terry fit) ranks the gold
    chain above a one-error chain of the same problem for most unseen problems (0.93 measured)."""
    import random

    from transformers import LlamaForCausalLM

    from qalign_repro.models.tiny import build_tokenizer
    from qalign_repro.tasks.arith import Arith

    sys.path.insert(0, str(ROOT / "scripts"))
    from tiny_rm_circuit import build_surprise_rm

    task = Arith(yaml.safe_load((ROOT / "conf" / "dataset" / "arith.yaml").read_text()))
    tok = build_tokenizer()
    enc = tt.Encoder(tok)
    lm = LlamaForCausalLM.from_pretrained(ROOT / "src" / "qalign_repro" / "assets" / "tiny-lm")
    docs = task.load_split("rm_train", 260)
    fit = [enc.chat(task.prompt(d), task.solution(d)) for d in docs[:100]]
    rm, info = build_surprise_rm(lm, fit, [tok.convert_tokens_to_ids(str(k)) for k in range(10)], enc.pad)
    assert info["c0_probe_error_max"] < 0.005 and info["code_error_max"] < 0.01
    pairs = tt.synthetic_pairs(task, docs[100:], 1, random.Random(3))
    good = tt.score(rm, [enc.chat(task.prompt(d), g) for d, g, _ in pairs], enc.pad)
    bad = tt.score(rm, [enc.chat(task.prompt(d), b) for d, _, b in pairs], enc.pad)
    assert len(pairs) >= 100 and (good > bad).mean() >= 0.85, (good > bad).mean()  # chance: 0.5, SE ~0.04


def test_smoke_run_with_the_wide_rm(tmp_path):
    """--rm-init wide on a one-layer LM: the stages run, their figures are recorded, and the RM saves and loads as
    a plain HF sequence classifier wider than the LM (LM width + --rm-wide-extra, the LM's heads)."""
    small = [a for a in SMALL if a not in ("--rm-init", "lm")]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *small, "--rm-init", "wide",
                           "--rm-wide-extra", "16", "--rm-dense-steps", "6", "--rm-dense-batch", "4",
                           "--rm-whole-steps", "4", "--rm-whole-batch", "4", "--rm-pool-steps", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny-rm")
    assert (rm.config.hidden_size, rm.config.head_dim, rm.config.num_hidden_layers) == (48, 16, 3)
    info = json.loads((tmp_path / "tiny-rm" / "metrics.json").read_text())["rm"]
    w = info["wide"]
    assert info["init"] == "wide" and w["dense"]["steps"] == 6 and w["whole"]["steps"] == 4
    assert w["dense"]["context"] == 2 and w["whole"]["context"] is None
    assert -1 <= w["whole"]["heldout_token_r"] <= 1 and info["shape"]["hidden"] == 48
    assert w["pairs"]["pairs"] == info["train_pairs"] and w["pairs"]["steps"] == (4 if info["train_pairs"] else 0)
    assert info["steps"] == w["pairs"]["steps"]  # the Bradley-Terry steps that ran (fit_rm does not run)
    assert "wider than the policy" in (tmp_path / "tiny-rm" / "README.md").read_text()


def test_wide_rm_is_deterministic_from_its_recorded_settings(tmp_path):
    """Issue 19: the learned RM is reproducible from the settings its card records -- two runs of the same
    command (same seed, one thread) give bit-identical RM weights and the same figures."""
    small = [a for a in SMALL if a not in ("--rm-init", "lm")]
    wide = ["--rm-init", "wide", "--rm-wide-extra", "16", "--rm-dense-steps", "5", "--rm-dense-batch", "4",
            "--rm-whole-steps", "3", "--rm-whole-batch", "4", "--rm-pool-steps", "5"]
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *small, *wide],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out / "tiny-rm")
    wa, wb = (load_file(o / "model.safetensors") for o in outs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((o / "metrics.json").read_text())["rm"] for o in outs)
    assert ma["heldout"] == mb["heldout"] and ma["wide"]["whole"]["heldout_token_r"] == mb["wide"]["whole"]["heldout_token_r"]
