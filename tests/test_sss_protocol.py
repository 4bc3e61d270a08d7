"""SSS talks to its models only through the Generator protocol (lm/base.py: ``next_token_logprob_rows`` for
full next-token distributions, ``like`` for the draft on the target's backend), and backends without full
distributions refuse in one line naming the backend and what is allowed."""

from __future__ import annotations

import pytest

from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import Generator
from qalign_repro.lm.toy import ToyGenerator
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.sss import SSS
from qalign_repro.rm.toy import ToyReward

MAX_NEW = 4
TARGET = {"vocab": 3, "max_len": MAX_NEW, "seed": 3, "scale": 1.0}
PROTOCOL = ("name", "n_params", "max_context", "eos_token_ids", "encode_chat", "decode", "sample",
            "next_token_logprob_rows", "like", "close")


class ProtocolOnly:
    """A generator that exposes the protocol and nothing else (no ``model``, ``pad_id``, ``next_probs``...)."""

    def __init__(self, inner: ToyGenerator):
        for attr in PROTOCOL:
            setattr(self, attr, getattr(inner, attr))
        self.like = lambda cfg: ProtocolOnly(inner.like(cfg))


def _run(gen) -> list[dict]:
    ctx = RunContext(generator=gen, reward=ToyReward({"seed": 1}), seed=7, beta=1.0, max_new_tokens=MAX_NEW,
                     temperature=1.0, batch_size=16)
    chains = [Chain(idx=j, prompt_id=f"p{j}", prompt_ids=[1], messages=[]) for j in range(6)]
    return SSS({"gamma": 2, "shift": 0.5, "draft": {"seed": 11, "scale": 1.5}, "draft_ref": {"seed": 5}}
               ).step(ctx, chains, 0)


def test_sss_needs_nothing_but_the_protocol():
    gen = ToyGenerator(TARGET)
    wrapped = ProtocolOnly(gen)
    assert isinstance(wrapped, Generator) and not hasattr(wrapped, "next_probs")
    assert _run(wrapped) == _run(gen)


class _Stub:
    name, n_params, max_context, eos_token_ids = "stub", 1, 64, [0]


@pytest.mark.parametrize("module,cls", [("qalign_repro.lm.vllm", "VLLMGenerator"),
                                        ("qalign_repro.lm.openai", "OpenAIGenerator")])
def test_backends_without_full_distributions_refuse_in_one_line(module, cls):
    import importlib

    backend = getattr(importlib.import_module(module), cls)
    gen = object.__new__(backend)  # no engine or server: the refusal needs none
    for call in (lambda: gen.next_token_logprob_rows([[1]], [[2]], [1]), lambda: gen.like({"asset": "tiny-draft"})):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and f"generator backend {backend.name!r} cannot" in msg
        assert msg.endswith("allowed: backend=hf or backend=toy")


def test_a_generator_without_the_protocol_methods_is_refused_by_sss():
    ctx = RunContext(generator=_Stub(), reward=ToyReward({}), seed=0, beta=1.0, max_new_tokens=4,
                     temperature=1.0, batch_size=4)
    with pytest.raises(ConfigError, match=r"generator backend 'stub' cannot run SSS: it has no like .*allowed: "
                                          r"backend=hf or backend=toy"):
        SSS({"draft": {"seed": 1}}).step(ctx, [Chain(0, "a", [1], [])], 0)
