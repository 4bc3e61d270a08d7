"""The embedded default models' building blocks: a character-level tokenizer and tiny Llama configs.

Both the placeholder builder (scripts/make_placeholder_models.py) and the trainer (scripts/train_tiny.py)
use these, so every shipped model shares one vocabulary and loads in any HF-compatible backend.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
#: every printable ASCII character and newline: enough for arithmetic and for the benchmarks' prompts
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def assets_dir(name: str) -> Path:
    """Folder of a shipped model (``tiny-lm`` or ``tiny-rm``) inside the installed package."""
    return Path(str(resources.files("qalign_repro").joinpath("assets", name)))


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Save so that other loaders (vLLM, older transformers) know the class."""
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["padding_side"] = "left"  # batched generation with a causal LM needs left padding
    cfg_path.write_text(json.dumps(cfg, indent=2))


def llama_config(tokenizer, *, hidden: int = 192, layers: int = 3, heads: int = 3, context: int = 512,
                 num_labels: int | None = None):
    """Head size hidden/heads must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...):
    192/3 = 64, so the shipped models load in every backend."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=num_labels is None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if num_labels is not None:
        cfg.num_labels = num_labels
    return cfg
