"""Bad config input stops with one line naming the value and what is allowed, before any model loads."""

from __future__ import annotations

import pytest
from _helpers import run_module

from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.store.run_names import run_name


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["method=qalgn"], r"method=qalgn is not a known option; allowed: .*ancestral.*qalign"),
        (["dataset=nope"], r"dataset=nope is not a known option; allowed: .*arith"),
        (["backend=nope"], r"backend=nope is not a known option; allowed: .*hf"),
        (["betta=2"], r"unknown config key 'betta'; did you mean 'beta'\?"),
        (["beta=0"], r"beta=0 is invalid; allowed: a finite number > 0"),
        (["beta=-1"], r"beta=-1 is invalid"),
        (["beta=nan"], r"beta=nan is invalid"),
        (["beta=abc"], r"beta='abc' is not a number"),
        (["steps=0"], r"steps=0 is invalid; allowed: an integer >= 1"),
        (["max_new_tokens=0"], r"max_new_tokens=0 is invalid"),
        (["model.max_context=8192", "max_new_tokens=100000"], r"max_new_tokens=100000 does not fit the model context"),
        (["temperature=0.7"], r"temperature=0.7 with method=qalign breaks exactness"),
        (["temperature=0"], r"temperature=0 is invalid"),
        (["dataset.n=0"], r"dataset.n=0 is invalid"),
        (["seed=-3"], r"seed=-3 is invalid"),
        (["run_name=../../etc"], r"invalid run name"),
    ],
)
def test_bad_values_raise_one_line(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        compose_config(overrides)
    assert "\n" not in str(info.value)


def test_inexact_temperature_allowed_when_asked():
    cfg = compose_config(["temperature=0.7", "allow_inexact=true"])
    assert cfg.temperature == 0.7
    assert compose_config(["temperature=0.7", "method=ancestral"]).method.name == "ancestral"


def test_run_name_is_stable_and_ignores_steps_and_output():
    a = run_name(compose_config(["steps=4"]))
    b = run_name(compose_config(["steps=64", "output_root=/elsewhere"]))
    c = run_name(compose_config(["beta=0.5"]))
    assert a == b and a != c and a.startswith("arith-qalign-tiny-b1-s0-")


def test_cli_prints_one_line_and_exits_2():
    proc = run_module("run", "method=qalgn", check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: method=qalgn is not a known option; allowed: ancestral, " + lines[0].split("ancestral, ")[1]]
    assert "Traceback" not in proc.stderr
