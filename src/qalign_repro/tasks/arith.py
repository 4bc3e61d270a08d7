"""``arith``: procedurally generated arithmetic word problems, the embedded default task.

A problem starts from a quantity and applies ``num_ops`` operations (add / subtract / multiply by a small
factor), phrased through one of a few short templates with named quantities::

    Q: Ann has 23 apples. She buys 17 more. She gives away 9. She doubles them.
       How many apples does Ann have now?
    A: 23+17=40. 40-9=31. 31*2=62. The answer is 62.

The answer is a short chain of thought ending in "The answer is N." so the GSM8K-style extractor
(``tasks/_numbers.py``) grades it. Everything is a pure function of the config (seed and difficulty knobs),
so the LM trainer (scripts/train_tiny.py), the RM trainer and every run see the same problems.

Splits: each problem's *arithmetic* (start value and operation list, not its wording) is hashed into 100
buckets; buckets [0, 5) are ``test``, [5, 15) ``rm_train`` and the rest ``train``. A test problem therefore
never occurs in the training data, not even reworded, and a split's first n docs do not depend on how many
docs another split asks for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qalign_repro.errors import ConfigError
from qalign_repro.tasks._numbers import extract_final_number
from qalign_repro.tasks.base import TASKS, Doc, Messages, Task

OPS = ("add", "sub", "mul")
SPLITS = ("train", "rm_train", "test")
#: bucket ranges (of 100) per split: disjoint by construction
_BUCKETS = {"test": range(0, 5), "rm_train": range(5, 15), "train": range(15, 100)}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}

#: defaults; conf/dataset/arith.yaml states the same values (a test checks that they agree)
DEFAULTS: dict[str, Any] = {
    "seed": 1234,
    "num_ops": 3,
    "start_min": 2,
    "start_max": 30,
    "operand_min": 1,
    "operand_max": 30,
    "mul_max": 3,
    "max_value": 99,
    "ops": list(OPS),
    "sizes": {"train": 100_000, "rm_train": 4_000, "test": 500},
    "split": "test",
    "strict": True,
    "prompt": "{question}",
}


@dataclass(frozen=True)
class _Template:
    intro: str
    add: tuple[str, ...]
    sub: tuple[str, ...]
    mul: tuple[str, ...]
    question: str
    items: tuple[str, ...]


# Placeholders: {name} {P} (pronoun, capitalised) {item} {n} (start) {a} (operand); in ``mul`` phrases {vt}
# / {vi} are the factor as a transitive / intransitive verb ("doubles", "triples", "multiplies by 5").
_TEMPLATES: tuple[_Template, ...] = (
    _Template(
        intro="{name} has {n} {item}.",
        add=("{P} buys {a} more.", "{P} finds {a} more.", "{P} gets {a} more."),
        sub=("{P} gives away {a}.", "{P} loses {a}.", "{P} sells {a}."),
        mul=("{P} {vt} them.",),
        question="How many {item} does {name} have now?",
        items=("apples", "marbles", "stickers", "cards", "shells", "pens"),
    ),
    _Template(
        intro="A bus has {n} people.",
        add=("{a} people get on.", "{a} more board."),
        sub=("{a} people get off.", "{a} leave."),
        mul=("The crowd {vi}.",),
        question="How many people are on the bus?",
        items=("people",),
    ),
    _Template(
        intro="A box holds {n} {item}.",
        add=("{a} are added.", "{a} more are put in."),
        sub=("{a} are taken out.", "{a} are removed."),
        mul=("The number {vi}.",),
        question="How many {item} are in the box?",
        items=("eggs", "toys", "nails", "beads", "cookies"),
    ),
    _Template(
        intro="{name} saves {n} dollars.",
        add=("{P} earns {a} more.", "{P} is given {a}."),
        sub=("{P} spends {a}.", "{P} pays {a} for lunch."),
        mul=("{P} {vt} the savings.",),
        question="How many dollars does {name} have?",
        items=("dollars",),
    ),
)
_VERBS = {2: "doubles", 3: "triples", 4: "quadruples"}


def _verbs(a: int) -> dict[str, str]:
    word = _VERBS.get(a)
    return {"vt": word or f"multiplies by {a}", "vi": word or f"grows {a} times"}


_NAMES = (
    ("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dev", "He"), ("Eva", "She"), ("Finn", "He"),
    ("Gia", "She"), ("Hugo", "He"), ("Ivy", "She"), ("Jon", "He"), ("Kim", "She"), ("Leo", "He"),
)


def _settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Config merged over DEFAULTS, validated (a bad knob is a one-line ConfigError)."""
    if cfg.get("path"):
        raise ConfigError(f"dataset.path={cfg['path']} is not used by arith (its problems are generated); allowed: "
                          "the generator knobs (seed, num_ops, operand ranges, ...) or a dataset that reads files")
    if cfg.get("source") not in (None, "generated"):
        raise ConfigError(f"dataset.source={cfg['source']!r}; allowed: generated (arith has no files or hub id)")
    s = {**DEFAULTS, **{k: v for k, v in cfg.items() if k in DEFAULTS}}
    s["sizes"] = {**DEFAULTS["sizes"], **dict(cfg.get("sizes") or {})}
    s["ops"] = list(s["ops"])
    if s["split"] not in SPLITS:
        raise ConfigError(f"dataset.split={s['split']!r}; allowed: {', '.join(SPLITS)}")
    bad = [o for o in s["ops"] if o not in OPS]
    if bad or not s["ops"]:
        raise ConfigError(f"dataset.ops={s['ops']!r}; allowed: a non-empty subset of {list(OPS)}")
    if int(s["num_ops"]) < 1:
        raise ConfigError(f"dataset.num_ops={s['num_ops']!r}; must be >= 1")
    if not 0 <= int(s["start_min"]) <= int(s["start_max"]) <= int(s["max_value"]):
        raise ConfigError("dataset: need 0 <= start_min <= start_max <= max_value")
    if not 1 <= int(s["operand_min"]) <= int(s["operand_max"]):
        raise ConfigError("dataset: need 1 <= operand_min <= operand_max")
    if "mul" in s["ops"] and int(s["mul_max"]) < 2:
        raise ConfigError(f"dataset.mul_max={s['mul_max']!r}; must be >= 2 when 'mul' is in ops")
    return s


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def _draw(rng: random.Random, s: Mapping[str, Any]) -> Doc:
    """One problem. No value goes below zero or above ``max_value``, and nothing is multiplied while it is
    below 2; an operation that cannot apply is left out of that step's choice."""
    value = rng.randint(int(s["start_min"]), int(s["start_max"]))
    start = value
    lo, hi, cap = int(s["operand_min"]), int(s["operand_max"]), int(s["max_value"])
    steps: list[list[Any]] = []
    for _ in range(int(s["num_ops"])):
        allowed = [
            op for op in s["ops"]
            if (op == "add" and value + lo <= cap)
            or (op == "sub" and value >= lo)
            or (op == "mul" and 2 <= value and value * 2 <= cap)
        ]
        op = rng.choice(allowed)
        if op == "add":
            a = rng.randint(lo, min(hi, cap - value))
            value += a
        elif op == "sub":
            a = rng.randint(lo, min(hi, value))
            value -= a
        else:
            a = rng.randint(2, min(int(s["mul_max"]), cap // value))
            value *= a
        steps.append([op, a, value])
    t_idx = rng.randrange(len(_TEMPLATES))
    t = _TEMPLATES[t_idx]
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(t.items)
    fields = {"name": name, "P": pronoun, "item": item}
    parts = [t.intro.format(n=start, **fields)]
    for op, a, _ in steps:
        parts.append(rng.choice(getattr(t, op)).format(a=a, **fields, **_verbs(a)))
    parts.append(t.question.format(**fields))
    return {"question": " ".join(parts), "start": start, "steps": steps, "answer": value, "template": t_idx}


def problem_key(doc: Doc) -> str:
    """The problem's arithmetic, independent of its wording: what the split hash and dedup use."""
    return f"{doc['start']}|" + ";".join(f"{op}{a}" for op, a, _ in doc["steps"])


def generate(cfg: Mapping[str, Any], split: str, n: int) -> list[Doc]:
    """The first ``n`` problems of ``split``: one seeded stream, filtered by bucket, deduped by key."""
    s = _settings({**dict(cfg), "split": split})
    rng = random.Random(f"arith:{s['seed']}")
    buckets = _BUCKETS[split]
    seen: set[str] = set()
    docs: list[Doc] = []
    misses = 0
    while len(docs) < n:
        doc = _draw(rng, s)
        key = problem_key(doc)
        if _bucket(key) not in buckets or key in seen:
            misses += 1
            if misses > 50 * n + 10_000:
                raise ConfigError(f"arith: cannot find {n} distinct {split} problems; widen the knobs")
            continue
        seen.add(key)
        docs.append({"id": f"arith-{split}-{len(docs):06d}", **doc})
    return docs


def iter_solution_steps(doc: Doc) -> Iterator[str]:
    value = doc["start"]
    for op, a, result in doc["steps"]:
        yield f"{value}{_SYMBOL[op]}{a}={result}."
        value = result


def solution(doc: Doc) -> str:
    """The gold chain of thought: the LM's training target and the oracle completion."""
    return " ".join([*iter_solution_steps(doc), f"The answer is {doc['answer']}."])


@TASKS.register("arith")
class Arith(Task):
    """Synthetic arithmetic word problems; ``cfg.split`` picks train / rm_train / test (the default)."""

    name = "arith"
    mbr_kind = "exact"

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__(cfg)
        self.settings = _settings(self.cfg)

    def load_all(self) -> list[Doc]:
        split = self.settings["split"]
        return generate(self.settings, split, int(self.settings["sizes"][split]))

    def load_split(self, split: str, n: int | None = None) -> list[Doc]:
        """The first ``n`` docs of any split (the trainer asks for exactly as many as its budget needs)."""
        if split not in SPLITS:
            raise ConfigError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
        return generate(self.settings, split, int(self.settings["sizes"][split] if n is None else n))

    def prompt(self, doc: Doc) -> Messages:
        return [{"role": "user", "content": str(self.settings["prompt"]).format(question=doc["question"])}]

    def extract(self, text: str) -> str | None:
        return extract_final_number(text, strict=bool(self.settings["strict"]))

    def gold(self, doc: Doc) -> str:
        return str(doc["answer"])

    def solution(self, doc: Doc) -> str:
        return solution(doc)

    def oracle_completion(self, doc: Doc) -> str:
        return solution(doc)
