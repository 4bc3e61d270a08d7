"""``python -m qalign_repro.plan experiment=general``: what a recipe will cost, before it touches a GPU.

For every stage of the recipe (calibration, then each job x dataset of ``recipe``; or just the configured run
when the config has no ``recipe``) the plan prints the generate / RM calls, the expected policy and RM tokens,
FLOPs (2 · parameters · tokens, as flops.py measures them afterwards) and GPU-hours at the throughputs in
``plan.*``.

Where the numbers come from (each row says which):
* prompts: the Task classes select exactly the docs the run will use; prompt lengths are measured with the
  model's real tokenizer and chat template when it can be loaded (local folder, shipped asset or the HF
  cache / hub), else estimated as 4 characters per token + 32 template tokens.
* completion length L (policy tokens, EOS included): ``plan.measure=runs`` (default) takes the mean length of
  the independent samples stored by runs of the same model on the same dataset (every output of an ancestral
  run, the first of any other; a smoke run is the cheapest way to get them); ``plan.measure=pilot`` samples ``plan.pilot_samples`` completions for ``plan.pilot_prompts`` prompts
  with the configured backend (loads the policy: do it on the machine that will run); otherwise the
  ``plan.completion_tokens`` estimate (a number, or a map per dataset with a ``default``).
* per-output token counts follow the run stage's accounting (methods/*.py):
    ancestral sample:   generated L, prefilled P, cached P (after the first sample), RM R
    QAlign step k > 0:  generated S, prefilled P + C, cached = prefilled, RM R - L + C + S
  where P = prompt tokens, R = RM tokens of (prompt, completion), C = E[i] the mean cut position and S the mean
  regenerated suffix (``methods/qalign.py:suffix_model``). For a completion of exactly L tokens S = (L+1)/2:
  the paper's "≈ L/2 new tokens per step" (Appendix D); with measured lengths S comes from their distribution
  (a model that stops at random regenerates more than half after a cut). Each method declares its own model
  (``Method.expected_tokens``, ``request_lengths``); the plan names no method.
* calibration: an upper bound from ``calibrate.*`` (all iterations used).

Options (``plan.*``; each may be given on the command line even when the experiment has no ``plan`` section):
``tokens_per_s`` (policy decode), ``prefill_tokens_per_s``, ``rm_tokens_per_s`` (per GPU), ``measure``,
``completion_tokens``, ``pilot_prompts``, ``pilot_samples``, ``output`` (also write the table as CSV).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from qalign_repro.config import plain_dict
from qalign_repro.errors import ConfigError, DataError
from qalign_repro.stages.overrides import recipe_stages, split_overrides

PLAN_DEFAULTS: dict[str, Any] = {
    "measure": "runs",              # runs | pilot | none
    "completion_tokens": {"default": 256},
    "pilot_prompts": 8,
    "pilot_samples": 4,
    "tokens_per_s": 2500.0,
    "prefill_tokens_per_s": 25000.0,
    "rm_tokens_per_s": 25000.0,
    # share of the decode throughput an async run keeps (measured on vLLM by `make bench-cost`, docs/performance.md)
    "async_occupancy": 0.9,
    "output": None,
    "max_measured_prompts": 5000,   # tokenise at most this many prompts per stage (a seeded subset beyond)
}
#: prompts per benchmark when the docs cannot be loaded (offline hub dataset) and dataset.n is null
KNOWN_SIZES = {"gsm8k": 1319, "math500": 500, "ifeval": 541, "mmlu_redux": 5330, "truthfulqa": 817,
               "gsm_symbolic": 5000, "gsm_symbolic_p1": 5000, "gsm_symbolic_p2": 2500}
CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS = 32


# -- expected token counts (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lengths:
    """Mean sizes per prompt for one stage, and where they came from."""

    n_prompts: int
    prompt_tokens: float          # P: policy prompt tokens (chat template included)
    completion_tokens: float      # L: expected completion tokens (EOS included)
    rm_tokens: float              # R: RM tokens of one (prompt, completion) conversation
    source: str
    #: measured completion lengths (independent samples), when there are any: the QAlign suffix model uses
    #: their distribution instead of assuming every completion has exactly L tokens
    length_samples: tuple[int, ...] = ()
    #: (figure, why) for each figure that is an estimate rather than measured: "prompts", "P", "L"
    estimates: tuple[tuple[str, str], ...] = ()


def _func_of(method: Any) -> Any:
    """The function behind a (bound) classmethod: identity of it tells a method's own cost model from the
    inherited ``Method.expected_tokens`` (typed as a plain callable, which has no ``__func__``)."""
    return method.__func__


def expected_tokens(method: str, steps: int, lengths: Lengths) -> dict[str, float]:
    """Total tokens of a run of ``steps`` outputs per prompt: the method's own cost model
    (``Method.expected_tokens``, which mirrors what its run stores), or a one-line ConfigError without one."""
    from qalign_repro.methods import METHODS, Method
    from qalign_repro.registry import UnknownNameError

    try:
        tokens = METHODS.get(method).expected_tokens(steps, lengths)
    except UnknownNameError:
        tokens = None
    if tokens is None:
        base = _func_of(Method.expected_tokens)
        priced = [m for m in METHODS.names() if _func_of(METHODS.get(m).expected_tokens) is not base]
        raise ConfigError(f"the plan has no cost model for method={method}; allowed: {', '.join(priced)}")
    return tokens


def calibration_tokens(cal: Mapping[str, Any], lengths: Lengths, method: str | None = None
                       ) -> tuple[dict[str, float], int]:
    """Upper bound of the calibration stage (calibrate.py): one ancestral step and ``pair_draws`` proposals,
    then at most ``iterations`` fresh chains of ``steps`` states, all of ``method`` (default: the method whose
    β calibrate.py tunes, its ``CALIBRATED_METHOD``). Returns the tokens and the number of generate steps
    (each one batched generate call and one RM call per batch of prompts)."""
    method = method or calibrated_method()
    pair = expected_tokens(method, 1 + int(cal.get("pair_draws", 4)), lengths)
    chains = expected_tokens(method, int(cal.get("steps", 8)), lengths)
    iters = int(cal.get("iterations", 8))
    total = {k: pair[k] + iters * chains[k] for k in pair}
    return total, 1 + int(cal.get("pair_draws", 4)) + iters * int(cal.get("steps", 8))


def calibrated_method() -> str:
    """The registered name of the method calibrate.py runs (its chains are what the calibration stage costs)."""
    from qalign_repro.stages.calibrate import CALIBRATED_METHOD

    return CALIBRATED_METHOD.name


# -- measuring lengths -------------------------------------------------------------------------------------------
#: tokenizers by (path, trust_remote_code): a recipe's stages share two or three models, each loaded once
_TOKENIZERS: dict[tuple[str, bool], tuple[Any | None, str]] = {}


def _load_tokenizer(cfg_node: Mapping[str, Any], what: str) -> tuple[Any | None, str]:
    """The real tokenizer of a model/RM config node, or None with the reason it could not be had."""
    if cfg_node.get("path") is None and not cfg_node.get("asset"):
        return None, f"{what} has no path"
    try:
        from qalign_repro.models.folders import resolve_model_path

        path = resolve_model_path(cfg_node, what)
    except Exception as exc:  # noqa: BLE001 - a broken local folder: the plan falls back to an estimate
        return None, f"{what} tokenizer unavailable ({type(exc).__name__})"
    trust = bool(cfg_node.get("trust_remote_code", False))
    if (path, trust) not in _TOKENIZERS:
        _TOKENIZERS[path, trust] = _fetch_tokenizer(path, trust)
    tok, note = _TOKENIZERS[path, trust]
    return tok, f"{what} {note}"


def _fetch_tokenizer(path: str, trust: bool) -> tuple[Any | None, str]:
    from qalign_repro.models.hub import offline_reason

    offline = None if Path(path).is_dir() else offline_reason()  # a hub id: decide offline once, then fail fast
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: the plan falls back to an estimate
        if offline:
            return None, "tokenizer not in the local HF cache (hub offline)"
        return None, f"tokenizer unavailable ({type(exc).__name__})"
    if not getattr(tok, "chat_template", None):
        return None, "tokenizer has no chat template"
    return tok, "tokenizer"


def _chat_len(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> int:
    from qalign_repro.models.hf_format import render_chat

    return len(tok.encode(render_chat(tok, messages, generation_prompt), add_special_tokens=False))


def _estimate_len(messages: list[dict[str, str]]) -> float:
    return sum(len(m.get("content", "")) for m in messages) / CHARS_PER_TOKEN + TEMPLATE_TOKENS


def _stage_docs(cfg: DictConfig) -> tuple[Any | None, list[dict] | None, str]:
    from qalign_repro.models.hub import offline_reason
    from qalign_repro.tasks import get_task

    offline = offline_reason() if cfg.dataset.get("source") == "hub" else None
    try:
        task = get_task(plain_dict(cfg.dataset))
        return task, task.docs(), "docs"
    except Exception as exc:  # noqa: BLE001 - hub dataset offline: fall back to sizes
        if offline:
            hub = cfg.dataset.get("hub") or {}
            return None, None, f"hub dataset {hub.get('id')} not in the local HF cache (hub offline)"
        return None, None, f"docs unavailable ({type(exc).__name__}: {str(exc)[:80]})"


def _completion_estimate(plan: Mapping[str, Any], dataset: str) -> float:
    value = plan.get("completion_tokens")
    if isinstance(value, Mapping):
        value = value.get(dataset, value.get("default", PLAN_DEFAULTS["completion_tokens"]["default"]))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"plan.completion_tokens={value!r} is invalid; allowed: a number > 0 or a map per dataset")
    return float(value)


def measured_from_runs(root: str | Path, model: str, dataset: str, limit: int = 4000
                       ) -> tuple[list[int], float] | None:
    """Completion lengths and the mean RM tokens of independent samples stored by runs of ``model`` on
    ``dataset`` (every output of a run whose method declares ``model_samples``, e.g. ancestral sampling; the
    first output of any other run), or None."""
    from qalign_repro.store.storage import RunStore, list_runs

    lens, scored = [], []
    for name in list_runs(root):
        store = RunStore(root, name, readonly=True)
        try:
            meta = store.meta
            if meta.get("dataset") != dataset or (meta.get("model") or {}).get("name") != model:
                continue
            independent = _model_samples(meta.get("method"))
            for inst in store.iter_instances():
                for out in inst["outputs"] if independent else inst["outputs"][:1]:
                    lens.append(len(out["completion_ids"]))
                    scored.append(int(out.get("tokens_scored") or 0))
                if len(lens) >= limit:
                    break
        finally:
            store.close()
        if len(lens) >= limit:
            break
    if not lens:
        return None
    return lens, sum(scored) / len(scored)


def _model_samples(method: Any) -> bool:
    """Whether every output of a run of ``method`` is an independent sample of the model (its declaration)."""
    from qalign_repro.methods import METHODS
    from qalign_repro.registry import UnknownNameError

    try:
        return bool(METHODS.get(str(method)).model_samples)
    except UnknownNameError:  # a run of a method this install does not have: its first output, like any other
        return False


def _pilot(cfg: DictConfig, plan: Mapping[str, Any], prompts: list[list[int]], messages: list[list[dict]],
           rm_tok: Any | None) -> tuple[list[int], float | None]:
    """Sample a few completions with the configured backend (seeds disjoint from any run's)."""
    from qalign_repro.lm import GENERATORS
    from qalign_repro.methods.base import derive_seed

    gen = GENERATORS.get(str(cfg.backend.generator))(plain_dict(cfg.model), plain_dict(cfg.backend))
    k_prompts = min(int(plan["pilot_prompts"]), len(prompts))
    reps = int(plan["pilot_samples"])
    ids = [prompts[j] for j in range(k_prompts) for _ in range(reps)]
    seeds = [derive_seed(int(cfg.seed) + 1_000_003, f"plan-pilot:{j}", r) for j in range(k_prompts) for r in range(reps)]
    # independent samples in bulk, through the step driver's engine layer (continuous where the backend is)
    from qalign_repro.lm.engine import Request, engine_for

    engine = engine_for(gen, int(cfg.batch_size), float(cfg.temperature), continuous=True)
    for j, (p, s) in enumerate(zip(ids, seeds)):
        engine.submit(Request(key=j, prompt_ids=p, max_tokens=int(cfg.max_new_tokens), seed=s))
    finished: dict[Hashable, Any] = {}
    while engine.in_flight():
        finished.update(engine.wait())
    engine.close()
    comps = [finished[j] for j in range(len(ids))]
    lens = [len(c.token_ids) for c in comps]
    rm = None
    if rm_tok is not None:
        from qalign_repro.models.hf_format import conversation

        convs = [conversation(messages[j], c.text) for j, c in zip([j for j in range(k_prompts) for _ in range(reps)], comps)]
        rm = sum(_chat_len(rm_tok, m, False) for m in convs) / len(convs)
    return lens, rm


def measure_lengths(cfg: DictConfig, plan: Mapping[str, Any], n_override: int | None = None) -> Lengths:
    """Prompt, completion and RM lengths for the stage ``cfg`` (see the module docstring for the sources)."""
    dataset = str(cfg.dataset.name)
    task, docs, doc_note = _stage_docs(cfg)
    notes = []
    estimates: list[tuple[str, str]] = []
    if docs is not None:
        if n_override is not None:
            docs = docs[:n_override]
        n = len(docs)
    else:
        n = int(n_override or cfg.dataset.get("n") or KNOWN_SIZES.get(dataset, 0))
        notes.append(f"{doc_note}; {n} prompts assumed")
        estimates.append(("prompts", doc_note))
        if n <= 0:
            raise DataError(f"the plan cannot size dataset {dataset!r}: its docs cannot be loaded and dataset.n is null")
    model_cfg = plain_dict(cfg.model)
    reward_cfg = plain_dict(cfg.reward)
    tok, tok_note = _load_tokenizer(model_cfg, "model") if docs is not None else (None, "")
    rm_tok, rm_note = _load_tokenizer(reward_cfg, "reward") if docs is not None else (None, "")
    sample = docs or []
    limit = int(plan["max_measured_prompts"])
    if len(sample) > limit:
        step = len(sample) / limit
        sample = [sample[int(i * step)] for i in range(limit)]
    messages = [task.prompt(d) for d in sample] if task is not None else []
    if tok is not None and messages:
        prompt_ids = [tok.encode(_render(tok, m, True), add_special_tokens=False) for m in messages]
        p = sum(len(x) for x in prompt_ids) / len(prompt_ids)
        notes.append(f"P: {tok_note}")
        limit_ctx = model_cfg.get("max_context")
        if limit_ctx:  # the run stage refuses these prompts: better to learn it here than hours into a run
            over = sum(len(x) + int(cfg.max_new_tokens) > int(limit_ctx) for x in prompt_ids)
            if over:
                notes.append(f"WARNING: {over} prompt(s) + max_new_tokens={cfg.max_new_tokens} exceed "
                             f"model.max_context={limit_ctx}; the run would stop on them")
        cap = model_cfg.get("max_prompt_tokens")
        if cap and max(len(x) for x in prompt_ids) > int(cap):
            notes.append(f"longest prompt {max(len(x) for x in prompt_ids)} > model.max_prompt_tokens={cap}")
    else:
        prompt_ids = []
        p = (sum(_estimate_len(m) for m in messages) / len(messages)) if messages else 200.0
        notes.append(f"P: estimate ({tok_note or doc_note})" if messages else "P: estimate 200 (no docs)")
        estimates.append(("P", (tok_note or doc_note) if messages else doc_note))
    if rm_tok is not None and messages:
        rm_prompt = sum(_chat_len(rm_tok, _conv(m, ""), False) for m in messages) / len(messages)
    else:
        rm_prompt = p + 8

    source = str(plan["measure"])
    samples: list[int] = []
    rm_tokens: float | None = None
    if source == "runs":
        found = measured_from_runs(cfg.output_root, str(cfg.model.name), dataset)
        if found is not None:
            samples, rm_tokens = found
            notes.append(f"L: {len(samples)} stored outputs")
    elif source == "pilot":
        if tok is None or not prompt_ids:
            raise ConfigError(f"plan.measure=pilot needs the model's tokenizer and the docs ({tok_note or doc_note})")
        samples, rm_tokens = _pilot(cfg, plan, prompt_ids, messages, rm_tok)
        notes.append(f"L: pilot of {len(samples)} samples")
    elif source != "none":
        raise ConfigError(f"plan.measure={source} is invalid; allowed: runs, pilot, none")
    if samples:
        length = sum(samples) / len(samples)
    else:
        length = _completion_estimate(plan, dataset)
        notes.append(f"L: estimate {length:g}")
        estimates.append(("L", "no stored runs of the model on the dataset" if source == "runs"
                          else f"plan.measure={source}"))
    if not rm_tokens:
        rm_tokens = rm_prompt + length
    return Lengths(n_prompts=n, prompt_tokens=p, completion_tokens=length, rm_tokens=rm_tokens,
                   source="; ".join(notes), length_samples=tuple(samples), estimates=tuple(estimates))


def _render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    from qalign_repro.models.hf_format import render_chat

    return render_chat(tok, messages, generation_prompt)


def _conv(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    return [*messages, {"role": "assistant", "content": text}]


# -- stages (their override lists come from stages/overrides.py, shared with the recipe) ---------------------------
def plan_options(cfg: DictConfig, own: Sequence[str]) -> dict[str, Any]:
    """``plan.*`` from the code defaults, the config's ``plan`` section and the command line, validated."""
    opts = plain_dict(OmegaConf.merge(
        OmegaConf.create(PLAN_DEFAULTS), cfg.get("plan") or {},
        OmegaConf.from_dotlist([o.lstrip("+")[len("plan."):] for o in own])))
    unknown = sorted(set(opts) - set(PLAN_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown plan option(s) {unknown}; allowed: {', '.join(sorted(PLAN_DEFAULTS))}")
    if opts["measure"] not in ("runs", "pilot", "none"):
        raise ConfigError(f"plan.measure={opts['measure']} is invalid; allowed: runs, pilot, none")
    for key in ("tokens_per_s", "prefill_tokens_per_s", "rm_tokens_per_s", "pilot_prompts", "pilot_samples",
                "max_measured_prompts"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"plan.{key}={value!r} is invalid; allowed: a number > 0")
    occ = opts["async_occupancy"]
    if isinstance(occ, bool) or not isinstance(occ, (int, float)) or not 0 < occ <= 1:
        raise ConfigError(f"plan.async_occupancy={occ!r} is invalid; allowed: a number in (0, 1]")
    return opts


def expected_max(samples: Sequence[float], batch: int) -> float:
    """E[max of ``batch`` draws with replacement] from an empirical distribution (closed form over its CDF)."""
    xs = sorted(float(x) for x in samples)
    k = len(xs)
    return sum(x * ((j / k) ** batch - ((j - 1) / k) ** batch) for j, x in enumerate(xs, start=1))


def occupancy(method: str, schedule: str, lengths: Lengths, batch: int, max_new: int, continuous: bool,
              opts: Mapping[str, Any]) -> tuple[float, str]:
    """The share of the engine's decode throughput a stage gets, and why.

    Lock-step (and bulk submission on an engine without continuous batching, e.g. hf): a call of ``batch``
    sequences lasts as long as its longest, so the engine does mean/E[max] of the work it could: computed from the
    measured length distribution (QAlign: the regenerated suffixes), else L / max_new_tokens (some sequence of a
    large batch runs to the limit). Async on an engine that batches continuously (vLLM, servers): every live chain
    keeps a request in the engine, ``plan.async_occupancy`` (measured by ``make bench-cost``). What one request
    makes is the method's ``request_lengths`` (QAlign: a regenerated suffix; else a whole completion)."""
    if schedule == "async" and continuous:
        return float(opts["async_occupancy"]), "async, continuous batching (plan.async_occupancy)"
    if lengths.length_samples:
        from qalign_repro.methods import METHODS

        draws = METHODS.get(method).request_lengths(lengths)
        mean = sum(draws) / len(draws)
        return min(1.0, mean / max(expected_max(draws, batch), 1e-9)), f"lock-step, mean/E[max] of {batch}"
    return min(1.0, lengths.completion_tokens / max(max_new, 1)), "lock-step, L / max_new_tokens"


def _gpu_hours(tokens: Mapping[str, float], opts: Mapping[str, Any], cached_prefill: bool,
               occupied: float = 1.0) -> float:
    prefill = tokens["tokens_prefilled"] - (tokens["tokens_cached"] if cached_prefill else 0.0)
    seconds = (tokens["tokens_generated"] / (float(opts["tokens_per_s"]) * max(occupied, 1e-3))
               + prefill / float(opts["prefill_tokens_per_s"])
               + tokens["tokens_scored"] / float(opts["rm_tokens_per_s"]))
    return seconds / 3600.0


def n_params(node: Mapping[str, Any], what: str) -> float:
    """Parameter count for FLOPs: ``n_params_plan`` (or ``n_params``) from the config, else counted from a local
    config.json (shipped assets, local folders)."""
    for key in ("n_params_plan", "n_params"):
        if node.get(key):
            return float(node[key])
    from qalign_repro.analysis.flops import params_from_hf_config
    from qalign_repro.models.folders import resolve_model_path

    try:
        path = Path(resolve_model_path(node, what))
        return float(params_from_hf_config(path / "config.json")["total"])
    except Exception:  # noqa: BLE001 - unknown size: FLOPs are left empty, tokens still reported
        return math.nan


def params_estimate(node: Mapping[str, Any]) -> str | None:
    """Why ``n_params`` of this model is not counted from its weights, or None when it is."""
    for key in ("n_params_plan", "n_params"):
        if node.get(key):
            from qalign_repro.models.hub import offline_reason

            path = node.get("path")
            local = path is None or Path(str(path)).expanduser().is_dir()
            offline = None if local else offline_reason()
            return f"the configs' {key}, not the weights" + (" (hub offline)" if offline else "")
    return None if math.isfinite(n_params(node, "model")) else "unknown: FLOPs left empty"


def build_plan(cfg: DictConfig, overrides: Sequence[str] = (), own: Sequence[str] = ()) -> tuple[pd.DataFrame, dict]:
    """The plan table (one row per stage plus a total) and the options it used."""
    from qalign_repro.cli import compose_config

    opts = plan_options(cfg, own)
    backend = str((cfg.get("recipe") or {}).get("backend") or cfg.backend.name)
    cached_prefill = backend == "vllm"
    rows = []
    estimates: list[tuple[str, str]] = []  # (figure, why) of every stage: render() sums them up in one line
    for st in recipe_stages(cfg, overrides):
        scfg = compose_config(list(st.overrides))
        batch = int(scfg.batch_size)
        if st.stage == "calibrate":
            cal = plain_dict(scfg.calibrate)
            if cal.get("split"):  # calibrate.py reads this split of the configured dataset
                OmegaConf.update(scfg, "dataset.split", str(cal["split"]))
            lengths = measure_lengths(scfg, opts, n_override=int(cal.get("prompts", 16)))
            method = calibrated_method()
            tokens, steps = calibration_tokens(cal, lengths, method)
        else:
            lengths = measure_lengths(scfg, opts)
            method = str(scfg.method.name)
            steps = int(scfg.steps)
            tokens = expected_tokens(method, steps, lengths)
        p_pol, p_rm = n_params(scfg.model, "model"), n_params(scfg.reward, "reward")
        estimates.extend(lengths.estimates)
        estimates.extend(("params", why) for node in (scfg.model, scfg.reward)
                         if (why := params_estimate(node)) is not None)
        sched = str(scfg.get("schedule", "auto"))
        from qalign_repro.methods import METHODS

        per_request = METHODS.get(method).per_request
        mode = "async" if sched == "async" or (sched == "auto" and per_request) else "lockstep"
        continuous = str(scfg.backend.generator) in ("vllm", "openai")
        occupied, occ_why = occupancy(method, mode, lengths, min(batch, max(lengths.n_prompts, 1)),
                                      int(scfg.max_new_tokens), continuous, opts)
        calls = steps * math.ceil(lengths.n_prompts / batch)
        flops_pol = 2 * p_pol * (tokens["tokens_prefilled"] + tokens["tokens_generated"])
        flops_pol_cached = flops_pol - 2 * p_pol * tokens["tokens_cached"]
        flops_rm = 2 * p_rm * tokens["tokens_scored"]
        rows.append({
            "stage": st.stage, "label": st.label, "dataset": str(scfg.dataset.name), "method": method,
            "model": str(scfg.model.name), "reward": str(scfg.reward.name), "prompts": lengths.n_prompts,
            "steps": steps, "generate_calls": calls, "rm_calls": calls, "sequences": lengths.n_prompts * steps,
            "prompt_tokens": lengths.prompt_tokens, "completion_tokens": lengths.completion_tokens,
            **tokens,
            "flops_policy": flops_pol, "flops_policy_cached": flops_pol_cached, "flops_rm": flops_rm,
            "flops": flops_pol + flops_rm, "gpu_hours": _gpu_hours(tokens, opts, cached_prefill, occupied),
            "schedule": mode, "occupancy": occupied, "occupancy_source": occ_why,
            "source": lengths.source,
        })
    table = pd.DataFrame(rows)
    total = {c: table[c].sum() for c in ("generate_calls", "rm_calls", "sequences", "tokens_generated",
                                         "tokens_prefilled", "tokens_cached", "tokens_scored", "flops_policy",
                                         "flops_policy_cached", "flops_rm", "flops", "gpu_hours")}
    table = pd.concat([table, pd.DataFrame([{"stage": "total", "label": "", **total}])], ignore_index=True)
    opts["cached_prefill"] = cached_prefill
    opts["backend"] = backend
    opts["estimates"] = estimates
    return table, opts


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "sci":
        return f"{float(value):.3g}"
    if kind == "int":
        return f"{int(round(float(value))):,}"
    if kind == "f1":
        return f"{float(value):.1f}"
    return str(value)


def render(table: pd.DataFrame, opts: Mapping[str, Any]) -> str:
    """Markdown for people: tokens and FLOPs in scientific notation, then the assumptions."""
    view = pd.DataFrame({
        "stage": table["stage"], "job": table["label"], "dataset": table.get("dataset"),
        "model": table.get("model"), "prompts": table.get("prompts").map(lambda v: _fmt(v, "int")),
        "steps": table.get("steps").map(lambda v: _fmt(v, "int")),
        "gen calls": table["generate_calls"].map(lambda v: _fmt(v, "int")),
        "RM calls": table["rm_calls"].map(lambda v: _fmt(v, "int")),
        "P": table.get("prompt_tokens").map(lambda v: _fmt(v, "f1")),
        "L": table.get("completion_tokens").map(lambda v: _fmt(v, "f1")),
        "generated": table["tokens_generated"].map(lambda v: _fmt(v, "sci")),
        "prefilled": table["tokens_prefilled"].map(lambda v: _fmt(v, "sci")),
        "RM tokens": table["tokens_scored"].map(lambda v: _fmt(v, "sci")),
        "FLOPs": table["flops"].map(lambda v: _fmt(v, "sci")),
        "FLOPs (prefix cache)": (table["flops_policy_cached"] + table["flops_rm"]).map(lambda v: _fmt(v, "sci")),
        "occupancy": table.get("occupancy").map(lambda v: "" if pd.isna(v) else f"{float(v):.2f}"),
        "GPU-h": table["gpu_hours"].map(lambda v: f"{float(v):.2f}"),
    }).fillna("")
    lines = [view.to_markdown(index=False), ""]
    lines.append(f"GPU-hours at {float(opts['tokens_per_s']):g} decode, {float(opts['prefill_tokens_per_s']):g} prefill "
                 f"and {float(opts['rm_tokens_per_s']):g} RM tokens/s per GPU (plan.tokens_per_s, "
                 "plan.prefill_tokens_per_s, plan.rm_tokens_per_s); prompt prefill "
                 + ("served from the prefix cache after the first step (vLLM)." if opts.get("cached_prefill")
                    else "recomputed every step (no prefix cache with this backend)."))
    lines.append("Decode time = generated tokens / (plan.tokens_per_s x occupancy): lock-step calls last as long as their "
                 "longest sequence (occupancy = mean / expected longest of a batch, from the length distribution); "
                 "async runs on vLLM or a server keep every chain's request in the engine "
                 f"(plan.async_occupancy={float(opts['async_occupancy']):g}).")
    lines.append("QAlign steps regenerate the suffix after a uniform cut: (L+1)/2 tokens for a fixed length L (paper, "
                 "Appendix D: ≈ L/2), from the measured length distribution when there is one. The calibration row "
                 "is an upper bound. FLOPs = 2 · parameters · tokens (policy prefill + decode, RM scoring).")
    lines.append("Where P (prompt tokens) and L (completion tokens) come from:")
    for _, row in table[table["stage"] != "total"].iterrows():
        lines.append(f"  - {row['stage']} {row['label']} / {row['dataset']}: {row['source']}")
    lines.append(estimates_line(opts.get("estimates") or [], int((table["stage"] != "total").sum())))
    return "\n".join(lines)


#: what an estimated figure is replaced by
_ESTIMATED = {"prompts": "prompt counts (dataset.n or the benchmark's known size)",
              "P": f"P ({CHARS_PER_TOKEN:g} characters per token + {TEMPLATE_TOKENS} template tokens)",
              "L": "L (plan.completion_tokens)", "params": "parameter counts"}


def estimates_line(estimates: Sequence[tuple[str, str]], n_stages: int) -> str:
    """One line naming every estimated figure, in how many stages, and why (a reader must know which numbers
    to distrust before booking GPU-hours on them)."""
    if not estimates:
        return "Estimates: none; every figure comes from the tokenizers, the docs, stored runs or the weights."
    whys: dict[str, dict[str, int]] = {}
    for figure, why in estimates:
        counts = whys.setdefault(figure, {})
        counts[why] = counts.get(why, 0) + 1
    parts = []
    for figure, counts in whys.items():
        stages = max(counts.values()) if figure == "params" else sum(counts.values())
        where = "" if figure == "params" else f" in {min(stages, n_stages)} of {n_stages} stages"
        parts.append(f"{_ESTIMATED.get(figure, figure)}{where} ({'; '.join(counts)})")
    from qalign_repro.models.hub import known_offline_reason

    offline = known_offline_reason()
    return "Estimates: " + "; ".join(parts) + (f"; the hub is offline: {offline}" if offline else "") + "."


def main(argv: list[str] | None = None) -> None:
    """Print the cost plan of the composed config (a recipe when it has a ``recipe`` section)."""
    from qalign_repro.cli import compose_config

    args = list(sys.argv[1:] if argv is None else argv)
    overrides, own = split_overrides(args)
    try:
        cfg = compose_config(overrides)
        table, opts = build_plan(cfg, overrides, own)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"cost plan: experiment {cfg.experiment_name} (nothing is run)\n")
    print(render(table, opts))
    if opts.get("output"):
        out = Path(str(opts["output"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        print(f"\nplan table written to {out}")


if __name__ == "__main__":
    main()
