"""What the vLLM backend asks of ``vllm.LLM`` on a CPU machine, where vLLM's own defaults do not suit: checked
without building an engine (no vLLM needed), by pretending the platform is a CPU or a GPU."""

from __future__ import annotations

import pytest

from qalign_repro.lm import vllm as lm_vllm
from qalign_repro.models.tiny import assets_dir

LM = str(assets_dir("tiny-lm"))


@pytest.fixture
def platform(monkeypatch):
    def set_cpu(cpu: bool) -> None:
        monkeypatch.setattr(lm_vllm, "on_cpu", lambda: cpu)
    return set_cpu


def test_cpu_engines_default_to_eager_small_blocks_and_a_fixed_kv_cache(platform):
    platform(True)
    lm = lm_vllm.engine_kwargs(LM, {}, {"enforce_eager": None, "block_size": None, "seed": 0}, "lm", 8192)
    assert lm["enforce_eager"] is True and lm["block_size"] == 32 and lm["enable_chunked_prefill"] is False
    assert lm["kv_cache_memory_bytes"] == lm_vllm.CPU_KV_CACHE_BYTES["lm"] and lm["max_model_len"] == 8192
    rm = lm_vllm.engine_kwargs(LM, {}, {"enforce_eager": None}, "rm", 8192)
    assert rm["enforce_eager"] is True and "block_size" not in rm
    assert rm["kv_cache_memory_bytes"] == lm_vllm.CPU_KV_CACHE_BYTES["rm"]


def test_explicit_settings_win_on_cpu_and_gpu_keeps_vllm_defaults(platform):
    platform(True)
    mine = lm_vllm.engine_kwargs(LM, {}, {"enforce_eager": False, "block_size": 64}, "lm", 8192)
    assert mine["enforce_eager"] is False and mine["block_size"] == 64
    platform(False)
    gpu = lm_vllm.engine_kwargs(LM, {}, {"enforce_eager": None, "block_size": None}, "lm", 8192)
    assert not {"enforce_eager", "block_size", "kv_cache_memory_bytes", "enable_chunked_prefill"} & set(gpu)
