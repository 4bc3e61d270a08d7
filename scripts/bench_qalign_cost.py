"""QAlign's cost against ancestral sampling on one vLLM engine (policy + RM engines built once, in one process).

For the same prompts, K ancestral samples and K QAlign steps (after the chains' initial sample) are timed, and
the script prints and stores (docs/performance.md, section "QAlign cost (vLLM)"):
  - generated tokens per QAlign step / per ancestral sample: the suffix is resampled from a uniform index, so
    the paper (Appendix D) expects about 0.5;
  - wall-time ratio QAlign / ancestral: the goal is <= 0.6 with prefix caching (the prompt and kept prefix are
    served from the cache; the RM still reads the whole sequence);
  - orchestration overhead = (wall - time inside the engine - time inside the RM) / wall, goal <= 5 %.
Each repeat runs both methods with a fresh seed after clearing the prefix cache; the table shows medians.

    python scripts/bench_qalign_cost.py [--prompts 32] [--steps 16] [--repeats 3] [HYDRA OVERRIDES...]
    e.g. ... model.path=/path/lm reward.path=/path/rm max_new_tokens=96 backend.engine.block_size=32
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECTION = "## QAlign cost (vLLM)"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc = f"{torch.cuda.get_device_name(0)} + {desc}"
    except ImportError:
        pass
    return desc


def run_phase(method: Any, ctx: Any, chains: list[Any], steps: range) -> dict[str, float]:
    """Run ``steps`` of ``method``; wall time and the parts spent inside the engine and the RM."""
    gen0, rm0 = ctx.timers["generate"], ctx.timers["reward"]
    tokens = prefilled = cached = longest = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for k in steps:
        outputs = method.step(ctx, chains, k)
        longest += max(o["tokens_generated"] for o in outputs)
        for c, o in zip(chains, outputs):
            c.last = o
            tokens += o["tokens_generated"]
            prefilled += o["tokens_prefilled"]
            cached += o["tokens_cached"]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(chains) * len(steps)
    return {"wall": wall, "cpu": cpu, "generate": ctx.timers["generate"] - gen0, "reward": ctx.timers["reward"] - rm0,
            "tokens": tokens / n, "prefilled": prefilled / n, "cached": cached / n,
            "longest": longest / len(steps)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from qalign_repro.cli import compose_config
    from qalign_repro.methods.ancestral import Ancestral
    from qalign_repro.methods.base import Chain, RunContext
    from qalign_repro.methods.qalign import QAlign
    from qalign_repro.run import build_backends
    from qalign_repro.tasks import get_task

    cfg = compose_config(["backend=vllm", "method=qalign", f"dataset.n={args.prompts}", *args.overrides])
    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    docs = task.docs()[: args.prompts]
    t0 = time.perf_counter()
    gen, rm = build_backends(cfg)
    load_s = time.perf_counter() - t0
    prompts = [(str(d["id"]), task.prompt(d)) for d in docs]
    encoded = [gen.encode_chat(m) for _, m in prompts]

    def context(seed: int) -> RunContext:
        return RunContext(generator=gen, reward=rm, seed=seed, beta=float(cfg.beta),
                          max_new_tokens=int(cfg.max_new_tokens), temperature=1.0, batch_size=int(cfg.batch_size))

    def chains() -> list[Chain]:
        return [Chain(idx=i, prompt_id=pid, prompt_ids=ids, messages=m)
                for i, ((pid, m), ids) in enumerate(zip(prompts, encoded))]

    # warm-up: the first requests of an engine pay one-time costs (kernel selection, allocator growth)
    run_phase(Ancestral(), context(10_000), chains(), range(2))
    reps = []
    for r in range(args.repeats):
        gen.llm.reset_prefix_cache()
        anc = run_phase(Ancestral(), context(r), chains(), range(args.steps))
        gen.llm.reset_prefix_cache()
        ctx, ch, method = context(r), chains(), QAlign({})
        run_phase(method, ctx, ch, range(1))  # initial states (an ancestral sample each), not timed
        qa = run_phase(method, ctx, ch, range(1, args.steps + 1))
        accepted = sum(o.last["accepted"] for o in ch)  # last step only: a rough indication
        reps.append({"anc": anc, "qa": qa, "acc_last": accepted / len(ch)})
        print(f"repeat {r}: ancestral {anc['wall']:.2f} s, qalign {qa['wall']:.2f} s, "
              f"tokens {qa['tokens']:.1f}/{anc['tokens']:.1f}", file=sys.stderr, flush=True)
    gen.close()
    rm.close()

    def med(key: str, part: str) -> float:
        return statistics.median(rep[part][key] for rep in reps)

    def overhead(part: str) -> float:
        return statistics.median((rep[part]["wall"] - rep[part]["generate"] - rep[part]["reward"]) / rep[part]["wall"]
                                 for rep in reps)

    return {
        "cfg": cfg, "load_s": load_s, "n_prompts": len(docs), "steps": args.steps, "repeats": args.repeats,
        "tokens_ratio": statistics.median(rep["qa"]["tokens"] / rep["anc"]["tokens"] for rep in reps),
        "wall_ratio": statistics.median(rep["qa"]["wall"] / rep["anc"]["wall"] for rep in reps),
        "cpu_ratio": statistics.median(rep["qa"]["cpu"] / rep["anc"]["cpu"] for rep in reps),
        "in_process": bool(cfg.backend.get("in_process", False)),
        "anc": {k: med(k, "anc") for k in reps[0]["anc"]}, "qa": {k: med(k, "qa") for k in reps[0]["qa"]},
        "overhead_anc": overhead("anc"), "overhead_qa": overhead("qa"),
        "model": str(gen.path), "reward_model": str(rm.path),
    }


def table(res: dict[str, Any]) -> str:
    a, q = res["anc"], res["qa"]
    rows = [
        ("generated tokens per sample / step", f"{a['tokens']:.1f}", f"{q['tokens']:.1f}",
         f"{res['tokens_ratio']:.2f} (paper: ≈ 0.5)"),
        ("longest completion per engine call (decode iterations)", f"{a['longest']:.1f}", f"{q['longest']:.1f}",
         f"{q['longest'] / a['longest']:.2f}"),
        ("prompt tokens sent per sample / step", f"{a['prefilled']:.1f}", f"{q['prefilled']:.1f}", ""),
        ("of which served from the prefix cache", f"{a['cached']:.1f}", f"{q['cached']:.1f}", ""),
        (f"wall time for {res['steps']} samples / steps (s)", f"{a['wall']:.2f}", f"{q['wall']:.2f}",
         f"{res['wall_ratio']:.2f} (goal ≤ 0.6)"),
        ("CPU time of this process (s)" + ("" if res["in_process"] else ", engine processes not included"),
         f"{a['cpu']:.2f}", f"{q['cpu']:.2f}", f"{res['cpu_ratio']:.2f}"),
        ("  inside the engine (s)", f"{a['generate']:.2f}", f"{q['generate']:.2f}", ""),
        ("  inside the RM (s)", f"{a['reward']:.2f}", f"{q['reward']:.2f}", ""),
        ("orchestration overhead", f"{100 * res['overhead_anc']:.1f} %", f"{100 * res['overhead_qa']:.1f} %",
         "goal ≤ 5 %"),
    ]
    lines = ["| | ancestral | QAlign | QAlign / ancestral |", "|---|---:|---:|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    return "\n".join(lines)


def section(res: dict[str, Any], args: argparse.Namespace) -> str:
    import vllm

    cfg = res["cfg"]
    eng = {k: v for k, v in dict(cfg.backend.engine).items() if v is not None}
    return "\n".join([
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}, vLLM {vllm.__version__}, by "
        f"`python scripts/bench_qalign_cost.py {' '.join(sys.argv[1:])}` (`make bench-cost`).",
        f"One policy engine (prefix caching on, settings {eng}) and one RM engine in one process; "
        f"{res['n_prompts']} prompts of `{cfg.dataset.name}`, max_new_tokens={cfg.max_new_tokens}, beta={cfg.beta}; "
        f"{res['steps']} ancestral samples vs {res['steps']} QAlign steps (after the chains' initial sample) per "
        f"prompt, medians over {res['repeats']} repeats (ratios: median of the per-repeat ratios), prefix cache "
        "cleared before each method. The CPU-time row includes the engine only with backend.in_process=true. "
        f"Models: `{res['model']}`, `{res['reward_model']}`.",
        "",
        table(res),
        "",
        "Reading it: a QAlign step generates only the suffix after a uniformly drawn index, about half a sample "
        "when completions end where the model's answers end (a trained model); the prompt and kept prefix come "
        "from the prefix cache in whole blocks. Engine time follows the generated tokens only when the engine is "
        "throughput-bound (large batches, a real model on a GPU); when each decode iteration costs about the same "
        "whatever the batch holds (a tiny model on CPU), an engine call lasts as many iterations as its longest "
        "completion, and the wall-time ratio follows the 'longest completion' row instead. The RM reads every full "
        "sequence in both methods. Orchestration is what the method does between engine calls (index draws, "
        "decoding proposals, acceptance tests, bookkeeping).",
        "",
    ])


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section (up to the next "## " heading) and leave the rest of the file alone."""
    old = path.read_text() if path.exists() else "# Performance\n\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[nxt + 1:] if nxt >= 0 else "")
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16, help="K: ancestral samples and QAlign steps per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the run config (backend=vllm is implied)")
    args = ap.parse_args()
    res = bench(args)
    text = section(res, args)
    print(text)
    if not args.no_write:
        write_section(args.out, text)
        print(f"wrote the '{SECTION[3:]}' section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
