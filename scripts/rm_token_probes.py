"""Where a learned tiny RM loses the LM's own per-token evidence: probes on the frozen tiny-lm's states.

The LM's own log-likelihood ranks its correct sample above its incorrect one in ~0.92 of held-out pairs, yet
every learned RM stays near chance (docs/tiny_models.md). An RM has to recompute, at each completion position t,
``l_t = log p_LM(x_t | x_<t)``: the LM's prediction made at t-1, looked up at the token written at t. This script
measures which of the two inputs a learned readout cannot get from the LM's states, by fitting the same SwiGLU
MLP (one hidden layer, the width of the LM's own MLP) to regress ``l_t`` from

- ``current``: the LM's final (normed) state at t only;
- ``current+previous``: the final states at t and t-1 (what one attention head to the previous token could give);
- ``token+previous``: the one-hot current token and the state at t-1 (the exact inputs of ``l_t``).

and prints the held-out Pearson r (all completion tokens, and digits only). Samples are the LM's own
temperature-1 completions on rm_train prompts, plus gold chains and one-error corruptions of them
(``train_tiny.corrupt``); held-out prompts are disjoint. Seeded and single-threaded by default::

    python scripts/rm_token_probes.py                        # ~15 min on one core
    python scripts/rm_token_probes.py --prompts 40 --held 10 --steps 50    # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny as tt  # noqa: E402  (the training script's own encoder, sampler and corruptions)

from qalign_repro.models.tiny import build_tokenizer  # noqa: E402
from qalign_repro.tasks.arith import Arith  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class SwiGLU(torch.nn.Module):
    """The probe: one gated hidden layer, as in a Llama MLP, and a scalar output."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(d_in, hidden), torch.nn.Linear(d_in, hidden)
        self.down = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))[..., 0]


@torch.no_grad()
def token_rows(lm: LlamaForCausalLM, seqs: list[list[int]], starts: list[int], pad: int, vocab: int,
               digits: set[int], clip: float, batch: int = 64) -> dict[str, torch.Tensor]:
    """Per completion token: normed final state at t and t-1, one-hot token, target l_t, is-digit flag."""
    cur, prev, onehot, target, is_digit = [], [], [], [], []
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        ids = tt.right_pad(chunk, pad)
        out = lm(input_ids=ids, output_hidden_states=True)
        states = out.hidden_states[-1]  # after the final norm: what the LM's head reads
        logp = torch.log_softmax(out.logits.float(), -1)
        for j, (seq, start) in enumerate(zip(chunk, starts[b : b + batch])):
            n = len(seq)
            tok = torch.tensor(seq[start:n])
            cur.append(states[j, start:n])
            prev.append(states[j, start - 1 : n - 1])
            onehot.append(torch.nn.functional.one_hot(tok, vocab).float())
            target.append(logp[j, start - 1 : n - 1].gather(1, tok[:, None])[:, 0].clamp(min=clip))
            is_digit.append(torch.tensor([t in digits for t in seq[start:n]]))
    return {"current": torch.cat(cur), "previous": torch.cat(prev), "token": torch.cat(onehot),
            "target": torch.cat(target), "digit": torch.cat(is_digit)}


def fit_probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_he: torch.Tensor, y_he: torch.Tensor, digit: torch.Tensor,
              args) -> dict[str, float]:
    torch.manual_seed(args.seed)
    probe = SwiGLU(x_tr.shape[1], args.hidden)
    opt = torch.optim.Adam(probe.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        k = torch.randint(0, len(y_tr), (args.batch,), generator=g)
        loss = ((probe(x_tr[k]) - y_tr[k]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = probe(x_he)
    r_all = float(np.corrcoef(p.numpy(), y_he.numpy())[0, 1])
    r_dig = float(np.corrcoef(p[digit].numpy(), y_he[digit].numpy())[0, 1]) if int(digit.sum()) > 2 else float("nan")
    return {"r": round(r_all, 3), "r_digits": round(r_dig, 3)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", type=Path, default=REPO / "src" / "qalign_repro" / "assets" / "tiny-lm")
    ap.add_argument("--dataset", type=Path, default=REPO / "conf" / "dataset" / "arith.yaml")
    ap.add_argument("--prompts", type=int, default=1200, help="rm_train prompts sampled (the last --held held out)")
    ap.add_argument("--held", type=int, default=180)
    ap.add_argument("--samples", type=int, default=8, help="LM samples per prompt (temperature 1)")
    ap.add_argument("--corruptions", type=int, default=2, help="one-error chains per training prompt")
    ap.add_argument("--clip", type=float, default=-10.0, help="targets below this log-prob are clipped")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=1024, help="token rows per probe step")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task = Arith(yaml.safe_load(args.dataset.read_text()))
    tok = build_tokenizer()
    enc = tt.Encoder(tok)
    lm = LlamaForCausalLM.from_pretrained(args.lm).eval()
    docs = task.load_split("rm_train", args.prompts)
    sampling = tt.parse_args([])  # the training script's own sampling settings (max_new_tokens, gen_batch)
    rows = tt.sample_texts(lm, enc, task, docs, args.samples, sampling, seed=args.seed + 1)
    rng = random.Random(args.seed + 7)
    split: dict[str, tuple[list[list[int]], list[int]]] = {"train": ([], []), "held": ([], [])}
    for k, (doc, row) in enumerate(zip(docs, rows)):
        part = "held" if k >= len(docs) - args.held else "train"
        texts = sorted({s["text"] for s in row})
        if part == "train":
            gold = task.solution(doc)
            texts += [gold] + [bad for _ in range(args.corruptions)
                               if (bad := tt.corrupt(gold, rng, int(task.settings["max_value"]))) is not None]
        msgs = task.prompt(doc)
        for text in texts:
            split[part][0].append(enc.chat(msgs, text))
            split[part][1].append(len(enc.prompt(msgs)))
    digits = {tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    tr = token_rows(lm, *split["train"], enc.pad, len(tok), digits, args.clip)
    he = token_rows(lm, *split["held"], enc.pad, len(tok), digits, args.clip)
    tt.log(f"{len(tr['target'])} training / {len(he['target'])} held-out completion tokens "
           f"({len(split['train'][0])} / {len(split['held'][0])} sequences); {time.time() - t0:.0f}s")
    results = {}
    for name, parts in (("current", ("current",)), ("current+previous", ("current", "previous")),
                        ("token+previous", ("token", "previous"))):
        x_tr = torch.cat([tr[p] for p in parts], 1)
        x_he = torch.cat([he[p] for p in parts], 1)
        results[name] = fit_probe(x_tr, tr["target"], x_he, he["target"], he["digit"], args)
        tt.log(f"{name:>17}: held-out r {results[name]['r']}, digits only {results[name]['r_digits']}")
    tt.log(f"done in {time.time() - t0:.0f}s")
    return results


if __name__ == "__main__":
    main()
