"""Generator on an OpenAI-compatible server (``backend.generator=openai``), e.g. ``make serve``'s vLLM server.

Each prompt is one ``POST {base_url}/completions`` request with the prompt as token ids, its own seed and its
own ``max_tokens`` (QAlign's suffix proposals have different budgets), plain-sampling parameters sent
explicitly (a server's defaults, e.g. from the model's generation_config, must not change the proposal), and
``return_token_ids`` so the completion comes back as ids (vLLM >= 0.10.2). Requests of one call run
concurrently on a thread pool.

Failures: connection errors, timeouts, 429 and 5xx answers are retried with exponential backoff (tenacity), one
visible line per retry round; after the last retry one line says what failed. A run commits each step
atomically, so what was stored before the failure stays and rerunning the same command resumes. Other 4xx
answers are not retried (they would fail again) and report the server's message.

The API key is read from the environment variable named by ``api_key_env`` when the backend is built; the
config holds only the variable's name, and the key never appears in messages or run metadata.

The HTTP pool and the start-up handshake (``HTTPSettings``, ``HTTPPool``, ``connect``) are shared with the reward
half, ``rm/openai.py``; this module imports httpx and tenacity only when a pool is built.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from qalign_repro.errors import BackendRequestError, BackendUnavailableError, ConfigError  # noqa: F401 (re-exported)
from qalign_repro.lm.base import GENERATORS, Completion, check_budget, unsupported
from qalign_repro.models import hf_format as hff
from qalign_repro.models.folders import resolve_model_path

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: the start-up probe's limit (seconds): a server that is up lists its models at once
PROBE_TIMEOUT_S = 10.0


class _Retryable(Exception):
    """Some requests of a batch failed in a way worth retrying."""

    def __init__(self, n_failed: int, n_total: int, last: str):
        super().__init__(f"{n_failed} of {n_total} requests failed ({last})")
        self.n_failed, self.n_total, self.last = n_failed, n_total, last


@dataclass
class HTTPSettings:
    base_url: str
    api_key_env: str | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    concurrency: int = 16

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], prefix: str = "") -> HTTPSettings:
        def get(key: str, default: Any) -> Any:
            value = cfg.get(prefix + key)
            if value is None:
                value = cfg.get(key)
            return default if value is None else value

        base = get("base_url", None)
        if not base:
            raise ConfigError(f"backend.{prefix}base_url is not set; allowed: http(s)://host:port[/v1]")
        s = cls(base_url=str(base).rstrip("/"), api_key_env=get("api_key_env", None),
                timeout_s=float(get("timeout_s", 120.0)), connect_timeout_s=float(get("connect_timeout_s", 5.0)),
                retries=int(get("retries", 5)), backoff_s=float(get("backoff_s", 1.0)),
                backoff_max_s=float(get("backoff_max_s", 30.0)), concurrency=int(get("concurrency", 16)))
        if s.retries < 0 or s.concurrency < 1 or s.timeout_s <= 0 or s.backoff_s < 0:
            raise ConfigError(f"backend retry settings invalid ({s.retries=}, {s.concurrency=}, {s.timeout_s=}, "
                              f"{s.backoff_s=}); allowed: retries >= 0, concurrency >= 1, timeout_s > 0")
        return s


class HTTPPool:
    """JSON POSTs to one server: concurrent, with timeouts and bounded, backed-off retries per batch."""

    def __init__(self, settings: HTTPSettings, label: str, log: Callable[[str], None] | None = None):
        import httpx

        self.s = settings
        self.label = label
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.concurrency,
                                max_keepalive_connections=settings.concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix=f"{label}-http")

    def url(self, path: str) -> str:
        return f"{self.s.base_url}/{path.lstrip('/')}"

    def _one(self, method: str, url: str, body: Any) -> tuple[str, Any]:
        """("ok", json) | ("retry", reason) | ("fail", message); exceptions only for bugs."""
        import httpx

        try:
            resp = self.client.request(method, url, json=body) if body is not None else self.client.request(method, url)
        except httpx.TransportError as exc:  # connect/read errors and timeouts
            return "retry", f"{type(exc).__name__}: {str(exc) or 'no detail'}"
        if resp.status_code in RETRY_STATUS:
            return "retry", f"HTTP {resp.status_code}: {_short(resp.text)}"
        if resp.status_code >= 400:
            hint = ""
            if resp.status_code in (401, 403):
                hint = f" (check the API key in ${self.s.api_key_env})" if self.s.api_key_env else " (set api_key_env)"
            return "fail", f"HTTP {resp.status_code} from {url}: {_short(resp.text)}{hint}"
        try:
            return "ok", resp.json()
        except ValueError:
            return "retry", f"invalid JSON from server: {_short(resp.text)}"

    def request_many(self, path: str, bodies: Sequence[Any], method: str = "POST") -> list[Any]:
        """Send every body, concurrently; retry the ones that failed transiently; return answers in order."""
        from tenacity import (
            RetryCallState,
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential,
        )

        url = self.url(path)
        results: list[Any] = [None] * len(bodies)
        pending = list(range(len(bodies)))
        t0 = time.monotonic()

        def attempt() -> None:
            nonlocal pending
            answers = list(self.pool.map(lambda i: self._one(method, url, bodies[i]), pending))
            failed, last = [], ""
            for i, (kind, value) in zip(pending, answers):
                if kind == "ok":
                    results[i] = value
                elif kind == "fail":
                    raise BackendRequestError(f"{self.label}: {value}")
                else:
                    failed.append(i)
                    last = value
            if failed:
                n_total = len(pending)
                pending = failed
                raise _Retryable(len(failed), n_total, last)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.log(f"{self.label}: {method} {url}: {exc}; retry {state.attempt_number}/{self.s.retries} "
                     f"in {wait:.1f} s")

        try:
            for att in Retrying(stop=stop_after_attempt(self.s.retries + 1),
                                wait=wait_exponential(multiplier=self.s.backoff_s, min=self.s.backoff_s,
                                                      max=self.s.backoff_max_s),
                                retry=retry_if_exception_type(_Retryable), before_sleep=before_sleep,
                                reraise=True):
                with att:
                    attempt()
        except _Retryable as exc:
            raise BackendUnavailableError(
                f"{self.label}: {method} {url} failed after {self.s.retries + 1} attempts over "
                f"{time.monotonic() - t0:.0f} s ({exc}); is the server up (make serve)? Steps already stored are "
                "kept: rerun the same command to resume"
            ) from None
        return results

    def get(self, path: str) -> Any:
        return self.request_many(path, [None], method="GET")[0]

    def probe(self, path: str, setting: str) -> Any:
        """``GET path`` once at start-up, without retries: no server there fails in seconds with one line
        naming the URL and the ``setting`` that points at it (the retries are for servers that die mid-run). A
        server that answers with an error goes through ``get`` and its usual messages."""
        import httpx

        url = self.url(path)
        limit = min(self.s.timeout_s, PROBE_TIMEOUT_S)
        try:
            resp = self.client.get(url, timeout=httpx.Timeout(limit, connect=min(self.s.connect_timeout_s, limit)))
        except httpx.TransportError as exc:
            raise BackendUnavailableError(
                f"{self.label}: no server answers at {self.s.base_url} (GET {url}: {type(exc).__name__}: "
                f"{str(exc) or 'no detail'}); start it (make serve) or point {setting} at it"
            ) from None
        if resp.status_code < 400:
            try:
                return resp.json()
            except ValueError:
                pass
        return self.get(path)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


def served_model(pool: HTTPPool, configured: str | None, setting: str = "backend.base_url") -> tuple[str, int | None]:
    """The model name to send and the server's max_model_len (vLLM reports it in /v1/models); the first request
    to the server, so it is the start-up probe."""
    listing = pool.probe("models", setting) or {}
    data = listing.get("data") or []
    if configured:
        for m in data:
            if m.get("id") == configured:
                return configured, m.get("max_model_len")
        if data:
            names = ", ".join(str(m.get("id")) for m in data)
            raise ConfigError(f"{pool.label}: the server at {pool.s.base_url} serves {names}, not {configured!r}")
        return configured, None
    if len(data) != 1:
        names = ", ".join(str(m.get("id")) for m in data) or "nothing"
        raise ConfigError(f"{pool.label}: the server at {pool.s.base_url} serves {names}; set the model name "
                          "in the backend config")
    return str(data[0]["id"]), data[0].get("max_model_len")


def connect(settings: HTTPSettings, label: str, configured: str | None, cfg: Mapping[str, Any],
            config: Mapping[str, Any], setting: str = "backend.base_url", listing: Any = None
            ) -> tuple[HTTPPool, str, int]:
    """The start-up handshake both halves of the backend make: a pool to the server, the served model's name
    (``served_model``: the first request, without retries) and the context to enforce: the model/ or reward/
    config's ``max_context`` (else the checkpoint's positions, else 2048), capped by the server's
    ``max_model_len``. ``listing`` wraps the pool for the model listing (the RM server lists under /v1)."""
    pool = HTTPPool(settings, label)
    try:
        name, server_len = served_model(listing(pool) if listing else pool, configured, setting)
    except BaseException:
        pool.close()
        raise
    max_context = int(cfg.get("max_context") or config.get("max_position_embeddings") or 2048)
    if server_len:
        max_context = min(max_context, int(server_len))
    return pool, name, max_context


@GENERATORS.register("openai")
class OpenAIGenerator:
    name = "openai"

    def __init__(self, model_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        backend_cfg = dict(backend_cfg or {})
        # the tokenizer, context and parameter count come from the same model folder the server serves
        self.path = resolve_model_path(model_cfg, "model")
        self.tokenizer = hff.load_tokenizer(self.path, "model", bool(model_cfg.get("trust_remote_code", False)))
        cfg = hff.model_config(self.path)
        self.n_params = hff.params_of(self.path, model_cfg)
        self.eos_token_ids = hff.eos_ids(cfg, self.tokenizer)
        self.entropy_top_k = int(backend_cfg.get("entropy_top_k", 20))
        self.return_logprobs = bool(backend_cfg.get("return_logprobs", False))
        self.http, self.model, self.max_context = connect(HTTPSettings.from_cfg(backend_cfg), "openai backend",
                                                          backend_cfg.get("model"), model_cfg, cfg)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return hff.encode_chat(self.tokenizer, messages)

    def decode(self, token_ids: list[int]) -> str:
        return hff.decode(self.tokenizer, token_ids)

    def next_token_logprob_rows(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                                n_rows: Sequence[int], temperature: float = 1.0, batch_size: int = 64) -> Any:
        """Not available: the completions API returns top-k log-probs of sampled positions only."""
        raise unsupported(self.name, "return full next-token distributions (the completions API returns top-k "
                                     "log-probs)")

    def like(self, model_cfg: Mapping[str, Any]) -> Any:
        """Not available: a server serves the models it was started with."""
        raise unsupported(self.name, "load a second model (a server serves the models it was started with)")

    def request_body(self, prompt: list[int], max_tokens: int, seed: int, temperature: float,
                     logprobs: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "prompt": list(map(int, prompt)), "max_tokens": int(max_tokens),
            "seed": int(seed), "n": 1, "temperature": float(temperature), "top_p": 1.0,
            # -1 = off in every vLLM version (0 only from 0.9 on); min_p/penalties pinned against server defaults
            "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "repetition_penalty": 1.0, "return_token_ids": True, "skip_special_tokens": True, "stream": False,
        }
        if logprobs is not None:
            # keys "token_id:N" instead of token strings, which can collide after decoding
            body.update(logprobs=logprobs, return_tokens_as_token_ids=True)
        return body

    def sample(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        seeds: list[int],
        temperature: float = 1.0,
        return_entropies: bool = False,
    ) -> list[Completion]:
        if not prompts:
            return []
        check_budget(prompts, max_tokens, self.max_context)
        logprobs = self.entropy_top_k if return_entropies else (0 if self.return_logprobs else None)
        if return_entropies and self.entropy_top_k == -1:
            raise ConfigError("backend.entropy_top_k=-1 (whole vocabulary) is not available through the "
                              "completions API; allowed: a positive k (the server's --max-logprobs caps it)")
        bodies = [self.request_body(p, m, s, temperature, logprobs) for p, m, s in zip(prompts, max_tokens, seeds)]
        answers = self.http.request_many("completions", bodies)
        return [self._completion(a, len(p), return_entropies) for a, p in zip(answers, prompts)]

    def request_engine(self, temperature: float = 1.0) -> OpenAIRequestEngine:
        """Continuous submission to the server (``methods/driver.py``'s async schedule)."""
        return OpenAIRequestEngine(self, temperature)

    def _completion(self, answer: Mapping[str, Any], n_prompt: int, return_entropies: bool) -> Completion:
        choice = answer["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:
            raise BackendRequestError(
                "openai backend: the server did not return token ids (return_token_ids); allowed: a vLLM server "
                ">= 0.10.2 (token ids are needed for exact QAlign suffixes)"
            )
        usage = answer.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        lps = ents = None
        lp_block = choice.get("logprobs")
        if lp_block and (self.return_logprobs or return_entropies):
            lps = [float(x) if x is not None else float("nan") for x in lp_block.get("token_logprobs") or []]
            if return_entropies:
                # each position lists the top k and, when it is outside them, the sampled token: keep the k largest
                ents = [hff.topk_entropy(sorted((top or {}).values(), reverse=True)[: self.entropy_top_k])
                        for top in lp_block.get("top_logprobs") or []]
        return Completion(
            token_ids=[int(t) for t in ids],
            text=choice.get("text", ""),
            finish_reason="stop" if choice.get("finish_reason") == "stop" else "length",
            prompt_tokens=int(usage.get("prompt_tokens") or n_prompt),
            cached_tokens=int(cached) if cached is not None else None,
            logprobs=lps,
            entropies=ents,
        )

    def close(self) -> None:
        self.http.close()


class OpenAIRequestEngine:
    """Requests to an OpenAI-compatible server as a ``lm.engine.RequestEngine``: each request is its own POST
    (with the pool's retries) on a thread of its own, at most ``backend.concurrency`` at a time, and comes back as
    soon as the server answers it. The server batches whatever is outstanding (vLLM's continuous batching), so
    a chain's next proposal is sent the moment its step is decided."""

    continuous = True

    def __init__(self, generator: OpenAIGenerator, temperature: float = 1.0):
        from qalign_repro.lm.engine import EngineStats

        self.gen, self.temperature = generator, float(temperature)
        self.pool = ThreadPoolExecutor(max_workers=generator.http.s.concurrency, thread_name_prefix="openai-engine")
        self.futures: dict[Any, Any] = {}
        self.stats = EngineStats()

    def submit(self, request: Any) -> None:
        check_budget([request.prompt_ids], [request.max_tokens], self.gen.max_context)
        logprobs = 0 if self.gen.return_logprobs else None
        body = self.gen.request_body(request.prompt_ids, request.max_tokens, request.seed, self.temperature, logprobs)
        fut = self.pool.submit(self.gen.http.request_many, "completions", [body])
        self.futures[fut] = (request.key, len(request.prompt_ids))
        self.stats.submitted += 1

    def in_flight(self) -> int:
        return len(self.futures)

    def wait(self) -> list[tuple[Any, Completion]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        if not self.futures:
            return []
        t0 = time.perf_counter()
        n = len(self.futures)
        finished, _ = wait_futures(list(self.futures), return_when=FIRST_COMPLETED)
        dt = time.perf_counter() - t0
        self.stats.waited(dt, n)
        done = []
        for fut in finished:
            key, n_prompt = self.futures.pop(fut)
            comp = self.gen._completion(fut.result()[0], n_prompt, False)  # re-raises the request's one-line error
            self.stats.completed([comp])
            done.append((key, comp))
        return done

    def close(self) -> None:
        for fut in self.futures:
            fut.cancel()
        self.futures.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
