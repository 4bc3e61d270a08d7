"""In-process Python API: the test-time methods without Hydra or the command line.

    from qalign_repro import QAlign, CARDS, SSS, load_model, load_reward, load_task

    model = load_model("tiny")            # conf/model/tiny.yaml; or a shipped asset, a folder or a hub id
    reward = load_reward("tiny")
    task = load_task("arith", n=4)        # 4 test problems, prompted in the format the tiny LM was trained on
    result = QAlign(model, reward, beta=0.998).run(task.docs(), steps=8, task=task)
    print(result)                         # per prompt: final text, answer, gold; acceptance; accuracy
    result.prompts[0].final["text"]       # prompt 0: the chain state after the last step
    result.to_pandas()                    # one row per output: text, reward, accepted, answer, correct, ...

    CARDS(model, reward, beta=1.0, reward_threshold=0.5).run(prompts, steps=4)   # 4 CARDS samples per prompt
    SSS(model, reward, draft="tiny-draft").run(prompts, steps=4)                  # 4 SSS samples per prompt

``run`` returns an ``api_result.Result``: per prompt the list of outputs in the stored schema
(``methods.base.output_record`` plus each method's extra fields, the same records ``python -m qalign_repro.run``
stores; ``result[i]`` is that list, so the result also works as the list of lists earlier versions returned),
with a task each output's answer and grade, and for chains the acceptance and MCMC diagnostics. With
``output_root`` the outputs are also stored in a run store (``storage.RunStore``) step by step, and a second
call with the same settings resumes or extends that run instead of starting over. β = 0.998 is the calibrated
β of the tiny pair for 8-step chains (``assets/tiny-rm/calibration.json``); β is in the RM's units, so another RM
needs its own (``beta=auto`` in the CLI, or ``python -m qalign_repro.calibrate``).

Nothing here samples by itself: a sampler builds the same ``RunContext`` as the run stage and calls the
registered method's ``step`` for k = 0, 1, ..., so the API and the CLI produce identical outputs for the
same model, prompt ids, seed and settings. Prompts are strings (one user turn), chat message lists, or with
``task=`` that task's docs (prompted by the task, graded against their gold answers, keeping their ids); prompt
``i`` gets the id ``str(i)`` unless ``prompt_ids`` names them, and all randomness derives from
``(seed, prompt id, step)``. Loading a tiny model on the CPU sets torch to one thread (``threads.py``): with one
per core, a loaded machine made the 1-prompt x 8-step example take 86 s instead of about one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from omegaconf import DictConfig, OmegaConf

from qalign_repro.cli import CONF_DIR
from qalign_repro.config import plain_dict
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.methods import METHODS
from qalign_repro.methods.base import Chain, RunContext

if TYPE_CHECKING:
    from qalign_repro.api_result import Result
    from qalign_repro.methods.sss import SSS as SSSMethod
    from qalign_repro.store.storage import RunStore
    from qalign_repro.tasks import Task

Messages = list[dict[str, str]]
Prompt = str | Sequence[Mapping[str, str]]


# -- models -------------------------------------------------------------------------------------------------
def _model_config(group: str, name: str | Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A model config from a conf group entry, a shipped asset, a mapping, or a folder / hub id."""
    from qalign_repro.models.tiny import assets_dir

    if isinstance(name, Mapping):
        cfg = dict(name)
    elif (CONF_DIR / group / f"{name}.yaml").is_file():
        cfg = plain_dict(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    elif assets_dir(str(name)).is_dir():
        cfg = {"name": str(name), "path": None, "asset": str(name)}
    else:
        cfg = {"name": Path(str(name)).name or str(name), "path": str(name)}
    return {**cfg, **overrides}


def _backend_for(cfg: Mapping[str, Any], backend: str | None) -> str:
    return backend or ("toy" if cfg.get("name") == "toy" else "hf")


def _reward_extra(reward: Any) -> dict[str, Any]:
    from qalign_repro.rm.mix import describe_reward

    return describe_reward(reward)


def _tuned(backend: Any) -> Any:
    """One torch thread for a tiny model on the CPU: with the default one per core, the README example took 86 s
    on a loaded 2-core machine instead of ~1 s (``threads.py``)."""
    from qalign_repro.models.threads import tune_cpu_threads

    tune_cpu_threads(backend)
    return backend


def load_model(name: str | Mapping[str, Any] = "tiny", *, backend: str | None = None, device: str = "auto",
               **overrides: Any) -> Any:
    """Load a generator: ``name`` is a ``conf/model`` entry (``tiny``, ``toy``), a shipped asset
    (``tiny-draft``), a model folder, a hub id or a config mapping; ``backend`` defaults to ``toy`` for the
    toy model and ``hf`` otherwise; keyword overrides go into the model config (``dtype=...``)."""
    from qalign_repro.lm import GENERATORS

    cfg = _model_config("model", name, overrides)
    return _tuned(GENERATORS.get(_backend_for(cfg, backend))(cfg, {"device": device}))


def load_reward(name: str | Mapping[str, Any] = "tiny", *, backend: str | None = None, device: str = "auto",
                **overrides: Any) -> Any:
    """Load a reward model, resolved like ``load_model`` (``conf/reward`` entries: ``tiny``, ``toy``, ``python``
    with ``target="pkg.module:function"``, ``mix``; a mix's model components each get their own default
    backend). ``qalign_repro.rm.mix.MixReward([(reward, weight), ...])`` composes loaded rewards directly."""
    from qalign_repro.models.threads import tune_cpu_threads
    from qalign_repro.rm import REWARDS
    from qalign_repro.rm.mix import build_reward, thread_backends
    from qalign_repro.store import run_names as naming  # noqa: F401  registers ${model_label:} for the mix's named components

    path = CONF_DIR / "reward" / f"{name}.yaml"
    # cast: OmegaConf.load is typed as either container; a conf/reward entry is a mapping
    node = cast(DictConfig, OmegaConf.load(path)) if isinstance(name, str) and path.is_file() else None
    if node is not None and node.get("kind") in ("python", "mix"):  # overrides first: python's name is ${.target}
        cfg = plain_dict(OmegaConf.merge(node, overrides))
    else:
        cfg = _model_config("reward", name, overrides)
    reward = build_reward(cfg, {"device": device},
                          lambda c, b: REWARDS.get(_backend_for(c, backend))(c, b))
    tune_cpu_threads(*thread_backends(reward))  # as _tuned, for the model components only
    return reward


# -- prompts ------------------------------------------------------------------------------------------------
def as_messages(prompt: Prompt) -> Messages:
    """A string is one user turn; a message list must be ``[{"role": ..., "content": ...}, ...]``."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    # not a str (returned above); the annotation keeps mypy's isinstance(Sequence) from re-adding str to it
    seq: Sequence[Mapping[str, str]] = prompt
    msgs = [dict(m) for m in seq] if isinstance(seq, Sequence) else None
    if not msgs or not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise ConfigError(f"prompt {prompt!r:.80} is neither a string nor a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def load_task(name: str = "arith", **overrides: Any) -> Task:
    """A benchmark with its ``conf/dataset/<name>.yaml`` settings; keyword overrides replace them (``n=4``,
    ``split="rm_train"``). Its ``docs()`` are prompts for ``Sampler.run(..., task=...)``: the models answer in
    the format they were trained on (a free-form question makes the tiny LM babble) and get graded."""
    from qalign_repro.tasks import get_task

    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")))
        raise ConfigError(f"task={name!r} is not a known dataset; allowed: {known}")
    return get_task({**plain_dict(OmegaConf.load(path)), **overrides})


def _method_defaults(method: str) -> dict[str, Any]:
    return plain_dict(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


# -- samplers -----------------------------------------------------------------------------------------------
class Sampler:
    """A registered method bound to a model, a reward model and the run-level settings."""

    method: ClassVar[str] = ""

    def __init__(self, model: Any, reward: Any, beta: float = 1.0, *, max_new_tokens: int | None = None,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 64, allow_inexact: bool = False,
                 schedule: str = "auto", **method_cfg: Any):
        defaults = _method_defaults(self.method)
        unknown = sorted(set(method_cfg) - set(defaults))
        if unknown:
            raise ConfigError(f"{type(self).__name__}: unknown option(s) {unknown}; allowed: "
                              f"{', '.join(k for k in defaults if k != 'name') or 'none'}")
        top = OmegaConf.load(CONF_DIR / "config.yaml")
        self.max_new_tokens = int(max_new_tokens if max_new_tokens is not None else top.max_new_tokens)
        if not float(beta) > 0:
            raise ConfigError(f"beta={beta!r}; allowed: a number > 0")
        if not float(temperature) > 0:
            raise ConfigError(f"temperature={temperature!r}; allowed: a number > 0")
        if METHODS.get(self.method).exact_only_at_temperature_one and float(temperature) != 1.0 and not allow_inexact:
            raise ConfigError(f"temperature={temperature!r} breaks {type(self).__name__}'s exactness; allowed: 1.0, "
                              "or allow_inexact=True")
        if self.max_new_tokens < 1 or int(batch_size) < 1 or int(seed) < 0:
            raise ConfigError("max_new_tokens and batch_size must be >= 1 and seed >= 0")
        self.model, self.reward = model, reward
        self.beta, self.temperature, self.seed, self.batch_size = float(beta), float(temperature), int(seed), int(batch_size)
        self.method_cfg = {**defaults, **method_cfg}
        if self.method_cfg.get("chains", 1) != 1:
            raise ConfigError(f"{type(self).__name__}: chains={self.method_cfg['chains']!r}; allowed: 1 in the Python "
                              "API (several chains per prompt: python -m qalign_repro.run method.chains=K)")
        from qalign_repro.methods.driver import SCHEDULES

        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule={schedule!r} is not a known option; allowed: {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.store: RunStore | None = None  # the RunStore of the last ``run`` with an output_root

    def _method(self) -> Any:
        return METHODS.get(self.method)(self.method_cfg)

    def _settings(self) -> dict[str, Any]:
        """Everything that changes what is generated (the run name hashes it)."""
        from qalign_repro.methods.proposal_index import without_default_index
        from qalign_repro.methods.warm_start import without_default_init

        method = {k: v for k, v in self.method_cfg.items() if not (k == "chains" and v == 1)}  # as before the option
        method = without_default_index(without_default_init(method))  # default start and index: as before them
        return {"method": method, "beta": self.beta, "seed": self.seed, "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens,
                "model": {"name": getattr(self.model, "name", None), "path": str(getattr(self.model, "path", None))},
                "reward": {"name": getattr(self.reward, "name", None), "path": str(getattr(self.reward, "path", None)),
                           **_reward_extra(self.reward)}}  # python / mix: target, components (rm/mix.py)

    def run(self, prompts: Sequence[Prompt | Mapping[str, Any]], steps: int = 1, *,
            prompt_ids: Sequence[str] | None = None, task: Any = None, output_root: str | Path | None = None,
            run_name: str | None = None, progress: bool = False) -> Result:
        """Outputs 0..steps-1 for every prompt (QAlign: the chain states; the others: independent samples), as a
        ``Result`` (``result[i]`` is prompt i's list of outputs). With ``task`` (a dataset name such as
        ``"arith"``, or a ``Task``) a prompt may be one of the task's docs: it is prompted with the task's own
        template, keeps its doc id and every output is graded against its gold answer; string and message
        prompts then get the task's extracted answers."""
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
            raise ConfigError("prompts must be a list of strings, chat message lists or task docs")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r}; allowed: an integer >= 1")
        task = load_task(task) if isinstance(task, str) else task
        docs = [dict(p) if isinstance(p, Mapping) else None for p in prompts]
        if task is None and any(d is not None for d in docs):
            raise ConfigError("a prompt is a mapping (a task doc?); allowed: a string or a message list, or docs "
                              "together with task=<dataset name or Task>")
        # d is None exactly where p is not a mapping, i.e. a Prompt
        messages = [task.prompt(d) if d is not None else as_messages(cast(Prompt, p)) for p, d in zip(prompts, docs)]
        if prompt_ids is None:
            prompt_ids = [str(d["id"]) if d is not None and "id" in d else str(i) for i, d in enumerate(docs)]
        ids = [str(i) for i in prompt_ids]
        if len(ids) != len(messages) or len(set(ids)) != len(ids):
            raise ConfigError("prompt_ids must give one distinct id per prompt")
        chains = []
        for idx, (pid, msgs) in enumerate(zip(ids, messages)):
            tok = self.model.encode_chat(msgs)
            if len(tok) + self.max_new_tokens > self.model.max_context:
                raise ConfigError(f"prompt {pid!r} has {len(tok)} tokens; with max_new_tokens={self.max_new_tokens} "
                                  f"it exceeds the model context ({self.model.max_context})")
            chains.append(Chain(idx=idx, prompt_id=pid, prompt_ids=tok, messages=msgs))
        ctx = RunContext(generator=self.model, reward=self.reward, seed=self.seed, beta=self.beta,
                         max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                         batch_size=self.batch_size, method_cfg=self.method_cfg)
        method = self._method()
        from qalign_repro.methods.warm_start import attach

        # init=run:<name> reads a run under output_root (here, the current folder without one); init=file:<path>
        attach(method, [(c.prompt_id, c.prompt_id, 0) for c in chains], self.model, self.max_new_tokens,
               output_root if output_root is not None else ".")
        if output_root is None:
            records: list[list[dict[str, Any]]] = [[] for _ in chains]
            self._loop(method, ctx, chains, records, 0, steps, None, progress)
            return self._result(records, chains, docs, task, None)
        stored = self._run_stored(method, ctx, chains, steps, Path(output_root), run_name, progress)
        return self._result(stored, chains, docs, task, self.store)

    def _result(self, records: list[list[dict[str, Any]]], chains: list[Chain], docs: list[dict[str, Any] | None],
                task: Any, store: Any) -> Result:
        from qalign_repro.api_result import PromptResult, Result, grade_outputs

        kind = METHODS.get(self.method).kind
        prompts = [PromptResult(prompt_id=c.prompt_id, messages=c.messages, outputs=r, doc=d,
                                grades=None if task is None else grade_outputs(task, d, r),
                                gold=None if task is None or d is None else str(task.gold(d)), chain=kind == "chain")
                   for c, r, d in zip(chains, records, docs)]
        return Result(method=self.method, kind=kind, beta=self.beta, prompts=prompts,
                      task=None if task is None else getattr(task, "name", None), store=store)

    def _run_stored(self, method: Any, ctx: RunContext, chains: list[Chain], steps: int, root: Path,
                    run_name: str | None, progress: bool) -> list[list[dict[str, Any]]]:
        from qalign_repro.store.provenance import environment_info
        from qalign_repro.store.storage import RunStore

        settings = self._settings()
        inputs = [{"id": c.prompt_id, "idx": c.idx, "prompt_ids": c.prompt_ids, "messages": c.messages, "doc": None}
                  for c in chains]
        digest = _digest({**settings, "prompts": [(i["id"], i["messages"]) for i in inputs]})
        name = run_name or f"api-{self.method}-b{self.beta:g}-s{self.seed}-{digest}"
        meta = {"run_name": name, "experiment_name": "api", "method": self.method, "beta": self.beta,
                "seed": self.seed, "steps": steps, "max_new_tokens": self.max_new_tokens, "config_hash": digest,
                "config": settings, "status": "created", "steps_done": 0,
                "model": {**settings["model"], "n_params": int(self.model.n_params)},
                "reward": {**settings["reward"], "n_params": int(self.reward.n_params)}}
        store = RunStore(root, name, create=True, meta=meta)
        self.store = store
        with store.lock():
            if store.meta.get("config_hash") != digest:
                raise StorageError(f"run {name!r} under {root} holds other settings or prompts; pick another run_name")
            if not store.n_instances():
                store.add_instances(inputs)
            store.update_meta(status="running", steps=max(steps, store.steps_done()),
                              environment=environment_info())
            done = store.steps_done()
            records = [list(inst["outputs"]) for inst in store.iter_instances()]
            for c in chains:
                c.last = records[c.idx][-1] if records[c.idx] else None
            self._loop(method, ctx, chains, records, done, steps, store, progress)
            store.update_meta(status="done", steps_done=store.steps_done())
        return [r[:steps] for r in records]

    def _loop(self, method: Any, ctx: RunContext, chains: list[Chain], records: list[list[dict[str, Any]]],
              start: int, steps: int, store: Any, progress: bool) -> None:
        """The run stage's step driver (``methods/driver.py``): the same schedules, so the API and the CLI store
        identical outputs."""
        from qalign_repro.methods.driver import drive

        for c in chains:
            c.done = len(records[c.idx])

        def commit(group: dict[tuple[int, int], dict[str, Any]]) -> None:
            if store is not None:
                store.commit_outputs(group)
            for (idx, _k), out in sorted(group.items(), key=lambda kv: kv[0][1]):
                records[idx].append(out)

        drive(method, ctx, chains, steps, commit, schedule=self.schedule, progress=progress, desc=method.name)


class Ancestral(Sampler):
    """Independent samples from the model (the pool for MV / WMV / BoN)."""

    method = "ancestral"


class QAlign(Sampler):
    """QAlign MCMC chains: output k is the chain state after step k (state 0 is an ancestral sample)."""

    method = "qalign"


class CARDS(Sampler):
    """Cascade reward sampling: output k is the k-th independent CARDS sample (options: conf/method/cards.yaml)."""

    method = "cards"


class SSS(Sampler):
    """Reward-shifted speculative sampling. ``draft`` (and ``draft_ref``) is a loaded generator, a name that
    ``load_model`` resolves, or a model config mapping; the reward model only scores the finished outputs."""

    method = "sss"

    def __init__(self, model: Any, reward: Any, draft: Any = "tiny-draft", beta: float = 1.0, *,
                 draft_ref: Any = None, **kwargs: Any):
        self._draft = self._resolve(model, draft)
        self._draft_ref = self._resolve(model, draft_ref) if draft_ref is not None else None
        super().__init__(model, reward, beta, **kwargs)
        # what the run name hashes: the spec as given, or what a loaded generator says about itself
        for key, spec, value in (("draft", draft, self._draft), ("draft_ref", draft_ref, self._draft_ref)):
            self.method_cfg[key] = (dict(spec) if isinstance(spec, Mapping) else spec if isinstance(spec, str)
                                    else None if value is None else
                                    {"name": getattr(value, "name", None), "path": str(getattr(value, "path", None)),
                                     "n_params": int(getattr(value, "n_params", 0))})

    @staticmethod
    def _resolve(model: Any, spec: Any) -> Any:
        if hasattr(spec, "sample"):
            return spec
        if getattr(model, "name", None) == "toy":
            from qalign_repro.methods.sss import build_like

            if not isinstance(spec, Mapping):
                raise ConfigError("SSS on the toy model: give the draft as a ToyGenerator or a toy config "
                                  f"mapping such as {{'seed': 5}}, not {spec!r}")
            return build_like(model, spec)
        return load_model(spec, backend=getattr(model, "name", None), device=str(getattr(model, "device", "auto")))

    def _method(self) -> Any:
        # cast: the registry is typed by the base class; the "sss" entry takes the drafts
        sss = cast("type[SSSMethod]", METHODS.get(self.method))
        return sss(self.method_cfg, draft=self._draft, draft_ref=self._draft_ref)


__all__ = ["Ancestral", "CARDS", "QAlign", "SSS", "Sampler", "as_messages", "load_model", "load_reward", "load_task"]
