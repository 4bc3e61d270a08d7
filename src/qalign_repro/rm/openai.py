"""Reward model on a vLLM pooling server (``backend.reward=openai``), e.g. the RM server of ``make serve``.

Inputs go to vLLM's ``POST /classify`` as token ids (the RM's chat template applied and tokenized here, exactly as
the ``hf`` and ``vllm`` reward backends do) with ``use_activation: false``, so the answer is the raw logit rather
than the sigmoid probability the endpoint returns by default for a one-label model.

Requests are split into chunks of ``rm_batch_size`` inputs sent concurrently, with the retry policy of the
generation half (lm/openai.py, whose pool and start-up handshake this module shares): timeouts, backoff on
connection errors / 5xx, one line per retry round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qalign_repro.errors import BackendRequestError, ConfigError
from qalign_repro.lm.openai import HTTPPool, HTTPSettings, connect
from qalign_repro.models import hf_format as hff
from qalign_repro.models.folders import check_architecture, resolve_model_path
from qalign_repro.rm.base import REWARDS, Scores


def server_root(base_url: str) -> str:
    """vLLM serves /classify at the root, next to /v1: accept either form of the URL."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


@REWARDS.register("openai")
class OpenAIReward:
    name = "openai"

    def __init__(self, reward_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        backend_cfg = dict(backend_cfg or {})
        self.path = resolve_model_path(reward_cfg, "reward")
        cfg = hff.model_config(self.path, "reward")
        check_architecture(cfg, self.path, "reward", "rm")  # a one-label sequence classifier, as locally
        self.tokenizer = hff.load_tokenizer(self.path, "reward", bool(reward_cfg.get("trust_remote_code", False)))
        self.n_params = hff.params_of(self.path, reward_cfg)
        settings = HTTPSettings.from_cfg(backend_cfg, prefix="rm_")
        if not backend_cfg.get("rm_base_url"):
            raise ConfigError("backend.rm_base_url is not set; allowed: the reward server's http(s)://host:port")
        settings.base_url = server_root(settings.base_url)
        self.http, self.model, self.max_context = connect(settings, "reward server", backend_cfg.get("rm_model"),
                                                          reward_cfg, cfg, "backend.rm_base_url", listing=_V1View)
        self.batch_size = int(backend_cfg.get("rm_batch_size") or 16)

    def encode(self, prompt: list[dict[str, str]], completion: str) -> list[int]:
        return hff.encode_conversation(self.tokenizer, prompt, completion, self.max_context)

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        if not encoded:
            return Scores(rewards=np.zeros(0), tokens=[])
        chunks = [encoded[s:s + self.batch_size] for s in range(0, len(encoded), self.batch_size)]
        bodies = [{"model": self.model, "input": chunk, "use_activation": False} for chunk in chunks]
        rewards: list[float] = []
        for chunk, answer in zip(chunks, self.http.request_many("classify", bodies)):
            data = sorted(answer.get("data") or [], key=lambda d: d["index"])
            if len(data) != len(chunk):
                raise BackendRequestError(f"reward server: {len(data)} scores for {len(chunk)} inputs")
            rewards.extend(float(d["probs"][0]) for d in data)
        return Scores(rewards=np.asarray(rewards, dtype=np.float64), tokens=[len(e) for e in encoded])

    def close(self) -> None:
        self.http.close()


class _V1View:
    """The pool seen from /v1, for the model listing (``/v1/models``) next to the root-level ``/classify``."""

    def __init__(self, pool: HTTPPool):
        self.pool, self.label, self.s = pool, pool.label, pool.s

    def get(self, path: str) -> Any:
        return self.pool.get(f"v1/{path}")

    def probe(self, path: str, setting: str) -> Any:
        return self.pool.probe(f"v1/{path}", setting)
