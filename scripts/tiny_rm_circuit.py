"""The tiny RM's starting point (``train_tiny.py --rm-init surprise``): the LM plus three hand-set Llama layers
that score a completion by how much the LM itself is surprised by its answer digits.

Why: a Bradley–Terry RM of this size, fine-tuned from the LM on a few thousand pairs, stays at chance (see
docs/tiny_models.md). The LM already knows which digit it expects, so its log-likelihood separates correct from
incorrect samples well; what a small RM cannot learn in a CPU budget is to compare "the digit the LM expected
at t-1" with "the digit written at t". These layers wire that comparison in; Bradley–Terry then fits the head.

Layout (a plain ``LlamaForSequenceClassification`` with ``attention_bias`` and ``mlp_bias``, which HF and vLLM
load):
- LM layer 0, then **C0**: its MLP recognises the current digit (probes fitted on the residual, where the digit is
  almost exactly linearly decodable) and writes a code into 10 directions the later LM layers hardly read or write;
- the remaining LM layers (they barely notice the code);
- **E1**: one head with constant query/key biases, phased so that RoPE peaks at offset 1, copies the LM's centred
  digit logits from position t-1 to t; a large constant keeps every later RMSNorm's scale fixed; its MLP reads the
  code and writes the surprise of the written digit, ``-(centred logit) - tau0``;
- **E2**: uniform attention averages the surprise over the prefix into one direction, which the head reads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

#: settings recorded in the model card (metrics.json ``rm.circuit``)
DEFAULTS: dict[str, float] = {"code_norm": 12.0, "tau0": -11.0, "constant": 2000.0, "carry_scale": 10.0,
                              "surprise_scale": 10.0, "gate_sharpness": 20.0, "gate_width": 8.0, "prev_strength": 40.0}


def _linears(layer) -> tuple:
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def _probe(x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> tuple[torch.Tensor, float]:
    """Logistic regression (L-BFGS, light L2) of a binary target on features: weight, bias."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float())
        loss = loss + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / std).detach()
    return w_raw, float(b.detach() - (w_raw * mean).sum())


def _residuals(rm, layer: int, seqs: list[list[int]], pad: int, where: str) -> list[torch.Tensor]:
    """Per-sequence states at ``layer``: the MLP input (``where="mlp_in"``) or the layer output (``"out"``)."""
    cap: dict[str, torch.Tensor] = {}
    mod = rm.model.layers[layer]
    if where == "mlp_in":
        hook = mod.post_attention_layernorm.register_forward_hook(lambda m, i, o: cap.__setitem__("h", o))
    else:
        hook = mod.register_forward_hook(lambda m, i, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out = []
    try:
        with torch.no_grad():
            for b in range(0, len(seqs), 64):
                chunk = seqs[b : b + 64]
                width = max(len(s) for s in chunk)
                rm.model(input_ids=torch.tensor([s + [pad] * (width - len(s)) for s in chunk]))
                out += [cap["h"][k, : len(s)].clone() for k, s in enumerate(chunk)]
    finally:
        hook.remove()
    return out


def build_surprise_rm(lm: LlamaForCausalLM, seqs: list[list[int]], digit_ids: list[int], pad: int,
                      settings: dict[str, float] | None = None) -> tuple[LlamaForSequenceClassification, dict[str, Any]]:
    """The RM before Bradley–Terry: ``lm`` plus the three layers above, fitted on ``seqs`` (token ids of full
    conversations; the LM's own samples). Returns the model and the figures the card records."""
    s = {**DEFAULTS, **(settings or {})}
    cfg = lm.config
    hidden, n_lm, head_dim = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    n_dig = len(digit_ids)
    if n_lm < 2 or hidden < 3 * n_dig + 6 or head_dim < 24 or cfg.intermediate_size < 2 * n_dig:
        raise ValueError(f"--rm-init surprise needs an LM with >= 2 layers, hidden >= {3 * n_dig + 6} and head size "
                         f">= 24; this one has {n_lm} layers, hidden {hidden}, head size {head_dim}")
    k_const, lam, zeta = s["constant"], s["carry_scale"], s["surprise_scale"]
    alpha, beta, scale = s["gate_sharpness"], s["gate_width"], math.sqrt(hidden)

    # directions the LM's layers 1.. hardly read or write: the digit code travels there
    mats = []
    for layer in lm.model.layers[1:]:
        w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        mats += [lin.weight * w1[None, :] for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                      layer.self_attn.v_proj)]
        mats += [lin.weight * w2[None, :] for lin in (layer.mlp.gate_proj, layer.mlp.up_proj)]
        mats += [layer.self_attn.o_proj.weight.T, layer.mlp.down_proj.weight.T]
    sv = torch.linalg.svd(torch.cat(mats).detach().double(), full_matrices=False)
    code_dirs = sv.Vh[-n_dig:].float()

    base = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "id2label", "label2id")}
    rcfg = LlamaConfig(**{**base,
                          "num_hidden_layers": n_lm + 3, "attention_bias": True, "mlp_bias": True,
                          "num_labels": 1, "pad_token_id": pad})
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(rcfg)
    c0, e1, e2 = 1, n_lm + 1, n_lm + 2
    with torch.no_grad():
        rm.model.embed_tokens.weight.copy_(lm.model.embed_tokens.weight)
        lm_slots = [0] + list(range(2, n_lm + 1))
        for dst, src in zip(lm_slots, range(n_lm)):
            rm.model.layers[dst].load_state_dict(lm.model.layers[src].state_dict(), strict=False)
        for layer in rm.model.layers:
            for lin in _linears(layer):
                lin.bias.zero_()
        for idx in (c0, e1, e2):
            for lin in _linears(rm.model.layers[idx]):
                lin.weight.zero_()
            rm.model.layers[idx].input_layernorm.weight.fill_(1.0)
            rm.model.layers[idx].post_attention_layernorm.weight.fill_(1.0)
        rm.model.norm.weight.fill_(1.0)
        rm.score.weight.zero_()
    rm.eval()

    digit_of = {t: j for j, t in enumerate(digit_ids)}
    labels = [torch.tensor([digit_of.get(t, n_dig) for t in q]) for q in seqs]
    y = torch.cat(labels)

    # C0: digit probes on its MLP input; a saturated indicator per digit writes code_norm * code_dirs[j]
    x = torch.cat(_residuals(rm, c0, seqs, pad, "mlp_in"))
    probe_err = []
    with torch.no_grad():
        mlp = rm.model.layers[c0].mlp
        for j in range(n_dig):
            with torch.enable_grad():
                w, b = _probe(x, y == j)
            dec = x @ w + b
            probe_err.append(float(((dec > 0) != (y == j)).float().mean()))
            for unit, off in ((2 * j, beta), (2 * j + 1, 0.0)):
                mlp.gate_proj.weight[unit] = alpha * w
                mlp.gate_proj.bias[unit] = alpha * b + off
                mlp.up_proj.bias[unit] = 1.0
            mlp.down_proj.weight[:, 2 * j] = s["code_norm"] / beta * code_dirs[j]
            mlp.down_proj.weight[:, 2 * j + 1] = -s["code_norm"] / beta * code_dirs[j]

    # quiet directions at the top of the LM, orthogonal to the code: carried logits, constant, surprise, pooled
    top = torch.cat(_residuals(rm, n_lm, seqs, pad, "out")).double()
    proj = torch.eye(hidden, dtype=torch.float64) - code_dirs.double().T @ code_dirs.double()
    evals, evecs = torch.linalg.eigh(proj @ (top.T @ top / len(top)) @ proj)
    keep = [i for i in range(hidden) if evals[i] > 1e-9][: n_dig + 3]
    quiet = evecs[:, keep].T.float()
    u_const, u_surprise, u_pooled, u_carry = quiet[0], quiet[1], quiet[2], quiet[3:]

    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    freqs = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    half = head_dim // 2
    with torch.no_grad():
        att = rm.model.layers[e1].self_attn
        rm.model.layers[e1].input_layernorm.weight.copy_(lm.model.norm.weight)  # values = the LM's final states
        amp = math.sqrt(s["prev_strength"])
        for i in range(12):  # the fastest RoPE pairs: a sharp peak at offset 1
            att.q_proj.bias[i] = amp
            att.k_proj.bias[i] = amp * math.cos(freqs[i])
            att.k_proj.bias[i + half] = amp * math.sin(freqs[i])
        logits = lm.lm_head.weight[digit_ids]
        att.v_proj.weight[:n_dig] = logits - logits.mean(0, keepdim=True)
        for j in range(n_dig):
            att.o_proj.weight[:, j] = lam * u_carry[j]
        att.o_proj.bias.copy_(k_const * u_const)

    # E1 MLP: thresholds for the routed code, measured at its input
    x = torch.cat(_residuals(rm, e1, seqs, pad, "mlp_in"))
    codes = (x @ code_dirs.T) * (k_const / scale)
    thresholds, code_err = [], []
    for j in range(n_dig):
        on, off = codes[y == j, j], codes[y != j, j]
        thr = 0.5 * (float(on.median()) + float(off.quantile(0.999))) if len(on) else s["code_norm"] / 2
        thresholds.append(thr)
        code_err.append(float(((codes[:, j] > thr) != (y == j)).float().mean()))
    with torch.no_grad():
        mlp = rm.model.layers[e1].mlp
        for j in range(n_dig):
            for unit, off in ((2 * j, beta), (2 * j + 1, 0.0)):
                mlp.gate_proj.weight[unit] = alpha * code_dirs[j] * (k_const / scale)
                mlp.gate_proj.bias[unit] = -alpha * thresholds[j] + off
                mlp.up_proj.weight[unit] = -k_const / (scale * lam) * u_carry[j]
                mlp.up_proj.bias[unit] = -s["tau0"]
            mlp.down_proj.weight[:, 2 * j] = zeta / beta * u_surprise
            mlp.down_proj.weight[:, 2 * j + 1] = -zeta / beta * u_surprise
        # E2: uniform attention (zero query/key) averages the surprise; the head reads minus the average
        att2 = rm.model.layers[e2].self_attn
        unit_read = k_const / (scale * zeta)
        att2.v_proj.weight[0] = unit_read * u_surprise
        att2.o_proj.weight[:, 0] = zeta * u_pooled
        rm.score.weight.copy_((-unit_read * u_pooled)[None])
    rm.eval()
    info = {"settings": s, "layers": {"code_writer": c0, "carry": e1, "pool": e2},
            "c0_probe_error_max": round(max(probe_err), 5), "code_error_max": round(max(code_err), 5),
            "fit_positions": int(len(y))}
    return rm, info
