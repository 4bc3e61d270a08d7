"""Warm starts (``method.init``): chains start from a stored run's or a file's completions, state 0 says where
it came from and is scored by this run's RM, both schedules store the same data, the chain is still exact after
burn-in (by enumeration on the toy model), and a bad source is a one-line error before any run folder exists."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from _helpers import TOY
from test_qalign_exact import BETA, MAX_NEW, exact_target, tv_distance

from qalign_repro.analysis.diagnostics import chain_diagnostics
from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.lm.toy import EOS, ToyGenerator
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.driver import drive
from qalign_repro.methods.qalign import QAlign
from qalign_repro.methods.warm_start import chain_keys, resolve
from qalign_repro.rm.toy import ToyReward
from qalign_repro.stages.run import execute
from qalign_repro.store.fsck import check_store
from qalign_repro.store.run_names import run_name


def _cfg(root, *extra: str):
    return compose_config([*TOY, f"output_root={root}", "dataset.n=3", *extra])


def _outputs(store) -> list[list[dict]]:
    return [inst["outputs"] for inst in store.iter_instances()]


def test_warm_start_from_a_stored_run(tmp_path):
    # the source: another model's samples (here: another RM too, so its rewards must not be reused)
    src = execute(_cfg(tmp_path, "method=ancestral", "steps=3", "reward.seed=9"))
    warm = execute(_cfg(tmp_path, "method=qalign", "steps=6", f"method.init=run:{src.name}", "method.init_output=1"))
    rm = ToyReward({"seed": 0, "scale": 2.0})
    for s_outs, outs in zip(_outputs(src), _outputs(warm)):
        first = outs[0]
        assert first["completion_ids"] == s_outs[1]["completion_ids"] and first["text"] == s_outs[1]["text"]
        assert first["init"] == f"run:{src.name}#1"
        assert first["reward"] == rm.value(first["text"]) != s_outs[1]["reward"]  # this run's RM scored it
        assert first["tokens_generated"] == 0 and first["accepted"] and first["index"] == 0
        assert all("init" not in o for o in outs[1:])
    assert check_store(tmp_path, warm.name) == []
    d = warm.meta["diagnostics"]
    assert d["warm_started_chains"] == 3 and d["init_sources"] == [f"run:{src.name}"]
    # -1: the source's last stored output (a QAlign run's last state)
    last = execute(_cfg(tmp_path, "method=qalign", "steps=2", f"method.init=run:{warm.name}", "method.init_output=-1"))
    assert [o[0]["completion_ids"] for o in _outputs(last)] == [o[-1]["completion_ids"] for o in _outputs(warm)]
    assert {o[0]["init"] for o in _outputs(last)} == {f"run:{warm.name}#5"}
    # the default start keeps the old run names; a warm start is another run
    assert run_name(_cfg(tmp_path, "method=qalign", "method.init=ancestral")) == run_name(_cfg(tmp_path, "method=qalign"))
    assert warm.name != run_name(_cfg(tmp_path, "method=qalign"))


def _write(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_warm_start_from_a_file_gives_each_chain_its_row(tmp_path):
    ids = [str(i["id"]) for i in execute(_cfg(tmp_path / "ids", "method=ancestral", "steps=1")).inputs()]
    path = _write(tmp_path / "init.jsonl", [{"id": d, "completion_ids": [1, 2, EOS]} for d in ids]
                  + [{"id": ids[0], "completion_ids": [2, 2, 2, 2]}])
    store = execute(_cfg(tmp_path, "method=qalign", "steps=3", "method.chains=2", f"method.init=file:{path}"))
    firsts = [o[0] for o in _outputs(store)]
    # chain j takes row j mod n of its doc: doc 0 has two rows, the others one
    assert [f["completion_ids"] for f in firsts] == [[1, 2, 0], [2, 2, 2, 2]] + [[1, 2, 0]] * 4
    assert [f["init"] for f in firsts[:2]] == [f"file:{path}#1", f"file:{path}#4"]
    assert firsts[1]["finish_reason"] == "length" and firsts[0]["finish_reason"] == "stop"
    assert check_store(tmp_path, store.name) == []
    # extending resumes the same chains: the same data as a fresh run of the longer length
    longer = execute(_cfg(tmp_path, "method=qalign", "steps=5", "method.chains=2", f"method.init=file:{path}"))
    fresh = execute(_cfg(tmp_path / "fresh", "method=qalign", "steps=5", "method.chains=2", f"method.init=file:{path}"))
    assert longer.name == store.name and _outputs(longer) == _outputs(fresh)


class _CharTokenizer:
    """Stands in for a HF tokenizer (loading the tiny model's costs seconds): one id per character."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


class _TextModel(ToyGenerator):
    def __init__(self) -> None:
        super().__init__()
        self.tokenizer, self.eos_token_ids = _CharTokenizer(), [3]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids if t not in self.eos_token_ids)


def test_text_rows_are_encoded_with_the_runs_tokenizer(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"id": "a", "text": "The answer is 7."}])
    state = resolve(("file", path, 0), chain_keys(["a"], 1), _TextModel(), 64, tmp_path)["a"]
    assert state["completion_ids"] == [ord(c) for c in "The answer is 7."] + [3]  # a given text ends with EOS
    assert state["text"] == "The answer is 7." and state["finish_reason"] == "stop"
    with pytest.raises(ConfigError, match="line 1: the completion has 17 tokens, more than max_new_tokens=16"):
        resolve(("file", path, 0), chain_keys(["a"], 1), _TextModel(), 16, tmp_path)
    with pytest.raises(ConfigError, match="backend 'toy' cannot encode text"):
        resolve(("file", path, 0), chain_keys(["a"], 1), ToyGenerator(), 64, tmp_path)


def _toy_ctx(continuous: bool = False) -> RunContext:
    gen = ToyGenerator({"vocab": 3, "max_len": MAX_NEW, "seed": 3, "scale": 1.0}, {"continuous": continuous})
    return RunContext(generator=gen, reward=ToyReward({"seed": 1, "scale": 2.0}), seed=7, beta=BETA,
                      max_new_tokens=MAX_NEW, temperature=1.0, batch_size=10_000)


def _warm_chains(tmp_path, start: list[int], n: int, schedule: str, steps: int,
                 continuous: bool = False) -> tuple[dict[tuple[int, int], dict], RunContext]:
    path = _write(tmp_path / "one.jsonl", [{"id": f"p{j}", "completion_ids": start} for j in range(n)])
    ctx = _toy_ctx(continuous)
    method = QAlign({"init": f"file:{path}"})
    chains = [Chain(idx=j, prompt_id=f"p{j}", prompt_ids=[1], messages=[]) for j in range(n)]
    method.init_states = resolve(method.init, chain_keys([c.prompt_id for c in chains], 1), ctx.generator,
                                 MAX_NEW, tmp_path)
    out: dict[tuple[int, int], dict] = {}
    drive(method, ctx, chains, steps, out.update, schedule=schedule, rm_batch=7)
    return out, ctx


def test_both_schedules_store_the_same_warm_started_chains(tmp_path):
    ref, _ = _warm_chains(tmp_path, [2, 1, EOS], 20, "lockstep", 6)
    got, ctx = _warm_chains(tmp_path, [2, 1, EOS], 20, "async", 6, continuous=True)
    assert got == ref and len(ref) == 20 * 6
    assert all(ref[(j, 0)]["init"].endswith(f"#{j + 1}") for j in range(20))


@pytest.mark.slow
def test_warm_start_from_a_bad_completion_is_exact_after_burn_in(tmp_path, capsys):
    """Every chain starts from the least likely completion under the target; after burn-in the states follow
    the target (TV <= 0.02, as from ancestral starts), and the diagnostics show the burn-in and the rising trace."""
    ctx = _toy_ctx()
    pi = exact_target(ctx.generator, ctx.reward, BETA)
    worst = min(pi, key=pi.get)
    n, steps, burn_in = 3000, 40, 10
    out, _ = _warm_chains(tmp_path, list(worst), n, "lockstep", steps)
    counts = Counter(tuple(o["completion_ids"]) for (_, k), o in out.items() if k >= burn_in)
    tv = tv_distance(counts, pi)
    early = Counter(tuple(o["completion_ids"]) for (_, k), o in out.items() if k == 1)
    with capsys.disabled():
        print(f"\n[warm start] TV(after burn-in {burn_in}, target) = {tv:.4f}; TV(state 1) = {tv_distance(early, pi):.3f}")
    assert tv <= 0.02
    assert tv_distance(early, pi) > 0.2  # the start is far from the target: burn-in is real
    d = chain_diagnostics([[out[(j, k)] for k in range(steps)] for j in range(n)])
    assert d["warm_started_chains"] == n and d["burn_in_estimate"] > 0
    assert d["reward_mean_after_burn_in"] > d["reward_mean_state0"] == pytest.approx(ctx.reward.value(
        ctx.generator.decode(list(worst))))
    trace = np.array(d["reward_trace"]["mean"])
    assert trace[0] < trace[len(trace) // 2] and d["reward_trace"]["state"][0] == 0


@pytest.mark.parametrize("extra,match", [
    (["method.init=run:no-such-run"], r"method.init=run:no-such-run: no run named 'no-such-run'"),
    (["method.init=file:/nonexistent/x.jsonl"], r"method.init=file:/nonexistent/x.jsonl: no such file"),
    (["method.init=warm"], r"method.init='warm' is not a known option; allowed: ancestral, run:"),
    (["method.init_output=true"], r"method.init_output=True; allowed: an integer"),
])
def test_bad_sources_are_one_line_errors_before_any_run_folder(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match) as exc:
        execute(_cfg(tmp_path, "method=qalign", "steps=2", *extra))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_file_rows_and_missing_docs_are_named(tmp_path):
    ids = [str(i["id"]) for i in execute(_cfg(tmp_path / "ids", "method=ancestral", "steps=1")).inputs()]
    cases = [
        ([{"id": ids[0], "completion_ids": [1, EOS]}], rf"no completion for 2 doc\(s\) of this run: {ids[1]}, {ids[2]}"),
        ([{"id": d, "completion_ids": [1, 1, 1, 1, EOS]} for d in ids], r"line 1: the completion has 5 tokens, more "
         r"than max_new_tokens=4"),
        ([{"id": d, "completion_ids": []} for d in ids], r"line 1: completion_ids must be a non-empty list"),
        ([{"id": ids[0]}], r"line 1: a row needs \"id\" and exactly one of"),
    ]
    for n, (rows, match) in enumerate(cases):
        path = _write(tmp_path / f"bad{n}.jsonl", rows)
        with pytest.raises(ConfigError, match=match):
            execute(_cfg(tmp_path / "new", "method=qalign", "steps=2", f"method.init=file:{path}"))
        assert not (tmp_path / "new" / "runs").exists() or not any((tmp_path / "new" / "runs").iterdir())
    # a source run that lacks a doc of this run
    src = execute(_cfg(tmp_path / "src", "method=ancestral", "steps=1", "shard.count=2"))
    missing = sorted(set(ids) - {str(i["id"]) for i in src.inputs()})
    assert len(missing) == 1
    with pytest.raises(ConfigError, match=rf"run:{src.name} has no completion for 1 doc\(s\) of this run: {missing[0]};"):
        execute(_cfg(tmp_path / "src", "method=qalign", "steps=2", f"method.init=run:{src.name}"))
    assert len(list((tmp_path / "src" / "runs").iterdir())) == 1


def test_python_api_warm_start(tmp_path):
    from qalign_repro import QAlign as ApiQAlign

    ctx = _toy_ctx()
    path = _write(tmp_path / "api.jsonl", [{"id": "0", "completion_ids": [2, EOS]}])
    res = ApiQAlign(ctx.generator, ctx.reward, beta=BETA, max_new_tokens=MAX_NEW, init=f"file:{path}").run(
        ["q"], steps=3)
    assert res[0][0]["init"] == f"file:{path}#1" and res[0][0]["completion_ids"] == [2, EOS]
