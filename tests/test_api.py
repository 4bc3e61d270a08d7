"""The in-process Python API: same outputs as the run stage, prompts as strings or messages, optional storage."""

from __future__ import annotations

import pytest
from _helpers import TOY

import qalign_repro
from qalign_repro import CARDS, SSS, Ancestral, QAlign, load_model, load_reward, load_task
from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.stages.run import execute
from qalign_repro.store.storage import RunStore
from qalign_repro.tasks import Task, get_task

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


# -- the result object (issue 16 item 6) ---------------------------------------------------------------------
class _FirstLetter(Task):
    """A stub task whose answer is the output's first character: grades computable by hand from the text."""

    name = "first_letter"

    def load_all(self):
        return [{"id": "p", "q": "say a", "gold": "a"}, {"id": "q", "q": "say b", "gold": "b"}]

    def prompt(self, doc):
        return [{"role": "user", "content": doc["q"]}]

    def extract(self, text):
        return text[:1] or None

    def gold(self, doc):
        return doc["gold"]


def test_result_object_grades_acceptance_and_pandas(toy):
    model, reward = toy
    task = _FirstLetter()
    docs = task.docs()
    result = QAlign(model, reward, beta=0.5, max_new_tokens=4).run(docs, steps=6, task=task)
    # list-like as before: result[i] is prompt i's outputs, and it equals the plain records
    plain = QAlign(model, reward, beta=0.5, max_new_tokens=4).run([task.prompt(d) for d in docs], steps=6,
                                                                    prompt_ids=["p", "q"])
    assert result == plain.records and len(result) == 2 and [len(r) for r in result] == [6, 6]
    for p, doc in zip(result.prompts, docs):
        assert p.prompt_id == doc["id"] and p.final == p.outputs[-1] and p.gold == doc["gold"]
        assert p.answers == [o["text"][:1] or None for o in p.outputs]
        assert p.correct == [o["text"][:1] == doc["gold"] for o in p.outputs]
        assert p.acceptance == pytest.approx(sum(o["accepted"] for o in p.outputs[1:]) / 5)
    moves = [o["accepted"] for r in result for o in r[1:]]
    assert result.kind == "chain" and result.acceptance == pytest.approx(sum(moves) / len(moves))
    assert result.diagnostics["chains"] == 2 and result.diagnostics["steps"] == 6
    finals = [p.correct[-1] for p in result.prompts]
    assert result.accuracy() == pytest.approx(sum(finals) / 2)
    df = result.to_pandas()
    assert len(df) == 12 and list(df["step"]) == list(range(6)) * 2
    assert {"prompt_id", "step", "text", "reward", "accepted", "answer", "correct", "gold", "n_tokens"} <= set(df)
    assert list(df["correct"]) == [c for p in result.prompts for c in p.correct]
    assert "acceptance" in repr(result) and "gold a" in repr(result)


def test_result_of_samples_and_free_prompts(toy, tmp_path):
    model, reward = toy
    result = Ancestral(model, reward, max_new_tokens=4).run(["What is 2+3?"], steps=3, task="arith",
                                                            output_root=tmp_path)
    assert result.kind == "samples" and result.acceptance is None and result.diagnostics is None
    assert result.store is not None and result.store.steps_done() == 3
    p = result.prompts[0]
    assert p.correct == [None] * 3 and p.gold is None and result.accuracy() is None and p.acceptance is None
    assert p.answers == [get_task({"name": "arith"}).extract(o["text"]) for o in p.outputs]
    assert set(result.to_pandas()["correct"].isna()) == {True}
    with pytest.raises(ConfigError, match="task doc"):
        Ancestral(model, reward).run([{"id": "x", "question": "?"}], steps=1)
    with pytest.raises(ConfigError, match="not a known dataset; allowed: .*arith"):
        load_task("arithmetic")


def test_load_task_builds_prompts_in_the_task_format():
    task = load_task("arith", n=3)
    docs = task.docs()
    assert len(docs) == 3 and task.prompt(docs[0])[0]["content"] == docs[0]["question"]
    assert load_task("arith", split="rm_train", n=2).docs()[0]["id"] != docs[0]["id"]


def test_tiny_cpu_models_get_one_torch_thread(monkeypatch):
    import torch

    from qalign_repro.models.threads import SMALL_MODEL_PARAMS, tune_cpu_threads

    class Fake:
        name, device = "hf", "cpu"

        def __init__(self, n_params):
            self.n_params = n_params

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert tune_cpu_threads(load_model("toy")) is None  # not a torch backend
        assert tune_cpu_threads(Fake(SMALL_MODEL_PARAMS // 2), Fake(SMALL_MODEL_PARAMS // 2)) is None
        gpu = Fake(10)
        gpu.device = "cuda"
        assert tune_cpu_threads(Fake(10), gpu) is None
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert tune_cpu_threads(Fake(10)) is None  # the user's explicit choice wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert tune_cpu_threads(Fake(10), Fake(10)) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_readme_example_runs_in_seconds_and_answers_in_format():
    """The README's API example on the shipped tiny models: arith-format prompts, graded, in seconds."""
    import time

    t0 = time.perf_counter()
    task = load_task("arith", n=4)
    result = QAlign(load_model("tiny", device="cpu"), load_reward("tiny", device="cpu"), beta=0.998).run(
        task.docs(), steps=8, task=task)
    wall = time.perf_counter() - t0
    assert [p.answers[-1] is not None for p in result.prompts].count(True) >= 3  # "The answer is N." format
    assert result.accuracy() is not None and 0 < result.acceptance_changed < 1
    assert wall < 60, f"README example took {wall:.0f} s"
