"""Where the in-process HF reward model reads its score (issue 19): at each input's last real token, the
completion's closing ``</s>``, whichever side a batch is padded on, so a padded batch scores every conversation
exactly as it scores alone. The shipped tiny RM pads with id 0, not its EOS (3): reading a pad or an EOS-valued
pad would both be caught. vLLM's pooling RM against this one: tests/vllm_backends/test_vllm_engine.py
(test_reward_is_the_raw_logit_of_the_hf_rm) and test_vllm_shipped_models.py (test_shipped_rm_scores_equal_the_hf_rm).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qalign_repro.models.hf_format import last_token_index, pad_batch

PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}],
           [{"role": "user", "content": "A box holds 4 eggs. How many eggs are in 5 boxes? Think step by step."}]]
COMPLETIONS = ["7", "Each box holds 4 eggs, so 5 boxes hold 5 * 4 = 20 eggs. The answer is 20.", ""]


@pytest.fixture(scope="module")
def rm():
    from qalign_repro.api import load_reward

    model = load_reward("tiny", device="cpu")
    yield model
    model.close()


@pytest.fixture(scope="module")
def encoded(rm):
    return [rm.encode(p, c) for p in PROMPTS for c in COMPLETIONS]


def test_the_tiny_rm_pads_with_an_id_other_than_its_eos(rm, encoded):
    eos = rm.tokenizer.convert_tokens_to_ids("</s>")
    assert rm.pad_id != eos
    assert all(e[-1] == eos for e in encoded)  # the template closes the assistant turn with </s>
    assert len({len(e) for e in encoded}) == len(encoded)  # every row of a batch is padded differently


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_scores_each_conversation_as_alone(rm, encoded, side, monkeypatch):
    alone = np.array([rm.score_ids([e])[0] for e in encoded])
    monkeypatch.setattr(rm, "padding_side", side)
    batched = rm.score_ids(encoded)
    assert np.max(np.abs(batched - alone)) < 1e-5
    assert len(set(np.round(alone, 4))) > 1  # distinct scores: a constant reward would pass trivially
    ids, mask, _, read = rm.batch(encoded)
    eos = rm.tokenizer.convert_tokens_to_ids("</s>")
    assert ids[torch.arange(len(encoded)), read].tolist() == [eos] * len(encoded)
    assert int((ids == rm.pad_id).sum()) > 0  # the batch really is padded on that side
    for row, e in zip(range(len(encoded)), encoded):
        cols = mask[row].nonzero().flatten().tolist()
        assert ids[row, cols].tolist() == e and int(read[row]) == cols[-1]
        assert (cols[0] == 0) if side == "right" else (cols[-1] == ids.shape[1] - 1)


def test_pad_batch_positions_and_read_index_on_both_sides():
    seqs = [[5, 6, 7], [8]]
    ids, mask, pos = pad_batch(seqs, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 2]
    ids, mask, pos = pad_batch(seqs, 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 0]
    with pytest.raises(ValueError, match="allowed: left, right"):
        pad_batch(seqs, 0, "middle")
