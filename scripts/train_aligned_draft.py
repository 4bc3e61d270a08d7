"""Make the aligned draft model that SSS uses on the embedded default: tiny-lm fine-tuned briefly towards tiny-rm.

Method: best-of-n fine-tuning (rejection-sampling SFT), the simplest way to move a policy towards an RM:

1. take ``--prompts`` problems of the arith task's ``train`` split starting at ``--offset`` (past the problems
   the LM was trained on, so the draft learns from the RM, not from re-reading its own training data);
2. sample ``--n`` completions per prompt from the LM (temperature 1, pure sampling, the package's HF backend);
3. score them with the RM and keep the best-scoring *finished* completion per prompt;
4. fine-tune a copy of the LM on (prompt, best completion + EOS) with the cross-entropy on the completion
   tokens only, for ``--epochs`` epochs at a small learning rate;
5. measure base vs draft on ``--eval-n`` test prompts (one T=1 sample each: accuracy and mean RM reward)
   and save the draft as an HF model (same tokenizer and chat template) with ``metrics.json`` and a card.

The draft is aligned *from the target model itself*, so for SSS its reference is the target
(``method.draft_ref: null``). About 2-4 minutes on 2 CPU cores with the defaults; deterministic for a fixed
``--seed`` and ``--threads``::

    python scripts/train_aligned_draft.py                               # -> src/qalign_repro/assets/tiny-draft
    python scripts/train_aligned_draft.py --out /tmp/d --prompts 16 --n 2 --epochs 1 --eval-n 8   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qalign_repro.lm.hf import HFGenerator
from qalign_repro.methods.base import derive_seed
from qalign_repro.models.tiny import assets_dir
from qalign_repro.rm.hf import HFReward
from qalign_repro.tasks.arith import Arith

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample(gen: HFGenerator, prompts: list[list[int]], n: int, max_new: int, seed: int, tag: str,
           batch: int) -> list[list[Any]]:
    """``n`` pure samples per prompt, each with its own derived seed; grouped per prompt."""
    flat = [p for p in prompts for _ in range(n)]
    seeds = [derive_seed(seed, f"{tag}-{i // n}", i % n) for i in range(len(flat))]
    out = []
    for b in range(0, len(flat), batch):
        out.extend(gen.sample(flat[b:b + batch], [max_new] * len(flat[b:b + batch]), seeds[b:b + batch]))
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def evaluate(gen: HFGenerator, rm: HFReward, task: Arith, docs: list[dict], args: argparse.Namespace,
             tag: str) -> dict[str, Any]:
    """One T=1 sample per test prompt: accuracy, mean RM reward, stop rate."""
    msgs = [task.prompt(d) for d in docs]
    comps = [c[0] for c in sample(gen, [gen.encode_chat(m) for m in msgs], 1, args.max_new_tokens, args.seed + 99,
                                  tag, args.gen_batch)]
    rewards = rm.score(msgs, [c.text for c in comps]).rewards
    correct = [bool(task.grade(d, c.text)["correct"]) for d, c in zip(docs, comps)]
    return {"accuracy": round(float(np.mean(correct)), 4), "mean_reward": round(float(np.mean(rewards)), 4),
            "stopped_rate": round(float(np.mean([c.finish_reason == "stop" for c in comps])), 4), "n": len(docs)}


def build_data(gen: HFGenerator, rm: HFReward, task: Arith, docs: list[dict], args: argparse.Namespace
               ) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
    """(prompt ids, best finished completion ids incl. EOS) per prompt, plus statistics of the selection."""
    msgs = [task.prompt(d) for d in docs]
    prompts = [gen.encode_chat(m) for m in msgs]
    groups = sample(gen, prompts, args.n, args.max_new_tokens, args.seed, "draft-data", args.gen_batch)
    flat_msgs = [m for m in msgs for _ in range(args.n)]
    rewards = rm.score(flat_msgs, [c.text for g in groups for c in g]).rewards.reshape(len(docs), args.n)
    data, picked_correct, any_correct, mean_correct = [], [], [], []
    for d, p, g, r in zip(docs, prompts, groups, rewards):
        correct = [bool(task.grade(d, c.text)["correct"]) for c in g]
        mean_correct.append(np.mean(correct))
        any_correct.append(any(correct))
        finished = [i for i, c in enumerate(g) if c.finish_reason == "stop"]
        if not finished:
            continue
        best = max(finished, key=lambda i: r[i])
        data.append((p, list(g[best].token_ids)))
        picked_correct.append(correct[best])
    stats = {"prompts": len(docs), "samples_per_prompt": args.n, "examples": len(data),
             "sample_accuracy": round(float(np.mean(mean_correct)), 4),
             "best_of_n_accuracy": round(float(np.mean(picked_correct)), 4) if picked_correct else None,
             "pass_at_n": round(float(np.mean(any_correct)), 4)}
    return data, stats


def finetune(model: torch.nn.Module, data: list[tuple[list[int], list[int]]], pad: int,
             args: argparse.Namespace) -> list[float]:
    """Cross-entropy on the completion tokens, right padding, AdamW with linear decay; returns epoch losses."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    total = max(1, math.ceil(len(data) / args.batch) * args.epochs)
    step, losses = 0, []
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(data), generator=gen).tolist()
        epoch_loss = []
        for b in range(0, len(order), args.batch):
            chunk = [data[i] for i in order[b:b + args.batch]]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, (p, c) in enumerate(chunk):
                ids[j, :len(p) + len(c)] = torch.tensor(p + c)
                labels[j, len(p):len(p) + len(c)] = torch.tensor(c)
            for group in opt.param_groups:
                group["lr"] = args.lr * (1 - step / total)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            epoch_loss.append(loss.item())
        losses.append(round(float(np.mean(epoch_loss)), 4))
        log(f"epoch {len(losses)}/{args.epochs}: loss {losses[-1]:.4f}")
    model.eval()
    return losses


def card(metrics: dict[str, Any]) -> str:
    b, d, s = metrics["base"], metrics["draft"], metrics["data"]
    warn = ("" if metrics["base_model_trained"] else
            "\n**Made from an untrained placeholder tiny-lm** (its metrics.json was missing): rerun this script "
            "once scripts/train_tiny.py has produced the trained models.\n")
    return "\n".join([
        "# tiny-draft: the aligned draft for SSS on the embedded default",
        "",
        "tiny-lm fine-tuned briefly towards tiny-rm by best-of-n SFT (`scripts/train_aligned_draft.py`):",
        f"{s['prompts']} arith train prompts (from offset {metrics['settings']['offset']}, unseen by the LM), "
        f"{s['samples_per_prompt']} samples each, the best finished sample under the RM kept "
        f"({s['examples']} examples), {metrics['settings']['epochs']} epoch(s) at lr {metrics['settings']['lr']}.",
        "Its reference model is tiny-lm itself, so SSS uses it with `method.draft_ref: null`.",
        warn,
        "## Measured (one temperature-1 sample per test prompt)",
        "",
        "| model | accuracy | mean RM reward | stopped |",
        "|---|---|---|---|",
        f"| tiny-lm (base) | {b['accuracy']:.3f} | {b['mean_reward']:.3f} | {b['stopped_rate']:.3f} |",
        f"| tiny-draft | {d['accuracy']:.3f} | {d['mean_reward']:.3f} | {d['stopped_rate']:.3f} |",
        "",
        f"n = {b['n']} test prompts. Training data: per-sample accuracy {s['sample_accuracy']}, best-of-"
        f"{s['samples_per_prompt']} accuracy {s['best_of_n_accuracy']}, pass@{s['samples_per_prompt']} "
        f"{s['pass_at_n']}. Wall time {metrics['wall_s']:.0f} s.",
        "",
        f"Reproduce: `python scripts/train_aligned_draft.py {' '.join(metrics['argv'])}`".rstrip() + "",
        "",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", type=Path, default=None, help="base LM folder (default: the shipped tiny-lm)")
    ap.add_argument("--rm", type=Path, default=None, help="RM folder (default: the shipped tiny-rm)")
    ap.add_argument("--out", type=Path, default=REPO / "src" / "qalign_repro" / "assets" / "tiny-draft")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=384, help="train-split prompts for best-of-n data")
    ap.add_argument("--offset", type=int, default=60_000, help="first train problem used (the LM saw the ones before)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--eval-n", type=int, default=200, help="test prompts for the base-vs-draft figures")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    lm_dir = args.lm or assets_dir("tiny-lm")
    rm_dir = args.rm or assets_dir("tiny-rm")
    trained = (Path(lm_dir) / "metrics.json").is_file()
    if not trained:
        log(f"warning: {lm_dir} has no metrics.json - it is an untrained placeholder; the draft will be too")
    gen = HFGenerator({"path": str(lm_dir)}, {"device": "cpu"})
    rm = HFReward({"path": str(rm_dir)}, {"device": "cpu"})
    task = Arith({})
    train_docs = task.load_split("train", args.offset + args.prompts)[args.offset:]
    test_docs = task.load_split("test", args.eval_n)

    log(f"base model: evaluating on {len(test_docs)} test prompts")
    base = evaluate(gen, rm, task, test_docs, args, "eval")
    log(f"base: {base}")
    log(f"sampling {args.n} completions for each of {len(train_docs)} train prompts")
    data, data_stats = build_data(gen, rm, task, train_docs, args)
    log(f"best-of-n data: {data_stats}")
    if not data:
        sys.exit("error: no finished sample to train on; raise --max-new-tokens or --n")
    losses = finetune(gen.model, data, gen.pad_id, args)
    draft = evaluate(gen, rm, task, test_docs, args, "eval")
    log(f"draft: {draft}")

    metrics = {"base_model": str(lm_dir), "reward_model": str(rm_dir), "base_model_trained": trained,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "data": data_stats, "epoch_losses": losses, "base": base, "draft": draft,
               "n_params": gen.n_params, "wall_s": round(time.time() - t0, 1),
               "argv": list(argv if argv is not None else sys.argv[1:])}
    # write next to the destination, then swap in: a crash never leaves a half-written model behind
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-draft-", dir=args.out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the shipped asset must be readable like its siblings
    gen.model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(lm_dir) / name).is_file():
            shutil.copy2(Path(lm_dir) / name, tmp / name)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (tmp / "README.md").write_text(card(metrics))
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    log(f"saved {args.out} ({metrics['wall_s']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
