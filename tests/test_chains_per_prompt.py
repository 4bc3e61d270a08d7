"""``method.chains: K``: K independent QAlign chains per prompt, stored as K instances of that prompt."""

from __future__ import annotations

import pytest
from _helpers import TOY

from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.stages.run import execute
from qalign_repro.store.fsck import check_store
from qalign_repro.store.run_names import run_name
from qalign_repro.store.storage import RunStore


def _cfg(root, *extra: str):
    return compose_config([*TOY, f"output_root={root}", "method=qalign", "dataset.n=3", "steps=5", *extra])


def test_k_chains_are_k_instances_per_prompt(tmp_path):
    one = execute(_cfg(tmp_path / "one"))
    three = execute(_cfg(tmp_path / "three", "method.chains=3"))
    inputs = three.inputs()
    assert [i["id"] for i in inputs] == [i["id"] for i in one.inputs() for _ in range(3)]
    assert [i["chain"] for i in inputs] == [0, 1, 2] * 3
    assert three.meta["chains"] == 3 and three.steps_done() == 5
    data = [inst["outputs"] for inst in three.iter_instances()]
    ref = [inst["outputs"] for inst in one.iter_instances()]
    # chain 0 of each prompt is the chain a one-chain run makes; the other chains draw their own randomness
    assert [data[3 * p] for p in range(3)] == ref
    assert all(data[3 * p + 1] != data[3 * p] and data[3 * p + 2] != data[3 * p + 1] for p in range(3))
    assert check_store(tmp_path / "three", three.name) == []
    # a rerun has nothing to do; the extra chains are part of the run's identity
    assert execute(_cfg(tmp_path / "three", "method.chains=3")).steps_done() == 5
    assert run_name(_cfg(tmp_path, "method.chains=3")) != run_name(_cfg(tmp_path))


def test_k_chains_resume_after_extension(tmp_path):
    execute(_cfg(tmp_path, "method.chains=2"))
    longer = execute(_cfg(tmp_path, "method.chains=2", "steps=8"))
    fresh = execute(_cfg(tmp_path / "fresh", "method.chains=2", "steps=8"))
    assert [i["outputs"] for i in longer.iter_instances()] == [i["outputs"] for i in fresh.iter_instances()]
    assert isinstance(RunStore(tmp_path, longer.name, readonly=True).meta["chains"], int)


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "two"])
def test_bad_chain_counts_are_one_line_errors(tmp_path, bad):
    from qalign_repro.config import validate

    with pytest.raises(ConfigError, match="method.chains"):
        validate(_cfg(tmp_path, f"method.chains={bad}"))
    assert not (tmp_path / "runs").exists()
