"""The shipped tiny LM and RM (the embedded default) run on vLLM as they do on HF: the LM answers the arith test
problems about as often as its model card says, and the RM gives the HF RM's raw scores."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm)")

from qalign_repro.cli import compose_config  # noqa: E402
from qalign_repro.models.folders import assets_dir  # noqa: E402
from qalign_repro.rm.hf import HFReward  # noqa: E402
from qalign_repro.stages.run import build_backends  # noqa: E402
from qalign_repro.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def shipped(vllm_backend, tmp_path_factory):
    # the default config is the embedded default (tiny LM + RM, arith); only the backend changes
    cfg = compose_config([*vllm_backend, f"output_root={tmp_path_factory.mktemp('out')}", "progress=false"])
    gen, rm = build_backends(cfg)
    yield cfg, gen, rm
    gen.close()
    rm.close()


def test_shipped_lm_solves_arith_on_vllm_about_as_often_as_on_hf(shipped):
    import json

    cfg, gen, _ = shipped
    card = json.loads((assets_dir("tiny-lm") / "metrics.json").read_text())["lm"]["test"]
    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    docs = task.load_split("test", 96)
    comps = gen.sample([gen.encode_chat(task.prompt(d)) for d in docs], [64] * len(docs), list(range(len(docs))))
    hits = [task.grade(d, c.text)["correct"] for c, d in zip(comps, docs)]
    acc = float(np.mean(hits))
    # 96 samples: a binomial 95% band of about +-0.10 around the card's figure (n=500, HF sampler)
    assert abs(acc - card["accuracy"]) <= 0.15, (acc, card)
    assert np.mean([c.finish_reason == "stop" for c in comps]) >= 0.9


def test_shipped_rm_scores_equal_the_hf_rm(shipped):
    cfg, gen, rm = shipped
    hf = HFReward(OmegaConf.to_container(cfg.reward, resolve=True), {"device": "cpu"})
    assert rm.n_params == hf.n_params
    task = get_task(OmegaConf.to_container(cfg.dataset, resolve=True))
    docs = task.load_split("test", 16)
    messages = [task.prompt(d) for d in docs]
    comps = gen.sample([gen.encode_chat(m) for m in messages], [64] * len(docs), list(range(100, 116)))
    texts = [c.text for c in comps]
    got, ref = rm.score(messages, texts), hf.score(messages, texts)
    assert float(np.max(np.abs(got.rewards - ref.rewards))) < 1e-3
    assert got.tokens == ref.tokens
