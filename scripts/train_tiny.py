"""Train the embedded default models: a tiny causal LM and a Bradley–Terry reward model on the ``arith`` task.

A miniature of the paper's task-specific setup (section 4.1, Appendix H):

1. LM: a ~1.8M-parameter character-level ``LlamaForCausalLM`` trained on the ``train`` split (cross-entropy on
   the answer tokens only), with a budget that leaves its single-sample accuracy at temperature 1 in the
   25–60 % band, so majority voting, best-of-n and QAlign have headroom.
2. RM: a ``LlamaForSequenceClassification`` (num_labels=1) trained with -log σ(r(correct) − r(incorrect)) on
   pairs of the LM's *own* temperature-1 samples on the ``rm_train`` split, each pair a correct and an
   incorrect answer to the same prompt, pairs picked by the ground truth (as in Appendix H). By default it is
   initialised from the trained LM (the paper initialises its RM from the policy): the RM then starts from
   features that already encode the arithmetic, which a few thousand pairs could not teach from scratch.
   Its pairwise accuracy is measured on pairs from held-out rm_train prompts.
3. Measure and record: LM test accuracy (one sample per prompt, temperature 1, pure sampling), RM held-out
   pairwise accuracy, and a best-of-n / majority-vote diagnostic on test prompts; ``metrics.json`` and a model
   card (``README.md``) are written next to each model's weights.

Deterministic on CPU for a fixed ``--seed`` and ``--threads``: seeded init, data in a fixed order (the task's
own seeded stream), seeded sampling. Every budget knob is a flag, so a smoke test runs in seconds::

    nice -n 5 python scripts/train_tiny.py                       # the shipped models (~20 min on 2 cores)
    python scripts/train_tiny.py --out /tmp/t --steps 5 --hidden 32 --layers 1 --heads 2 --rm-prompts 16 ...
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import operator
import os
import platform
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml
from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification

from qalign_repro.models.tiny import build_tokenizer, llama_config, save_tokenizer
from qalign_repro.tasks.arith import Arith

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "qalign_repro" / "assets"
DEFAULT_DATASET = REPO / "conf" / "dataset" / "arith.yaml"
#: the band the issue asks for; the card states it and the tests check the shipped figures against it
LM_ACCURACY_BAND = (0.25, 0.60)
RM_PAIRWISE_BAND = (0.55, 0.97)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ------------------------------------------------------------------------------------------------


class Encoder:
    """Chat rendering + character tokenization exactly as the generator/RM backends do it."""

    def __init__(self, tok):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.ids(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def chat(self, messages: list[dict[str, str]], completion: str) -> list[int]:
        """The full conversation the RM scores: prompt + assistant completion + ``</s>``."""
        full = messages + [{"role": "assistant", "content": completion}]
        return self.ids(self.tok.apply_chat_template(full, tokenize=False))


def right_pad(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)


# -- sampling ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model: LlamaForCausalLM, prompts: list[list[int]], *, max_new: int, eos: int, pad: int,
           generator: torch.Generator, batch: int = 128) -> list[tuple[list[int], bool, list[float]]]:
    """Pure ancestral samples (temperature 1, no top-k/top-p): ``(token ids without EOS, stopped, logprobs)``
    each, ``logprobs`` covering the returned ids plus the EOS when stopped (what a QAlign ratio would use).

    A KV-cached loop over left-padded batches, with positions taken from the attention mask so a padded
    prompt sees the same positions as an unpadded one. Written out rather than ``generate`` so that nothing
    (a generation_config default, a logits processor) can silently change the distribution.
    """
    from qalign_repro.models.hf_format import left_pad  # the backends' own left-padded batches

    model.eval()
    out: list[tuple[list[int], bool, list[float]]] = []
    for b in range(0, len(prompts), batch):
        chunk = prompts[b : b + batch]
        ids, mask, pos = left_pad(chunk, pad)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, logits = res.past_key_values, res.logits[:, -1]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        toks: list[torch.Tensor] = []
        lps: list[torch.Tensor] = []
        pos = pos[:, -1:]
        for _ in range(max_new):
            logp = torch.log_softmax(logits.float(), -1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            toks.append(nxt)
            lps.append(logp.gather(1, nxt[:, None]).squeeze(1))
            done = done | (nxt == eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=torch.long)], dim=1)
            pos = pos + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                        use_cache=True)
            past, logits = res.past_key_values, res.logits[:, -1]
        gen, lp = torch.stack(toks, dim=1).tolist(), torch.stack(lps, dim=1).tolist()
        for row, row_lp in zip(gen, lp):
            if eos in row:
                end = row.index(eos)
                out.append((row[:end], True, row_lp[: end + 1]))
            else:
                out.append((row, False, row_lp))
    return out


def sample_texts(model, enc: Encoder, task: Arith, docs: list[dict], k: int, args, seed: int) -> list[list[dict]]:
    """``k`` samples per doc, graded: ``[[{"text", "correct", "stopped"}, ...], ...]`` in doc order."""
    g = torch.Generator().manual_seed(seed)
    prompts = [enc.prompt(task.prompt(d)) for d in docs for _ in range(k)]
    res = sample(model, prompts, max_new=args.max_new_tokens, eos=enc.eos, pad=enc.pad, generator=g,
                 batch=args.gen_batch)
    out: list[list[dict]] = []
    for i, d in enumerate(docs):
        row = []
        for ids, stopped, _ in res[i * k : (i + 1) * k]:
            text = enc.tok.decode(ids, skip_special_tokens=True)
            row.append({"text": text, "correct": bool(task.grade(d, text)["correct"]), "stopped": stopped})
        out.append(row)
    return out


def accuracy_with_ci(hits: list[bool]) -> dict[str, Any]:
    """Accuracy with a Wilson 95 % interval (n is small enough that the normal interval misbehaves)."""
    n, p = len(hits), float(np.mean(hits)) if hits else float("nan")
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"accuracy": round(p, 4), "n": n, "ci95": [round(centre - half, 4), round(centre + half, 4)]}


# -- LM ----------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, warmup: int, base: float, final_frac: float) -> float:
    """Linear warmup, then cosine decay to ``final_frac * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train_lm(args, tok, enc: Encoder, task: Arith) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(tok, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                          context=args.context))
    n_params = sum(p.numel() for p in model.parameters())
    docs = task.load_split("train", args.steps * args.batch)
    log(f"LM: {n_params / 1e6:.2f}M params, {len(docs)} train problems, {args.steps} steps x {args.batch}")
    # a fixed validation curve on held-out rm_train prompts (never test: the test figure stays untouched)
    val_docs = task.load_split("rm_train")[-args.eval_n :] if args.eval_every else []
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    curve: list[dict[str, Any]] = []
    tokens = 0
    t0, c0 = time.time(), time.process_time()
    model.train()
    for step in range(args.steps):
        batch = docs[step * args.batch : (step + 1) * args.batch]
        seqs, labels = [], []
        for d in batch:
            p = enc.prompt(task.prompt(d))
            a = enc.ids(task.solution(d)) + [enc.eos]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        ids = right_pad(seqs, enc.pad)
        lab = right_pad(labels, -100)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr, args.final_lr_frac)
        # right padding + causal attention: real tokens never see the pads, so no mask is needed
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(ids.numel())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t0
            log(f"LM step {step + 1}/{args.steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{tokens / el:.0f} tok/s {el:.0f}s")
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            rows = sample_texts(model, enc, task, val_docs, 1, args, seed=args.seed + 7)
            acc = float(np.mean([r[0]["correct"] for r in rows]))
            curve.append({"step": step + 1, "val_accuracy": round(acc, 4), "seconds": round(time.time() - t0)})
            log(f"LM step {step + 1}: val accuracy {acc:.3f} (n={len(val_docs)}, rm_train tail, T=1)")
            model.train()
    model.eval()
    info = {"n_params": n_params, "train_problems": len(docs), "train_tokens": tokens,
            "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1), "val_curve": curve}
    return model, info


# -- RM ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def score(rm: LlamaForSequenceClassification, seqs: list[list[int]], pad: int, batch: int = 64) -> np.ndarray:
    """Scalar rewards; right padding, the head reads the last non-pad token (the closing ``</s>``)."""
    rm.eval()
    out = []
    for b in range(0, len(seqs), batch):
        out.append(rm(input_ids=right_pad(seqs[b : b + batch], pad)).logits[:, 0].float())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def make_pairs(docs: list[dict], rows: list[list[dict]], per_prompt: int,
               rng: random.Random) -> list[tuple[dict, str, str]]:
    """Up to ``per_prompt`` (doc, correct text, incorrect text) pairs per prompt, picked by the ground truth;
    distinct texts where the samples allow it (the LM often repeats a correct solution)."""
    pairs = []
    for doc, row in zip(docs, rows):
        good = sorted({s["text"] for s in row if s["correct"]})
        bad = sorted({s["text"] for s in row if not s["correct"]})
        if not good or not bad:
            continue
        rng.shuffle(good)
        rng.shuffle(bad)
        for j in range(min(per_prompt, max(len(good), len(bad)))):
            pairs.append((doc, good[j % len(good)], bad[j % len(bad)]))
    return pairs


_STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def corrupt(solution: str, rng: random.Random, max_value: int = 99) -> str | None:
    """A wrong chain of the two kinds the tiny LM writes: one step's result is off (by 1, 2 or 10) or one
    operand is mis-copied from the question, and the chain goes on correctly from the wrong value, so exactly
    one line is locally wrong and the final answer is wrong. None when no such chain stays in [0, max_value]."""
    steps = [(int(a), op, int(b)) for a, op, b, _ in _STEP.findall(solution)]
    if not steps:
        return None
    for _ in range(20):
        k = rng.randrange(len(steps))
        delta = rng.choice((-10, -2, -1, 1, 2, 10))
        miscopy = rng.random() < 0.3
        lines, cur, ok = [], steps[0][0], True
        for j, (_, op, b) in enumerate(steps):
            a = cur
            if j == k and miscopy:  # for "*": another small multiplier
                b = rng.choice([m for m in (2, 3, 4) if m != b]) if op == "*" else b + delta
            c = _OPS[op](a, b) + (delta if j == k and not miscopy else 0)
            if not (0 <= a <= max_value and 0 < b <= max_value and 0 <= c <= max_value):
                ok = False
                break
            lines.append(f"{a}{op}{b}={c}.")
            cur = c
        if ok and not solution.endswith(f"The answer is {cur}."):
            return " ".join([*lines, f"The answer is {cur}."])
    return None


def synthetic_pairs(task: Arith, docs: list[dict], per_prompt: int,
                    rng: random.Random) -> list[tuple[dict, str, str]]:
    """(doc, gold chain, corrupted chain) pairs: hard negatives that differ from the gold by one local error,
    so the only thing that separates the two sides is the arithmetic of one line."""
    pairs = []
    for doc in docs:
        gold = task.solution(doc)
        for _ in range(per_prompt):
            bad = corrupt(gold, rng, int(task.settings["max_value"]))
            if bad is not None:
                pairs.append((doc, gold, bad))
    return pairs


def prefix_labels(seq: list[int], gold: list[int], start: int, correct: bool, sticky: bool = True) -> list[float]:
    """Per-position targets for the dense loss: 1 while the completion so far is still a prefix of the gold
    chain, 0 from the first token that leaves it (``sticky=False``: 0 on that token only, later ones ignored);
    the last token (``</s>``) gets the grade itself, so the position the RM's score is read at learns exactly
    what the Bradley–Terry loss asks for. Prompt positions get -1 (ignored)."""
    first_off = next((t for t in range(start, len(seq)) if t >= len(gold) or seq[t] != gold[t]), len(seq))
    after = 0.0 if sticky else -1.0
    labels = [-1.0] * start + [1.0 if t < first_off else 0.0 if t == first_off else after for t in range(start, len(seq))]
    labels[-1] = 1.0 if correct else 0.0
    return labels


def pairwise_accuracy(rm, enc: Encoder, task: Arith, docs: list[dict], rows: list[list[dict]]) -> dict[str, Any]:
    """Over every (correct, incorrect) sample pair of the same prompt: how often the correct one scores
    higher (ties count half). ``n_prompts`` is the effective sample size (pairs of a prompt are correlated)."""
    per_wins, per_total = [], []
    for d, row in zip(docs, rows):
        good = [s["text"] for s in row if s["correct"]]
        bad = [s["text"] for s in row if not s["correct"]]
        if not good or not bad:
            continue
        msgs = task.prompt(d)
        r = score(rm, [enc.chat(msgs, t) for t in good + bad], enc.pad)
        rg, rb = r[: len(good)][:, None], r[len(good) :][None, :]
        per_wins.append(float((rg > rb).sum() + 0.5 * (rg == rb).sum()))
        per_total.append(len(good) * len(bad))
    wins, total, prompts = sum(per_wins), sum(per_total), len(per_total)
    # None, not NaN, when there are no pairs: metrics.json stays strict JSON
    return {"pairwise_accuracy": round(wins / total, 4) if total else None, "n_pairs": total,
            "n_prompts": prompts, "ci95": prompt_bootstrap_ci(per_wins, per_total)}


def prompt_bootstrap_ci(wins: list[float], totals: list[int], n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile bootstrap interval of sum(wins) / sum(totals), resampling prompts (the pairs of one
    prompt are correlated, so prompts are the unit); seeded, so the record is reproducible."""
    if not totals:
        return None
    w, t = np.asarray(wins, dtype=np.float64), np.asarray(totals, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(t), size=(n_boot, len(t)))
    acc = w[idx].sum(1) / t[idx].sum(1)
    return [round(float(np.quantile(acc, 0.025)), 4), round(float(np.quantile(acc, 0.975)), 4)]


def _extra_inits(args) -> list[str]:
    """The init of each extra layer: ``--rm-extra-inits`` (one per layer, e.g. ``random,pool``) or else
    ``--rm-extra-init`` for all of them."""
    spec = getattr(args, "rm_extra_inits", None)
    inits = spec.split(",") if spec else [args.rm_extra_init] * args.rm_extra_layers
    if len(inits) != args.rm_extra_layers or set(inits) - {"random", "pool"}:
        raise ValueError(f"--rm-extra-inits {spec!r}: need {args.rm_extra_layers} of random|pool")
    return inits


def build_rm(args, tok, lm: LlamaForCausalLM | None) -> LlamaForSequenceClassification:
    """The RM before training: the LM's transformer (``--rm-init lm``) plus ``--rm-extra-layers`` freshly
    initialised layers on top, and a fresh scalar head."""
    torch.manual_seed(args.seed + 2)
    rm = LlamaForSequenceClassification(llama_config(tok, hidden=args.hidden, layers=args.layers + args.rm_extra_layers,
                                                     heads=args.heads, context=args.context, num_labels=1))
    if args.rm_init == "lm":
        if lm is None:
            raise ValueError("--rm-init lm needs the trained LM")
        res = rm.model.load_state_dict(lm.model.state_dict(), strict=False)
        assert not res.unexpected_keys and all(int(k.split(".")[1]) >= args.layers for k in res.missing_keys), res
        inits = _extra_inits(args)
        for layer, how in zip(rm.model.layers[args.layers :], inits):
            if how == "pool":
                # identity at the start (zero output projections), uniform causal attention (zero query/key):
                # each position sees the running mean of the prefix, so per-token evidence (an error the LM's
                # states already reveal) can reach the last token from the first step on
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.o_proj, layer.mlp.down_proj):
                    torch.nn.init.zeros_(proj.weight)
        if args.rm_freeze_base:
            for module in (rm.model.embed_tokens, *rm.model.layers[: args.layers]):
                module.requires_grad_(False)
    return rm


def dense_targets(enc: Encoder, task: Arith, doc: dict, text: str, preferred: bool, sticky: bool = True) -> list[float]:
    """``prefix_labels`` for one side of a pair: the preferred side of every pair here (on-policy or
    synthetic) is a correct chain and the rejected side a wrong one."""
    msgs = task.prompt(doc)
    gold = enc.chat(msgs, task.solution(doc))
    return prefix_labels(enc.chat(msgs, text), gold, len(enc.prompt(msgs)), preferred, sticky)


def dense_loss(per_pos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss of the per-position scores against ``prefix_labels`` (-1 = not counted)."""
    keep = labels >= 0
    return torch.nn.functional.binary_cross_entropy_with_logits(per_pos[keep], labels[keep])


def _sibling(name: str) -> Any:
    """A module beside this script (the RM builders), also when this file is loaded by path (the tests)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def surprise_rm(args, enc: Encoder, task: Arith, lm: LlamaForCausalLM, docs: list[dict],
                rows: list[list[dict]]) -> tuple[LlamaForSequenceClassification, dict[str, Any]]:
    """``--rm-init surprise``: the LM plus the hand-set layers of ``tiny_rm_circuit`` (fitted on the LM's own
    samples of the first ``--rm-circuit-prompts`` training prompts); only the head is left trainable, and it is
    fitted in float32 (the circuit carries small signals next to a large constant)."""
    build_surprise_rm = _sibling("tiny_rm_circuit").build_surprise_rm

    seqs = [enc.chat(task.prompt(d), smp["text"]) for d, row in zip(docs[: args.rm_circuit_prompts], rows)
            for smp in row[:2]]
    digits = [enc.tok.convert_tokens_to_ids(str(k)) for k in range(10)]
    rm, info = build_surprise_rm(lm, seqs, digits, enc.pad)
    for name, param in rm.named_parameters():
        param.requires_grad_(name.startswith("score."))
    return rm, info


def wide_rm(args, enc: Encoder, task: Arith, lm: LlamaForCausalLM, fit_docs: list[dict], fit_rows: list[list[dict]],
            pairs: list[tuple[dict, str, str]], held_docs: list[dict], held_rows: list[list[dict]],
            on_step=None) -> tuple[LlamaForSequenceClassification, dict[str, Any]]:
    """``--rm-init wide``: an RM wider than the policy (``scripts/tiny_rm_wide.py``), its fresh layers trained on
    the frozen base's cached states -- first on dense per-token targets (the LM's own log-prob of each token of
    its samples and of gold / one-error chains of the training prompts), then with Bradley-Terry on ``pairs``."""
    wide = _sibling("tiny_rm_wide")

    seqs: list[list[int]] = []
    starts: list[int] = []
    index: dict[tuple[int, ...], int] = {}

    def add(doc: dict, text: str) -> int:
        msgs = task.prompt(doc)
        seq = enc.chat(msgs, text)
        if tuple(seq) not in index:
            index[tuple(seq)] = len(seqs)
            seqs.append(seq)
            starts.append(len(enc.prompt(msgs)))
        return index[tuple(seq)]

    rng = random.Random(args.seed + 7)
    for doc, row in zip(fit_docs, fit_rows):
        for smp in row:
            add(doc, smp["text"])
        gold = task.solution(doc)
        add(doc, gold)
        for _ in range(args.rm_dense_corruptions):
            if (bad := corrupt(gold, rng, int(task.settings["max_value"]))) is not None:
                add(doc, bad)
    n_train = len(seqs)
    pair_ids = [(add(doc, good), add(doc, bad)) for doc, good, bad in pairs]  # all in the pool already
    for doc, row in zip(held_docs, held_rows):  # for the held-out token r only
        for smp in row:
            add(doc, smp["text"])
    t0 = time.time()
    targets = wide.lm_token_logprobs(lm, seqs, starts, enc.pad, clip=args.rm_dense_clip)
    rm = wide.build_wide_rm(lm, args.rm_wide_extra, seed=args.seed + 2, code_scale=args.rm_wide_code_scale)
    wide.freeze_base(rm, args.layers)
    states = wide.base_states(rm, args.layers, seqs, enc.pad)
    gain = wide.match_code_gain(rm, args.layers, args.hidden, states[:n_train])
    cache_s = time.time() - t0
    n_tokens = sum(len(t) for t in targets[:n_train])
    log(f"RM wide: {n_train} training sequences ({n_tokens} completion tokens), "
        f"base states cached in {cache_s:.0f}s, code gain {gain:.0f}")
    # stage 1: the carry layer learns the LM's own l_t, on windows, then on whole sequences (0 on the prompt)
    carry = wide.Top(rm, args.layers, 1)
    train, held = (states[:n_train], starts[:n_train], targets[:n_train]), (states[n_train:], starts[n_train:],
                                                                               targets[n_train:])
    dense = wide.train_dense(carry, *train, steps=args.rm_dense_steps, batch=args.rm_dense_batch, lr=args.rm_dense_lr,
                             seed=args.seed, log=log, log_every=4 * args.log_every)
    dense["heldout_token_r_windows"] = wide.token_r(carry, *held, context=2)
    whole = wide.train_dense(carry, *train, steps=args.rm_whole_steps, batch=args.rm_whole_batch, lr=args.rm_whole_lr,
                             seed=args.seed + 5, context=None, warmup=20, log=log, log_every=4 * args.log_every,
                             stage="dense (whole sequences)")
    whole["heldout_token_r"] = wide.token_r(carry, *held)
    log(f"RM wide stage 1: held-out token r {whole['heldout_token_r']} on whole sequences "
        f"({dense['heldout_token_r_windows']} on windows; {len(seqs) - n_train} sequences)")
    # stage 2: Bradley-Terry at </s> on the on-policy pairs through the pool layer, the carry layer frozen
    feats = wide.pool_features(rm, args.layers, dict(enumerate(states[:n_train])))
    wide.init_pool(rm, args.layers, feats, seed=args.seed + 3)
    bt = wide.train_pool(rm, args.layers, feats, pair_ids, steps=args.rm_pool_steps, lr=args.rm_pool_lr, log=log,
                         log_every=4 * args.log_every,
                         on_step=None if on_step is None else lambda k: on_step(k, rm, "pool"))
    rm.eval()
    info = {"extra_width": args.rm_wide_extra, "code_scale": args.rm_wide_code_scale, "code_gain": round(gain, 1),
            "dense_sequences": n_train, "dense_tokens": n_tokens,
            "cache_wall_s": round(cache_s, 1), "dense": dense, "whole": whole, "pairs": bt}
    return rm, info


def fit_rm(args, tok, enc: Encoder, task: Arith, lm: LlamaForCausalLM | None,
           pairs: list[tuple[dict, str, str]], rm: LlamaForSequenceClassification | None = None,
           epochs: int | None = None, on_step=None) -> LlamaForSequenceClassification:
    """Bradley–Terry training on ``(doc, preferred text, rejected text)`` pairs: one pass per epoch in a
    seeded order, 3 % warmup then linear decay (the paper's Appendix H schedule), no weight decay.
    ``rm``: continue training that model instead of building a new one; ``on_step(step)``: a hook (the
    held-out curve)."""
    rm = build_rm(args, tok, lm) if rm is None else rm
    epochs = args.rm_epochs if epochs is None else epochs
    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.rm_lr, weight_decay=0.0)
    total = max(1, math.ceil(len(pairs) / args.rm_batch) * epochs)
    warmup = max(1, round(0.03 * total))
    step = 0
    rm.train()
    for epoch in range(epochs):
        order = list(range(len(pairs)))
        random.Random(args.seed + 100 + epoch).shuffle(order)
        for b in range(0, len(order), args.rm_batch):
            chunk = [pairs[i] for i in order[b : b + args.rm_batch]]
            seqs = [enc.chat(task.prompt(doc), good) for doc, good, _ in chunk]
            seqs += [enc.chat(task.prompt(doc), bad) for doc, _, bad in chunk]
            ids = right_pad(seqs, enc.pad)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16 and args.rm_init != "surprise"):
                # the head on every position; the score is the last real token's, as the HF/vLLM RM reads it
                per_pos = rm.score(rm.model(input_ids=ids).last_hidden_state)[..., 0].float()
            last = torch.tensor([len(q) - 1 for q in seqs])
            r = per_pos[torch.arange(len(seqs)), last]
            margin = r[: len(chunk)] - r[len(chunk) :]
            loss = -torch.nn.functional.logsigmoid(margin).mean()
            if args.rm_dense_weight:
                sticky = args.rm_dense_labels == "prefix"
                targets = [dense_targets(enc, task, doc, good, True, sticky) for doc, good, _ in chunk]
                targets += [dense_targets(enc, task, doc, bad, False, sticky) for doc, _, bad in chunk]
                labels = torch.tensor([t + [-1.0] * (ids.shape[1] - len(t)) for t in targets])
                loss = loss + args.rm_dense_weight * dense_loss(per_pos, labels)
            lr = args.rm_lr * (step + 1) / warmup if step < warmup else args.rm_lr * (total - step) / (total - warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % args.log_every == 0 or step == total:
                log(f"RM step {step}/{total} loss {loss.item():.4f} batch acc "
                    f"{(margin > 0).float().mean().item():.2f}")
            if on_step is not None:
                on_step(step)
                rm.train()
    rm.eval()
    return rm


def train_rm(args, tok, enc: Encoder, task: Arith, lm: LlamaForCausalLM):
    """Sample the LM on rm_train prompts, pair correct with incorrect samples, fit, measure on held-out prompts."""
    t0 = time.time()
    docs = task.load_split("rm_train", args.rm_prompts)
    log(f"RM: sampling {args.rm_samples} completions for each of {len(docs)} rm_train prompts")
    rows = sample_texts(lm, enc, task, docs, args.rm_samples, args, seed=args.seed + 1)
    sample_s = time.time() - t0
    # held-out prompts come last; the LM's validation curve (--eval-every) uses the tail of rm_train too
    n_held = max(1, round(len(docs) * args.rm_heldout))
    fit_docs, fit_rows = docs[:-n_held], rows[:-n_held]
    held_docs, held_rows = docs[-n_held:], rows[-n_held:]
    rng = random.Random(args.seed)
    pairs = make_pairs(fit_docs, fit_rows, args.rm_pairs_per_prompt, rng)
    rng.shuffle(pairs)
    data_acc = float(np.mean([s["correct"] for r in rows for s in r]))
    log(f"RM: {len(pairs)} training pairs from {len(fit_docs)} prompts (LM accuracy on these samples "
        f"{data_acc:.3f}); {sample_s:.0f}s sampling")
    curve: list[dict[str, Any]] = []

    def held_out_curve(stage: str):
        def hook(step: int, model: LlamaForSequenceClassification | None = None, name: str = stage) -> None:
            if args.rm_eval_every and step % args.rm_eval_every == 0:
                acc = pairwise_accuracy(rm if model is None else model, enc, task, held_docs,
                                        held_rows)["pairwise_accuracy"]
                curve.append({"stage": name, "step": step, "heldout_pairwise_accuracy": acc})
                log(f"RM {name} step {step}: held-out pairwise accuracy {acc}")
        return hook

    circuit = wide = None
    if args.rm_init == "wide":
        if args.rm_synthetic_prompts or args.rm_dense_weight or args.rm_extra_layers:
            raise SystemExit("--rm-init wide trains its own fresh layers on dense targets: drop --rm-synthetic-prompts, "
                             "--rm-dense-weight and --rm-extra-layers")
        rm, wide = wide_rm(args, enc, task, lm, fit_docs, fit_rows, pairs, held_docs, held_rows,
                           on_step=held_out_curve("wide"))
    elif args.rm_init == "surprise":
        rm, circuit = surprise_rm(args, enc, task, lm, fit_docs, fit_rows)
        log(f"RM: surprise circuit built; held-out pairwise accuracy before Bradley-Terry "
            f"{pairwise_accuracy(rm, enc, task, held_docs, held_rows)['pairwise_accuracy']}")
    else:
        rm = build_rm(args, tok, lm)

    synthetic = []
    if args.rm_synthetic_prompts:
        # rm_train problems after the sampled ones: disjoint from the held-out prompts
        syn_docs = task.load_split("rm_train", args.rm_prompts + args.rm_synthetic_prompts)[args.rm_prompts :]
        synthetic = synthetic_pairs(task, syn_docs, args.rm_synthetic_per_prompt, random.Random(args.seed + 7))
        log(f"RM stage 1: {len(synthetic)} synthetic (gold, one-error) pairs from {len(syn_docs)} prompts")
        stage1 = synthetic
        if args.rm_synthetic_mix:  # the on-policy pairs too, in one seeded shuffle with the synthetic ones
            stage1 = [(synthetic + pairs)[i] for i in np.random.default_rng(5).permutation(len(synthetic) + len(pairs))]
            log(f"RM stage 1: mixed with the {len(pairs)} on-policy pairs")
        # stage-1 overrides (--rm-synthetic-dense-weight / -lr); the namespace is restored for stage 2
        s1 = argparse.Namespace(**vars(args))
        for key in ("dense_weight", "lr"):
            if getattr(args, f"rm_synthetic_{key}") is not None:
                setattr(s1, f"rm_{key}", getattr(args, f"rm_synthetic_{key}"))
        fit_rm(s1, tok, enc, task, lm, stage1, rm=rm, epochs=args.rm_synthetic_epochs,
               on_step=held_out_curve("synthetic"))
    if wide is None:
        fit_rm(args, tok, enc, task, lm, pairs, rm=rm, on_step=held_out_curve("on-policy"))
    held = pairwise_accuracy(rm, enc, task, held_docs, held_rows)
    fit = pairwise_accuracy(rm, enc, task, fit_docs[: args.rm_fit_eval], fit_rows[: args.rm_fit_eval])
    log(f"RM: held-out pairwise accuracy {held['pairwise_accuracy']} ({held['n_pairs']} pairs, "
        f"{held['n_prompts']} prompts); train-prompt accuracy {fit['pairwise_accuracy']}")
    info = {"init": args.rm_init, "circuit": circuit, "wide": wide, "rm_train_prompts": len(docs), "heldout_prompts": n_held,
            "samples_per_prompt": args.rm_samples, "train_pairs": len(pairs), "synthetic_pairs": len(synthetic),
            "extra_layers": args.rm_extra_layers, "freeze_base": args.rm_freeze_base, "heldout_curve": curve,
            # the Bradley-Terry steps that ran: fit_rm's, or the wide RM's pool stage (fit_rm does not run then)
            "steps": wide["pairs"]["steps"] if wide else max(1, math.ceil(len(pairs) / args.rm_batch) * args.rm_epochs),
            "stage1_steps": (math.ceil((len(synthetic) + len(pairs) * args.rm_synthetic_mix) / args.rm_batch)
                             * args.rm_synthetic_epochs if synthetic else 0),
            "lm_accuracy_on_rm_samples": round(data_acc, 4), "heldout": held, "fit_subset": fit,
            "sampling_wall_s": round(sample_s, 1), "wall_s": round(time.time() - t0, 1)}
    return rm, info


# -- diagnostics -------------------------------------------------------------------------------------------


def selection_diagnostic(args, enc: Encoder, task: Arith, lm, rm, docs: list[dict]) -> dict[str, Any]:
    """Best-of-n, majority vote and oracle pass@n over ``k`` test samples per prompt, at n = 1, 2, 4, ...:
    a first look at whether the RM adds over MV and whether BoN bends down at larger n."""
    rows = sample_texts(lm, enc, task, docs, args.diag_k, args, seed=args.seed + 3)
    rewards = [score(rm, [enc.chat(task.prompt(d), s["text"]) for s in row], enc.pad) for d, row in zip(docs, rows)]
    out: dict[str, Any] = {"prompts": len(docs), "k": args.diag_k, "by_n": []}
    n = 1
    while n <= args.diag_k:
        bon, mv, oracle = [], [], []
        for d, row, r in zip(docs, rows, rewards):
            sub = row[:n]
            bon.append(sub[int(np.argmax(r[:n]))]["correct"])
            oracle.append(any(s["correct"] for s in sub))
            answers = [task.extract(s["text"]) for s in sub]
            votes = Counter(a for a in answers if a is not None)
            mv.append(bool(votes) and task.same(votes.most_common(1)[0][0], task.gold(d)))
        out["by_n"].append({"n": n, "bon": round(float(np.mean(bon)), 4), "mv": round(float(np.mean(mv)), 4),
                            "pass_at_n": round(float(np.mean(oracle)), 4)})
        n *= 2
    corr = np.concatenate([[s["correct"] for s in row] for row in rows]).astype(bool)
    allr = np.concatenate(rewards)
    out["mean_reward_correct"] = round(float(allr[corr].mean()), 3) if corr.any() else None
    out["mean_reward_incorrect"] = round(float(allr[~corr].mean()), 3) if (~corr).any() else None
    return out


# -- output ------------------------------------------------------------------------------------------------


def save(model, tok, out_dir: Path, card: str, metrics: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, LlamaForCausalLM):
        # generate() on the shipped model defaults to pure sampling (QAlign's proposal must be the model)
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tok, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "README.md").write_text(card)


def _without_out(argv: list[str]) -> list[str]:
    """The command line minus ``--out DIR`` (where a run writes is not a training setting)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci_text(acc: dict[str, Any]) -> str:
    ci = acc.get("ci95")
    return f"; 95 % bootstrap CI over prompts {ci[0]:.3f}–{ci[1]:.3f}" if ci else ""


def fresh_pairwise(args, enc: Encoder, task: Arith, lm, rm) -> dict[str, Any]:
    """The RM's pairwise accuracy on prompts neither model saw (``test`` split), on new LM samples: the figure
    issue 19 asks for, beside the held-out rm_train one."""
    docs = task.load_split("test")[: args.rm_fresh_prompts]
    rows = sample_texts(lm, enc, task, docs, args.rm_samples, args, seed=args.seed + 11)
    return {"prompts": len(docs), "samples_per_prompt": args.rm_samples,
            **pairwise_accuracy(rm, enc, task, docs, rows)}


def _rm_init_text(rm: dict[str, Any]) -> str:
    if rm["init"] == "surprise":
        c = rm["circuit"] or {}
        return ("the trained tiny-lm plus three hand-set layers (`scripts/tiny_rm_circuit.py`: a layer after the LM's "
                "first one writes the current digit into directions the LM hardly uses, a previous-position head "
                "brings the LM's digit logits to the next position, and the last layer averages the LM's surprise at "
                f"the written digits; fitted on {c.get('fit_positions', '?')} positions of the LM's own samples, "
                f"digit-probe error <= {c.get('c0_probe_error_max', '?')}); only the scalar head is trained")
    if rm["init"] == "lm":
        return "the trained tiny-lm (as the paper initialises its RM from the policy)"
    if rm["init"] == "wide":
        w = rm["wide"]
        d, f, p = w["dense"], w["whole"], w["pairs"]
        return ("the trained tiny-lm made wider than the policy (`scripts/tiny_rm_wide.py`, no hand-set weights): "
                f"{w['extra_width']} more residual columns, freshly drawn in the embedding and left alone by the LM's "
                "frozen layers, so the written token reaches the top beside the LM's states. A fresh carry layer "
                f"learnt the LM's own log-prob of each token on {w['dense_sequences']} samples and gold / one-error "
                f"chains ({d['steps']} steps x {d['batch']} on windows, then {f['steps']} x {f['batch']} on whole "
                f"sequences; held-out token r {f['heldout_token_r']}); then, the carry layer frozen, a fresh uniform-"
                f"attention pool layer, the final norm and the head were trained with the Bradley–Terry loss on the "
                f"{p['pairs']} pairs ({p['steps']} full-batch Adam steps, lr {p['lr']})")
    return "scratch"


def model_card(kind: str, metrics: dict[str, Any]) -> str:
    s, lm, rm = metrics["settings"], metrics["lm"], metrics["rm"]
    cmd = "python scripts/train_tiny.py " + " ".join(_without_out(metrics["argv"]))
    if metrics.get("lm_argv") is not None:
        lm_cmd = "python scripts/train_tiny.py " + " ".join(_without_out(metrics["lm_argv"]))
        how = (f"the LM by `{lm_cmd.strip()}`, then the RM and the figures by `{cmd.strip()}` (`--lm-from` "
               "reuses that LM; one run with the first command's LM flags and the second's other flags gives the "
               "same weights)")
    else:
        how = f"`{cmd.strip()}`"
    lines = [
        f"# tiny-{kind}: qalign-repro embedded default {'policy' if kind == 'lm' else 'reward model'}",
        "",
        "Trained by `scripts/train_tiny.py` on the synthetic `arith` task (see `docs/tiny_models.md`):",
        "a miniature of the QAlign paper's task-specific setup (section 4.1, Appendix H).",
        "",
        "Scope: trained for `arith` only. Its context (8192 positions; trained on sequences under 256 tokens, raised",
        "afterwards, which RoPE leaves exact) holds every bundled benchmark prompt + 800 new tokens, so GSM8K, MATH-500,",
        "MMLU-Redux, TruthfulQA and IFEval run end to end, but with arith-style answers and near-zero accuracy; `run` says",
        "so in one line (`trained_on: [arith]` in `conf/model/tiny.yaml` / `conf/reward/tiny.yaml`). For the paper's "
        "numbers:",
        "`model=tulu3_8b_sft reward=tulu3_8b_rm` on a GPU (`docs/cluster.md`).",
        "",
        f"Reproduce: {how} (seed {s['seed']}, {s['threads']} CPU thread(s); the same seed and thread count give "
        "the same weights on the same kind of CPU).",
        "",
        "## Measured",
        "",
        f"- LM test accuracy, one sample per prompt at temperature 1 (no top-k/top-p), max {s['max_new_tokens']} "
        f"new tokens: **{lm['test']['accuracy']:.3f}** (n = {lm['test']['n']} test prompts, Wilson 95 % CI "
        f"{lm['test']['ci95'][0]:.3f}–{lm['test']['ci95'][1]:.3f}); {lm['test']['stopped_rate']:.3f} of samples "
        "ended with `</s>`.",
        f"- RM held-out pairwise accuracy (correct vs incorrect LM samples of the same held-out rm_train prompt): "
        f"**{_f(rm['heldout']['pairwise_accuracy'])}** ({rm['heldout']['n_pairs']} pairs from "
        f"{rm['heldout']['n_prompts']} prompts{_ci_text(rm['heldout'])}); on training prompts "
        f"{_f(rm['fit_subset']['pairwise_accuracy'])}.",
        *([f"- RM pairwise accuracy on fresh prompts (`test` split, {rm['fresh']['samples_per_prompt']} new LM "
           f"samples for each of {rm['fresh']['prompts']} prompts): **{_f(rm['fresh']['pairwise_accuracy'])}** "
           f"({rm['fresh']['n_pairs']} pairs from {rm['fresh']['n_prompts']} prompts{_ci_text(rm['fresh'])})."]
          if rm.get("fresh") else []),
        f"- Stated bands (tests check them): LM accuracy {metrics['ranges']['lm_accuracy']}, RM pairwise "
        f"accuracy {metrics['ranges']['rm_pairwise_accuracy']}.",
        f"- Wall time: {metrics['wall_s']['total']:.0f} s in total (LM training {metrics['wall_s']['lm_train']:.0f} s, "
        f"RM sampling + training {metrics['wall_s']['rm']:.0f} s, evaluation {metrics['wall_s']['eval']:.0f} s) "
        f"on {metrics['machine']}; {metrics['cpu_s']:.0f} CPU-seconds (wall time depends on what else runs).",
        "",
    ]
    diag = metrics.get("selection_diagnostic")
    if diag:
        lines += [f"Selection on {diag['prompts']} test prompts with {diag['k']} samples each (first n samples):",
                  "", "| n | BoN (RM) | MV | pass@n |", "|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['bon']:.3f} | {r['mv']:.3f} | {r['pass_at_n']:.3f} |" for r in diag["by_n"]]
        lines.append("")
    if lm["val_curve"]:
        lines += ["LM validation curve (held-out rm_train prompts, one sample each, T = 1):", "",
                  "| step | accuracy | seconds |", "|---|---|---|"]
        lines += [f"| {c['step']} | {c['val_accuracy']:.3f} | {c['seconds']} |" for c in lm["val_curve"]]
        lines.append("")
    shape = {k: s[k] for k in ("hidden", "layers", "heads")} if kind == "lm" else rm.get("shape", s)
    lines += [
        "## Architecture",
        "",
        f"`{'LlamaForCausalLM' if kind == 'lm' else 'LlamaForSequenceClassification'}`, hidden {shape['hidden']}, "
        f"{shape['layers']} layers, {shape['heads']} heads, context {s['context']}, character-level tokenizer "
        f"({metrics['vocab_size']} tokens, chat template `<|user|>...<|assistant|>...</s>`), "
        f"{(lm['n_params'] if kind == 'lm' else metrics['rm']['n_params']) / 1e6:.2f} M parameters.",
        "",
    ]
    if kind == "lm":
        lines += [
            f"Trained on {lm['train_problems']} distinct `train` problems (one epoch, {s['steps']} steps x batch "
            f"{s['batch']}), AdamW (betas 0.9/0.95, weight decay {s['weight_decay']}), lr {s['lr']} with "
            f"{s['warmup']} warmup steps and cosine decay to {s['final_lr_frac']} x lr, cross-entropy on the "
            "answer tokens only. `generation_config.json` sets pure sampling (temperature 1, top_k 0, top_p 1).",
        ]
    elif rm["init"] == "wide":
        lines += [
            f"Built from {_rm_init_text(rm)}. The pairs are tiny-lm's own temperature-1 samples "
            f"({rm['samples_per_prompt']} per prompt on {rm['rm_train_prompts'] - rm['heldout_prompts']} rm_train "
            f"prompts, up to {s['rm_pairs_per_prompt']} (correct, incorrect) pairs per prompt, picked by the ground "
            "truth). Scores are raw logits read at the closing `</s>` of the full chat (prompt + completion), as the "
            "`hf` reward backend feeds it.",
        ]
    else:
        lines += [
            f"Initialised from {_rm_init_text(rm)}; "
            f"trained with the Bradley–Terry loss -log σ(r(correct) − r(incorrect)) on {rm['train_pairs']} pairs of "
            f"tiny-lm's own temperature-1 samples ({rm['samples_per_prompt']} per prompt on "
            f"{rm['rm_train_prompts'] - rm['heldout_prompts']} rm_train prompts, up to {s['rm_pairs_per_prompt']} "
            f"pairs per prompt, picked by the ground truth), {s['rm_epochs']} epoch(s), batch {s['rm_batch']} pairs, "
            f"lr {s['rm_lr']} with 3 % warmup and linear decay, no weight decay. Scores are raw logits read at the "
            "closing `</s>` of the full chat (prompt + completion), as the `hf` reward backend feeds it.",
        ]
    lines += ["", "Task settings (`conf/dataset/arith.yaml`):", "", "```json",
              json.dumps(metrics["dataset"], indent=2), "```", ""]
    return "\n".join(lines)


#: the flags that shape the LM; --lm-from takes them from the earlier run so the record stays true
LM_FLAGS = ("hidden", "layers", "heads", "context", "steps", "batch", "lr", "warmup", "final_lr_frac",
            "weight_decay", "bf16", "eval_every", "eval_n")


def reuse_lm(args, task: Arith) -> tuple[LlamaForCausalLM, dict[str, Any], dict[str, Any]]:
    """Load the LM an earlier run of this script saved, instead of training it again.

    Everything after LM training depends only on the LM's weights and on seeded generators, so the result is
    the same as one run with the earlier run's LM flags; that holds only for the same seed, thread count and
    task, which is checked.
    """
    prev = json.loads((args.lm_from / "metrics.json").read_text())
    for key in ("seed", "threads"):
        if prev["settings"][key] != getattr(args, key):
            raise SystemExit(f"--lm-from: {key}={getattr(args, key)} but the LM was trained with {prev['settings'][key]}")
    if prev["dataset"] != task.settings:
        raise SystemExit("--lm-from: the LM was trained on different arith settings")
    for key in LM_FLAGS:
        setattr(args, key, prev["settings"][key])
    lm = LlamaForCausalLM.from_pretrained(args.lm_from).eval()
    info = {k: v for k, v in prev["lm"].items() if k != "test"}
    log(f"LM: reusing {args.lm_from} ({info['n_params'] / 1e6:.2f}M params, {args.steps} steps x {args.batch})")
    return lm, info, prev


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT/tiny-lm and OUT/tiny-rm")
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="arith task config (yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-from", type=Path, default=None,
                    help="reuse the tiny-lm folder of an earlier run (same seed/threads/task) and redo the RM "
                         "and the measurements; its LM flags replace this run's")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; part of what fixes the result. 1 because on a shared 2-core machine two "
                         "threads were 3x slower (OpenMP threads wait on each other when a core is taken)")
    g = ap.add_argument_group("LM")
    g.add_argument("--hidden", type=int, default=192)
    g.add_argument("--layers", type=int, default=3)
    g.add_argument("--heads", type=int, default=3, help="192/3 = head size 64, which vLLM's CPU attention supports")
    g.add_argument("--context", type=int, default=8192,
                   help="max_position_embeddings: holds every bundled benchmark prompt + 800 new tokens; RoPE has "
                        "no position table, so it does not change the trained weights")
    g.add_argument("--steps", type=int, default=1200)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--final-lr-frac", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for the training forwards of LM and RM (fp32 weights; ~1.4x faster on "
                        "CPUs with AVX512-BF16); sampling, scoring and the saved weights stay fp32")
    g = ap.add_argument_group("RM")
    g.add_argument("--rm-init", choices=["wide", "surprise", "lm", "scratch"], default="wide",
                   help="wide: the LM widened by fresh residual columns + two fresh layers, all learnt "
                        "(tiny_rm_wide.py); surprise: the LM + hand-set layers scoring the LM's own surprise at the answer digits "
                        "(tiny_rm_circuit.py), head fitted by Bradley-Terry; lm: the LM + a fresh head, all trained")
    g.add_argument("--rm-wide-extra", type=int, default=96,
                   help="--rm-init wide: residual columns added to the LM's (hidden + extra must divide by --heads)")
    g.add_argument("--rm-wide-code-scale", type=float, default=0.05,
                   help="--rm-init wide: std of the new embedding columns relative to the LM embedding's")
    g.add_argument("--rm-dense-steps", type=int, default=3000,
                   help="--rm-init wide: stage-1 steps on windows (per-token targets)")
    g.add_argument("--rm-dense-batch", type=int, default=64, help="--rm-init wide: sequences per stage-1 step")
    g.add_argument("--rm-dense-lr", type=float, default=1e-3, help="--rm-init wide: stage-1 learning rate")
    g.add_argument("--rm-whole-steps", type=int, default=600,
                   help="--rm-init wide: stage-1 steps on whole sequences (after the windowed ones)")
    g.add_argument("--rm-whole-batch", type=int, default=32, help="--rm-init wide: sequences per whole-sequence step")
    g.add_argument("--rm-whole-lr", type=float, default=5e-4, help="--rm-init wide: whole-sequence learning rate")
    g.add_argument("--rm-pool-steps", type=int, default=1000,
                   help="--rm-init wide: stage-2 full-batch Bradley-Terry steps through the pool layer")
    g.add_argument("--rm-pool-lr", type=float, default=3e-3, help="--rm-init wide: stage-2 learning rate")
    g.add_argument("--rm-dense-corruptions", type=int, default=4,
                   help="--rm-init wide: one-error chains per training prompt added to stage 1's sequences")
    g.add_argument("--rm-dense-clip", type=float, default=-10.0,
                   help="--rm-init wide: stage-1 targets (the LM's token log-probs) are clipped below at this")
    g.add_argument("--rm-circuit-prompts", type=int, default=300, help="training prompts the circuit is fitted on")
    g.add_argument("--rm-extra-layers", type=int, default=0, help="freshly initialised layers on top of the LM's")
    g.add_argument("--rm-extra-init", choices=["random", "pool"], default="random",
                   help="extra layers: standard init, or identity with uniform attention (a running mean)")
    g.add_argument("--rm-freeze-base", action=argparse.BooleanOptionalAction, default=False,
                   help="with --rm-init lm: train only the extra layers, the final norm and the head")
    g.add_argument("--rm-synthetic-prompts", type=int, default=0,
                   help="stage 1 before the on-policy pairs: rm_train problems (after the sampled ones) whose gold "
                        "chain is paired with one-error corruptions of it (0 = off, the paper's recipe)")
    g.add_argument("--rm-synthetic-per-prompt", type=int, default=4)
    g.add_argument("--rm-synthetic-epochs", type=int, default=1, help="passes over the stage-1 pairs")
    g.add_argument("--rm-synthetic-mix", action=argparse.BooleanOptionalAction, default=False,
                   help="stage 1 trains on the synthetic and the on-policy pairs together (one seeded shuffle)")
    g.add_argument("--rm-synthetic-dense-weight", type=float, default=None,
                   help="--rm-dense-weight for stage 1 only (default: the same as stage 2)")
    g.add_argument("--rm-synthetic-lr", type=float, default=None, help="--rm-lr for stage 1 only (default: the same)")
    g.add_argument("--rm-extra-inits", default=None,
                   help="one init per extra layer, comma-separated random|pool (e.g. random,pool: a freely "
                        "initialised layer, then a running-mean pool); overrides --rm-extra-init")
    g.add_argument("--rm-dense-weight", type=float, default=0.0,
                   help="weight of the per-position loss: the head, read at every completion token, learns whether "
                        "the chain so far is still the gold one (0 = the paper's plain Bradley-Terry loss)")
    g.add_argument("--rm-dense-labels", choices=["prefix", "first-error"], default="prefix",
                   help="prefix: 0 from the first wrong token on; first-error: 0 on that token, later ones not counted")
    g.add_argument("--rm-eval-every", type=int, default=0, help="held-out pairwise accuracy every N RM steps")
    g.add_argument("--rm-prompts", type=int, default=1200, help="rm_train prompts sampled (incl. held-out)")
    g.add_argument("--rm-samples", type=int, default=8, help="LM samples per rm_train prompt")
    g.add_argument("--rm-pairs-per-prompt", type=int, default=4)
    g.add_argument("--rm-heldout", type=float, default=0.15, help="fraction of rm_train prompts held out")
    g.add_argument("--rm-epochs", type=int, default=2)
    g.add_argument("--rm-batch", type=int, default=32)
    g.add_argument("--rm-lr", type=float, default=1e-3)
    g.add_argument("--rm-fresh-prompts", type=int, default=200,
                   help="test prompts (x --rm-samples new LM samples) for the RM's fresh-prompt pairwise accuracy")
    g.add_argument("--rm-fit-eval", type=int, default=200, help="training prompts re-scored for the fit figure")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--test-n", type=int, default=500, help="test prompts for the LM accuracy (one sample each)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--gen-batch", type=int, default=128)
    g.add_argument("--eval-every", type=int, default=100,
                   help="validation accuracy every N LM steps (0 = off; it does not change the weights)")
    g.add_argument("--eval-n", type=int, default=200)
    g.add_argument("--diag-prompts", type=int, default=200, help="test prompts for the BoN/MV diagnostic (0 = off)")
    g.add_argument("--diag-k", type=int, default=16)
    g.add_argument("--log-every", type=int, default=25)
    return ap.parse_args(argv)


#: flags whose value is a path: recorded by ``_portable`` (the record must not depend on where the repo lives)
PATH_FLAGS = ("--out", "--dataset", "--lm-from")


def _portable(value: str | Path) -> str:
    """A path as metrics.json and the cards record it: relative to the repository root when it lies inside
    the repository, else ``<outside repo>/<its last component>`` (a scratch folder's location is no setting)."""
    p = Path(value)
    full = p if p.is_absolute() else Path.cwd() / p
    # as written first (conf/ is a link into src/), then with links resolved (a repo reached through a link)
    for cand in (Path(os.path.normpath(full)), full.resolve()):
        try:
            return cand.relative_to(REPO).as_posix() or "."
        except ValueError:
            pass
    return f"<outside repo>/{p.name}"


def _record_argv(argv: list[str]) -> list[str]:
    """The command line as recorded: the values of ``PATH_FLAGS`` made repo-relative by ``_portable``."""
    out, path_next = [], False
    for a in argv:
        flag, eq, value = a.partition("=")
        if path_next:
            out.append(_portable(a))
        elif eq and flag in PATH_FLAGS:
            out.append(f"{flag}={_portable(value)}")
        else:
            out.append(a)
        path_next = not path_next and a in PATH_FLAGS
    return out


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (_portable(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dataset = yaml.safe_load(args.dataset.read_text())
    task = Arith(dataset)
    tok = build_tokenizer()
    enc = Encoder(tok)

    if args.lm_from:
        lm, lm_info, prev = reuse_lm(args, task)
    else:
        lm, lm_info, prev = *train_lm(args, tok, enc, task), None
        # save the LM at once (card and figures follow at the end): a run stopped later resumes with --lm-from
        early = {"argv": _record_argv(list(sys.argv[1:] if argv is None else argv)), "settings": _settings(args),
                 "dataset": task.settings, "lm": lm_info, "wall_s": {"lm_train": round(time.time() - t_start, 1)}}
        save(lm, tok, args.out / "tiny-lm", "# tiny-lm (RM stage and measurements not finished)\n", early)
    t_lm, cpu_lm = time.time(), time.process_time()
    rm, rm_info = train_rm(args, tok, enc, task, lm)
    rm_info["n_params"] = sum(p.numel() for p in rm.parameters())
    rm_info["shape"] = {"hidden": rm.config.hidden_size, "layers": rm.config.num_hidden_layers,
                        "heads": rm.config.num_attention_heads}
    t_rm, cpu_rm = time.time(), time.process_time()

    test_docs = task.load_split("test")[: args.test_n]
    rows = sample_texts(lm, enc, task, test_docs, 1, args, seed=args.seed + 5)
    test = accuracy_with_ci([r[0]["correct"] for r in rows])
    test["stopped_rate"] = round(float(np.mean([r[0]["stopped"] for r in rows])), 4)
    test["temperature"] = 1.0
    lm_info["test"] = test
    log(f"LM test accuracy {test['accuracy']:.3f} (n={test['n']}, 95% CI {test['ci95']})")
    diag = selection_diagnostic(args, enc, task, lm, rm, test_docs[: args.diag_prompts]) if args.diag_prompts else None
    if diag:
        log("selection diagnostic: " + json.dumps(diag["by_n"]))
    if args.rm_fresh_prompts:
        rm_info["fresh"] = fresh_pairwise(args, enc, task, lm, rm)
        log(f"RM pairwise accuracy on fresh test prompts {rm_info['fresh']['pairwise_accuracy']} "
            f"(CI {rm_info['fresh']['ci95']}, {rm_info['fresh']['n_prompts']} prompts)")
    t_end, cpu_end = time.time(), time.process_time()

    # a resumed run (--lm-from) reports the LM stage as the earlier run measured it
    lm_wall = prev["wall_s"]["lm_train"] if prev else round(t_lm - t_start, 1)
    lm_cpu = lm_info.get("cpu_s") if prev else round(cpu_lm - cpu_start, 1)
    metrics: dict[str, Any] = {
        "argv": _record_argv(list(sys.argv[1:] if argv is None else argv)),
        "lm_argv": prev["argv"] if prev else None,
        "settings": _settings(args),
        "dataset": task.settings,
        "vocab_size": len(tok),
        "lm": lm_info,
        "rm": rm_info,
        "selection_diagnostic": diag,
        "ranges": {"lm_accuracy": list(LM_ACCURACY_BAND), "rm_pairwise_accuracy": list(RM_PAIRWISE_BAND)},
        "wall_s": {"lm_train": lm_wall, "rm": round(t_rm - t_lm, 1), "eval": round(t_end - t_rm, 1),
                   "total": round(lm_wall + t_end - t_lm, 1)},
        "cpu_s_by_stage": {"lm_train": lm_cpu, "rm": round(cpu_rm - cpu_lm, 1), "eval": round(cpu_end - cpu_rm, 1)},
        "cpu_s": round((lm_cpu or 0.0) + cpu_end - cpu_lm, 1),
        "machine": f"{platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
    }
    for kind, model in (("lm", lm), ("rm", rm)):
        save(model, tok, args.out / f"tiny-{kind}", model_card(kind, metrics), metrics)
    log(f"saved to {args.out}/tiny-lm and tiny-rm in {t_end - t_start:.0f}s")
    return metrics


if __name__ == "__main__":
    main()
