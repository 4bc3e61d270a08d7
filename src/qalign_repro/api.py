"""In-process Python API: the test-time methods without Hydra or the command line.

    from qalign_repro import QAlign, CARDS, SSS, load_model, load_reward

    model = load_model("tiny")            # conf/model/tiny.yaml; or a shipped asset, a folder or a hub id
    reward = load_reward("tiny")
    records = QAlign(model, reward, beta=1.0).run(["Ann has 3 apples. She buys 2 more. How many?"], steps=8)
    records[0][-1]["text"]                # prompt 0: the chain state after the last step

    CARDS(model, reward, beta=1.0, reward_threshold=0.5).run(prompts, steps=4)   # 4 CARDS samples per prompt
    SSS(model, reward, draft="tiny-draft").run(prompts, steps=4)                  # 4 SSS samples per prompt

``run`` returns, per prompt, the list of outputs in the stored schema (``methods.base.output_record`` plus
each method's extra fields) - the same records ``python -m qalign_repro.run`` stores. With ``output_root``
they are also stored in a run store (``storage.RunStore``) step by step, and a second call with the same
settings resumes or extends that run instead of starting over.

Nothing here samples by itself: a sampler builds the same ``RunContext`` as the run stage and calls the
registered method's ``step`` for k = 0, 1, ..., so the API and the CLI produce identical outputs for the
same model, prompt ids, seed and settings. Prompts are strings (one user turn) or chat message lists; prompt
``i`` gets the id ``str(i)`` unless ``prompt_ids`` names them, and all randomness derives from
``(seed, prompt id, step)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from qalign_repro.cli import CONF_DIR
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.methods import METHODS
from qalign_repro.methods.base import Chain, RunContext

Messages = list[dict[str, str]]
Prompt = str | Sequence[Mapping[str, str]]


# -- models -------------------------------------------------------------------------------------------------
def _model_config(group: str, name: str | Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A model config from a conf group entry, a shipped asset, a mapping, or a folder / hub id."""
    from qalign_repro.tiny import assets_dir

    if isinstance(name, Mapping):
        cfg = dict(name)
    elif (CONF_DIR / group / f"{name}.yaml").is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), resolve=True)
    elif assets_dir(str(name)).is_dir():
        cfg = {"name": str(name), "path": None, "asset": str(name)}
    else:
        cfg = {"name": Path(str(name)).name or str(name), "path": str(name)}
    return {**cfg, **overrides}


def _backend_for(cfg: Mapping[str, Any], backend: str | None) -> str:
    return backend or ("toy" if cfg.get("name") == "toy" else "hf")


def load_model(name: str | Mapping[str, Any] = "tiny", *, backend: str | None = None, device: str = "auto",
               **overrides: Any) -> Any:
    """Load a generator: ``name`` is a ``conf/model`` entry (``tiny``, ``toy``), a shipped asset
    (``tiny-draft``), a model folder, a hub id or a config mapping; ``backend`` defaults to ``toy`` for the
    toy model and ``hf`` otherwise; keyword overrides go into the model config (``dtype=...``)."""
    from qalign_repro.lm import GENERATORS

    cfg = _model_config("model", name, overrides)
    return GENERATORS.get(_backend_for(cfg, backend))(cfg, {"device": device})


def load_reward(name: str | Mapping[str, Any] = "tiny", *, backend: str | None = None, device: str = "auto",
                **overrides: Any) -> Any:
    """Load a reward model, resolved like ``load_model`` (``conf/reward`` entries: ``tiny``, ``toy``)."""
    from qalign_repro.rm import REWARDS

    cfg = _model_config("reward", name, overrides)
    return REWARDS.get(_backend_for(cfg, backend))(cfg, {"device": device})


# -- prompts ------------------------------------------------------------------------------------------------
def as_messages(prompt: Prompt) -> Messages:
    """A string is one user turn; a message list must be ``[{"role": ..., "content": ...}, ...]``."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    msgs = [dict(m) for m in prompt] if isinstance(prompt, Sequence) else None
    if not msgs or not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise ConfigError(f"prompt {prompt!r:.80} is neither a string nor a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _method_defaults(method: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"), resolve=True)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


# -- samplers -----------------------------------------------------------------------------------------------
class Sampler:
    """A registered method bound to a model, a reward model and the run-level settings."""

    method: ClassVar[str] = ""

    def __init__(self, model: Any, reward: Any, beta: float = 1.0, *, max_new_tokens: int | None = None,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 64, allow_inexact: bool = False,
                 **method_cfg: Any):
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
        if self.method == "qalign" and float(temperature) != 1.0 and not allow_inexact:
            raise ConfigError("temperature != 1 breaks QAlign's exactness; allowed: 1.0, or allow_inexact=True")
        if self.max_new_tokens < 1 or int(batch_size) < 1 or int(seed) < 0:
            raise ConfigError("max_new_tokens and batch_size must be >= 1 and seed >= 0")
        self.model, self.reward = model, reward
        self.beta, self.temperature, self.seed, self.batch_size = float(beta), float(temperature), int(seed), int(batch_size)
        self.method_cfg = {**defaults, **method_cfg}
        self.store = None  # the RunStore of the last ``run`` with an output_root

    def _method(self) -> Any:
        return METHODS.get(self.method)(self.method_cfg)

    def _settings(self) -> dict[str, Any]:
        """Everything that changes what is generated (the run name hashes it)."""
        return {"method": self.method_cfg, "beta": self.beta, "seed": self.seed, "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens,
                "model": {"name": getattr(self.model, "name", None), "path": str(getattr(self.model, "path", None))},
                "reward": {"name": getattr(self.reward, "name", None), "path": str(getattr(self.reward, "path", None))}}

    def run(self, prompts: Sequence[Prompt], steps: int = 1, *, prompt_ids: Sequence[str] | None = None,
            output_root: str | Path | None = None, run_name: str | None = None,
            progress: bool = False) -> list[list[dict[str, Any]]]:
        """Outputs 0..steps-1 for every prompt (QAlign: the chain states; the others: independent samples)."""
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
            raise ConfigError("prompts must be a list of strings or of chat message lists")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r}; allowed: an integer >= 1")
        messages = [as_messages(p) for p in prompts]
        ids = [str(i) for i in range(len(messages))] if prompt_ids is None else [str(i) for i in prompt_ids]
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
        if output_root is None:
            records: list[list[dict[str, Any]]] = [[] for _ in chains]
            self._loop(method, ctx, chains, records, 0, steps, None, progress)
            return records
        return self._run_stored(method, ctx, chains, steps, Path(output_root), run_name, progress)

    def _run_stored(self, method: Any, ctx: RunContext, chains: list[Chain], steps: int, root: Path,
                    run_name: str | None, progress: bool) -> list[list[dict[str, Any]]]:
        from qalign_repro.provenance import environment_info
        from qalign_repro.storage import RunStore

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

    @staticmethod
    def _loop(method: Any, ctx: RunContext, chains: list[Chain], records: list[list[dict[str, Any]]], start: int,
              steps: int, store: Any, progress: bool) -> None:
        from tqdm.auto import tqdm

        for k in tqdm(range(start, steps), initial=start, total=steps, desc=method.name, disable=not progress):
            outputs = method.step(ctx, chains, k)
            if store is not None:
                store.commit_step(k, {c.idx: o for c, o in zip(chains, outputs)})
            for c, o in zip(chains, outputs):
                c.last = o
                records[c.idx].append(o)


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
        return METHODS.get(self.method)(self.method_cfg, draft=self._draft, draft_ref=self._draft_ref)


__all__ = ["Ancestral", "CARDS", "QAlign", "SSS", "Sampler", "as_messages", "load_model", "load_reward"]
