"""The in-process Python API: same outputs as the run stage, prompts as strings or messages, optional storage."""

from __future__ import annotations

import pytest
from _helpers import TOY

import qalign_repro
from qalign_repro import CARDS, SSS, Ancestral, QAlign, load_model, load_reward
from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.run import execute
from qalign_repro.storage import RunStore
from qalign_repro.tasks import get_task

SCHEMA = {"completion_ids", "text", "reward", "accepted", "index", "proposal_len", "proposal_reward",
          "tokens_generated", "tokens_prefilled", "tokens_cached", "tokens_scored", "finish_reason"}


@pytest.fixture(scope="module")
def toy():
    return load_model("toy"), load_reward("toy")


def test_lazy_exports():
    assert qalign_repro.__version__ and "QAlign" in qalign_repro.__all__
    with pytest.raises(AttributeError):
        qalign_repro.NotAThing  # noqa: B018


@pytest.mark.parametrize("sampler,kwargs", [
    (Ancestral, {}), (QAlign, {}), (CARDS, {"entropy_threshold": 0.8, "min_segment_tokens": 1}),
    (SSS, {"draft": {"seed": 5}, "gamma": 2}),
], ids=["ancestral", "qalign", "cards", "sss"])
def test_api_matches_run_stage(tmp_path, toy, sampler, kwargs):
    """Same prompt ids, messages, seed and settings: the API returns exactly what the run stage stores."""
    method = sampler.method
    overrides = [f"method={method}", *TOY, f"output_root={tmp_path}", "steps=3", "dataset.n=2", "beta=0.5"]
    overrides += {"cards": ["method.entropy_threshold=0.8", "method.min_segment_tokens=1"],
                  "sss": ["method.draft.asset=null", "+method.draft.seed=5", "method.gamma=2"]}.get(method, [])
    cfg = compose_config(overrides)
    store = execute(cfg)
    stored = [inst["outputs"] for inst in store.iter_instances()]
    task = get_task(dict(cfg.dataset))
    docs = task.docs()
    model, reward = toy
    records = sampler(model, reward, beta=0.5, max_new_tokens=4, **kwargs).run(
        [task.prompt(d) for d in docs], steps=3, prompt_ids=[d["id"] for d in docs])
    assert records == stored
    assert all(SCHEMA <= set(o) for r in records for o in r)


def test_string_prompts_storage_and_resume(tmp_path, toy):
    model, reward = toy
    sampler = CARDS(model, reward, beta=1.0, max_new_tokens=4, min_segment_tokens=1)
    first = sampler.run(["What is 2+3?", [{"role": "user", "content": "And 4+4?"}]], steps=2, output_root=tmp_path)
    assert [len(r) for r in first] == [2, 2]
    name = sampler.store.name
    more = sampler.run(["What is 2+3?", [{"role": "user", "content": "And 4+4?"}]], steps=3, output_root=tmp_path)
    assert [r[:2] for r in more] == first and [len(r) for r in more] == [3, 3]
    store = RunStore(tmp_path, name, readonly=True)
    assert store.steps_done() == 3 and store.meta["method"] == "cards" and store.meta["status"] == "done"
    assert store.meta["model"]["n_params"] == model.n_params
    # in memory and stored give the same outputs
    assert CARDS(model, reward, max_new_tokens=4, min_segment_tokens=1).run(["What is 2+3?"], steps=3)[0] == more[0]
    with pytest.raises(StorageError, match="other settings"):
        CARDS(model, reward, beta=2.0, max_new_tokens=4).run(["x"], steps=1, output_root=tmp_path, run_name=name)


def test_api_errors(toy):
    model, reward = toy
    with pytest.raises(ConfigError, match="unknown option"):
        CARDS(model, reward, entropy_treshold=1.0)
    with pytest.raises(ConfigError, match="list"):
        QAlign(model, reward).run("just one string", steps=1)
    with pytest.raises(ConfigError, match="messages"):
        QAlign(model, reward).run([[{"role": "user"}]], steps=1)
    with pytest.raises(ConfigError, match="exactness"):
        QAlign(model, reward, temperature=0.7)
    with pytest.raises(ConfigError, match="steps"):
        Ancestral(model, reward).run(["x"], steps=0)
    with pytest.raises(ConfigError, match="toy"):
        SSS(model, reward, draft="tiny-draft")


@pytest.mark.slow
def test_api_tiny_hf():
    """The shipped tiny models through the API, as in the README; the draft is resolved by asset name."""
    model, reward = load_model("tiny", device="cpu"), load_reward("tiny", device="cpu")
    prompt = "Ann has 3 apples. She buys 2 more. How many apples does Ann have now?"
    records = SSS(model, reward, draft="tiny-draft", max_new_tokens=12).run([prompt], steps=2)
    assert len(records) == 1 and len(records[0]) == 2
    assert all(SCHEMA <= set(o) and 1 <= len(o["completion_ids"]) <= 12 for o in records[0])
    assert records[0][0]["models"]["draft"]["n_params"] == model.n_params  # tiny-draft: tiny-lm fine-tuned
