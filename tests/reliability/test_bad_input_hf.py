"""Bad model folders and prompts with the real HF backend (``backend=hf``, the shipped tiny models): one line
naming the folder/value and what is allowed, nothing stored. Slow: imports transformers in-process."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from badkit import assert_unchanged, cli_error, copy_root, snapshot, toy
from crashkit import Fault, PhaseBoard, run_forked

from qalign_repro.models.tiny import assets_dir

pytestmark = pytest.mark.slow

HF = ["progress=false", "method=qalign", "dataset.n=2", "steps=2", "max_new_tokens=16"]


@pytest.fixture(scope="module")
def populated(tmp_path_factory, preloaded) -> Path:
    from qalign_repro.cli import compose_config
    from qalign_repro.stages.run import execute

    root = tmp_path_factory.mktemp("populated-hf") / "root"
    cfg = compose_config(toy(root, "dataset.n=2", "steps=2"))
    assert run_forked(lambda: execute(cfg), Fault(), board=PhaseBoard(), log=root.parent / "log").returncode == 0
    return root


def model_copy(tmp: Path, asset: str, drop: tuple[str, ...] = (), edit=None) -> Path:
    """A copy of a shipped model folder without the files in ``drop`` (and ``edit(folder)`` applied)."""
    dst = tmp / f"{asset}-broken"
    shutil.copytree(assets_dir(asset), dst)
    for pattern in drop:
        for p in dst.glob(pattern):
            p.unlink()
    if edit:
        edit(dst)
    return dst


def _no_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))


def _truncate_weights(folder: Path) -> None:
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# (id, extra overrides given the tmp folder, pattern, new empty run allowed, xfail reason, raises).
# A new run's models and prompts are checked before its folder exists (a finished run still loads no model),
# so a bad model or prompt leaves no new run at all, and the existing runs untouched.
CASES = [
    ("model-without-weights", lambda t: [f"model.path={model_copy(t, 'tiny-lm', ('*.safetensors',))}"],
     r"model.path=.*tiny-lm-broken has no weights \(\*.safetensors or \*.bin\)", False, None, None),
    ("model-without-config", lambda t: [f"model.path={model_copy(t, 'tiny-lm', ('config.json',))}"],
     r"model.path=.* has no config.json; allowed: an HF-format model folder", False, None, None),
    ("model-path-not-a-folder", lambda t: ["model.path=./no-such-model"],
     r"model.path=./no-such-model is not a folder; allowed: a model folder or a hub id", False, None, None),
    ("reward-without-weights", lambda t: [f"reward.path={model_copy(t, 'tiny-rm', ('*.safetensors',))}"],
     r"reward.path=.*tiny-rm-broken has no weights", False, None, None),
    ("tokenizer-without-chat-template",
     lambda t: [f"model.path={model_copy(t, 'tiny-lm', edit=_no_chat_template)}"],
     r"tokenizer of .*tiny-lm-broken has no chat template; allowed: a model folder whose", False, None, None),
    ("prompt-longer-than-context",
     lambda t: ["dataset=gsm8k", "dataset.n=null", f"+dataset.path={_long_question(t)}"],
     r"1 of 1 prompts do not fit the model context \(8192 tokens\) with max_new_tokens=16; the longest, doc '0', "
     r"has \d+ tokens; allowed: model.max_context=\d+ with model.allow_long_context=true \(past the model's 8192 "
     r"positions: untrained\), or a shorter prompt or another dataset, or the paper's models", False, None, None),
    ("max-new-tokens-beyond-model-context", lambda t: ["max_new_tokens=9000"],
     r"with max_new_tokens=9000; the longest, doc '[^']+', has (\d+) tokens; allowed: max_new_tokens <= \d+, or "
     r"model.max_context=\d+ with model.allow_long_context=true", False, None, None),
    ("truncated-weights", lambda t: [f"model.path={model_copy(t, 'tiny-lm', edit=_truncate_weights)}"],
     r"model.path=.*tiny-lm-broken: could not load it with AutoModelForCausalLM \(\w+: .*\); allowed: a complete",
     False, None, None),
    ("model-without-tokenizer", lambda t: [f"model.path={model_copy(t, 'tiny-lm', ('tokenizer*',))}"],
     r"model.path=.*tiny-lm-broken has no tokenizer files", False, None, None),
    ("reward-model-as-policy", lambda t: [f"model.path={assets_dir('tiny-rm')}"],
     r"model.path=.*tiny-rm is a sequence classifier / reward model \(LlamaForSequenceClassification\), not a "
     r"causal LM; allowed: a causal LM", False, None, None),
    ("policy-as-reward-model", lambda t: [f"reward.path={assets_dir('tiny-lm')}"],
     r"reward.path=.*tiny-lm is a causal LM \(LlamaForCausalLM\), not a sequence classifier", False, None, None),
    ("context-beyond-positions", lambda t: ["model.max_context=10000"],
     r"model.max_context=10000 exceeds the 8192 positions of .*tiny-lm; allowed: model.max_context <= 8192, or "
     r"model.allow_long_context=true", False, None, None),
]


def _long_question(tmp: Path) -> Path:
    path = tmp / "long.jsonl"
    path.write_text(json.dumps({"question": "How many apples? " * 500, "answer": "#### 1"}) + "\n")
    return path


@pytest.mark.parametrize(
    ("extra", "pattern", "new_empty_run_ok"),
    [pytest.param(extra, pattern, ok, id=cid,
                  marks=[pytest.mark.xfail(strict=True, reason=why, raises=raises)] if why else [])
     for cid, extra, pattern, ok, why, raises in CASES])
def test_bad_model_or_prompt_is_one_line_and_changes_nothing(populated, tmp_path, extra, pattern, new_empty_run_ok):
    root = copy_root(populated, tmp_path / "root")
    before = snapshot(root)
    line = cli_error("run", [*HF, f"output_root={root}", *extra(tmp_path)])
    assert "\n" not in line
    assert re.search(pattern, line), line
    assert_unchanged(root, before, new_empty_run_ok=new_empty_run_ok)
