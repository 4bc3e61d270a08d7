"""FLOPs from stored token counts, and parameter counts from HF configs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from qalign_repro.analysis import flops as fl
from qalign_repro.errors import DataError
from qalign_repro.stages.predict import PredictOptions, predict_run
from qalign_repro.store.storage import RunStore

ASSETS = Path(__file__).resolve().parents[1] / "src" / "qalign_repro" / "assets"

# per prompt, per output: (prefilled, generated, cached, scored)
TOKENS = [
    [(10, 5, 0, 15), (12, 3, 8, 15), (13, 2, 10, 15), (10, 7, 0, 17)],
    [(20, 9, 0, 29), (25, 4, 20, 29), (21, 8, 16, 29), (20, 1, 0, 21)],
]
P_POLICY, P_RM = 1000.0, 300.0


def make_run(root: Path, name: str, method: str) -> None:
    meta = {"run_name": name, "experiment_name": "flops", "method": method, "dataset": "arith",
            "mbr_kind": "exact", "beta": 1.0, "status": "done",
            "model": {"name": "m", "path": None, "n_params": P_POLICY},
            "reward": {"name": "r", "path": None, "n_params": P_RM}}
    store = RunStore(root, name, create=True, meta=meta)
    store.add_instances([{"id": f"d{p}", "idx": p, "prompt_ids": [1, 2], "messages": [], "doc": {}}
                         for p in range(len(TOKENS))])
    for k in range(4):
        store.commit_step(k, {p: {"completion_ids": [1], "text": "x", "reward": float(k), "accepted": True,
                                  "index": 0, "proposal_len": 1, "proposal_reward": 0.0,
                                  "tokens_prefilled": t[k][0], "tokens_generated": t[k][1],
                                  "tokens_cached": t[k][2], "tokens_scored": t[k][3], "finish_reason": "stop"}
                              for p, t in enumerate(TOKENS)})
    store.write_eval("grades", [{"id": f"d{p}", "answer": ["1"] * 4, "correct": [True] * 4, "metrics": {}}
                                for p in range(len(TOKENS))])
    store.close()


def hand_sum(n: int, cache: bool) -> tuple[float, float]:
    pol = np.mean([sum(t[0] + t[1] - (t[2] if cache else 0) for t in row[:n]) for row in TOKENS])
    rm = np.mean([sum(t[3] for t in row[:n]) for row in TOKENS])
    return pol, rm


@pytest.mark.parametrize("cache", [False, True])
def test_stored_run_flops_equal_hand_computed_sum(tmp_path, cache):
    make_run(tmp_path, "anc", "ancestral")
    table, _ = predict_run(tmp_path, "anc", PredictOptions(bootstrap=10, count_prefix_cache=cache))
    assert sorted(table["n"].unique()) == [1, 2, 4]
    for _, row in table.iterrows():
        pol, rm = hand_sum(int(row["n"]), cache)
        assert row["tokens_policy"] == pol
        assert row["flops_policy"] == 2 * P_POLICY * pol
        if row["rule"] == "mv":  # MV never reads a reward: no RM cost
            assert row["tokens_rm"] == 0 and row["flops_rm"] == 0
        else:
            assert row["tokens_rm"] == rm
            assert row["flops_rm"] == 2 * P_RM * rm
        assert row["flops"] == row["flops_policy"] + row["flops_rm"]


def test_qalign_run_always_pays_for_the_rm(tmp_path):
    make_run(tmp_path, "qa", "qalign")
    table, diag = predict_run(tmp_path, "qa", PredictOptions(bootstrap=10))
    assert table["rule"].unique().tolist() == ["qalign"]
    row = table[table["n"] == 4].iloc[0]
    pol, rm = hand_sum(4, False)
    assert row["flops"] == 2 * P_POLICY * pol + 2 * P_RM * rm
    assert diag is not None and diag["steps"] == 4


def test_forward_flops_and_cumulative():
    assert fl.forward_flops(7, 3) == 42
    costs = np.array([[1, 2, 3, 4], [10, 20, 30, 40]])
    assert fl.cumulative_at(costs, [1, 2, 4]).tolist() == [[1, 3, 10], [10, 30, 100]]
    assert fl.policy_tokens([5], [2], [4], count_prefix_cache=True).tolist() == [3]
    assert fl.policy_tokens([5], [2], [4], count_prefix_cache=False).tolist() == [7]


def _safetensors_count(path: Path) -> int:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("asset", ["tiny-lm", "tiny-rm"])
def test_params_from_config_match_the_shipped_weights(asset):
    d = ASSETS / asset
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"{asset} not built")
    counted = fl.params_from_hf_config(d / "config.json")
    assert counted["total"] == _safetensors_count(d / "model.safetensors")


def test_params_from_config_hand_computed_llama():
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
           "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 16, "num_attention_heads": 2,
           "num_key_value_heads": 1, "tie_word_embeddings": False}
    # per layer: q 8*8 + k,v 2*8*4 + o 8*8 = 192; mlp 3*8*16 = 384; 2 norms 16 -> 592
    per_layer = 192 + 384 + 16
    got = fl.params_from_hf_config(cfg)
    assert got["embedding"] == 80
    assert got["non_embedding"] == 2 * per_layer + 8 + 80
    assert got["total"] == 80 + 2 * per_layer + 8 + 80
    tied = fl.params_from_hf_config({**cfg, "tie_word_embeddings": True})
    assert tied["total"] == got["total"] - 80
    rm = fl.params_from_hf_config({**cfg, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1})
    assert rm["total"] == 80 + 2 * per_layer + 8 + 8
    gpt2 = fl.params_from_hf_config({"n_embd": 8, "n_layer": 1, "vocab_size": 10, "n_positions": 4})
    # wte 80 + wpe 32; block: attn 3*64+24 + 64+8, mlp 8*32+32 + 32*8+8, 2 ln 32; ln_f 16; tied head
    assert gpt2["total"] == 80 + 32 + (216 + 72 + 288 + 264 + 32) + 16


def test_n_params_from_meta_or_config(tmp_path):
    assert fl.n_params_of({"model": {"n_params": 123}}) == 123
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 16,
        "num_attention_heads": 2, "tie_word_embeddings": True}))
    assert fl.n_params_of({"model": {"path": str(tmp_path)}}) == fl.params_from_hf_config(
        tmp_path / "config.json")["total"]
    with pytest.raises(DataError, match="n_params"):
        fl.n_params_of({"run_name": "x", "model": {"name": "llama-8B"}})  # never parsed from the name
