"""Train a task-specific Bradley-Terry reward model as in the QAlign paper (Appendix H) with trl's RewardTrainer.

The paper's RM: Llama-3.1-8B-Instruct, full fine-tuning, llama3 chat template, one preference pair per GSM8K
training prompt (a correct on-policy answer preferred over an incorrect one, picked from 64 samples of the policy
itself), 5 % validation split, total batch 128, 1 epoch, linear decay with 3 % warmup, weight decay 0, bf16,
DeepSpeed ZeRO-3. Its learning rate is not legible in our copy of Table 2: ``--lr`` defaults to 1e-6, a common
full-fine-tuning RM value; set it explicitly for a faithful run. The trained folder is what
``reward=task_bt_rm reward.path=<out>`` loads (LlamaForSequenceClassification, one label, raw logit = reward).

Pairs come from one of:
  --from-runs ROOT RUN [RUN ...]  stored runs with a ``grades`` eval (the paper's recipe): e.g.
        python -m qalign_repro.run experiment=task_specific method=ancestral steps=64 dataset.source=hub \
            dataset.split=train dataset.hub.split=train dataset.n=null experiment_name=rm_data
        python -m qalign_repro.evaluate experiment=task_specific experiment_name=rm_data runs=all
        python scripts/train_bt_rm.py --from-runs results <run name> --model meta-llama/Llama-3.1-8B-Instruct ...
  --pairs FILE.jsonl   rows {"prompt": [chat messages] | "text", "chosen": "text", "rejected": "text"}
  --arith N            N synthetic pairs from the embedded arithmetic task (the worked solution vs. the same
                       solution with a wrong final answer): a CPU smoke test on the shipped tiny LM

Multi-GPU: ``accelerate launch --num_processes 8 scripts/train_bt_rm.py ... --zero3`` (or ``--deepspeed cfg.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- pairs -----------------------------------------------------------------------------------------------------
def _messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def pair_row(prompt: Any, chosen: str, rejected: str) -> dict[str, Any]:
    """trl's conversational preference format with an implicit prompt; the RM sees exactly what the run
    stage's HF RM backend scores: the chat template over (prompt messages + assistant completion)."""
    return {"prompt": _messages(prompt), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def pairs_from_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
            if missing:
                raise SystemExit(f"error: {path}:{lineno}: missing field(s) {missing}")
            rows.append(pair_row(row["prompt"], row["chosen"], row["rejected"]))
    return rows


def pairs_from_runs(root: str, names: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """One pair per prompt: a random correct output preferred over a random incorrect one (paper, App. H);
    prompts whose outputs are all correct or all wrong give no pair."""
    from qalign_repro.store.storage import RunStore

    rng = random.Random(seed)
    rows = []
    for name in names:
        store = RunStore(root, name, readonly=True)
        try:
            if not store.has_eval("grades"):
                raise SystemExit(f"error: run {name!r} has no grades; run python -m qalign_repro.evaluate first")
            grades = store.read_eval("grades")
            for inst, g in zip(store.iter_instances(), grades):
                texts = [o["text"] for o in inst["outputs"]]
                good = sorted({t for t, c in zip(texts, g["correct"]) if c})
                bad = sorted({t for t, c in zip(texts, g["correct"]) if not c})
                if good and bad:
                    rows.append(pair_row(inst["input"]["messages"], rng.choice(good), rng.choice(bad)))
        finally:
            store.close()
    return rows


def pairs_from_arith(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic pairs on the arithmetic task's ``rm_train`` split (disjoint from test)."""
    from qalign_repro.cli import compose_config
    from qalign_repro.tasks import get_task

    cfg = compose_config(["dataset=arith", "dataset.split=rm_train", f"dataset.n={n}"])
    from omegaconf import OmegaConf

    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    rng = random.Random(seed)
    rows = []
    for doc in task.docs():
        good = task.oracle_completion(doc)
        gold = str(task.gold(doc))
        wrong = str(max(0, int(gold) + rng.choice([-3, -2, -1, 1, 2, 3, 10])))
        if wrong == gold:
            wrong = str(int(gold) + 1)
        bad = good[: good.rfind(gold)] + wrong + good[good.rfind(gold) + len(gold):]
        rows.append(pair_row(task.prompt(doc), good, bad))
    return rows


# -- training ----------------------------------------------------------------------------------------------------
ZERO3 = {
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": "auto"},
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
}


def train(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    if len(rows) < 2:
        raise SystemExit(f"error: {len(rows)} preference pair(s); need at least 2")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = max(1, args.batch_size // (args.per_device_batch * world))
    data = Dataset.from_list(rows).shuffle(seed=args.seed)
    split = data.train_test_split(test_size=args.val_fraction, seed=args.seed) if args.val_fraction > 0 else None
    train_set, eval_set = (split["train"], split["test"]) if split else (data, None)
    deepspeed = args.deepspeed
    if args.zero3 and not deepspeed:
        deepspeed = str(Path(args.out) / "ds_zero3.json")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(deepspeed).write_text(json.dumps(ZERO3, indent=2))
    bf16 = args.bf16 if args.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    config = RewardConfig(
        output_dir=args.out, learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch, per_device_eval_batch_size=args.per_device_batch,
        gradient_accumulation_steps=accum, lr_scheduler_type="linear", warmup_steps=args.warmup_ratio,
        weight_decay=0.0, bf16=bf16, max_length=args.max_length, seed=args.seed,
        eval_strategy="epoch" if eval_set is not None else "no", save_strategy="no", logging_steps=1,
        report_to="none", deepspeed=deepspeed, gradient_checkpointing=args.gradient_checkpointing,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # Llama 3 has none; the RM needs one to batch pairs
        tokenizer.pad_token = tokenizer.eos_token
    trainer = RewardTrainer(model=args.model, args=config, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer)
    result = trainer.train()
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "pairs": len(rows),
               "train_pairs": len(train_set), "gradient_accumulation_steps": accum}
    if eval_set is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.model.config.pad_token_id = tokenizer.pad_token_id
    trainer.save_model(args.out)
    tokenizer.save_pretrained(args.out)
    if trainer.is_world_process_zero():
        card = {"base_model": args.model, "recipe": "QAlign paper Appendix H (scripts/train_bt_rm.py)",
                "hyperparameters": {k: getattr(args, k) for k in ("lr", "batch_size", "epochs", "max_steps",
                                                                  "warmup_ratio", "val_fraction", "max_length",
                                                                  "seed")},
                "metrics": metrics, "history": trainer.state.log_history}
        (Path(args.out) / "training_card.json").write_text(json.dumps(card, indent=2, default=str))
    return metrics


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: hub id or folder (the paper: Llama-3.1-8B-Instruct)")
    p.add_argument("--out", required=True, help="output folder (pass it as reward.path)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="JSONL of {prompt, chosen, rejected}")
    src.add_argument("--from-runs", nargs="+", metavar=("ROOT", "RUN"), help="output_root and graded run names")
    src.add_argument("--arith", type=int, metavar="N", help="N synthetic arithmetic pairs (smoke test)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batch-size", type=int, default=128, help="total batch (per device x accumulation x GPUs)")
    p.add_argument("--per-device-batch", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="> 0: stop after this many optimizer steps")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-length", type=int, default=2048, help="longer pairs are dropped, never truncated")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on when the GPU has it")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON")
    p.add_argument("--zero3", action="store_true", help="write and use a ZeRO-3 config (the paper's setup)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.from_runs is not None and len(args.from_runs) < 2:
        p.error("--from-runs needs ROOT and at least one RUN")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.pairs:
        rows = pairs_from_jsonl(args.pairs)
    elif args.from_runs:
        rows = pairs_from_runs(args.from_runs[0], args.from_runs[1:], args.seed)
    else:
        rows = pairs_from_arith(args.arith, args.seed)
    metrics = train(args, rows)
    print(json.dumps({"out": args.out, **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}}))


if __name__ == "__main__":
    main()
