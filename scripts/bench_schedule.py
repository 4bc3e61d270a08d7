"""What the step driver's schedules buy on one engine: lock-step vs bulk / asynchronous, QAlign vs ancestral.

One process builds the policy and RM backends once (in-process vLLM by default), then runs, for each repeat, the
measurements below one after another in an interleaved order (A B A B ...), each with its own seed and with the
prefix cache cleared before it. Ratios are taken within a repeat and reported as median [min, max]:

1. ancestral, P prompts x S samples: wall(bulk: every request submitted at once) / wall(lock-step: one engine
   call per sample index, ``batch_size`` prompts x one sample);
2. QAlign, P chains x S steps: wall(async: chains advance on their own) / wall(lock-step);
3. a QAlign step vs an ancestral sample at the same concurrency (P sequences in flight): wall per output;
   the generated-token ratio is its floor;
4. engine occupancy: generated tokens/s of the async QAlign run / tokens/s of a plain replay of exactly its
   requests (same prompts, budgets and seeds, so the same tokens) with P in flight and nothing else to do: the
   physical limit of this engine at that concurrency.

    python scripts/bench_schedule.py [--prompts 64] [--steps 32] [--repeats 3] [--write] [HYDRA OVERRIDES...]

``--write`` replaces the "Schedules" section of docs/performance.md with the table. Overrides go to the run
config (default: the shipped tiny models, arith test prompts, backend=vllm in process, beta=0.01).
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

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Schedules"
DEFAULTS = ["backend=vllm", "backend.in_process=true", "beta=0.01", "progress=false"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


class Recorder:
    """Wraps a request engine to keep every request it was given (for the replay)."""

    def __init__(self, engine: Any):
        self.engine, self.requests = engine, []
        self.continuous, self.stats = engine.continuous, engine.stats

    def submit(self, request: Any) -> None:
        self.requests.append(request)
        self.engine.submit(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def reset_cache(gen: Any) -> None:
    """Clear the engine's prefix cache (in process), or ask the server to (vLLM's dev-mode endpoint, which
    ``--serve`` turns on)."""
    llm = getattr(gen, "llm", None)
    if llm is not None:
        llm.reset_prefix_cache()
        return
    http = getattr(gen, "http", None)
    if http is not None:
        import httpx

        base = http.s.base_url.rstrip("/").removesuffix("/v1")
        try:
            httpx.post(f"{base}/reset_prefix_cache", timeout=30)
        except httpx.HTTPError:
            pass


class Servers:
    """``scripts/serve.sh`` (the two-terminal workflow's servers) on free local ports, for ``backend=openai``."""

    def __init__(self, overrides: list[str]):
        import socket

        ports = []
        for _ in range(2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        self.urls = [f"backend.base_url=http://127.0.0.1:{ports[0]}/v1",
                     f"backend.rm_base_url=http://127.0.0.1:{ports[1]}"]
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", SERVE_LOG_DIR=str(Path("/tmp") / f"bench-serve-{ports[0]}"))
        for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"):
            env.pop(var, None)
        self.proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh"), *overrides, *self.urls], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            print(line.rstrip(), file=sys.stderr)
            if "serve: ready" in line:
                return
        raise RuntimeError("the servers did not start (see the lines above)")

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=120)


def measure(method_name: str, schedule: str, gen: Any, reward: Any, chains_of: Any, steps: int, seed: int,
            batch_size: int, beta: float, max_new: int, in_flight: int | None = None,
            record: bool = False, rm_batch: int | None = None) -> dict[str, Any]:
    from qalign_repro.methods import METHODS
    from qalign_repro.methods.base import RunContext
    from qalign_repro.methods.driver import drive

    reset_cache(gen)
    ctx = RunContext(generator=gen, reward=reward, seed=seed, beta=beta, max_new_tokens=max_new, temperature=1.0,
                     batch_size=batch_size)
    chains = chains_of()
    outputs: dict[tuple[int, int], dict] = {}
    recorders: list[Recorder] = []
    import qalign_repro.methods.driver as driver_module

    original = driver_module.engine_for
    if record:
        def recording(*a: Any, **kw: Any) -> Recorder:
            recorders.append(Recorder(original(*a, **kw)))
            return recorders[-1]
        driver_module.engine_for = recording
    try:
        t0 = time.perf_counter()
        drive(METHODS.get(method_name)({}), ctx, chains, steps, outputs.update, schedule=schedule, in_flight=in_flight,
              rm_batch=rm_batch)
        wall = time.perf_counter() - t0
    finally:
        driver_module.engine_for = original
    proposals = [o for (_, k), o in outputs.items() if method_name != "qalign" or k > 0]
    return {"wall": wall, "generate": ctx.timers["generate"], "reward": ctx.timers["reward"],
            "outputs": len(outputs), "tokens": sum(o["tokens_generated"] for o in outputs.values()),
            "step_tokens": sum(o["tokens_generated"] for o in proposals) / max(len(proposals), 1),
            "accepted": (sum(o["accepted"] for o in proposals) / max(len(proposals), 1)),
            "requests": recorders[0].requests if recorders else []}


def replay(gen: Any, requests: list[Any], concurrency: int) -> dict[str, float]:
    """The same requests through the engine with ``concurrency`` always in flight and nothing in between."""
    from qalign_repro.lm.engine import engine_for

    reset_cache(gen)
    engine = engine_for(gen, concurrency, 1.0, continuous=True)
    todo = list(requests)
    tokens = 0
    t0 = time.perf_counter()
    while todo or engine.in_flight():
        while todo and engine.in_flight() < concurrency:
            engine.submit(todo.pop(0))
        for _, comp in engine.wait():
            tokens += len(comp.token_ids)
    wall = time.perf_counter() - t0
    engine.close()
    return {"wall": wall, "tokens": tokens}


def write_doc_section(section: str, text: str) -> None:
    """Replace the ``section`` heading's part of docs/performance.md with ``text`` (or append it)."""
    path = ROOT / "docs" / "performance.md"
    doc = path.read_text()
    start = doc.find(section + "\n")
    if start < 0:
        doc = doc.rstrip() + "\n\n" + text
    else:
        nxt = doc.find("\n## ", start + len(section))
        doc = doc[:start] + text + (doc[nxt + 1:] if nxt >= 0 else "")
    path.write_text(doc)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="replace the Schedules section of docs/performance.md")
    ap.add_argument("--serve", action="store_true",
                    help="backend=openai against scripts/serve.sh's servers (started here on free ports)")
    args, overrides = ap.parse_known_args()
    servers = None
    if args.serve:
        servers = Servers(overrides)
        overrides = ["backend=openai", *servers.urls, *overrides]
    try:
        run_all(args, overrides)
    finally:
        if servers is not None:
            servers.stop()


def run_all(args: argparse.Namespace, overrides: list[str]) -> None:

    from qalign_repro.cli import compose_config
    from qalign_repro.methods.base import Chain
    from qalign_repro.stages.run import build_backends
    from qalign_repro.tasks import get_task

    own_backend = args.serve or any(o.startswith("backend=") for o in overrides)
    base = [d for d in DEFAULTS if not (own_backend and d.startswith("backend"))]
    cfg = compose_config([*base, f"dataset.n={args.prompts}", *overrides])
    t_load = time.perf_counter()
    gen, reward = build_backends(cfg)
    load_s = time.perf_counter() - t_load
    from omegaconf import OmegaConf

    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    docs = task.docs()[: args.prompts]
    prompts = [(str(d["id"]), task.prompt(d)) for d in docs]
    encoded = [(pid, msgs, gen.encode_chat(msgs)) for pid, msgs in prompts]

    def chains_of() -> list[Any]:
        return [Chain(idx=j, prompt_id=pid, prompt_ids=ids, messages=msgs) for j, (pid, msgs, ids) in enumerate(encoded)]

    common = dict(gen=gen, reward=reward, chains_of=chains_of, steps=args.steps, batch_size=int(cfg.batch_size),
                  beta=float(cfg.beta), max_new=int(cfg.max_new_tokens), rm_batch=cfg.get("rm_batch"))
    p = args.prompts
    rows: dict[str, list[float]] = {k: [] for k in ("anc_bulk", "anc_lock", "anc_p", "q_async", "q_lock",
                                                   "r_anc", "r_q", "r_tokens", "occupancy", "acc")}
    raw = []
    # warm-up: the first requests of a fresh engine pay for allocations and kernel selection
    measure("ancestral", "async", seed=999, **{**common, "steps": 2})
    measure("qalign", "async", seed=999, **{**common, "steps": 2})
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        seed = 1000 + rep
        order = [("anc_bulk", "ancestral", "async", None), ("anc_lock", "ancestral", "lockstep", None),
                 ("q_async", "qalign", "async", None), ("q_lock", "qalign", "lockstep", None),
                 ("anc_p", "ancestral", "async", p)]
        if rep % 2:  # A B A B ... with the pairs swapped every other repeat
            order = [order[1], order[0], order[3], order[2], order[4]]
        res = {}
        for key, method, schedule, in_flight in order:
            res[key] = measure(method, schedule, seed=seed, in_flight=in_flight, record=(key == "q_async"), **common)
            print(f"repeat {rep}: {key:9s} wall {res[key]['wall']:7.2f} s  tokens {res[key]['tokens']}", flush=True)
        rp = replay(gen, res["q_async"]["requests"], p)
        print(f"repeat {rep}: replay    wall {rp['wall']:7.2f} s  tokens {rp['tokens']}", flush=True)
        loads.append(os.getloadavg()[0])
        q_steps = res["q_async"]
        per_step = (q_steps["wall"] / q_steps["outputs"])
        per_sample = res["anc_p"]["wall"] / res["anc_p"]["outputs"]
        rows["anc_bulk"].append(res["anc_bulk"]["wall"] / res["anc_lock"]["wall"])
        rows["q_async"].append(res["q_async"]["wall"] / res["q_lock"]["wall"])
        rows["r_q"].append(per_step / per_sample)
        rows["r_tokens"].append(q_steps["step_tokens"] / res["anc_p"]["step_tokens"])
        rows["occupancy"].append((q_steps["tokens"] / q_steps["wall"]) / (rp["tokens"] / rp["wall"]))
        rows["acc"].append(q_steps["accepted"])
        raw.append({k: {kk: vv for kk, vv in v.items() if kk != "requests"} for k, v in res.items()} | {"replay": rp})

    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in raw)

    lines = [
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}, by `python scripts/bench_schedule.py "
        f"{' '.join(sys.argv[1:])}` (`make bench-cost`): backend {cfg.backend.name} "
        f"(in_process={cfg.backend.get('in_process')}), model {cfg.model.name}, reward {cfg.reward.name}, "
        f"{p} `{cfg.dataset.name}` prompts x {args.steps} samples / steps, max_new_tokens={cfg.max_new_tokens}, "
        f"beta={cfg.beta}, batch_size={cfg.batch_size}, rm_batch={cfg.get('rm_batch')}; {args.repeats} interleaved repeats, prefix cache cleared before "
        f"each measurement; load average (1 min) {', '.join(f'{x:.1f}' for x in loads)}; engines built in "
        f"{load_s:.0f} s.", "",
        "| figure | median [min, max] over repeats | goal |",
        "|---|---|---|",
        f"| ancestral {p} x {args.steps}: wall(bulk) / wall(lock-step) | {spread(rows['anc_bulk'])} | far below 1 |",
        f"| QAlign {p} x {args.steps}: wall(async) / wall(lock-step) | {spread(rows['q_async'])} | <= 0.65 |",
        f"| QAlign step / ancestral sample, wall per output at {p} in flight | {spread(rows['r_q'])} | <= 0.6 |",
        f"|   generated tokens per QAlign step / per ancestral sample (the floor) | {spread(rows['r_tokens'])} | |",
        f"| engine occupancy: tokens/s of async QAlign / of a plain replay of its requests | "
        f"{spread(rows['occupancy'])} | >= 0.8 |",
        "", "| run (median wall s, generated tokens) | wall | tokens | in engine | in RM |", "|---|--:|--:|--:|--:|",
    ]
    names = {"anc_lock": "ancestral, lock-step", "anc_bulk": "ancestral, bulk", "anc_p": f"ancestral, {p} in flight",
             "q_lock": "QAlign, lock-step", "q_async": "QAlign, async"}
    for key, label in names.items():
        lines.append(f"| {label} | {med(key, 'wall'):.1f} | {med(key, 'tokens'):.0f} | {med(key, 'generate'):.1f} | "
                     f"{med(key, 'reward'):.1f} |")
    lines.append(f"| plain replay of the async QAlign requests | {statistics.median(r['replay']['wall'] for r in raw):.1f} "
                 f"| {statistics.median(r['replay']['tokens'] for r in raw):.0f} | | |")
    lines.append(f"\nQAlign acceptance in these runs: {spread(rows['acc'])}.")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write:
        section = SECTION if not args.serve else SECTION + " (OpenAI-compatible servers)"
        write_doc_section(section, text.replace(SECTION, section, 1))
    for closer in (gen, reward):
        closer.close()


if __name__ == "__main__":
    main()
