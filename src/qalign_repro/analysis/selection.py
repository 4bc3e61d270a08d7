"""Selection rules that turn a pool of sampled outputs into one prediction per prompt.

Every rule is a pure, vectorised numpy function over arrays shaped ``[prompts, samples]`` and a budget ``n``
(the rule sees samples ``start .. n-1`` only), so one call decides all prompts of a run at once instead of a
Python loop per prompt (see ``scripts/bench_predict.py``).

Representation
    * ``codes``: int array, the extracted answer of every sample encoded per prompt as an integer
      (``encode_answers``); ``INVALID`` (-1) marks a sample without an extractable answer.
    * ``rewards``: float array of RM scores (NaN is treated as -inf: never preferred).
    * ``utility``: for MBR, the ``[samples, samples]`` pairwise utility (ROUGE F-measure) of one prompt, or a
      stack of them ``[..., samples, samples]``.

Every rule returns a ``Selection``: the index (into the original sample axis) of the sample that carries the
prediction, and ``valid`` (False when the rule had no valid answer to pick, e.g. all samples invalid).

Tie-breaking (deterministic, documented once here)
    * MV / QAlign: the answer with the most votes; ties go to the answer whose first occurrence in the window
      is earliest. The returned sample is that first occurrence.
    * WMV: the answer with the largest summed weight; weights within a relative 1e-12 of the maximum count
      as tied (float sums of equal rewards in different orders), then earliest first occurrence wins.
    * BoN: the largest reward; ties go to the earliest sample. BoN looks at rewards only, as in the paper, so
      it can pick an invalid sample (reported as invalid, scored by the grader).
    * MBR / WMBR: the largest expected utility; ties go to the earliest sample.
    * Invalid answers never receive votes: MV/WMV/QAlign pick an invalid sample only when every sample in
      the window is invalid, and then ``valid`` is False (the prediction counts as wrong).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INVALID = -1
#: relative tolerance under which two WMV weight sums count as a tie
WMV_TIE_RTOL = 1e-12


@dataclass(frozen=True)
class Selection:
    """Chosen sample per prompt: ``index`` into the sample axis and whether the prediction is a valid answer."""

    index: np.ndarray
    valid: np.ndarray

    def take(self, values: np.ndarray) -> np.ndarray:
        """``values[p, index[p]]`` for every prompt (e.g. correctness or reward of the chosen sample)."""
        return np.take_along_axis(np.asarray(values), self.index[..., None], axis=-1)[..., 0]

    def correct(self, correct: np.ndarray) -> np.ndarray:
        """Score of the prediction: the chosen sample's grade, 0 where the rule found no valid answer."""
        picked = self.take(correct)
        return np.where(self.valid, picked, np.zeros_like(picked))


# -- encoding ------------------------------------------------------------------------------------------------
def encode_answers(answers: Sequence[Any]) -> np.ndarray:
    """Integer codes for one prompt's answers: 0 for the first distinct answer, 1 for the next, ...;
    ``None`` -> ``INVALID``. Codes in order of first occurrence make "smallest code" mean "seen first"."""
    table: dict[Any, int] = {}
    out = np.empty(len(answers), dtype=np.int32)
    for k, a in enumerate(answers):
        if a is None:
            out[k] = INVALID
            continue
        try:
            out[k] = table.setdefault(a, len(table))
        except TypeError:  # unhashable (e.g. a list answer): compare by its repr
            out[k] = table.setdefault(repr(a), len(table))
    return out


def encode_answer_matrix(rows: Iterable[Sequence[Any]], n: int | None = None) -> np.ndarray:
    """Stack ``encode_answers`` of several prompts into ``[prompts, n]`` (rows truncated to ``n``)."""
    encoded = [encode_answers(list(r)[:n] if n is not None else list(r)) for r in rows]
    if not encoded:
        return np.zeros((0, n or 0), dtype=np.int32)
    width = min(len(e) for e in encoded)
    return np.stack([e[:width] for e in encoded])


def budgets(n_max: int, extra: Iterable[int] | None = None) -> list[int]:
    """The budget axis: 1, 2, 4, ... up to ``n_max``, ``n_max`` itself, plus ``extra`` values <= ``n_max``."""
    if n_max < 1:
        return []
    out = {1 << k for k in range(int(n_max).bit_length()) if (1 << k) <= n_max}
    out.add(int(n_max))
    out.update(int(b) for b in (extra or []) if 1 <= int(b) <= n_max)
    return sorted(out)


def pool_chains(values: np.ndarray, chains: int) -> np.ndarray:
    """Pool the K chains of each prompt into one row: ``[P*K, S, ...]`` (instance ``p*K + j`` = chain j of
    prompt p) -> ``[P, K*S, ...]`` with ``pooled[p, k*K + j] = values[p*K + j, k]``.

    Why interleaved: the first n pooled positions are then the states a run of K chains has produced after
    ``ceil(n / K)`` steps (every chain advances together), so "budget n" means the same compute whatever K is,
    and dropping each chain's first ``b`` states is dropping the first ``b*K`` pooled positions."""
    v = np.asarray(values)
    if isinstance(chains, bool) or not isinstance(chains, (int, np.integer)) or chains < 1:
        raise ValueError(f"chains={chains!r} must be an integer >= 1")
    if v.ndim < 2 or v.shape[0] % chains:
        raise ValueError(f"{v.shape[0] if v.ndim else 0} rows are not whole groups of {chains} chains")
    if chains == 1:
        return v
    p, s = v.shape[0] // chains, v.shape[1]
    return v.reshape(p, chains, s, *v.shape[2:]).swapaxes(1, 2).reshape(p, s * chains, *v.shape[2:])


def _clean_rewards(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    return np.where(np.isnan(r), -np.inf, r)


def _check_window(n_samples: int, n: int, start: int) -> None:
    if not 0 <= start < n <= n_samples:
        raise ValueError(f"budget window [{start}, {n}) is empty or exceeds the {n_samples} stored samples")


def _vote(codes: np.ndarray, n: int, start: int, weights: np.ndarray | None) -> Selection:
    """Shared core of MV and WMV on the window ``[start, n)`` of every row of ``codes`` ([P, N])."""
    codes = np.asarray(codes)
    n_prompts = codes.shape[0]
    _check_window(codes.shape[1], n, start)
    x = codes[:, start:n]
    m = x.shape[1]
    valid = x >= 0
    n_codes = int(x.max(initial=-1)) + 1
    rows = np.arange(n_prompts)
    if n_codes == 0:  # nothing valid anywhere
        return Selection(np.full(n_prompts, start, dtype=np.int64), np.zeros(n_prompts, dtype=bool))
    flat = (rows[:, None] * n_codes + x)[valid]  # row-major: a prompt's samples in window order
    # first occurrence of every (prompt, answer): np.unique returns the first index into ``flat``
    uniq, first_idx = np.unique(flat, return_index=True)
    pos = np.broadcast_to(np.arange(m), x.shape)[valid]
    first = np.full(n_prompts * n_codes, m, dtype=np.int64)
    first[uniq] = pos[first_idx]
    first = first.reshape(n_prompts, n_codes)
    if weights is None:
        counts = np.bincount(flat, minlength=n_prompts * n_codes).reshape(n_prompts, n_codes)
        key = counts * (m + 1) - first  # most votes, then earliest first occurrence
        best = np.argmax(key, axis=1)
        has = counts[rows, best] > 0
    else:
        w = np.bincount(flat, weights=weights[:, start:n][valid], minlength=n_prompts * n_codes)
        w = w.reshape(n_prompts, n_codes)
        wmax = w.max(axis=1, keepdims=True)
        tied = (w >= wmax * (1.0 - WMV_TIE_RTOL)) & (first < m)
        best = np.argmax(np.where(tied, -first, np.iinfo(np.int64).min), axis=1)
        has = valid.any(axis=1)
    index = np.where(has, start + first[rows, best], start)
    return Selection(index.astype(np.int64), has)


# -- rules on extracted answers ------------------------------------------------------------------------------
def majority_vote(codes: np.ndarray, n: int, start: int = 0) -> Selection:
    """MV: the most frequent valid answer among samples ``start .. n-1`` (ties: earliest first occurrence)."""
    return _vote(codes, n, start, None)


def vote_weights(rewards: np.ndarray, n: int, beta: float, start: int = 0, codes: np.ndarray | None = None
                 ) -> np.ndarray:
    """Unnormalised softmax(r/beta) weights of the window, shifted by each prompt's max valid reward so the
    largest weight is 1 (no overflow, and never all-underflow). Normalisation does not change an argmax."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    r = _clean_rewards(rewards)[:, start:n]
    ok = np.isfinite(r) if codes is None else np.isfinite(r) & (np.asarray(codes)[:, start:n] >= 0)
    rmax = np.max(np.where(ok, r, -np.inf), axis=1, keepdims=True)
    rmax = np.where(np.isfinite(rmax), rmax, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.exp((r - rmax) / beta)
    w = np.where(ok, w, 0.0)
    full = np.zeros(np.shape(rewards), dtype=np.float64)
    full[:, start:n] = w
    return full


def weighted_majority_vote(codes: np.ndarray, rewards: np.ndarray, n: int, beta: float, start: int = 0
                           ) -> Selection:
    """WMV: the valid answer with the largest total weight softmax(r/beta) among samples ``start .. n-1``
    (self-normalised importance sampling towards p(y|x)·exp(r/beta), paper §3.2)."""
    return _vote(codes, n, start, vote_weights(rewards, n, beta, start, codes))


def qalign(codes: np.ndarray, n: int, burn_in: int = 0) -> Selection:
    """QAlign: MV over the chain states ``burn_in .. n-1`` (the first ``n`` states were paid for)."""
    if n <= burn_in:
        raise ValueError(f"budget n={n} leaves no chain state after burn_in={burn_in}")
    return _vote(codes, n, burn_in, None)


def best_of_n(rewards: np.ndarray, n: int, codes: np.ndarray | None = None) -> Selection:
    """BoN: the sample with the largest reward among the first ``n`` (ties: earliest). ``valid`` says
    whether it has an answer (all True when ``codes`` is None)."""
    r = _clean_rewards(rewards)
    _check_window(r.shape[1], n, 0)
    index = np.argmax(r[:, :n], axis=1).astype(np.int64)
    if codes is None:
        valid = np.ones(r.shape[0], dtype=bool)
    else:
        valid = np.take_along_axis(np.asarray(codes), index[:, None], axis=1)[:, 0] >= 0
    return Selection(index, valid)


# -- MBR over pairwise utilities ----------------------------------------------------------------------------
def mbr(utility: np.ndarray, n: int, start: int = 0, weights: np.ndarray | None = None) -> np.ndarray:
    """MBR: the sample ``i`` in ``[start, n)`` maximising sum_j w_j·U[i, j] over ``j`` in the same window
    (w = 1 for MBR, softmax(r/beta) for WMBR). The candidate itself is one of the pseudo-references, as in the
    empirical risk of the paper's Eq. 3. ``utility``: ``[..., N, N]``; ``weights``: ``[..., N]``. Returns the
    chosen index ``[...]`` (ties: earliest)."""
    u = np.asarray(utility)
    _check_window(u.shape[-1], n, start)
    block = u[..., start:n, start:n]
    if weights is None:
        score = block.sum(axis=-1, dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)[..., start:n]
        score = np.einsum("...ij,...j->...i", np.asarray(block, dtype=np.float64), w)
    return start + np.argmax(score, axis=-1)


def mbr_all_budgets(utility: np.ndarray, budgets_: Sequence[int], start: int = 0) -> np.ndarray:
    """``mbr`` for every budget at once: the expected-utility sums grow by the new reference columns of each
    budget, so all budgets cost one pass over U. Returns ``[..., len(budgets_)]`` indices; budgets
    ``<= start`` get -1."""
    u = np.asarray(utility, dtype=np.float64)
    out = np.full(u.shape[:-2] + (len(budgets_),), -1, dtype=np.int64)
    acc = np.zeros(u.shape[:-1], dtype=np.float64)  # acc[..., i] = sum_{j in [start, prev)} U[i, j]
    prev = start
    for b in sorted(range(len(budgets_)), key=lambda k: budgets_[k]):
        n = int(budgets_[b])
        if n <= start:
            continue
        _check_window(u.shape[-1], n, start)
        acc += u[..., :, prev:n].sum(axis=-1)
        prev = n
        out[..., b] = start + np.argmax(acc[..., start:n], axis=-1)
    return out


def correctness(sel: Selection, correct: np.ndarray) -> np.ndarray:
    """Alias of ``Selection.correct`` for a functional style."""
    return sel.correct(correct)


# -- what the pipeline knows about each rule ---------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One selection rule as predict, plot and summary see it. They branch on these properties, never on a
    rule's name, so a new rule is one entry in ``RULES`` (its name and family are table values: keep them)."""

    name: str
    #: the paper's name of the rule's family: MBR over base-model samples is still called MV (paper §4.2), its
    #: weighted form WMV
    family: str
    #: reads rewards, so it pays for the RM even on a pool that was sampled without one
    needs_reward: bool = False
    #: weights outputs by softmax(r/β) (the table reports that β as ``selection_beta``)
    weighted: bool = False
    #: decides by pairwise utilities of the texts on every task (MBR, WMBR)
    mbr: bool = False
    #: reads a chain: its states in stored order after burn-in (never reordered, undefined for n <= burn-in),
    #: by MV on exact tasks and MBR-ROUGE over the states on rouge tasks; only chain runs report it
    follows_chain: bool = False
    #: the decision on encoded answers ``(codes, rewards, n, burn_in, beta) -> Selection``; None = utilities only
    exact: Callable[[np.ndarray, np.ndarray, int, int, float], Selection] | None = None

    def over_utilities(self, rouge: bool) -> bool:
        """Whether the rule decides by pairwise utilities (needs the texts) on a task with this MBR kind."""
        return self.mbr or (rouge and self.follows_chain)

    @property
    def uses_beta(self) -> bool:
        """The run's β shapes the rule's result: its weights, or the distribution the chain targets."""
        return self.weighted or self.follows_chain


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("mv", "MV", exact=lambda c, r, n, b, beta: majority_vote(c, n)),
    Rule("wmv", "WMV", needs_reward=True, weighted=True,
         exact=lambda c, r, n, b, beta: weighted_majority_vote(c, r, n, beta)),
    Rule("bon", "BoN", needs_reward=True, exact=lambda c, r, n, b, beta: best_of_n(r, n, c)),
    Rule("qalign", "QAlign", needs_reward=True, follows_chain=True,
         exact=lambda c, r, n, b, beta: qalign(c, n, b)),
    Rule("mbr", "MV", mbr=True),
    Rule("wmbr", "WMV", needs_reward=True, weighted=True, mbr=True),
)}
#: the rules that apply to any pool of outputs (a method's ``default_rules`` None), per MBR kind of the task
POOL_RULES = {"exact": ("mv", "wmv", "bon"), "rouge": ("mbr", "wmbr", "bon")}


def pool_rules(rouge: bool) -> tuple[str, ...]:
    return POOL_RULES["rouge" if rouge else "exact"]


def rules_where(**props: bool) -> list[str]:
    """Names of the rules whose properties have the given values, e.g. ``rules_where(follows_chain=True)``."""
    return [name for name, r in RULES.items() if all(getattr(r, k) == v for k, v in props.items())]


# -- ROUGE utilities for MBR (open-ended tasks) -----------------------------------------------------------------
#: utility metrics ``rouge_utility`` computes; both are the rouge-score package's F-measure
ROUGE_METRICS = ("rouge1", "rougeL")
_PAIR_CHUNK = 1 << 17


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Tokens exactly as rouge-score's default tokenizer makes them (lower-case, runs of [a-z0-9], no
    stemming), so the scores below equal ``rouge_scorer.RougeScorer([metric]).score(a, b).fmeasure``.
    rouge-score replaces every other character by a space and splits; ``findall`` is the same, faster."""
    return [_ROUGE_TOKEN.findall((t or "").lower()) for t in texts]


def rouge_utility(texts: Sequence[str], metric: str = "rouge1") -> np.ndarray:
    """Symmetric ``[N, N]`` matrix of ROUGE F-measures between all pairs of ``texts``.

    Why not call rouge-score per pair: that is N² Python calls per prompt (minutes at N = 1024). Here
    identical texts are scored once (QAlign chains repeat states), ROUGE-1 overlaps come from one matrix
    product over a thermometer code of the counts (min(a, b) = sum_k [a >= k]·[b >= k]) and ROUGE-L from a
    bit-parallel LCS vectorised over pairs. F = 2·overlap / (len_i + len_j), 0 when either text has no tokens.
    """
    if metric not in ROUGE_METRICS:
        raise ValueError(f"MBR metric {metric!r} is not supported; allowed: {', '.join(ROUGE_METRICS)}")
    index: dict[str, int] = {}
    inverse = np.array([index.setdefault(str(t or ""), len(index)) for t in texts], dtype=np.int64)
    tokens = rouge_tokenize(list(index))
    vocab: dict[str, int] = {}
    flat = np.array([vocab.setdefault(t, len(vocab)) for toks in tokens for t in toks], dtype=np.int64)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    if metric == "rouge1":
        overlap = _unigram_overlap(flat, lengths, len(vocab))
    else:
        overlap = _lcs_matrix(np.split(flat, np.cumsum(lengths)[:-1]), len(vocab))
    # F = overlap / ((len_i + len_j) / 2); overlap is 0 whenever a text is empty, so a denominator clipped
    # away from 0 only avoids 0/0
    half = lengths.astype(np.float64) / 2.0
    denom = np.add.outer(half, half)
    if (lengths == 0).any():
        np.maximum(denom, 0.5, out=denom)
    overlap = np.divide(overlap, denom, out=denom)
    if len(index) == len(inverse):  # no repeated text: rows are already in sample order
        return overlap
    return overlap[np.ix_(inverse, inverse)]


#: thermometer columns set in more texts than this go to the dense matrix product, the rest to pair lists
_DENSE_DF = 64
_PAIR_BLOCK = 1 << 21


def _unigram_overlap(flat: np.ndarray, lengths: np.ndarray, n_vocab: int) -> np.ndarray:
    """Clipped unigram overlap sum_w min(c_iw, c_jw) for all pairs of texts.

    Columns of the thermometer code are (word, k) with entry [c_iw >= k]; a column adds 1 to every pair of
    texts it is set in. Columns set in fewer than two texts only touch the diagonal (the text length) and are
    dropped; frequent columns (function words) go through one ``B @ B.T`` (BLAS syrk; 0/1 products summed in
    float32 are exact below 2**24); rare columns - most of a natural vocabulary - add their few pairs
    directly, which costs sum(df²) instead of texts² per column."""
    u = len(lengths)
    overlap: np.ndarray = np.zeros((u, u), dtype=np.float32)  # integer counts: exact in float32 below 2**24
    if n_vocab == 0:
        return overlap
    rows = np.repeat(np.arange(u), lengths)
    counts = np.bincount(rows * n_vocab + flat, minlength=u * n_vocab).reshape(u, n_vocab)
    dense, sparse = [], []
    for level in range(1, int(counts.max()) + 1):
        hit = counts >= level
        df = hit.sum(axis=0)
        if not (df >= 2).any():
            break
        dense.append(hit[:, df > _DENSE_DF])
        sparse.append(hit[:, (df >= 2) & (df <= _DENSE_DF)])
    if dense:
        b = np.concatenate(dense, axis=1)
        if b.shape[1]:
            b = b.astype(np.float32)
            overlap = b @ b.T
    if sparse:
        _add_pairs(overlap, np.concatenate(sparse, axis=1))
    overlap[np.diag_indices(u)] = lengths
    return overlap


def _add_pairs(overlap: np.ndarray, hit: np.ndarray) -> None:
    """``overlap += hit @ hit.T`` for a sparse boolean ``hit`` by enumerating, per column, the pairs of texts
    it is set in (blocks of at most ``_PAIR_BLOCK`` pairs, so memory stays bounded)."""
    u = overlap.shape[0]
    col, row = np.nonzero(hit.T)  # entries grouped by column, rows ascending
    if not len(col):
        return
    sizes = np.bincount(col, minlength=hit.shape[1])
    sizes = sizes[sizes > 0]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    cost = sizes.astype(np.int64) ** 2
    flat = overlap.reshape(-1)
    lo = 0
    while lo < len(sizes):
        hi = lo + max(1, int(np.searchsorted(np.cumsum(cost[lo:]), _PAIR_BLOCK, side="right")))
        d, st, c = sizes[lo:hi], starts[lo:hi], cost[lo:hi]
        within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        dd = np.repeat(d, c)
        base = np.repeat(st, c)
        i = row[base + within // dd]
        j = row[base + within % dd]
        np.add.at(flat, i * u + j, 1.0)
        lo = hi


def _lcs_matrix(ids: list[np.ndarray], n_vocab: int) -> np.ndarray:
    """LCS lengths of all pairs with the bit-parallel algorithm (Hyyrö 2004), vectorised over pairs:
    V <- (V + (V & M[b])) | (V & ~M[b]) per token b of the second text; LCS = zero bits of V."""
    u = len(ids)
    out = np.zeros((u, u), dtype=np.float64)
    lengths = np.array([len(t) for t in ids], dtype=np.int64)
    out[np.diag_indices(u)] = lengths
    if u < 2 or lengths.max(initial=0) == 0:
        return out
    max_len = int(lengths.max())
    words = (max_len + 63) // 64
    # tokens present in one text only can never match another text: map them to a mask-free id
    df = np.zeros(n_vocab + 1, dtype=np.int64)
    for t in ids:
        df[np.unique(t)] += 1
    shared = np.flatnonzero(df[:n_vocab] >= 2)
    remap = np.full(n_vocab + 1, len(shared), dtype=np.int64)  # last id = "never matches" (and padding)
    remap[shared] = np.arange(len(shared))
    masks = np.zeros((u, len(shared) + 1, words), dtype=np.uint64)
    padded = np.full((u, max_len), len(shared), dtype=np.int64)
    for i, t in enumerate(ids):
        if len(t) == 0:
            continue
        r = remap[t]
        padded[i, : len(t)] = r
        pos = np.arange(len(t))
        keep = r < len(shared)
        np.bitwise_or.at(masks[i], (r[keep], pos[keep] // 64),
                         np.left_shift(np.uint64(1), (pos[keep] % 64).astype(np.uint64)))
    pi, pj = np.triu_indices(u, k=1)
    for lo in range(0, len(pi), _PAIR_CHUNK):
        a, b = pi[lo: lo + _PAIR_CHUNK], pj[lo: lo + _PAIR_CHUNK]
        v = np.full((len(a), words), np.iinfo(np.uint64).max, dtype=np.uint64)
        for step in range(int(lengths[b].max())):
            m = masks[a, padded[b, step]]  # [pairs, words]
            x = v & m
            keep = v & ~x
            carry = np.zeros(len(a), dtype=np.uint64)
            for w in range(words):
                s = v[:, w] + x[:, w]
                c1 = s < v[:, w]
                s2 = s + carry
                c2 = s2 < s
                v[:, w] = s2 | keep[:, w]
                carry = (c1 | c2).astype(np.uint64)
        # LCS = zero bits of V among the first len(a) bit positions
        bit = np.arange(words * 64)
        low = (bit[None, :] < lengths[a][:, None]).reshape(len(a), words, 64)
        lowmask = (low.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=2, dtype=np.uint64)
        lcs = np.bitwise_count(~v & lowmask).sum(axis=1)
        out[a, b] = lcs
        out[b, a] = lcs
    return out
