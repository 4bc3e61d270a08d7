"""A newcomer's first commands on the default tiny models (issue 16, items 1 and 8): every bundled benchmark fits
the shipped context, the run says when the tiny models meet a benchmark they were not trained for, a context
error only suggests values that can work, a refused start leaves no run behind, wrong models are refused before
their weights load, and run names follow the model actually loaded."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from _helpers import run_module

from qalign_repro.cli import CONF_DIR, compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import check_budget
from qalign_repro.models.folders import check_architecture, context_length, inspect_model, model_positions
from qalign_repro.models.tiny import assets_dir
from qalign_repro.stages.run import context_error, untrained_note
from qalign_repro.store.run_names import config_hash, group_name

BENCHMARKS = ["gsm8k", "gsm_symbolic", "gsm_symbolic_p1", "gsm_symbolic_p2", "math500", "mmlu_redux", "truthfulqa",
              "ifeval"]
LLAMA_LM = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 512}
LLAMA_RM = {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
            "id2label": {"0": "LABEL_0"}, "max_position_embeddings": 512}


def _largest_max_new_tokens() -> int:
    """The largest ``max_new_tokens`` any shipped config asks for (top level, experiments, model cards)."""
    found = []
    for path in CONF_DIR.rglob("*.yaml"):
        node = yaml.safe_load(path.read_text()) or {}
        if isinstance(node, dict) and isinstance(node.get("max_new_tokens"), int):
            found.append(node["max_new_tokens"])
    return max(found)


# -- item 1: the context ---------------------------------------------------------------------------------------
@pytest.mark.slow  # draws the 12,500 GSM-Symbolic instances and tokenizes ~22 k prompts (~25 s on 2 busy cores)
def test_every_bundled_prompt_plus_the_largest_budget_fits_the_shipped_context():
    from transformers import AutoTokenizer

    from qalign_repro.tasks import get_task

    tok = AutoTokenizer.from_pretrained(assets_dir("tiny-lm"))
    budget = _largest_max_new_tokens()
    assert budget >= 800  # the paper's budget is among them
    longest = {}
    for name in ["arith", *BENCHMARKS]:
        cfg = yaml.safe_load((CONF_DIR / "dataset" / f"{name}.yaml").read_text())
        cfg["n"] = None  # every doc, not the default subset
        if name == "mmlu_redux":
            cfg["error_types"] = None  # every annotation label too (experiment=general keeps them all)
        task = get_task(cfg)
        texts = [tok.apply_chat_template(task.prompt(d), add_generation_prompt=True, tokenize=False)
                 for d in task.docs()]
        longest[name] = max(len(ids) for ids in tok(texts, add_special_tokens=False).input_ids)
    worst = max(longest.values())
    assert worst > 512  # what made the mission command fail at the old context
    for asset in ("tiny-lm", "tiny-rm", "tiny-draft"):
        positions = model_positions(json.loads((assets_dir(asset) / "config.json").read_text()))
        # the RM reads prompt + completion + the closing "</s>"
        assert worst + budget + 1 <= positions, (asset, longest, budget, positions)


def test_tiny_configs_take_the_context_of_the_loaded_model():
    cfg = compose_config([])
    assert cfg.model.max_context is None and cfg.reward.max_context is None
    spec = inspect_model({}, str(assets_dir("tiny-lm")), "model", "lm")
    assert spec.max_context == spec.positions == 8192
    assert inspect_model({}, str(assets_dir("tiny-rm")), "reward", "rm").max_context == 8192


# -- item 1: the untrained-benchmark line ------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_tiny_models_on_a_benchmark_they_were_not_trained_for_say_so_in_one_line(dataset):
    note = untrained_note(compose_config([f"dataset={dataset}"]))
    assert note is not None and "\n" not in note
    assert note.startswith("note: model=tiny and reward=tiny were trained on arith only, not on " + dataset)
    assert "model=tulu3_8b_sft reward=tulu3_8b_rm" in note and "docs/cluster.md" in note


def test_no_note_on_arith_or_for_models_the_list_does_not_describe(tmp_path):
    assert untrained_note(compose_config(["dataset=arith"])) is None
    note = untrained_note(compose_config(["dataset=gsm8k", f"model.path={tmp_path}"]))
    assert note is not None and note.startswith("note: reward=tiny was trained")  # the other LM: no claim
    assert untrained_note(compose_config(["dataset=gsm8k", "model=tulu3_8b_sft", "reward=tulu3_8b_rm"])) is None


# -- item 1: context errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_prompt", "max_new", "context", "positions"), [
    (499, 96, 512, 512), (5111, 96, 512, 512), (600, 96, 512, 8192), (400, 200, 512, 8192), (9000, 10, 8192, None)])
def test_a_context_error_suggests_only_values_that_work(n_prompt, max_new, context, positions):
    line = context_error(n_prompt, max_new, context, positions)
    for cap in re.findall(r"max_new_tokens <= (-?\d+)", line):
        assert 1 <= int(cap) and n_prompt + int(cap) <= context
    for value in re.findall(r"model.max_context=(\d+)", line):
        assert int(value) >= n_prompt + max_new
        if positions is None or int(value) > positions:
            assert "allow_long_context=true" in line
    assert ("max_new_tokens <=" in line) == (n_prompt < context)
    assert "a shorter prompt" in line and "model=tulu3_8b_sft reward=tulu3_8b_rm" in line


def test_check_budget_never_suggests_an_impossible_budget():
    with pytest.raises(ConfigError) as exc:
        check_budget([[1] * 600], [16], 512)
    assert "new tokens for this prompt" not in str(exc.value) and "model.max_context" in str(exc.value)
    with pytest.raises(ConfigError, match=r"allowed: at most 12 new tokens for this prompt, a shorter prompt"):
        check_budget([[1] * 500], [16], 512)


def test_a_refused_start_leaves_no_run_and_evaluate_finds_none(tmp_path):
    """The mission's old failure: a prompt beyond the context left an empty "created" run graded 0.000."""
    from qalign_repro.errors import StorageError
    from qalign_repro.stages.run import execute
    from qalign_repro.store.listing import select_runs

    cfg = compose_config(["dataset=mmlu_redux", "dataset.n=4", "model.max_context=300", "progress=false",
                          f"output_root={tmp_path}"])
    with pytest.raises(ConfigError) as exc:
        execute(cfg)
    line = str(exc.value)
    assert re.fullmatch(r"\d of 4 prompts do not fit the model context \(300 tokens\) with max_new_tokens=96; "
                        r"the longest, doc '[^']+', has \d+ tokens; allowed: .*", line), line
    assert "max_new_tokens <= -" not in line
    assert not (tmp_path / "runs").exists()
    with pytest.raises(StorageError, match=r"^no run .* for these overrides"):
        select_runs(cfg)  # what evaluate / predict / plot do first: nothing to grade as 0.000


# -- item 8: wrong models are refused --------------------------------------------------------------------------------
def test_architecture_check_refuses_the_wrong_role():
    check_architecture(LLAMA_LM, "/m", "model", "lm")
    check_architecture({"architectures": ["GPT2LMHeadModel"]}, "/m", "model", "lm")  # the Auto mapping's name
    check_architecture({"model_type": "llama"}, "/m", "model", "lm")  # no architectures: the type's causal LM
    check_architecture(LLAMA_RM, "/r", "reward", "rm")
    with pytest.raises(ConfigError, match=r"^model.path=/r is a sequence classifier / reward model "
                                          r"\(LlamaForSequenceClassification\), not a causal LM; allowed: a causal LM"):
        check_architecture(LLAMA_RM, "/r", "model", "lm")
    with pytest.raises(ConfigError, match=r"^reward.path=/m is a causal LM \(LlamaForCausalLM\), not a sequence "
                                          r"classifier with one label; allowed: a sequence classifier"):
        check_architecture(LLAMA_LM, "/m", "reward", "rm")
    with pytest.raises(ConfigError, match=r"^model.path=/e is LlamaModel, not a causal LM"):
        check_architecture({"architectures": ["LlamaModel"]}, "/e", "model", "lm")
    two = {k: v for k, v in LLAMA_RM.items() if k != "id2label"}  # transformers' default: 2 labels
    with pytest.raises(ConfigError, match=r"^reward.path=/r has num_labels=2; allowed: 1"):
        check_architecture(two, "/r", "reward", "rm")


def test_max_context_beyond_the_positions_needs_the_explicit_flag():
    assert context_length({}, LLAMA_LM, "/m", "model") == 512
    assert context_length({"max_context": 256}, LLAMA_LM, "/m", "model") == 256
    with pytest.raises(ConfigError, match=r"^model.max_context=2048 exceeds the 512 positions of /m; allowed: "
                                          r"model.max_context <= 512, or model.allow_long_context=true"):
        context_length({"max_context": 2048}, LLAMA_LM, "/m", "model")
    assert context_length({"max_context": 2048, "allow_long_context": True}, LLAMA_LM, "/m", "model") == 2048
    with pytest.raises(ConfigError, match=r"^reward.max_context=600 exceeds the 512 positions"):
        context_length({"max_context": 600}, LLAMA_RM, "/r", "reward")


def test_rm_folder_as_policy_is_refused_by_the_hf_backend_before_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    from qalign_repro.lm.hf import HFGenerator

    def boom(*a, **k):
        raise AssertionError("weights loaded before the architecture check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    rm = assets_dir("tiny-rm")
    with pytest.raises(ConfigError, match=rf"^model.path={re.escape(str(rm))} is a sequence classifier"):
        HFGenerator({"path": str(rm)}, {"device": "cpu"})


# -- item 8: names from the loaded model --------------------------------------------------------------------------
def test_run_name_follows_the_loaded_model(tmp_path):
    default = compose_config([])
    assert (default.model.name, default.reward.name) == ("tiny", "tiny")
    assert group_name(default).startswith("arith-qalign-tiny-b1-s0-")
    folder = tmp_path / "My-LM"
    cfg = compose_config([f"model.path={folder}", f"reward.path={tmp_path / 'other-rm'}"])
    assert (cfg.model.name, cfg.reward.name) == ("My-LM", "other-rm")
    assert group_name(cfg).startswith("arith-qalign-My-LM-b1-s0-")
    named = compose_config([f"model.path={folder}", "model.name=mine"])  # an explicit name wins
    assert named.model.name == "mine" and "-mine-" in group_name(named)
    hub = compose_config(["model=tulu3_8b_sft", "reward=tulu3_8b_rm"])
    assert (hub.model.name, hub.reward.name) == ("tulu3_8b_sft", "tulu3_8b_rm")
    assert compose_config(["model=tulu3_8b_sft", "model.path=org/Other-8B"]).model.name == "Other-8B"
    # the list of benchmarks a model was trained on describes it; it changes nothing generated
    assert config_hash(compose_config(["model.trained_on=[arith,gsm8k]"])) == config_hash(default)


@pytest.mark.slow
def test_a_copied_model_folder_names_the_run(tmp_path):
    lm = shutil.copytree(assets_dir("tiny-lm"), tmp_path / "my-tiny-copy")
    proc = run_module("run", f"model.path={lm}", "dataset.n=1", "steps=1", "max_new_tokens=8", "progress=false",
                      f"output_root={tmp_path / 'out'}")
    names = [p.name for p in (tmp_path / "out" / "runs").iterdir()]
    assert len(names) == 1 and names[0].startswith("arith-qalign-my-tiny-copy-b1-s0-"), (names, proc.stdout)


# -- item 1: the mission command, end to end -----------------------------------------------------------------------
@pytest.mark.slow
def test_mission_command_and_a_benchmark_pipeline_run_offline_to_a_figure(tmp_path):
    """``python -m qalign_repro.run method=qalign dataset=gsm8k`` on the default models (fewer prompts/steps to
    stay short), then ancestral + evaluate + predict + plot on a multiple-choice benchmark."""
    small = ["dataset.n=2", "steps=3", "progress=false", f"output_root={tmp_path}"]
    proc = run_module("run", "method=qalign", "dataset=gsm8k", *small)
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not on gsm8k" in notes[0]
    run_module("run", "method=ancestral", "dataset=truthfulqa", *small)
    for stage in ("evaluate", "predict", "plot"):
        run_module(stage, "runs=all", *small)
    figures = list((tmp_path / "figures" / "default").glob("*.png"))
    assert figures, sorted(p.name for p in tmp_path.rglob("*"))
    table = (tmp_path / "predictions" / "default" / "predictions.csv").read_text()
    assert "truthfulqa" in table and "gsm8k" in table
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [r.split("-")[0] for r in runs] == ["gsm8k", "truthfulqa"]
