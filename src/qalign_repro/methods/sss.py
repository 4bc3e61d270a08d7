"""SSS: reward-shifted speculative sampling with an aligned draft model and an unaligned target model.

Stated target (exact). At every position, with ``p`` the target model, ``q`` the aligned draft and ``q0`` the
draft's unaligned reference (``draft_ref``; null = the target itself, i.e. the draft was aligned from the
target, as the embedded ``tiny-draft`` is), the next token follows

    pi(x | y_<t)  ∝  p(x | y_<t) · (q(x | y_<t) / q0(x | y_<t)) ** shift

and a completion y (ending in EOS, or cut at ``max_new_tokens``) has probability prod_t pi(y_t | y_<t).
``log q - log q0`` is the draft's token-level implicit reward (the DPO reading of an aligned model), so pi is
the target model tilted by the reward the alignment put into the draft - the reward-shifted target of the SSS
paper in its token-level form, with ``shift`` scaling the reward (``shift = 1/beta`` in units of the draft's
own beta). At a run temperature T != 1 all three distributions are tempered (softmax(logits / T)) first.
With ``draft_ref: null`` it is the geometric mixture ``p^(1-shift) · q^shift``; ``shift: 1`` then
gives the draft itself (the aligned draft *is* the reward-shifted target when it was aligned from the target).

Algorithm (one round, per chain): the draft proposes ``gamma`` tokens d_1..d_m (m < gamma at EOS / the
limit); one forward pass of the target (and of the reference) over ``prompt + y + d`` gives p (and q0) at the
m + 1 positions, the draft's q comes from the same kind of pass. Then, left to right:

* **acceptance** (modified): accept d_i with probability ``min(1, pi(d_i) / q(d_i))`` - a plain speculative
  sampler would use ``p / q``, which recovers p, not the shifted target;
* **residual / bonus token** (modified): at the first rejection draw from ``norm(max(pi - q, 0))`` and end the
  round; if all m drafts are accepted, draw one more token from ``pi`` at position m + 1 (free: the target's
  pass already computed it).

Exactness: P(token = x) = q(x)·min(1, pi/q) + (1 - Σ_z min(q, pi)) · (pi - q)+(x) / Σ_z (pi - q)+ = pi(x),
because Σ_z (pi - q)+ = 1 - Σ_z min(q, pi). Every token is therefore drawn from pi given the tokens before it,
whatever the draft is - the draft only changes speed (acceptance rate), never the output distribution.
``tests/test_sss.py`` checks this by enumeration on toy models. No RM call is made while decoding; the
finished output is scored once by the run's RM so that BoN / WMV can select among SSS samples (counted).

Differences from the published code (lblaoke's ``sss_generate``): it accepts with ``min(1, p/q)`` and draws
the bonus token from ``norm(p · q / q0)`` with no draft reference shift in the acceptance and no extra token
after a fully accepted round; per position that gives min(p, q) + (1 - Σ min(p, q)) · pi, not pi. This
implementation keeps the paper's target and ingredients but uses the acceptance/residual pair that makes it
exact, and records the acceptance rate so the speed side can still be compared.

Backends: needs full next-token distributions of all models at several positions, asked for through the
Generator protocol only (``next_token_logprob_rows``; the draft is built with ``like``): HF (one forward pass
per model and round; no KV cache across rounds - see the token accounting) and the toy generator. vLLM's public
API returns top-k log-probs (complete only with ``max_logprobs=-1``, V numbers per position) and its built-in
speculative decoding has a fixed acceptance rule, so SSS does not run on it (docs/methods.md).

Token accounting: every forward pass is counted per model in ``models`` (prefilled / generated / cached, the
latter being what a prefix cache would already hold from this chain's earlier passes). The standard fields
add the draft (and reference) tokens scaled by ``n_params(model) / n_params(target)`` so that flops.py's
``2 · N_target · tokens`` is exactly the FLOPs of all models together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qalign_repro.errors import ConfigError
from qalign_repro.methods.base import (
    METHODS,
    PURPOSE_ACCEPT,
    PURPOSE_GENERATE,
    Chain,
    Method,
    RunContext,
    derive_rng,
    output_record,
)
from qalign_repro.methods.cards import common_prefix_len

DEFAULTS: dict[str, Any] = {"gamma": 4, "shift": 1.0, "draft": None, "draft_ref": None}
MODEL_ROLES = ("target", "draft", "draft_ref")


# -- next-token distributions of a model --------------------------------------------------------------------
def next_token_logprob_rows(gen: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                            n_rows: Sequence[int], temperature: float = 1.0, batch_size: int = 64
                            ) -> list[np.ndarray]:
    """Log-probabilities of the next token at the last ``n_rows[j]`` positions of ``prompts[j] + completions[j]``,
    through the Generator protocol (``lm/base.py``: row i of result j is the distribution after
    ``completions[j][:len - n_rows[j] + 1 + i]``); backends without full distributions refuse in one line."""
    return _protocol(gen, "next_token_logprob_rows")(prompts, completions, n_rows, temperature, batch_size)


def _protocol(gen: Any, method: str) -> Any:
    """A Generator-protocol method SSS needs; an object without it (a user's generator) is one ConfigError line."""
    fn = getattr(gen, method, None)
    if fn is None:
        from qalign_repro.lm.base import unsupported

        raise unsupported(getattr(gen, "name", type(gen).__name__),
                          f"run SSS: it has no {method} (full next-token distributions / a second model)")
    return fn


def shifted_logprobs(target: np.ndarray, draft: np.ndarray, ref: np.ndarray | None, shift: float) -> np.ndarray:
    """log pi = log p + shift · (log q - log q0), normalised; ``ref=None`` means q0 = p."""
    base = target if ref is None else ref
    z = target + shift * (draft - base) if shift else target.copy()
    if not np.isfinite(z).all():  # a token impossible under some model: impossible under pi
        z = np.where(np.isfinite(z), z, -np.inf)
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def _draw(p: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from an (unnormalised) probability vector with one uniform."""
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(p) - 1))


def verify(drafts: Sequence[int], q_logp: np.ndarray, pi_logp: np.ndarray, rng: np.random.Generator,
           extra: bool) -> tuple[list[int], int]:
    """Speculative verification against the shifted target: the accepted drafts plus one residual/bonus token.

    ``q_logp``/``pi_logp`` have one row per draft position plus (when ``extra``) the position after the last
    draft. Returns ``(new tokens, number of drafts accepted)``.
    """
    for i, x in enumerate(drafts):
        ratio = math.exp(min(0.0, float(pi_logp[i, x] - q_logp[i, x])))
        if float(rng.random()) < ratio:
            continue
        q, pi = np.exp(q_logp[i]), np.exp(pi_logp[i])
        residual = np.maximum(pi - q, 0.0)
        if not residual.sum() > 0:  # pi == q up to rounding: a rejection had probability ~0
            residual = pi
        return list(drafts[:i]) + [_draw(residual, float(rng.random()))], i
    if extra:
        return list(drafts) + [_draw(np.exp(pi_logp[len(drafts)]), float(rng.random()))], len(drafts)
    return list(drafts), len(drafts)


# -- the method ---------------------------------------------------------------------------------------------
@dataclass
class _State:
    chain: Chain
    gen_rng: np.random.Generator
    acc_rng: np.random.Generator
    y: list[int] = field(default_factory=list)
    done: bool = False
    finish: str = "length"
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    seen: dict[str, list[int]] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=lambda: {
        r: {"prefilled": 0, "generated": 0, "cached": 0, "calls": 0} for r in MODEL_ROLES})


@METHODS.register("sss")
class SSS(Method):
    name = "sss"

    def __init__(self, cfg: Mapping[str, Any] | None = None, *, draft: Any = None, draft_ref: Any = None):
        """``draft`` / ``draft_ref`` may be given as loaded generators (Python API); otherwise they are built
        from ``cfg["draft"]`` / ``cfg["draft_ref"]`` with the target's backend class on first use."""
        super().__init__(cfg)
        c = {**DEFAULTS, **{k: v for k, v in self.cfg.items() if k != "name"}}
        unknown = sorted(set(c) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"method=sss: unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
        if isinstance(c["gamma"], bool) or not isinstance(c["gamma"], int) or c["gamma"] < 1:
            raise ConfigError(f"method.gamma={c['gamma']!r}; allowed: an integer >= 1 (draft tokens per round)")
        if not math.isfinite(float(c["shift"])) or float(c["shift"]) < 0:
            raise ConfigError(f"method.shift={c['shift']!r}; allowed: a finite number >= 0")
        if c["draft"] is None and draft is None:
            raise ConfigError("method=sss needs a draft model: set method.draft (e.g. {asset: tiny-draft})")
        self.c = c
        self._models: dict[str, Any] = {}
        if draft is not None:
            self._models["draft"] = draft
        if draft_ref is not None:
            self._models["draft_ref"] = draft_ref

    # -- models -------------------------------------------------------------------------------------------
    def _model(self, ctx: RunContext, role: str) -> Any:
        if role == "target":
            return ctx.generator
        if role not in self._models:
            spec = self.c[role]
            if spec is None:
                return None
            self._models[role] = build_like(ctx.generator, spec)
        return self._models[role]

    def _check_models(self, ctx: RunContext, chains: list[Chain]) -> None:
        for role in ("draft", "draft_ref"):
            m = self._model(ctx, role)
            if m is None:
                continue
            if list(m.eos_token_ids) != list(ctx.generator.eos_token_ids):
                raise ConfigError(f"sss: the {role} model's EOS ids {m.eos_token_ids} differ from the target's "
                                  f"{ctx.generator.eos_token_ids}; the models must share one tokenizer")
            for ch in chains[:4]:
                if ch.messages and m.encode_chat(ch.messages) != ch.prompt_ids:
                    raise ConfigError(f"sss: the {role} model tokenizes the prompt differently from the target; "
                                      "the models must share one tokenizer and chat template")

    # -- one output per chain -----------------------------------------------------------------------------
    def step(self, ctx: RunContext, chains: list[Chain], k: int) -> list[dict[str, Any]]:
        self._check_models(ctx, chains)
        limit = ctx.max_new_tokens
        if hasattr(ctx.generator, "max_len"):  # the toy model's own length limit
            limit = min(limit, int(ctx.generator.max_len))
        states = [_State(chain=ch, gen_rng=derive_rng(ctx.seed, ch.prompt_id, k, PURPOSE_GENERATE),
                         acc_rng=derive_rng(ctx.seed, ch.prompt_id, k, PURPOSE_ACCEPT),
                         seen={r: (list(ch.prompt_ids) if k else []) for r in MODEL_ROLES})
                  for ch in chains]
        while True:
            active = [s for s in states if not s.done]
            if not active:
                break
            self._round(ctx, active, limit)
        texts = [ctx.generator.decode(s.y) for s in states]
        rewards, scored = ctx.score([s.chain.messages for s in states], texts)
        return [self._record(ctx, s, t, float(r), n) for s, t, r, n in zip(states, texts, rewards, scored)]

    def _round(self, ctx: RunContext, states: list[_State], limit: int) -> None:
        gamma, shift = int(self.c["gamma"]), float(self.c["shift"])
        draft, ref = self._model(ctx, "draft"), self._model(ctx, "draft_ref")
        t0 = time.perf_counter()
        budgets = [min(gamma, limit - len(s.y)) for s in states]
        prompts = [s.chain.prompt_ids + s.y for s in states]
        seeds = [int(s.gen_rng.integers(0, 2**63 - 1)) for s in states]
        comps = []
        for b in range(0, len(states), ctx.batch_size):
            comps.extend(draft.sample(prompts[b:b + ctx.batch_size], budgets[b:b + ctx.batch_size],
                                      seeds[b:b + ctx.batch_size], temperature=ctx.temperature))
        drafts = [list(c.token_ids) for c in comps]
        eos = ctx.generator.eos_token_ids
        # an extra (bonus) row is needed unless the round must end after the drafts anyway
        extra = [not (d and d[-1] in eos) and len(s.y) + len(d) < limit
                 and not (comp.finish_reason == "length" and len(d) < budget)
                 for s, d, comp, budget in zip(states, drafts, comps, budgets)]
        n_rows = [len(d) + int(e) for d, e in zip(drafts, extra)]
        for s, prompt, d, comp in zip(states, prompts, drafts, comps):
            self._count(s, "draft", prompt, d, comp.prompt_tokens, comp.cached_tokens)
        rows: dict[str, list[np.ndarray]] = {}
        verify_idx = [j for j, n in enumerate(n_rows) if n > 0]
        # feed up to the last position that decides a token: the rows are the last n_rows positions
        seqs = [(states[j].y + drafts[j])[:len(states[j].y) + n_rows[j] - 1] for j in verify_idx]
        prompts_v = [states[j].chain.prompt_ids for j in verify_idx]
        for role, model in (("draft", draft), ("target", ctx.generator), ("draft_ref", ref)):
            if model is None:
                continue
            got = next_token_logprob_rows(model, prompts_v, seqs, [n_rows[j] for j in verify_idx],
                                          ctx.temperature, ctx.batch_size)
            rows[role] = [np.zeros((0, 0))] * len(states)
            for j, g, seq in zip(verify_idx, got, seqs):
                rows[role][j] = g
                full = states[j].chain.prompt_ids + seq
                self._count(states[j], role, full, [], len(full), None)
        ctx.timers["generate"] += time.perf_counter() - t0

        for j, (s, d) in enumerate(zip(states, drafts)):
            pi = shifted_logprobs(rows["target"][j], rows["draft"][j],
                                  rows["draft_ref"][j] if "draft_ref" in rows else None, shift)
            new, n_acc = verify(d, rows["draft"][j], pi, s.acc_rng, extra[j])
            s.rounds += 1
            s.drafted += len(d)
            s.accepted += n_acc
            s.y.extend(new)
            if s.y and s.y[-1] in eos:
                s.done, s.finish = True, "stop"
            elif len(s.y) >= limit or not new:
                s.done, s.finish = True, "length"
            elif n_acc == len(d) and not extra[j]:  # the draft model stopped at its own limit
                s.done, s.finish = True, "length"

    @staticmethod
    def _count(s: _State, role: str, prompt: list[int], generated: list[int], prefilled: int,
               cached: int | None) -> None:
        u = s.usage[role]
        u["calls"] += 1
        u["prefilled"] += prefilled
        u["generated"] += len(generated)
        u["cached"] += cached if cached is not None else common_prefix_len(s.seen[role], prompt)
        s.seen[role] = list(prompt) + list(generated[:-1]) if generated else list(prompt)

    def _record(self, ctx: RunContext, s: _State, text: str, reward: float, scored: int) -> dict[str, Any]:
        n_target = max(int(ctx.generator.n_params), 1)
        models: dict[str, dict[str, int]] = {}
        totals = {"prefilled": 0.0, "generated": 0.0, "cached": 0.0}
        for role in MODEL_ROLES:
            model = self._model(ctx, role)
            if model is None:
                continue
            u = dict(s.usage[role], n_params=int(model.n_params))
            models[role] = u
            scale = int(model.n_params) / n_target
            for key in totals:
                totals[key] += u[key] * scale
        rec = output_record(
            s.y, text, reward, accepted=True, index=0, proposal_len=len(s.y), proposal_reward=reward,
            tokens_generated=round(totals["generated"]), tokens_prefilled=round(totals["prefilled"]),
            tokens_cached=round(totals["cached"]), tokens_scored=scored, finish_reason=s.finish,
        )
        rec.update(rounds=s.rounds, drafted=s.drafted, drafts_accepted=s.accepted,
                   acceptance_rate=s.accepted / s.drafted if s.drafted else 1.0,
                   lm_calls=sum(u["calls"] for u in models.values()), rm_calls=1, models=models)
        return rec

    def postfix(self, outputs: list[dict[str, Any]]) -> dict[str, str]:
        drafted = sum(o.get("drafted", 0) for o in outputs)
        acc = sum(o.get("drafts_accepted", 0) for o in outputs)
        return {"draft_acc": f"{acc / max(drafted, 1):.2f}"}


def build_like(target: Any, spec: Any) -> Any:
    """A second model on the target's backend (the protocol's ``like``): ``spec`` is a model config mapping
    (``path``/``asset`` for HF; ``seed``/``scale`` for the toy, whose vocabulary and limits default to the
    target's)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"sss: a draft model spec must be a mapping (e.g. {{asset: tiny-draft}}), got {spec!r}")
    return _protocol(target, "like")(dict(spec))
