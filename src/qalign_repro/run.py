"""``python -m qalign_repro.run``: generate chains / samples for a dataset and store them step by step.

Idempotent and resumable: the run's name derives from the config (naming.py), each step is committed
atomically (storage.py), and a rerun continues after the last committed step, or says there is nothing to do.
Rerunning with a larger ``steps`` extends the same chains.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qalign_repro.cli import entry_point
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.methods import METHODS
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.models_io import model_fingerprints
from qalign_repro.naming import config_hash, group_name, run_name
from qalign_repro.provenance import environment_info
from qalign_repro.storage import RunStore
from qalign_repro.tasks import get_task


def build_backends(cfg: DictConfig) -> tuple[Any, Any]:
    from qalign_repro.lm import GENERATORS
    from qalign_repro.rm import REWARDS

    gen_cls = GENERATORS.get(str(cfg.backend.generator))
    rm_cls = REWARDS.get(str(cfg.backend.reward))
    backend = OmegaConf.to_container(cfg.backend, resolve=True)
    generator = gen_cls(OmegaConf.to_container(cfg.model, resolve=True), backend)
    reward = rm_cls(OmegaConf.to_container(cfg.reward, resolve=True), backend)
    return generator, reward


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


def _prepare_instances(store: RunStore, task: Any, docs: list[dict], generator: Any, max_new: int) -> None:
    if store.n_instances():
        stored = [i["id"] for i in store.inputs()]
        wanted = [d["id"] for d in docs]
        if stored != wanted:
            raise StorageError(
                f"run {store.name!r} holds prompts {stored[:3]}... but this config selects {wanted[:3]}...; "
                "use another run_name or output_root"
            )
        return
    inputs = []
    for idx, doc in enumerate(docs):
        messages = task.prompt(doc)
        ids = generator.encode_chat(messages)
        if len(ids) + max_new > generator.max_context:
            raise ConfigError(
                f"prompt of doc {doc['id']!r} has {len(ids)} tokens; with max_new_tokens={max_new} it exceeds the "
                f"model context ({generator.max_context}); allowed: max_new_tokens <= {generator.max_context - len(ids)}"
            )
        inputs.append({"id": str(doc["id"]), "idx": idx, "prompt_ids": ids, "messages": messages, "doc": doc})
    store.add_instances(inputs)


def execute(cfg: DictConfig) -> RunStore:
    """Run (or resume, or extend) the configured run and return its store."""
    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    docs = shard_docs(task.docs(), int(cfg.shard.index), int(cfg.shard.count))
    name = run_name(cfg)
    prints = model_fingerprints(cfg)  # before the store exists: a bad folder leaves no empty run behind
    store = RunStore(cfg.output_root, name, create=True, meta={**initial_meta(cfg, name, task), "weights": prints})
    with store.lock():
        meta = store.meta
        if meta.get("config_hash") != config_hash(cfg):
            raise StorageError(f"run {name!r} was created with a different config; pick another run_name")
        _check_same_weights(store, name, prints)
        done = store.steps_done() if store.n_instances() else 0
        if store.n_instances() == len(docs) and done >= cfg.steps:
            if meta.get("status") != "done":  # killed after its last commit: finish the bookkeeping
                _finish(cfg, store)
            print(f"run {name}: complete ({done} steps for {len(docs)} prompts); nothing to do")
            return store
        method = METHODS.get(str(cfg.method.name))(OmegaConf.to_container(cfg.method, resolve=True))
        generator, reward = build_backends(cfg)
        _prepare_instances(store, task, docs, generator, int(cfg.max_new_tokens))
        store.update_meta(
            status="running", steps=int(cfg.steps), data_source=task.data_source(),
            doc_ids=[d["id"] for d in docs],
            model={"name": str(cfg.model.name), "path": getattr(generator, "path", None), "n_params": generator.n_params},
            reward={"name": str(cfg.reward.name), "path": getattr(reward, "path", None), "n_params": reward.n_params},
            environment=environment_info(),
        )
        beta = _resolve_beta(cfg, store, generator, reward)
        ctx = RunContext(generator=generator, reward=reward, seed=int(cfg.seed), beta=beta,
                         max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                         batch_size=int(cfg.batch_size), method_cfg=OmegaConf.to_container(cfg.method, resolve=True))
        last = store.last_outputs()
        chains = [Chain(idx=i["idx"], prompt_id=i["id"], prompt_ids=i["prompt_ids"], messages=i["messages"],
                        last=last.get(i["idx"])) for i in store.inputs()]
        _loop(cfg, store, method, ctx, chains, done, name)
    return store


def _resolve_beta(cfg: DictConfig, store: RunStore, generator: Any, reward: Any) -> float:
    """A number, or for ``beta=auto`` the calibrated value (stored in meta so a resumed run keeps it)."""
    if cfg.beta != "auto":
        return float(cfg.beta)
    meta = store.meta
    if isinstance(meta.get("beta"), float):
        return meta["beta"]
    from qalign_repro.calibrate import load_or_calibrate

    result = load_or_calibrate(cfg, generator, reward, meta["weights"])
    store.update_meta(beta=float(result["beta"]), beta_calibration=result)
    print(f"beta=auto: calibrated beta={result['beta']:.4g} (chain acceptance {result['chain_acceptance']:.3f})")
    return float(result["beta"])


def _loop(cfg: DictConfig, store: RunStore, method: Any, ctx: RunContext, chains: list[Chain], start: int,
          name: str) -> None:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    wall0 = float(store.meta.get("wall_time_s", 0.0))
    tokens = 0
    bar = tqdm(range(start, int(cfg.steps)), initial=start, total=int(cfg.steps), desc=f"{cfg.method.name} steps",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    accepted = total = 0
    for k in bar:
        outputs = method.step(ctx, chains, k)
        store.commit_step(k, {c.idx: o for c, o in zip(chains, outputs)})
        for c, o in zip(chains, outputs):
            c.last = o
        tokens += sum(o["tokens_generated"] for o in outputs)
        if k > 0:
            accepted += sum(o["accepted"] for o in outputs)
            total += len(outputs)
        elapsed = time.perf_counter() - t_start
        bar.set_postfix({"step": k, "acc": f"{accepted / total:.2f}" if total else "-",
                         "tok/s": f"{tokens / max(elapsed, 1e-9):.0f}", **method.postfix(outputs)})
    elapsed = time.perf_counter() - t_start
    store.update_meta(wall_time_s=wall0 + elapsed, time_in_generate_s=ctx.timers["generate"],
                      time_in_reward_s=ctx.timers["reward"])
    print(f"run {name}: {store.steps_done()} steps for {len(chains)} prompts stored in {store.dir}")
    _finish(cfg, store)


def _finish(cfg: DictConfig, store: RunStore) -> None:
    """Mark the run done (and, for chains, store and print the MCMC diagnostics)."""
    values: dict[str, Any] = {"status": "done", "steps_done": store.steps_done(),
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cfg.method.name == "qalign":
        from qalign_repro.diagnostics import format_diagnostics, run_diagnostics

        values["diagnostics"] = run_diagnostics(store)
        print("MCMC diagnostics:\n" + format_diagnostics(values["diagnostics"]))
    store.update_meta(**values)


@entry_point
def main(cfg: DictConfig) -> None:
    """Generate and store outputs for the configured method and dataset."""
    execute(cfg)


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.run import main as _main

    _main()
