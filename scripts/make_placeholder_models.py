"""Build untrained tiny HF-format models (causal LM + scalar RM) deterministically.

They exist so the pipeline has something to load before scripts/train_tiny.py has produced the trained
defaults, and so tests can build throw-away models in a temp folder.

    python scripts/make_placeholder_models.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from qalign_repro.models.tiny import build_tokenizer, llama_config, save_tokenizer


def make(out: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 2) -> tuple[Path, Path]:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(llama_config(tok, hidden=hidden, layers=layers, heads=heads))
    torch.manual_seed(seed + 1)
    rm = LlamaForSequenceClassification(llama_config(tok, hidden=hidden, layers=layers, heads=heads, num_labels=1))
    paths = []
    for name, model in (("tiny-lm", lm), ("tiny-rm", rm)):
        d = out / name
        model.save_pretrained(d, safe_serialization=True)
        save_tokenizer(tok, d)
        paths.append(d)
    return paths[0], paths[1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make(args.out, args.seed))
