"""A learned tiny RM that is wider than the policy (``train_tiny.py --rm-init wide``).

Why wider: a learned RM has to recompute, at each completion token t, the LM's own log-prob
``l_t = log p_LM(x_t | x_<t)`` -- the prediction made at t-1 looked up at the token written at t -- and the LM's
states cannot give it (``scripts/rm_token_probes.py``: r 0.33-0.50 from the LM's final states, 0.92 when the
current token is given separately). With tied embeddings, the current token and the predicted next token share
the same directions, and every learned RM of the policy's width stayed near chance (docs/tiny_models.md). A
"larger RM than the policy" removes the collision without hand-set weights: ``--rm-wide-extra`` more residual
dimensions, whose embedding columns are freshly drawn and which the LM's layers neither read nor write, so the
written token reaches the top of the network untouched next to the LM's own states.

Layout (a plain ``LlamaForSequenceClassification``; HF and vLLM load it):
- embedding: the LM's, plus ``extra`` random columns (drawn with the LM embedding's std);
- the LM's layers, zero-padded to the new width (RMSNorm weights rescaled by sqrt(h / (h + extra)) so the LM's
  own computation is unchanged while the extra columns are zero, and nearly so when they are small);
- one fresh "carry" layer (standard random init) that learns to bring the previous position's state to t;
- one fresh "pool" layer whose query, key and MLP output projections stay zero: uniform causal attention, so at
  the closing ``</s>``, where the score head reads, it adds a learnt linear readout of the sequence's mean state.

Training (the base -- embedding and LM layers -- stays frozen, so its states are computed once and the fresh
layers are trained on the cache):
1. dense per-token targets: the score head, read at every completion token through the carry layer (the pool
   layer is the identity then), regresses the LM's own ``l_t`` (clipped) on the LM's samples and on gold /
   one-error chains -- process supervision whose labels come from the policy itself. First on windows (the
   completion and 2 positions before it: ~3x cheaper), then on whole sequences with target 0 at the prompt's
   positions. The second pass is needed: softmax attention normalises over every position in view, so a carry
   layer trained on windows misreads whole sequences (held-out token r 0.81 on windows, 0.21 on whole sequences,
   measured); and 0 on the prompt makes the mean over all positions, which the pool takes, the mean evidence.
2. the paper's Bradley-Terry loss at ``</s>`` on the on-policy (correct, incorrect) pairs, through the pool's
   value/output projections, the final norm and the head. With the carry layer frozen and uniform attention, the
   score at ``</s>`` is a function of two cached vectors per sequence (the state at ``</s>`` and the mean of the
   pool's normalised inputs), so this stage is full-batch Adam on those. The pool's input gains start at
   1 / (std of each column of that mean over the training sequences), a data-dependent init: without it the
   columns differ in scale ~1,000-fold (the token code against the LM's columns) and Adam stayed at ln 2.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

#: the fresh layers on top of the LM's, in order
FRESH = ("carry", "pool")


def _wide_config(lm_config: LlamaConfig, extra: int, fresh: int) -> LlamaConfig:
    cfg = LlamaConfig(**lm_config.to_dict())
    head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
    cfg.hidden_size = lm_config.hidden_size + extra
    cfg.head_dim = head_dim  # the LM's heads, unchanged
    cfg.intermediate_size = lm_config.intermediate_size
    cfg.num_hidden_layers = lm_config.num_hidden_layers + fresh
    cfg.num_labels = 1
    cfg.tie_word_embeddings = False
    cfg.architectures = ["LlamaForSequenceClassification"]
    return cfg


@torch.no_grad()
def build_wide_rm(lm: LlamaForCausalLM, extra: int, seed: int, code_scale: float = 0.05) -> LlamaForSequenceClassification:
    """The RM before training: see the module docstring. ``code_scale``: std of the new embedding columns
    relative to the LM embedding's; small, so the LM's RMSNorms barely notice them."""
    if (lm.config.hidden_size + extra) % lm.config.num_attention_heads:
        raise ValueError(f"extra width {extra}: hidden {lm.config.hidden_size} + extra must be a multiple of "
                         f"{lm.config.num_attention_heads} heads")
    torch.manual_seed(seed)
    h, n_lm = lm.config.hidden_size, lm.config.num_hidden_layers
    rm = LlamaForSequenceClassification(_wide_config(lm.config, extra, len(FRESH)))
    rm.config.pad_token_id = lm.config.pad_token_id
    emb = lm.model.embed_tokens.weight
    rm.model.embed_tokens.weight[:, :h] = emb
    rm.model.embed_tokens.weight[:, h:] = torch.randn(emb.shape[0], extra) * emb.std() * code_scale
    scale = math.sqrt(h / (h + extra))
    for src, dst in zip(lm.model.layers, rm.model.layers[:n_lm]):
        sa, da = src.self_attn, dst.self_attn
        for s, d in ((sa.q_proj, da.q_proj), (sa.k_proj, da.k_proj), (sa.v_proj, da.v_proj),
                     (src.mlp.gate_proj, dst.mlp.gate_proj), (src.mlp.up_proj, dst.mlp.up_proj)):
            d.weight.zero_()
            d.weight[:, :h] = s.weight  # reads only the LM's columns
        for s, d in ((sa.o_proj, da.o_proj), (src.mlp.down_proj, dst.mlp.down_proj)):
            d.weight.zero_()
            d.weight[:h] = s.weight  # writes only the LM's columns
        for s, d in ((src.input_layernorm, dst.input_layernorm),
                     (src.post_attention_layernorm, dst.post_attention_layernorm)):
            d.weight[:h] = s.weight * scale
            d.weight[h:] = scale
    pool = rm.model.layers[n_lm + FRESH.index("pool")]
    for proj in (pool.self_attn.q_proj, pool.self_attn.k_proj, pool.self_attn.o_proj, pool.mlp.down_proj):
        proj.weight.zero_()
    return rm


@torch.no_grad()
def match_code_gain(rm: LlamaForSequenceClassification, n_lm: int, lm_width: int,
                    states: Sequence[torch.Tensor]) -> float:
    """Data-dependent init of the carry layer's two RMSNorm gains on the extra columns: after the norm, the
    small token code comes out as large per column as the LM's own columns (what a fresh layer's random
    weights expect of their inputs), instead of ~1,000 times smaller. Returns the gain."""
    flat = torch.cat(list(states))
    gain = float(flat[:, :lm_width].pow(2).mean().sqrt() / flat[:, lm_width:].pow(2).mean().sqrt())
    carry = rm.model.layers[n_lm + FRESH.index("carry")]
    for norm in (carry.input_layernorm, carry.post_attention_layernorm):
        norm.weight[lm_width:] = gain
    return gain


def freeze_base(rm: LlamaForSequenceClassification, n_lm: int) -> None:
    for module in (rm.model.embed_tokens, *rm.model.layers[:n_lm]):
        module.requires_grad_(False)


class Top(torch.nn.Module):
    """The RM above its frozen base, run on cached base states: ``layers`` fresh layers, the final norm and the
    head, sharing the RM's own modules (training this trains the RM)."""

    def __init__(self, rm: LlamaForSequenceClassification, n_lm: int, layers: int):
        super().__init__()
        cfg = LlamaConfig(**rm.config.to_dict())
        cfg.num_hidden_layers = layers
        self.body = LlamaModel(cfg)
        self.body.layers = torch.nn.ModuleList(rm.model.layers[n_lm : n_lm + layers])
        self.body.norm = rm.model.norm
        self.body.embed_tokens = torch.nn.Embedding(1, 1)  # unused: the input is the cached states
        self.score = rm.score

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Per-position scores ``[batch, time]`` of right-padded base states ``[batch, time, hidden]``."""
        hidden = self.body(inputs_embeds=states, use_cache=False).last_hidden_state
        return self.score(hidden)[..., 0].float()


@torch.no_grad()
def base_states(rm: LlamaForSequenceClassification, n_lm: int, seqs: Sequence[list[int]], pad: int,
                batch: int = 64) -> list[torch.Tensor]:
    """The residual stream after the last LM layer, per sequence (float32, ``[len, hidden]``)."""
    cap: dict[str, torch.Tensor] = {}
    hook = rm.model.layers[n_lm - 1].register_forward_hook(
        lambda m, i, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    layers = rm.model.layers
    rm.model.layers = layers[:n_lm]  # the fresh layers are not needed for the cache
    out: list[torch.Tensor] = []
    try:
        for b in range(0, len(seqs), batch):
            chunk = seqs[b : b + batch]
            width = max(len(s) for s in chunk)
            rm.model(input_ids=torch.tensor([s + [pad] * (width - len(s)) for s in chunk]))
            out += [cap["h"][k, : len(s)].float().clone() for k, s in enumerate(chunk)]
    finally:
        hook.remove()
        rm.model.layers = layers
    return out


@torch.no_grad()
def lm_token_logprobs(lm: LlamaForCausalLM, seqs: Sequence[list[int]], starts: Sequence[int], pad: int,
                      clip: float, batch: int = 64) -> list[torch.Tensor]:
    """The dense targets: ``l_t`` of each completion token (positions ``start..len-1``), clipped below."""
    out: list[torch.Tensor] = []
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        width = max(len(s) for s in chunk)
        logits = lm(input_ids=torch.tensor([s + [pad] * (width - len(s)) for s in chunk])).logits
        logp = torch.log_softmax(logits.float(), -1)
        for k, (seq, start) in enumerate(zip(chunk, starts[b : b + batch])):
            tok = torch.tensor(seq[start:])
            out.append(logp[k, start - 1 : len(seq) - 1].gather(1, tok[:, None])[:, 0].clamp(min=clip))
    return out


def _pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    width = max(len(s) for s in states)
    out = torch.zeros(len(states), width, states[0].shape[1])
    for k, s in enumerate(states):
        out[k, : len(s)] = s
    return out


def _lr(step: int, total: int, warmup: int, base: float) -> float:
    return base * (step + 1) / warmup if step < warmup else base * max(0.0, total - step) / max(1, total - warmup)


def train_dense(top: Top, states: list[torch.Tensor], starts: list[int], targets: list[torch.Tensor], *,
                steps: int, batch: int, lr: float, seed: int, context: int | None = 2, warmup: int = 50,
                log: Callable[[str], None] = print, log_every: int = 100, stage: str = "dense") -> dict[str, Any]:
    """MSE of the per-position score against per-token ``targets`` on completion tokens.

    ``context``: each sequence is cut to its completion plus that many positions before it (cheap: most of a
    sequence is its prompt); None keeps the whole sequence and asks for 0 at the prompt's positions, as the
    exported model sees it (see the module docstring for why both passes are needed)."""
    params = [p for p in top.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    top.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(states), (batch,), generator=g).tolist()
        cut = [0 if context is None else max(0, starts[i] - context) for i in idx]
        x = _pad_states([states[i][c:] for i, c in zip(idx, cut)])
        y = torch.full(x.shape[:2], float("nan"))
        for k, (i, c) in enumerate(zip(idx, cut)):
            if context is None:
                y[k, : starts[i]] = 0.0
            y[k, starts[i] - c : starts[i] - c + len(targets[i])] = targets[i]
        keep = ~torch.isnan(y)
        loss = ((top(x)[keep] - y[keep]) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, warmup, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"RM {stage} step {step + 1}/{steps} mse {np.mean(losses[-log_every:]):.4f} ({time.time() - t0:.0f}s)")
    top.eval()
    return {"steps": steps, "batch": batch, "lr": lr, "context": context,
            "final_mse": round(float(np.mean(losses[-log_every:])), 4), "wall_s": round(time.time() - t0, 1)}


@torch.no_grad()
def token_r(carry: Top, states: Sequence[torch.Tensor], starts: Sequence[int], targets: Sequence[torch.Tensor],
            context: int | None = None, batch: int = 128) -> float:
    """Pearson r of the per-token predictions against ``l_t`` over every completion token; ``context`` as in
    ``train_dense`` (None: whole sequences, as the exported model reads them)."""
    carry.eval()
    pred, true = [], []
    for b in range(0, len(states), batch):
        cut = [0 if context is None else max(0, s - context) for s in starts[b : b + batch]]
        p = carry(_pad_states([x[c:] for x, c in zip(states[b : b + batch], cut)]))
        for k, (s, c, t) in enumerate(zip(starts[b : b + batch], cut, targets[b : b + batch])):
            pred.append(p[k, s - c : s - c + len(t)])
            true.append(t)
    return round(float(np.corrcoef(torch.cat(pred).numpy(), torch.cat(true).numpy())[0, 1]), 4)


@torch.no_grad()
def pool_features(rm: LlamaForSequenceClassification, n_lm: int, states: dict[int, torch.Tensor],
                  batch: int = 128) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence, what the pool layer and the head see at ``</s>``: the residual after the (frozen) carry layer
    at the last position, and the mean over all positions of the pool's normalised input (its input gain not
    applied; ``init_pool`` sets it from these)."""
    carry = Top(rm, n_lm, 1)
    carry.body.norm = torch.nn.Identity()  # the residual, not the head's view of it
    pool = rm.model.layers[n_lm + FRESH.index("pool")]
    norm = pool.input_layernorm
    ids = sorted(states)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b in range(0, len(ids), batch):
        chunk = ids[b : b + batch]
        h = carry.body(inputs_embeds=_pad_states([states[i] for i in chunk]), use_cache=False).last_hidden_state
        for k, i in enumerate(chunk):
            x = h[k, : len(states[i])]
            unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            out[i] = (x[-1].clone(), unit.mean(0))
    return out


def _pool_score(rm: LlamaForSequenceClassification, n_lm: int, last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The exported model's score at ``</s>`` from ``pool_features``: uniform attention averages the values, and
    the value projection is linear, so the attention output is ``o(v(gain * mean))``; the pool's MLP adds 0."""
    pool = rm.model.layers[n_lm + FRESH.index("pool")]
    attn = pool.self_attn
    hidden = last + attn.o_proj(attn.v_proj(pool.input_layernorm.weight * mean))
    return rm.score(rm.model.norm(hidden))[..., 0].float()


@torch.no_grad()
def init_pool(rm: LlamaForSequenceClassification, n_lm: int, feats: dict[int, tuple[torch.Tensor, torch.Tensor]],
              seed: int, out_std: float = 0.02) -> None:
    """Data-dependent init of the pool layer: input gains that make each column of the mean state unit-variance
    over ``feats``, and a small random output projection (zero would leave the value projection no gradient)."""
    pool = rm.model.layers[n_lm + FRESH.index("pool")]
    means = torch.stack([m for _, m in feats.values()])
    pool.input_layernorm.weight.copy_(1 / means.std(0).clamp(min=1e-6))
    g = torch.Generator().manual_seed(seed)
    w = pool.self_attn.o_proj.weight
    w.copy_(torch.randn(w.shape, generator=g) * out_std)


def train_pool(rm: LlamaForSequenceClassification, n_lm: int, feats: dict[int, tuple[torch.Tensor, torch.Tensor]],
               pairs: list[tuple[int, int]], *, steps: int, lr: float, log: Callable[[str], None] = print,
               log_every: int = 100, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Stage 2: the paper's Bradley-Terry loss on ``(preferred, rejected)`` sequence ids at ``</s>``, full batch,
    Adam with 5 % warm-up and linear decay; trains the pool's value/output projections, the final norm and the
    head (the pool's query, key and MLP stay zero: its attention stays uniform)."""
    pool = rm.model.layers[n_lm + FRESH.index("pool")]
    params = [pool.self_attn.v_proj.weight, pool.self_attn.o_proj.weight, rm.model.norm.weight, rm.score.weight]
    for p in rm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if not pairs:
        log("RM pool: no (correct, incorrect) pairs to train on; the pool keeps its init")
        return {"steps": 0, "lr": lr, "pairs": 0, "final_loss": None, "wall_s": 0.0}
    ids = sorted({i for pair in pairs for i in pair})
    row = {i: k for k, i in enumerate(ids)}
    last = torch.stack([feats[i][0] for i in ids])
    mean = torch.stack([feats[i][1] for i in ids])
    good = torch.tensor([row[g] for g, _ in pairs])
    bad = torch.tensor([row[b] for _, b in pairs])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0, loss_value = time.time(), float("nan")
    for step in range(steps):
        r = _pool_score(rm, n_lm, last, mean)
        loss = -torch.nn.functional.logsigmoid(r[good] - r[bad]).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, max(1, steps // 20), lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            train_acc = float((r[good] > r[bad]).float().mean())
            log(f"RM pool step {step + 1}/{steps} loss {loss_value:.4f} train pairwise {train_acc:.3f} "
                f"({time.time() - t0:.0f}s)")
        if on_step is not None:
            on_step(step + 1)
    for p in params:
        p.requires_grad_(False)
    return {"steps": steps, "lr": lr, "pairs": len(pairs), "final_loss": round(loss_value, 4),
            "wall_s": round(time.time() - t0, 1)}
