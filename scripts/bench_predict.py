"""Benchmark of the predict stage against a per-prompt Python loop implementation of the same rules.

    python scripts/bench_predict.py                      # 6 datasets x 128 prompts x 1024 samples (+ chains)
    python scripts/bench_predict.py --prompts 8 --samples 64 --no-doc     # smoke test

Builds (once, cached under --root) a synthetic store in the real storage schema: per dataset one ancestral run
(1024 independent samples per prompt) and one QAlign run (a 1024-state chain per prompt, rejected states
repeat the previous one); five exact-answer datasets and one open-ended (IFEval-like, MBR-ROUGE-1) dataset.
Each phase runs in its own subprocess so its peak memory is measured on its own:

* ``vectorised``: the predict stage as users run it (``predict_runs`` + ``write_tables``: read, rules at every
  budget, bootstrap CIs, FLOPs, CSV/markdown).
* ``loop``: the same reads, then a straightforward per-prompt, per-budget Python loop (Counter votes, dict
  weights, argmax, ROUGE via rouge-score per pair, a bootstrap loop per point) - the way the authors'
  repository computes predictions. Its ROUGE pair scoring would take hours, so it is timed on a random sample
  of pairs and extrapolated to all pairs (reported as such).

Results go to stdout and (unless --no-doc) to docs/performance.md under "## predict stage".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXACT = ["gsm8k", "math500", "mmlu_redux", "truthfulqa", "gsm_symbolic"]
ROUGE = ["ifeval"]
BUDGET_EXTRA: list[int] = []
SECTION = "## predict stage"


# -- synthetic store ------------------------------------------------------------------------------------------
def _meta(name: str, method: str, dataset: str, n: int) -> dict:
    return {"run_name": name, "experiment_name": "bench", "method": method, "dataset": dataset,
            "mbr_kind": "rouge" if dataset in ROUGE else "exact", "beta": 1.0, "seed": 0, "steps": n,
            "status": "done", "model": {"name": "synthetic-8b", "path": None, "n_params": 8.0e9},
            "reward": {"name": "synthetic-rm-8b", "path": None, "n_params": 7.5e9}, "config": {}}


class Pool:
    """The 'model' of one prompt: answers with a prompt-specific difficulty, rewards that prefer correct
    answers (noisily), and for the open-ended task texts that are noisy copies of a few templates."""

    def __init__(self, rng: np.random.Generator, dataset: str, vocab: list[str]):
        self.rng = rng
        self.rouge = dataset in ROUGE
        self.p_correct = rng.beta(2.0, 2.0)
        self.wrong = [str(v) for v in rng.integers(100, 999, 6)]
        self.gold = str(rng.integers(0, 99))
        if self.rouge:
            zipf = 1.0 / np.arange(1, len(vocab) + 1)
            self.vocab, self.zipf = vocab, zipf / zipf.sum()
            self.templates = [list(rng.choice(vocab, int(rng.integers(30, 60)), p=self.zipf)) for _ in range(4)]
            self.good = rng.random(4) < 0.5

    def sample(self) -> tuple[str, str | None, bool, float, int]:
        """(text, answer, correct, reward, n_tokens)"""
        rng = self.rng
        n_tok = int(rng.integers(32, 97))
        if self.rouge:
            t = int(rng.integers(0, 4))
            words = list(self.templates[t])
            for j in np.flatnonzero(rng.random(len(words)) < 0.2):
                words[j] = self.vocab[int(rng.choice(len(self.vocab), p=self.zipf))]
            good = bool(self.good[t])
            return " ".join(words), f"template-{t}", good, float(rng.normal(0.8 * good, 1.0)), n_tok
        u = rng.random()
        if u < 0.05:
            ans = None
        elif u < 0.05 + 0.95 * self.p_correct:
            ans = self.gold
        else:
            ans = self.wrong[int(rng.integers(0, len(self.wrong)))]
        ok = ans == self.gold
        text = f"Let me think step by step. ... The answer is {ans}." if ans else "I am not sure."
        return text, ans, ok, float(rng.normal(1.0 * ok, 1.0)), n_tok


def _output(text, reward, accepted, index, ids, prop_len, prop_reward, gen, pre, cached, scored):
    return {"completion_ids": ids, "text": text, "reward": reward, "accepted": accepted, "index": index,
            "proposal_len": prop_len, "proposal_reward": prop_reward, "tokens_generated": gen,
            "tokens_prefilled": pre, "tokens_cached": cached, "tokens_scored": scored, "finish_reason": "stop"}


def build_run(root: Path, dataset: str, method: str, n_prompts: int, n: int, seed: int) -> None:
    from qalign_repro.store.storage import RunStore

    name = f"{dataset}-{method}"
    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(500)]
    grades = []

    def instances():
        for p in range(n_prompts):
            pool = Pool(rng, dataset, vocab)
            lp = int(rng.integers(60, 200))
            outs, answers, correct = [], [], []
            text, ans, ok, rew, ln = pool.sample()
            ids = rng.integers(0, 32000, ln).tolist()
            outs.append(_output(text, rew, True, 0, ids, ln, rew, ln, lp, 0, lp + ln))
            answers.append(ans)
            correct.append(ok)
            for _ in range(1, n):
                t2, a2, ok2, r2, l2 = pool.sample()
                if method == "ancestral":
                    ids2 = rng.integers(0, 32000, l2).tolist()
                    outs.append(_output(t2, r2, True, 0, ids2, l2, r2, l2, lp, lp, lp + l2))
                    answers.append(a2)
                    correct.append(ok2)
                    continue
                i = int(rng.integers(0, len(ids)))  # QAlign: suffix proposal from a uniform index
                new = max(l2 - i, 1)
                prop = ids[:i] + rng.integers(0, 32000, new).tolist()
                alpha = min(1.0, math.exp(r2 - rew) * len(ids) / len(prop))
                cost = dict(gen=new, pre=lp + i, cached=lp + i, scored=lp + len(prop))
                if rng.random() < alpha:
                    text, ans, ok, rew, ids = t2, a2, ok2, r2, prop
                    outs.append(_output(text, rew, True, i, ids, len(prop), r2, **cost))
                else:
                    outs.append(_output(text, rew, False, i, ids, len(prop), r2, **cost))
                answers.append(ans)
                correct.append(ok)
            grades.append({"id": f"{dataset}-{p}", "answer": answers, "correct": correct, "metrics": {}})
            yield {"input": {"id": f"{dataset}-{p}", "idx": p, "prompt_ids": list(range(lp)), "messages": [],
                             "doc": {"gold": pool.gold}}, "outputs": outs}

    store = RunStore(root, name, create=True, meta=_meta(name, method, dataset, n))
    store.storage.write(name, "data", instances())  # one transaction, instances streamed from the generator
    store.write_eval("grades", grades)
    store.close()


def ensure_store(root: Path, n_prompts: int, n: int, n_datasets: int, rebuild: bool) -> list[str]:
    datasets = (EXACT[: max(n_datasets - 1, 0)] + ROUGE)[:n_datasets]
    spec = {"prompts": n_prompts, "samples": n, "datasets": datasets, "version": 1}
    spec_path = root / "bench_spec.json"
    names = [f"{d}-{m}" for d in datasets for m in ("ancestral", "qalign")]
    if not rebuild and spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return names
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    for k, d in enumerate(datasets):
        for j, m in enumerate(("ancestral", "qalign")):
            build_run(root, d, m, n_prompts, n, seed=1000 * k + j)
            print(f"  built {d}-{m} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    spec_path.write_text(json.dumps(spec))
    return names


# -- timing ------------------------------------------------------------------------------------------------------
class Clock:
    """Wall-clock and CPU seconds (all threads of this process) accumulated per part. Both are reported:
    the machine is shared, so wall time depends on other load while CPU time mostly does not."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._part: str | None = None

    def start(self, part: str) -> None:
        self._part, self._w, self._c = part, time.perf_counter(), time.process_time()

    def stop(self, suffix: str = "") -> None:
        assert self._part is not None
        part = self._part + suffix
        self.wall[part] = self.wall.get(part, 0.0) + time.perf_counter() - self._w
        self.cpu[part] = self.cpu.get(part, 0.0) + time.process_time() - self._c
        self._part = None

    def total(self, which: str, prefix: str = "", suffix: str = "") -> float:
        d = self.wall if which == "wall" else self.cpu
        return sum(v for k, v in d.items() if k.startswith(prefix) and k.endswith(suffix))

    def add(self, part: str, seconds: float) -> None:  # extrapolated CPU-bound work: wall = CPU
        self.wall[part] = self.wall.get(part, 0.0) + seconds
        self.cpu[part] = self.cpu.get(part, 0.0) + seconds

    def result(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu}


# -- the loop implementation ----------------------------------------------------------------------------------
def loop_predict(root: Path, names: list[str], n_boot: int, pair_sample: int) -> dict:
    """Per prompt, per budget Python loops over the same stored data (timed by part)."""
    from rouge_score import rouge_scorer

    from qalign_repro.analysis.selection import budgets
    from qalign_repro.store.storage import RunStore

    clock = Clock()
    rouge_pairs_total = 0
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    for name in names:
        clock.start("read")
        store = RunStore(root, name, readonly=True)
        meta = store.meta
        grades = store.read_eval("grades")
        insts = [{"text": [o["text"] for o in inst["outputs"]], "reward": [o["reward"] for o in inst["outputs"]],
                  "cost": [o["tokens_prefilled"] + o["tokens_generated"] for o in inst["outputs"]],
                  "scored": [o["tokens_scored"] for o in inst["outputs"]]}
                 for inst in store.iter_instances()]
        store.close()
        rouge = meta["mbr_kind"] == "rouge"
        kind = ":rouge" if rouge else ":exact"
        clock.stop(kind)
        clock.start("rules")
        n = len(insts[0]["reward"])
        bud = budgets(n, BUDGET_EXTRA)
        qalign = meta["method"] == "qalign"
        rules = ["qalign"] if qalign else (["mbr", "wmbr", "bon"] if rouge else ["mv", "wmv", "bon"])
        results = {r: {b: [] for b in bud} for r in rules}
        for inst, g in zip(insts, grades):
            answers, correct, rewards = g["answer"], g["correct"], inst["reward"]
            for b in bud:  # FLOPs per budget
                _ = sum(inst["cost"][:b]), sum(inst["scored"][:b])
            if rouge:
                continue  # pairwise ROUGE: timed on a sample of pairs below
            for b in bud:
                for r in rules:
                    if r == "bon":
                        best = max(range(b), key=lambda i: rewards[i])
                        results[r][b].append(correct[best])
                    elif r in ("mv", "qalign"):
                        c = Counter(a for a in answers[:b] if a is not None)
                        win = c.most_common(1)[0][0] if c else None
                        results[r][b].append(win is not None and correct[answers.index(win)])
                    else:
                        m = max(rewards[:b])
                        w: dict = {}
                        for a, rw in zip(answers[:b], rewards[:b]):
                            if a is not None:
                                w[a] = w.get(a, 0.0) + math.exp(rw - m)
                        win = max(w, key=w.get) if w else None
                        results[r][b].append(win is not None and correct[answers.index(win)])
        clock.stop(kind)
        if rouge:
            # a straightforward MBR scores every pair of each prompt's pool with rouge-score once and reuses
            # the matrix for all budgets; time a random sample of pairs and extrapolate to all of them
            rng = np.random.default_rng(0)
            pairs = n * (n + 1) // 2 * len(insts)
            rouge_pairs_total += pairs
            t0 = time.process_time()
            for _ in range(pair_sample):
                texts = insts[int(rng.integers(0, len(insts)))]["text"]
                scorer.score(texts[int(rng.integers(0, n))], texts[int(rng.integers(0, n))])
            clock.add("rouge_pairs:rouge", (time.process_time() - t0) / pair_sample * pairs)
            for r in rules:
                for b in bud:
                    results[r][b] = [False] * len(insts)
        clock.start("bootstrap")
        rng = np.random.default_rng(0)
        for r in rules:
            for b in bud:
                x = np.asarray(results[r][b], dtype=float)
                means = []
                for _ in range(n_boot):
                    means.append(x[rng.integers(0, len(x), len(x))].mean())
                np.quantile(means, [0.025, 0.975])
        clock.stop(kind)
    out = clock.result()
    for which in ("wall", "cpu"):  # roll-ups for the report
        for part in ("read", "rules", "bootstrap", "rouge_pairs"):
            out[which][part] = clock.total(which, prefix=part)
        for kind in ("exact", "rouge"):
            out[which][f"all:{kind}"] = clock.total(which, suffix=f":{kind}")
    return {**out, "rouge_pairs": rouge_pairs_total}


def vectorised_predict(root: Path, names: list[str], n_boot: int) -> dict:
    """The stage as users run it (minus Hydra start-up), then its reading step alone for the breakdown."""
    from qalign_repro.stages.predict import (
        OUTPUT_FIELDS,
        PredictOptions,
        iter_output_fields,
        predict_runs,
        write_tables,
    )
    from qalign_repro.store.storage import RunStore

    clock = Clock()
    clock.start("stage")
    table, diag = predict_runs(root, names, PredictOptions(bootstrap=n_boot))
    write_tables(table, diag, root / "predictions" / "bench", root)
    clock.stop()
    rouge_runs = [n for n in names if n.split("-")[0] in ROUGE]
    for part, subset in (("stage_exact", [n for n in names if n not in rouge_runs]), ("stage_rouge", rouge_runs)):
        if subset:
            clock.start(part)
            predict_runs(root, subset, PredictOptions(bootstrap=n_boot))
            clock.stop()
    clock.start("read")
    n_out = 0
    for name in names:
        store = RunStore(root, name, readonly=True)
        store.read_eval("grades")
        rouge = store.meta["mbr_kind"] == "rouge"
        for _, out in iter_output_fields(store, store.steps_done(), OUTPUT_FIELDS + (("text",) if rouge else ())):
            n_out += len(out["reward"])
        store.close()
    clock.stop()
    size = sum((root / "runs" / n / "exp.sqlite").stat().st_size for n in names)
    return {**clock.result(), "rows": len(table), "outputs": n_out, "store_mb": size / 1e6}


def run_phase(args: argparse.Namespace, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--root", str(args.root), "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--datasets", str(args.datasets), "--bootstrap", str(args.bootstrap),
           "--pair-sample", str(args.pair_sample)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    names = ensure_store(args.root, args.prompts, args.samples, args.datasets, False)
    if args.phase == "vectorised":
        out = vectorised_predict(args.root, names, args.bootstrap)
    else:
        out = loop_predict(args.root, names, args.bootstrap, args.pair_sample)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(args: argparse.Namespace, vec: dict, loop: dict, build_s: float | None, load: float) -> str:
    def cell(d: dict, *parts: str) -> str:
        w, c = sum(d["wall"].get(p, 0.0) for p in parts), sum(d["cpu"].get(p, 0.0) for p in parts)
        return f"{w:,.1f} / {c:,.1f}"

    vw, vc = vec["wall"]["stage"], vec["cpu"]["stage"]
    parts = ("read", "rules", "bootstrap", "rouge_pairs")
    lw, lc = sum(loop["wall"][p] for p in parts), sum(loop["cpu"][p] for p in parts)
    n_runs = 2 * args.datasets

    def speed(kind: str) -> str:
        return (f"{loop['wall'][f'all:{kind}'] / vec['wall'][f'stage_{kind}']:,.1f}x / "
                f"{loop['cpu'][f'all:{kind}'] / vec['cpu'][f'stage_{kind}']:,.1f}x")

    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    lines = [
        SECTION,
        "",
        f"Measured {date} on a {os.cpu_count()}-core x86-64 CPU ({cpu_name()}), Python "
        f"{platform.python_version()}, numpy {np.__version__}, by `python scripts/bench_predict.py`. "
        f"The machine is shared: load average {load:.1f} when the benchmark started, so wall-clock times are "
        "inflated; CPU seconds (all threads of the process) are the steadier measure.",
        "",
        f"Synthetic store: {args.datasets} datasets ({args.datasets - 1} exact-answer + 1 open-ended scored by "
        f"MBR-ROUGE-1) x {args.prompts} prompts x {args.samples} ancestral samples, plus a {args.samples}-state "
        f"QAlign chain per prompt: {n_runs} runs, {vec['outputs']:,} stored outputs, {vec['store_mb']:,.0f} MB of "
        f"SQLite (completions of 32-96 token ids, open-ended texts of 30-60 words). Budgets 1, 2, 4, ..., "
        f"{args.samples}; {args.bootstrap} bootstrap resamples per point; {vec['rows']} table rows. "
        + ("The store was built by an earlier call (cached under --root)." if build_s is None
           else f"Building the store took {build_s:.0f} s (not timed below)."),
        "",
        "Wall / CPU seconds:",
        "",
        "| part | predict stage (vectorised) | per-prompt Python loop | speed-up (wall / CPU) |",
        "|---|---:|---:|---:|",
        f"| read the store | {cell(vec, 'read')} (fields projected in SQL) | {cell(loop, 'read')} "
        "(`iter_instances`, full JSON) | |",
        f"| selection rules + FLOPs at every budget | | {cell(loop, 'rules')} | |",
        f"| bootstrap CIs | | {cell(loop, 'bootstrap')} | |",
        f"| ROUGE-1 utilities for MBR ({loop['rouge_pairs']:,} pairs) | | {cell(loop, 'rouge_pairs')} "
        f"(extrapolated from {args.pair_sample:,} rouge-score calls) | |",
        f"| **whole stage** | **{vw:,.1f} / {vc:,.1f}** | **{lw:,.0f} / {lc:,.0f}** | "
        f"**{lw / vw:,.0f}x / {lc / vc:,.0f}x** |",
        f"| exact-answer runs only ({n_runs - 2} runs; no table writing) | {cell(vec, 'stage_exact')} | "
        f"{cell(loop, 'all:exact')} | {speed('exact')} |",
        f"| open-ended MBR runs only (2 runs; no table writing) | {cell(vec, 'stage_rouge')} | "
        f"{cell(loop, 'all:rouge')} | {speed('rouge')} |",
        "",
        f"Peak memory (max RSS of the process): predict stage {vec['peak_rss_mb']:,.0f} MB, loop "
        f"{loop['peak_rss_mb']:,.0f} MB. The stage streams instances and keeps compact [prompts, samples] arrays "
        "plus one [samples, samples] utility matrix at a time; the loop holds every run's texts and rewards as "
        "Python lists.",
        "",
        "How the loop is built: the straightforward implementation of the same rules, as in the authors' "
        "repository (a `Counter` vote, a dict of weights, an argmax per prompt and budget, rouge-score per pair, "
        "a Python loop per bootstrap resample), reading through the public streaming API. Its pairwise ROUGE "
        "would take hours, so that part is the measured CPU time per rouge-score call times the number of pairs "
        "(each prompt's pool scored once and reused for every budget). The stage's own ROUGE-1 is exact (equal to "
        "rouge-score, see tests/test_selection.py) but computed over unique texts, with a matrix product for "
        "frequent words and pair lists for rare ones.",
        "",
        "Reading: the goal of 20x holds for the whole stage because of MBR; on exact-answer runs alone the "
        f"gain is about {loop['cpu']['all:exact'] / vec['cpu']['stage_exact']:.0f}x CPU, because decoding the stored outputs dominates both sides (the stage reads only "
        "the fields it needs, in SQL) and the exact-answer rules themselves are cheap even in a Python loop. "
        "The stage is mostly single-threaded, so on an idle 2-core machine its wall time should approach its CPU "
        "time; check the load average above before reading the wall-clock column.",
        "",
    ]
    return "\n".join(lines)


def write_doc(section: str) -> Path:
    path = REPO / "docs" / "performance.md"
    text = path.read_text() if path.is_file() else "# Performance\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/qalign_bench_predict"))
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--datasets", type=int, default=6)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--pair-sample", type=int, default=20000)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    ap.add_argument("--phase", choices=["vectorised", "loop"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return
    t0 = time.perf_counter()
    existed = (args.root / "bench_spec.json").is_file() and not args.rebuild
    ensure_store(args.root, args.prompts, args.samples, args.datasets, args.rebuild)
    build_s = None if existed and time.perf_counter() - t0 < 1 else time.perf_counter() - t0
    load = os.getloadavg()[0]
    vec = run_phase(args, "vectorised")
    loop = run_phase(args, "loop")
    section = report(args, vec, loop, build_s, load)
    print(section)
    if not args.no_doc:
        print(f"written to {write_doc(section)}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
