"""``python -m qalign_repro.run``: generate chains / samples for a dataset and store them step by step.

Idempotent and resumable: the run's name derives from the config (naming.py), each step is committed
atomically (storage.py), and a rerun continues after the last committed step, or says there is nothing to do.
Rerunning with a larger ``steps`` extends the same chains.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from qalign_repro.backends import build_backends
from qalign_repro.cli import entry_point
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.methods import METHODS
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.models.folders import model_fingerprints
from qalign_repro.rm.mix import describe_reward
from qalign_repro.store.provenance import environment_info
from qalign_repro.store.run_names import config_hash, group_name, run_name
from qalign_repro.store.storage import RunStore, SQLiteStorage
from qalign_repro.tasks import get_task


def initial_meta(cfg: DictConfig, name: str, task: Any) -> dict[str, Any]:
    return {
        "run_name": name,
        "experiment_name": str(cfg.experiment_name),
        "method": str(cfg.method.name),
        "dataset": str(cfg.dataset.name),
        "mbr_kind": task.mbr_kind,
        "beta": cfg.beta if cfg.beta == "auto" else float(cfg.beta),
        "seed": int(cfg.seed),
        "steps": int(cfg.steps),
        "max_new_tokens": int(cfg.max_new_tokens),
        "config_hash": config_hash(cfg),
        "group": group_name(cfg),
        "shard": {"index": int(cfg.shard.index), "count": int(cfg.shard.count)},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "status": "created",
        "steps_done": 0,
        "wall_time_s": 0.0,
    }


def _check_same_weights(store: RunStore, name: str, prints: dict[str, str | None]) -> None:
    stored = store.meta.get("weights")
    if stored is None:  # a run from before fingerprints: adopt the current ones
        store.update_meta(weights=prints)
        return
    for what, now in prints.items():
        if stored.get(what) != now:
            raise StorageError(f"run {name!r} was made with other weights behind {what}.path (fingerprint "
                               f"{stored.get(what)}, now {now}); allowed: the same weights, or another run_name / "
                               "output_root for the new ones")


def shard_docs(docs: list[dict], index: int, count: int) -> list[dict]:
    """Round-robin split, so shards get similar mixes of prompts and sizes differ by at most one."""
    return docs[index::count]


#: how to get the paper's results instead of the tiny models' (for the one-line notes and errors)
PAPER_MODELS = "the paper's models on a GPU (model=tulu3_8b_sft reward=tulu3_8b_rm; docs/cluster.md)"


def untrained_note(cfg: DictConfig) -> str | None:
    """One line when a shipped model meets a dataset outside its config's ``trained_on`` (the tiny models know
    arith only): the run still works, but its accuracy says nothing about the method."""
    dataset = str(cfg.dataset.name)
    strangers = [w for w in ("model", "reward") if cfg[w].get("path") is None and cfg[w].get("trained_on")
                 and dataset not in list(cfg[w].trained_on)]
    if not strangers:
        return None
    trained = sorted({t for w in strangers for t in cfg[w].trained_on})
    who = " and ".join(f"{w}={cfg[w].name}" for w in strangers)
    return (f"note: {who} {'were' if len(strangers) > 1 else 'was'} trained on {', '.join(trained)} only, not on "
            f"{dataset}: the run works, but expect near-zero accuracy; the paper's results need {PAPER_MODELS}")


def context_error(n_prompt: int, max_new: int, context: int, positions: int | None) -> str:
    """The options that can make a prompt of ``n_prompt`` tokens + ``max_new`` fit, each of them possible."""
    need = n_prompt + max_new
    options = [f"max_new_tokens <= {context - n_prompt}"] if context - n_prompt >= 1 else []
    if positions is not None and need <= positions:
        options.append(f"model.max_context={need} or more (the model has {positions} positions)")
    else:
        options.append(f"model.max_context={need} with model.allow_long_context=true (past the model's "
                       f"{positions or 'unknown number of'} positions: untrained)")
    options += ["a shorter prompt or another dataset", PAPER_MODELS]
    return ", or ".join(options)


def encode_instances(task: Any, docs: list[dict], generator: Any, max_new: int) -> list[dict[str, Any]]:
    """The run's instances (chat-templated prompt ids), refused as a whole when a prompt cannot fit the context
    with ``max_new`` tokens; the error names the longest prompt, so one fix covers every prompt."""
    inputs = []
    for idx, doc in enumerate(docs):
        messages = task.prompt(doc)
        ids = generator.encode_chat(messages)
        inputs.append({"id": str(doc["id"]), "idx": idx, "prompt_ids": ids, "messages": messages, "doc": doc})
    context = int(generator.max_context)
    too_long = [i for i in inputs if len(i["prompt_ids"]) + max_new > context]
    if too_long:
        worst = max(too_long, key=lambda i: len(i["prompt_ids"]))
        n = len(worst["prompt_ids"])
        raise ConfigError(
            f"{len(too_long)} of {len(inputs)} prompts do not fit the model context ({context} tokens) with "
            f"max_new_tokens={max_new}; the longest, doc {worst['id']!r}, has {n} tokens; allowed: "
            + context_error(n, max_new, context, getattr(generator, "max_positions", None)))
    return inputs


def chains_per_prompt(cfg: DictConfig) -> int:
    """``method.chains`` (K independent chains per prompt; 1 when the method has no such option)."""
    return int(cfg.method.get("chains", 1) or 1)


def expand_chains(inputs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """K instances per prompt, prompt-major (instance idx = p*K + j), all with the prompt's doc ``id`` (evaluate
    and predict group by it) and ``chain: j``; chain j > 0 draws its randomness from its own ``seed_key``, so
    chain 0 is the same chain a one-chain run makes."""
    if k == 1:
        return inputs
    out: list[dict[str, Any]] = []
    for inp in inputs:
        for j in range(k):
            extra = {"chain": j} if j == 0 else {"chain": j, "seed_key": f"{inp['id']}#chain{j}"}
            out.append({**inp, "idx": len(out), **extra})
    return out


def _prepare_instances(store: RunStore, docs: list[dict], inputs: list[dict[str, Any]] | None, k: int = 1) -> None:
    """Store the instances once (``inputs`` from ``encode_instances``; None only for a store that holds them);
    a resumed run must hold exactly this config's prompts (``k`` chains each)."""
    if store.n_instances():
        stored = [i["id"] for i in store.inputs()]
        wanted = [d["id"] for d in docs for _ in range(k)]
        if stored != wanted:
            raise StorageError(
                f"run {store.name!r} holds prompts {stored[:3]}... but this config selects {wanted[:3]}...; "
                "use another run_name or output_root"
            )
        return
    if inputs is None:
        raise StorageError(f"run {store.name!r} holds no prompts and none were encoded")
    store.add_instances(expand_chains(inputs, k))


def _start(cfg: DictConfig, task: Any, docs: list[dict], encode: bool = True
           ) -> tuple[Any, tuple[Any, Any], list[dict[str, Any]] | None]:
    """Everything a new run checks before its folder exists: method options, the models (architecture and
    context are checked before any weight loads), and that every prompt fits the context (``encode``; a
    resumed run's prompts are stored already)."""
    method = METHODS.get(str(cfg.method.name))(cast(dict[str, Any], OmegaConf.to_container(cfg.method, resolve=True)))
    generator, reward = build_backends(cfg)
    inputs = encode_instances(task, docs, generator, int(cfg.max_new_tokens)) if encode else None
    from qalign_repro.methods.warm_start import attach, chain_keys

    # method.init=run:/file: -- the source is read and checked here, before any run folder exists
    attach(method, chain_keys([str(d["id"]) for d in docs], chains_per_prompt(cfg)), generator,
           int(cfg.max_new_tokens), cfg.output_root)
    note = untrained_note(cfg)
    if note:  # after the checks, so that a refused start says one line only
        print(note, file=sys.stderr, flush=True)
    return method, (generator, reward), inputs


def execute(cfg: DictConfig) -> RunStore:
    """Run (or resume, or extend) the configured run and return its store."""
    task = get_task(cast(dict[str, Any], OmegaConf.to_container(cfg.dataset, resolve=True)))
    docs = shard_docs(task.docs(), int(cfg.shard.index), int(cfg.shard.count))
    name = run_name(cfg)
    prints = model_fingerprints(cfg)  # before the store exists: a bad folder leaves no empty run behind
    started = None
    if not SQLiteStorage(Path(str(cfg.output_root)) / "runs", mode="r").exists(name):
        started = _start(cfg, task, docs)  # a new run: no folder until the models and prompts pass their checks
    store = RunStore(cfg.output_root, name, create=True, meta={**initial_meta(cfg, name, task), "weights": prints})
    with store.lock():
        store.verify()  # damaged rows: never "complete", never resumed from (checksums; fsck names the rest)
        meta = store.meta
        if meta.get("config_hash") != config_hash(cfg):
            raise StorageError(f"run {name!r} was created with a different config; pick another run_name")
        _check_same_weights(store, name, prints)
        done = store.steps_done() if store.n_instances() else 0
        if store.n_instances() == len(docs) * chains_per_prompt(cfg) and done >= cfg.steps:
            if meta.get("status") != "done":  # killed after its last commit: finish the bookkeeping
                _finish(cfg, store)
            print(f"run {name}: complete ({_count(done, 'output')} for each of {_count(len(docs), 'prompt')}); "
                  "nothing to do")
            return store
        method, (generator, reward), inputs = started or _start(cfg, task, docs, encode=not store.n_instances())
        _prepare_instances(store, docs, inputs, chains_per_prompt(cfg))
        store.update_meta(
            status="running", steps=int(cfg.steps), data_source=task.data_source(),
            doc_ids=[d["id"] for d in docs], chains=chains_per_prompt(cfg),
            model={"name": str(cfg.model.name), "path": getattr(generator, "path", None), "n_params": generator.n_params},
            reward={"name": str(cfg.reward.name), "path": getattr(reward, "path", None), "n_params": reward.n_params,
                    **describe_reward(reward)},  # python / mix: kind and per-component FLOPs (rm/mix.py)
            environment=environment_info(),
        )
        beta = _resolve_beta(cfg, store, generator, reward)
        ctx = RunContext(generator=generator, reward=reward, seed=int(cfg.seed), beta=beta,
                         max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                         batch_size=int(cfg.batch_size),
                         method_cfg=cast(dict[str, Any], OmegaConf.to_container(cfg.method, resolve=True)))
        _loop(cfg, store, method, ctx, stored_chains(store), name)
    return store


def stored_chains(store: RunStore) -> list[Chain]:
    """The run's chains as stored: each resumes from its own last committed output. An instance's
    ``seed_key`` (extra chains of one prompt, ``method.chains``) keys its randomness, else its doc id."""
    last = store.last_outputs()
    counts = store.step_counts()
    return [Chain(idx=i["idx"], prompt_id=str(i.get("seed_key", i["id"])), prompt_ids=i["prompt_ids"],
                  messages=i["messages"], last=last.get(i["idx"]), done=counts.get(i["idx"], 0))
            for i in store.inputs()]


def _resolve_beta(cfg: DictConfig, store: RunStore, generator: Any, reward: Any) -> float:
    """A number, or for ``beta=auto`` the calibrated value (stored in meta so a resumed run keeps it)."""
    if cfg.beta != "auto":
        return float(cfg.beta)
    meta = store.meta
    if isinstance(meta.get("beta"), float):
        return meta["beta"]
    from qalign_repro.stages.calibrate import load_or_calibrate

    result = load_or_calibrate(cfg, generator, reward, meta["weights"])
    store.update_meta(beta=float(result["beta"]), beta_calibration=result)
    of = " of the changed proposals" if result.get("count") == "changed" else ""
    where = (f"shipped with the models ({result['shipped']}; same weights and calibrate settings)"
             if result.get("shipped") else "calibrated")
    print(f"beta=auto: beta={result['beta']:.4g} {where}; calibration chains accepted "
          f"{result['chain_acceptance']:.3f}{of}")
    return float(result["beta"])


def _loop(cfg: DictConfig, store: RunStore, method: Any, ctx: RunContext, chains: list[Chain], name: str) -> None:
    from qalign_repro.methods.driver import drive

    t_start = time.perf_counter()
    wall0 = float(store.meta.get("wall_time_s", 0.0))
    sched = cfg.get("schedule", "auto")
    progress = drive(method, ctx, chains, int(cfg.steps), store.commit_outputs, schedule=sched,
                     in_flight=cfg.get("in_flight"), rm_batch=cfg.get("rm_batch"), progress=bool(cfg.progress),
                     desc=f"{cfg.method.name}")
    elapsed = time.perf_counter() - t_start
    store.update_meta(wall_time_s=wall0 + elapsed, time_in_generate_s=ctx.timers["generate"],
                      time_in_reward_s=ctx.timers["reward"])
    steps = store.steps_done()
    print(f"run {name}: {_count(steps, 'output')} per chain for {_count(len(chains), 'chain')} stored in {store.dir} "
          f"({progress.tokens / max(elapsed, 1e-9):.0f} generated tokens/s)")
    _finish(cfg, store)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _finish(cfg: DictConfig, store: RunStore) -> None:
    """Mark the run done (and, for chains, store and print the MCMC diagnostics)."""
    values: dict[str, Any] = {"status": "done", "steps_done": store.steps_done(),
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if METHODS.get(str(cfg.method.name)).kind == "chain":
        from qalign_repro.analysis.diagnostics import format_diagnostics, run_diagnostics

        values["diagnostics"] = run_diagnostics(store)
        print("MCMC diagnostics:\n" + format_diagnostics(values["diagnostics"]))
    store.update_meta(**values)


@entry_point
def main(cfg: DictConfig) -> None:
    """Generate and store outputs for the configured method and dataset."""
    execute(cfg)


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.stages.run import main as _main

    _main()
