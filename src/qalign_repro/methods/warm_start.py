"""Warm starts: QAlign chains whose state 0 is a given completion instead of an ancestral sample.

``method.init``: ``ancestral`` (default), ``run:<run name>`` (a stored run under the same ``output_root``, e.g.
the DPO model's ancestral samples; ``method.init_output`` picks which of its outputs: 0 = its first sample,
-1 = its last stored output, i.e. a QAlign run's last state) or ``file:<path.jsonl>`` (rows ``{"id": doc id,
"completion_ids": [...]}`` or ``{"id", "text"}``; a text is encoded with this run's tokenizer and ends with EOS).
Chain j of a prompt takes candidate j mod n of that doc's n candidates (the source's chains, or its rows, in
order), so K chains get K different starts when the source has them.

Why this is still exact: MH with the right target converges from any start (the Quest proposal always
regenerates at least the last token, so the first accepted move lands in the model's support); only burn-in
changes, which the run's diagnostics show. State 0 is scored by this run's RM, never the source's reward, and
records where it came from (``init``). Everything is resolved and checked before a run folder exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import Completion
from qalign_repro.methods.base import Chain, Proposal, RunContext

ALLOWED = "ancestral, run:<run name> or file:<path.jsonl>"


def without_default_init(method: dict[str, Any]) -> dict[str, Any]:
    """The ``method`` config node as a run's identity (run name hash) sees it: an ancestral start (the default)
    drops ``init`` / ``init_output`` (init_output only means something with init=run:), so such runs keep the
    names they had before warm starts existed."""
    if method.get("init", "ancestral") == "ancestral":
        return {k: v for k, v in method.items() if k not in ("init", "init_output")}
    return method


def parse_init(value: Any, init_output: Any = 0) -> tuple[str, str, int]:
    """``(kind, target, init_output)`` of ``method.init``, or a one-line ConfigError."""
    if isinstance(init_output, bool) or not isinstance(init_output, int):
        raise ConfigError(f"method.init_output={init_output!r}; allowed: an integer (0 = first output, -1 = last)")
    text = str(value) if value is not None else ""
    if text == "ancestral":
        return "ancestral", "", int(init_output)
    kind, sep, target = text.partition(":")
    if not sep or kind not in ("run", "file") or not target.strip():
        raise ConfigError(f"method.init={value!r} is not a known option; allowed: {ALLOWED}")
    return kind, target.strip(), int(init_output)


def chain_keys(doc_ids: list[str], k: int) -> list[tuple[str, str, int]]:
    """``(chain key, doc id, chain j)`` of every chain, keyed like ``run.expand_chains`` keys randomness."""
    return [(d if j == 0 else f"{d}#chain{j}", d, j) for d in doc_ids for j in range(k)]


def _check_state(ids: Any, where: str, max_new: int) -> list[int]:
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in ids):
        raise ConfigError(f"{where}: completion_ids must be a non-empty list of token ids; got {str(ids)[:60]}")
    if len(ids) > max_new:
        raise ConfigError(f"{where}: the completion has {len(ids)} tokens, more than max_new_tokens={max_new}; "
                          "allowed: completions of at most max_new_tokens tokens, or a larger max_new_tokens")
    return ids


def _from_run(root: Path, name: str, init_output: int, generator: Any, max_new: int) -> dict[str, list[dict]]:
    from qalign_repro.errors import StorageError
    from qalign_repro.store.storage import RunStore

    try:
        store = RunStore(root, name, readonly=True)
    except StorageError as exc:
        raise ConfigError(f"method.init=run:{name}: {exc}") from None
    out: dict[str, list[dict]] = {}
    try:
        for inst in store.iter_instances():
            inp, outs = inst["input"], inst["outputs"]
            doc, j = str(inp["id"]), int(inp.get("chain", 0))
            where = f"method.init=run:{name}, doc {doc!r}" + (f" chain {j}" if j else "")
            k = init_output if init_output >= 0 else len(outs) + init_output
            if not 0 <= k < len(outs):
                raise ConfigError(f"{where} has {len(outs)} stored outputs, no output method.init_output="
                                  f"{init_output}; allowed: -{len(outs)} .. {len(outs) - 1}")
            o = outs[k]
            ids = _check_state(o.get("completion_ids"), where, max_new)
            text = generator.decode(ids)
            if text != o.get("text"):
                raise ConfigError(f"{where}: its completion decodes to other text with this run's tokenizer; the "
                                  "source run must use the same tokenizer; allowed: file: rows with \"text\"")
            label = f"run:{name}#{k}" + (f"/chain{j}" if j else "")
            out.setdefault(doc, []).append({"completion_ids": ids, "text": text, "init": label,
                                            "finish_reason": o.get("finish_reason", "stop")})
    finally:
        store.close()
    return out


def _encode_text(generator: Any, text: str, where: str) -> list[int]:
    tok = getattr(generator, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"{where}: backend {getattr(generator, 'name', '?')!r} cannot encode text; allowed: rows "
                          "with \"completion_ids\"")
    ids = list(tok.encode(text, add_special_tokens=False))
    if not ids or ids[-1] not in generator.eos_token_ids:
        ids.append(int(generator.eos_token_ids[0]))  # a given text is a complete answer
    return ids


def _from_file(path: Path, generator: Any, max_new: int) -> dict[str, list[dict]]:
    if not path.is_file():
        raise ConfigError(f"method.init=file:{path}: no such file; allowed: a JSONL file of {{\"id\", "
                          "\"completion_ids\"}} or {\"id\", \"text\"} rows")
    out: dict[str, list[dict]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"method.init=file:{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "id" not in row or ("completion_ids" in row) == ("text" in row):
            raise ConfigError(f"{where}: a row needs \"id\" and exactly one of \"completion_ids\" or \"text\"")
        if "text" in row:
            if not isinstance(row["text"], str):
                raise ConfigError(f"{where}: \"text\" must be a string")
            ids = _encode_text(generator, row["text"], where)
        else:
            ids = row["completion_ids"]
        ids = _check_state(ids, where, max_new)
        out.setdefault(str(row["id"]), []).append({
            "completion_ids": ids, "text": generator.decode(ids), "init": f"file:{path}#{n}",
            "finish_reason": "stop" if ids[-1] in generator.eos_token_ids else "length"})
    return out


def resolve(init: tuple[str, str, int], keys: list[tuple[str, str, int]], generator: Any, max_new: int,
            output_root: str | Path) -> dict[str, dict[str, Any]] | None:
    """State 0 of every chain (``chain key -> state``), or None for ancestral starts; every check (source
    exists, holds every doc, lengths) happens here, before any run folder is created."""
    kind, target, init_output = init
    if kind == "ancestral":
        return None
    if kind == "run":
        cands = _from_run(Path(str(output_root)), target, init_output, generator, max_new)
    else:
        path = Path(target).expanduser()
        cands = _from_file(path, generator, max_new)
    missing = sorted({d for _, d, _ in keys if d not in cands})
    if missing:
        raise ConfigError(f"method.init={kind}:{target} has no completion for {len(missing)} doc(s) of this run: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; allowed: a source that "
                          "holds every doc of the run")
    return {key: cands[d][j % len(cands[d])] for key, d, j in keys}


def attach(method: Any, keys: list[tuple[str, str, int]], generator: Any, max_new: int,
           output_root: str | Path) -> None:
    """Resolve a method's warm starts (a method without ``init`` is left alone)."""
    init = getattr(method, "init", None)
    if init is not None:
        method.init_states = resolve(init, keys, generator, max_new, output_root)


def initial_proposal(method: Any, ctx: RunContext, chain: Chain, seed: int) -> Proposal:
    """State 0 of a warm-started chain: a proposal whose completion is known (never sent to the engine)."""
    states = method.init_states
    if states is None or chain.prompt_id not in states:
        raise ConfigError(f"method.init={method.init[0]}:{method.init[1]}: no warm start resolved for chain "
                          f"{chain.prompt_id!r}; resolve them first (warm_start.attach)")
    s = states[chain.prompt_id]
    comp = Completion(token_ids=list(s["completion_ids"]), text=s["text"], finish_reason=s["finish_reason"],
                      prompt_tokens=0, cached_tokens=0)
    return Proposal(chain=chain, k=0, prompt_ids=chain.prompt_ids, max_tokens=ctx.max_new_tokens, seed=seed,
                    memo={"init": s["init"]}, completion=comp)
