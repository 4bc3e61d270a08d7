"""GSM-Symbolic templates (apple/ml-gsm-symbolic): parse, instantiate offline, and check official instances.

A template's ``question_annotated`` is the question with ``{var,default}`` slots followed by a spec::

    #init:
    - name = sample(names_female)
    - $x = range(10, 50)
    - frac1, frac2 = sample(fraction_alnum, 2)
    #conditions:
    - divides(x, 5)
    #answer: x // 5

``answer_annotated`` is the worked solution with ``{expression}`` fields and GSM8K calculator annotations
``<<...>>`` (dropped, as in Apple's released instances), ending in ``#### {expression}``.

Semantics (checked against all 2,500 official P2 rows, see ``check_instance``):

- an init right-hand side that evaluates to a collection (``range(a, b)`` with Python's exclusive end, a list, an
  ``np.arange``) is sampled uniformly; ``sample(xs)`` picks one, ``sample(xs, k)`` k distinct, several targets
  unpack; ``$`` marks numeric variables.
- list items of the form ``(text, number)`` (``("twice", 2)``, ``("one-third", 1/3)``) are shown as ``text`` in the
  question and used as ``number`` in conditions, the answer formula and the solution.
- numbers are Python ints/floats/``Fraction``; the solution prints ``str(value)`` (``Fraction(9, 10)`` -> ``9/10``,
  ``45.0`` -> ``45.0``), floats rounded to 10 decimals to hide binary noise.
- instances are drawn by a randomised depth-first search with conflict-directed backjumping (``draw``), seeded per
  (seed, variant, template), and accepted only when the solution's ``####`` number equals the ``#answer`` formula
  (except ``ANSWER_FORMULA_EXCEPTIONS``); duplicate questions are redrawn.

The named lists (``names``, ``fraction_alnum``, ...) are not in Apple's release; the ones here hold every value seen
in the official P2 instances for that list (plus a few more names, cities, fruits), so generated main/P1 instances
follow the templates' specs but are not Apple's instances.

Template code is evaluated safely: the AST is restricted to arithmetic, comparisons, literals, subscripts and
calls of the helpers below (plus ``np.arange`` / ``np.random.randint``); there are no builtins, no dunder names and
no other attribute access.
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any

from qalign_repro.errors import DataError
from qalign_repro.tasks._numbers import normalize_number

# ------------------------------------------------------------------------------------------------------------
# named lists (rebuilt; see the module docstring)
# ------------------------------------------------------------------------------------------------------------
# Observed in Apple's P2 instances (the list each value was drawn from is known from the template), plus a few more.
NAMES_FEMALE = [
    "Aisha", "Amelia", "Ananya", "Ava", "Beatriz", "Camila", "Chen", "Daphne", "Elena", "Emma", "Fatima", "Gabrielle",
    "Haruka", "Isabella", "Jasmine", "Kayla", "Keisha", "Kimia", "Leilani", "Mei", "Mia", "Nadia", "Nia", "Olga",
    "Olivia", "Priya", "Quinn", "Rania", "Roya", "Sakura", "Sofia", "Sophia", "Tara", "Uma", "Valentina", "Valeria",
    "Winnie", "Xena", "Yara", "Zahra", "Chloe", "Grace", "Hannah", "Layla", "Lucia", "Mariam", "Nora", "Zoe",
]
NAMES_MALE = [
    "Alejandro", "Ali", "Andre", "Arash", "Arjun", "Benjamin", "Bodhi", "Carlos", "DeShawn", "Diego", "Esteban",
    "Faisal", "Gabriel", "Hiroshi", "Ibrahim", "Jamal", "James", "Jin", "Kai", "Leon", "Liam", "Luca", "Luis", "Mateo",
    "Mohammed", "Noah", "Oliver", "Oscar", "Pavel", "Qasim", "Ravi", "Sanjay", "Santiago", "Tariq", "Theo", "Thiago",
    "Umar", "Viktor", "Wei", "Xavier", "Yuki", "Yusuf", "Daniel", "Emre", "Hassan", "Kenji", "Kofi", "Omar",
]
NAMES = NAMES_FEMALE + NAMES_MALE

_WORDS_0_19 = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    """English words for 0..999 ("thirty five", as in the official instances)."""
    if n < 20:
        return _WORDS_0_19[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _WORDS_0_19[n % 10])
    if n < 1000:
        rest = n % 100
        return _WORDS_0_19[n // 100] + " hundred" + ("" if rest == 0 else " " + number_word(rest))
    raise ValueError(f"number_word supports 0..999, got {n}")


_ORD_PLURAL = {2: "halves", 3: "thirds", 4: "fourths", 5: "fifths", 6: "sixths", 7: "sevenths", 8: "eighths",
               9: "ninths", 10: "tenths", 12: "twelfths"}
_ORD_SINGULAR = {2: "half", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh", 8: "eighth", 9: "ninth",
                 10: "tenth", 12: "twelfth"}


def _fraction_word(num: int, den: int) -> str:
    """"one-half", "two-sixths": the hyphenated form of Apple's word fractions."""
    return f"{number_word(num)}-{_ORD_SINGULAR[den] if num == 1 else _ORD_PLURAL[den]}"


def _shown_fractions(pairs: list[tuple[int, int]], words: bool) -> list[tuple[str, Fraction]]:
    return [(_fraction_word(n, d) if words else f"{n}/{d}", Fraction(n, d)) for n, d in pairs]


# (text shown in the question, number used everywhere else); unreduced forms ("2/4", "two-sixths") are Apple's.
MULTI_TIMES = [(f"{number_word(k)} times", k) for k in range(2, 11)]
MULTIPLE_ICE = [("twice", 2), ("thrice", 3)]
MULTIPLE = [("double", 2), ("triple", 3), ("quadruple", 4), ("quintuple", 5)]
FRACTION_ALPH = _shown_fractions([(1, 2), (2, 4), (3, 6), (1, 3), (2, 6), (2, 3), (4, 6), (1, 4), (3, 4), (1, 5),
                                  (2, 5), (3, 5), (4, 5), (1, 6), (5, 6), (1, 7), (1, 8), (1, 9), (1, 10)], words=True)
FRACTION_NUMS = _shown_fractions([(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (1, 5), (2, 5), (1, 6), (1, 7), (1, 8),
                                  (1, 9), (1, 10)], words=False)  # fraction_nums[:4] is 1/2, 1/3, 2/3, 1/4 in P2
FRACTION_ALNUM = FRACTION_ALPH + FRACTION_NUMS + _shown_fractions([(3, 4), (3, 5), (4, 5)], words=False)
FRACTIONS = [("half", Fraction(1, 2)), ("a third", Fraction(1, 3)), ("a quarter", Fraction(1, 4)),
             ("a fifth", Fraction(1, 5)), ("an eighth", Fraction(1, 8)), ("a tenth", Fraction(1, 10))] + \
    _shown_fractions([(1, d) for d in range(2, 11)], words=False)
FRACTION_DECIMALS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

NAMED_LISTS: dict[str, list[Any]] = {
    "names": NAMES,
    "names_female": NAMES_FEMALE,
    "names_male": NAMES_MALE,
    "fruits": ["apple", "apricot", "banana", "grape", "kiwi", "orange", "pear", "pineapple", "plum", "pomegranate",
               "watermelon", "peach", "mango", "cherry"],
    "colors": ["black", "blue", "brown", "cyan", "gray", "green", "indigo", "magenta", "orange", "pink", "purple", "red",
               "teal", "turquoise", "white", "yellow"],
    "sports": ["badminton", "basketball", "cricket", "football", "hurling", "tennis", "volleyball", "baseball",
               "hockey", "rugby"],
    "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "cities": ["Amsterdam", "Auckland", "Bangkok", "Beijing", "Berlin", "Buenos Aires", "Cairo", "Cape Town", "Dubai",
               "Hanoi", "Helsinki", "Istanbul", "Lisbon", "London", "Marrakech", "Mexico City", "Moscow", "Mumbai",
               "Nairobi", "New York City", "Reykjavik", "Seoul", "Singapore", "Stockholm", "Sydney", "São Paulo",
               "Tokyo", "Toronto", "Vienna", "Paris", "Rome", "Madrid"],
    "currencies_sym": ["$", "€", "¥", "₣", "₺", "£", "₹"],
    "weights_med": ["pound", "kg", "kilogram"],
    "weights_sm": ["ounce", "gram", "g", "oz"],
    "length_lg": ["mile", "kilometer", "km"],
    "multi_times": MULTI_TIMES,
    "multiple_ice": MULTIPLE_ICE,
    "multiple": MULTIPLE,
    "fractions": FRACTIONS,
    "fraction_alnum": FRACTION_ALNUM,
    "fraction_alph": FRACTION_ALPH,
    "fraction_nums": FRACTION_NUMS,
    "fraction_decimals": FRACTION_DECIMALS,
}

# ------------------------------------------------------------------------------------------------------------
# helpers available to template code
# ------------------------------------------------------------------------------------------------------------
_EPS = 1e-9
_PLAIN = (int, float, str, Fraction, tuple, list, bool)


def _num(x: Any) -> Any:
    """Plain Python number from numpy scalars (template code may produce them)."""
    if type(x) in _PLAIN:
        return x
    if hasattr(x, "item") and not isinstance(x, (int, float, Fraction)):
        return x.item()
    return x


def is_int(x: Any) -> bool:
    x = _num(x)
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    if isinstance(x, Fraction):
        return x.denominator == 1
    if isinstance(x, float):
        return math.isfinite(x) and abs(x - round(x)) < _EPS * max(1.0, abs(x))
    return False


def tolerant_int(x: Any) -> int:
    """``int()`` that does not truncate binary noise: int(2.9999999999999996) == 3."""
    x = _num(x)
    if isinstance(x, float) and is_int(x):
        return int(round(x))
    return int(x)


def divides(a: Any, b: Any) -> bool:
    """True when ``b`` divides ``a`` (``a % b == 0``; Apple's argument order)."""
    a, b = _num(a), _num(b)
    if b == 0:
        return False
    r = a % b
    if isinstance(r, float):
        return min(abs(r), abs(abs(b) - abs(r))) < _EPS * max(1.0, abs(a))
    return r == 0


def format_frac(x: Any) -> str:
    """A fraction as "a/b" (an integer as "n")."""
    x = _num(x)
    f = Fraction(x).limit_denominator(10**6) if isinstance(x, float) else Fraction(x)
    return str(f)


def fix_floats(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [fix_floats(v) for v in x]
    x = _num(x)
    return round(x, 2) if isinstance(x, float) else x


def _decimals(step: float) -> int:
    exp = Decimal(str(step)).as_tuple().exponent
    return max(0, -exp) if isinstance(exp, int) else 0


def arange(start: float, stop: float | None = None, step: float = 1) -> list[Any]:
    if stop is None:
        start, stop = 0, start
    if step == 0:
        raise ValueError("arange step must not be 0")
    n = max(0, math.ceil((stop - start) / step))
    if all(isinstance(v, int) for v in (start, stop, step)):
        return [start + i * step for i in range(n)]
    places = max(_decimals(start), _decimals(step))
    return [round(start + i * step, places) for i in range(n)]


@dataclass
class _Helpers:
    """Random helpers bound to one ``random.Random``."""

    rng: random.Random

    def sample(self, items: Any, k: int | None = None) -> Any:
        items = list(items)
        if not items:
            raise ValueError("sample() from an empty collection")
        if k is None:
            return self.rng.choice(items)
        return self.rng.sample(items, int(k))

    def sample_sequential(self, items: Any, k: int) -> list[Any]:
        items = list(items)
        start = self.rng.randrange(len(items))
        return [items[(start + i) % len(items)] for i in range(int(k))]

    def shuffle_list(self, items: Any) -> list[Any]:
        items = list(items)
        self.rng.shuffle(items)
        return items

    def randint(self, low: int, high: int | None = None, size: int | None = None) -> Any:
        if high is None:
            low, high = 0, low
        if size is None:
            return self.rng.randrange(int(low), int(high))
        return [self.rng.randrange(int(low), int(high)) for _ in range(int(size))]


class _NumpyShim:
    """The two numpy functions templates use, drawing from the instance's RNG."""

    def __init__(self, helpers: _Helpers):
        self.arange = arange
        self.random = _RandomShim(helpers)


class _RandomShim:
    def __init__(self, helpers: _Helpers):
        self.randint = helpers.randint


def numbers_within(low: int, high: int) -> list[tuple[str, int]]:
    """``(word, n)`` for low <= n <= high: shown as a word in the question, used as a number."""
    return [(number_word(n), n) for n in range(int(low), int(high) + 1)]


def frange(start: float, stop: float, step: float = 1) -> list[Any]:
    return arange(start, stop, step)


def _fraction(a: Any, b: Any = None) -> Fraction:
    a = _num(a)
    if isinstance(a, tuple):
        a = a[1]
    if b is None:
        return Fraction(a) if not isinstance(a, float) else Fraction(a).limit_denominator(10**6)
    b = _num(b)
    fa = Fraction(a) if not isinstance(a, float) else Fraction(a).limit_denominator(10**6)
    fb = Fraction(b) if not isinstance(b, float) else Fraction(b).limit_denominator(10**6)
    return fa / fb


#: the deterministic helpers and the named lists (shared: template code cannot mutate them, see compile_expr)
_BASE_NAMESPACE: dict[str, Any] = {
    "range": range, "list": list, "int": tolerant_int, "round": round, "is_int": is_int, "divides": divides,
    "Fraction": _fraction, "format_frac": format_frac, "fix_floats": fix_floats, "numbers_within": numbers_within,
    "frange": frange,
    **{name: list(values) for name, values in NAMED_LISTS.items()},
}


def namespace(rng: random.Random) -> dict[str, Any]:
    """Everything template code may call or read: the helpers the 250 templates use, bound to ``rng``."""
    helpers = _Helpers(rng)
    return {**_BASE_NAMESPACE, "sample": helpers.sample, "sample_sequential": helpers.sample_sequential,
            "shuffle_list": helpers.shuffle_list, "np": _NumpyShim(helpers)}


# ------------------------------------------------------------------------------------------------------------
# restricted evaluation
# ------------------------------------------------------------------------------------------------------------
_ALLOWED_NODES = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Load, ast.Constant,
    ast.List, ast.Tuple, ast.Subscript, ast.Slice, ast.Attribute, ast.IfExp, ast.keyword,
    ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod,
    ast.Pow, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn,
)
_ALLOWED_ATTRS = {("np", "arange"), ("np", "random"), ("np.random", "randint")}
#: the only functions template code may call (besides np.arange and np.random.randint)
CALLABLE = frozenset({"range", "list", "int", "round", "is_int", "divides", "Fraction", "format_frac", "fix_floats",
                      "numbers_within", "frange", "sample", "sample_sequential", "shuffle_list"})


class UnsafeExpression(ValueError):
    """Template code outside the allowed subset."""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise UnsafeExpression("attribute access on an expression")


def compile_expr(source: str) -> tuple[Any, frozenset[str]]:
    """Compile template code after checking its AST; returns (code, names it reads)."""
    source = source.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise UnsafeExpression(f"not a Python expression: {source!r} ({exc.msg})") from None
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise UnsafeExpression(f"{type(node).__name__} is not allowed in template code: {source!r}")
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise UnsafeExpression(f"name {node.id!r} is not allowed in template code")
            names.add(node.id)
        if isinstance(node, ast.Call):
            target = _dotted(node.func) if isinstance(node.func, (ast.Name, ast.Attribute)) else None
            if target not in CALLABLE and target not in ("np.arange", "np.random.randint"):
                raise UnsafeExpression(f"call of {target or 'an expression'} is not allowed in template code: {source!r}")
        if isinstance(node, ast.Attribute) and (_dotted(node.value), node.attr) not in _ALLOWED_ATTRS:
            raise UnsafeExpression(f"attribute {node.attr!r} is not allowed in template code: {source!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, complex)):
            raise UnsafeExpression(f"constant {node.value!r} is not allowed in template code")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            right = node.right  # a variable (bounded by its #init domain) or a small constant: no 2 ** 10 ** 10
            small = isinstance(right, ast.Constant) and isinstance(right.value, int) and abs(right.value) <= 10
            if not (small or isinstance(right, ast.Name)):
                raise UnsafeExpression(f"only small constant or variable exponents are allowed: {source!r}")
    return compile(tree, "<template>", "eval"), frozenset(names)


@lru_cache(maxsize=8192)
def _compiled(source: str) -> Any:
    return compile_expr(source)[0]


_NO_BUILTINS: dict[str, Any] = {"__builtins__": {}}


def safe_eval(code: Any, env: dict[str, Any]) -> Any:
    return eval(code, _NO_BUILTINS, env)  # noqa: S307 - AST checked by compile_expr, no builtins


# ------------------------------------------------------------------------------------------------------------
# template parsing
# ------------------------------------------------------------------------------------------------------------
SLOT = re.compile(r"\{\s*(\w+)\s*,([^{}]*)\}")
FIELD = re.compile(r"\{([^{}]+)\}")
CALC = re.compile(r"<<[^<>]*>>")
_SECTION = re.compile(r"^\s*#\s*(init|conditions|answer)\s*[:=]?[ \t]*(.*)$", re.MULTILINE)
_ASSIGN = re.compile(r"^\s*([$\w\s,()]+?)\s*=(?!=)\s*(.+)$", re.DOTALL)


@dataclass
class InitLine:
    targets: list[str]
    numeric: list[bool]
    source: str
    code: Any
    reads: frozenset[str]


@dataclass
class Condition:
    source: str
    code: Any
    reads: frozenset[str]


@dataclass
class Template:
    variant: str
    template_id: int
    original_id: int
    question: str
    solution: str
    original_question: str
    original_answer: str
    init: list[InitLine]
    conditions: list[Condition]
    answer_source: str
    answer_code: Any
    slot_vars: list[str] = field(default_factory=list)

    @property
    def variables(self) -> list[str]:
        return [t for line in self.init for t in line.targets]


def parse_template(row: dict[str, Any], variant: str) -> Template:
    where = f"GSM-Symbolic {variant} template {row.get('id_shuffled')}"
    text = row["question_annotated"]
    sections = list(_SECTION.finditer(text))
    if not sections or sections[0].group(1) != "init":
        raise DataError(f"{where}: no '#init:' section")
    question = text[: sections[0].start()].rstrip()
    body: dict[str, str] = {}
    for k, sec in enumerate(sections):
        end = sections[k + 1].start() if k + 1 < len(sections) else len(text)
        body[sec.group(1)] = (sec.group(2) + "\n" + text[sec.end() : end]).strip()
    if "answer" not in body:
        raise DataError(f"{where}: no '#answer' section")
    init = []
    for line in _items(body["init"]):
        m = _ASSIGN.match(line)
        if not m:
            raise DataError(f"{where}: cannot parse init line {line!r}")
        lhs = m.group(1).replace("(", "").replace(")", "")
        targets = [t.strip() for t in lhs.split(",") if t.strip()]
        numeric = [t.startswith("$") for t in targets]
        targets = [t.lstrip("$").strip() for t in targets]
        code, reads = _compile(m.group(2), where)
        init.append(InitLine(targets, numeric, m.group(2).strip(), code, reads))
    conditions = []
    for line in _items(body.get("conditions", "")):
        code, reads = _compile(line, where)
        conditions.append(Condition(line, code, reads))
    answer_src = body["answer"].strip()
    if answer_src.startswith("{") and answer_src.endswith("}"):
        answer_src = answer_src[1:-1].strip()
    answer_code, _ = _compile(answer_src, where)
    slot_vars = []
    for m in SLOT.finditer(question):
        if m.group(1) not in slot_vars:
            slot_vars.append(m.group(1))
    tpl = Template(variant, int(row["id_shuffled"]), int(row["id_orig"]), question, row["answer_annotated"],
                   row.get("question", ""), row.get("answer", ""), init, conditions, answer_src, answer_code, slot_vars)
    defined = set(tpl.variables)
    missing = [v for v in slot_vars if v not in defined]
    if missing:
        raise DataError(f"{where}: question slot(s) {missing} have no #init line")
    return tpl


def _items(block: str) -> list[str]:
    return [ln.strip()[1:].strip() for ln in block.splitlines() if ln.strip().startswith("-") and ln.strip()[1:].strip()]


def _compile(source: str, where: str) -> tuple[Any, frozenset[str]]:
    try:
        return compile_expr(re.sub(r"\$(?=[A-Za-z_])", "", source))
    except UnsafeExpression as exc:
        raise DataError(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------------------------
# formatting and instantiation
# ------------------------------------------------------------------------------------------------------------
def _is_pair(v: Any) -> bool:
    """``(shown, number)``: ``("twice", 2)``, ``("one-third", Fraction(1, 3))``, ``(20, 20)``."""
    return (isinstance(v, tuple) and len(v) == 2 and isinstance(_num(v[0]), (str, int, float, Fraction))
            and isinstance(_num(v[1]), (int, float, Fraction)) and not isinstance(v[1], bool))


def fmt(value: Any) -> str:
    value = _num(value)
    if isinstance(value, float):
        return str(round(value, 10))
    return str(value)


_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+|\n\s*)$")


def render_question(tpl: Template, env: dict[str, Any], shown: dict[str, str] | None = None) -> str:
    """The question with each slot filled: a ``(text, number)`` value shows its text (``shown``), any other value
    ``str(value)``; a slot that starts a sentence is capitalised."""
    shown = shown or {}
    out, pos = [], 0
    for m in SLOT.finditer(tpl.question):
        out.append(tpl.question[pos : m.start()])
        name = m.group(1)
        text = shown[name] if name in shown else fmt(env[name])
        if text and _SENTENCE_START.search("".join(out)):
            text = text[0].upper() + text[1:]
        out.append(text)
        pos = m.end()
    out.append(tpl.question[pos:])
    return "".join(out)


def render_solution(tpl: Template, env: dict[str, Any]) -> str:
    text = CALC.sub("", tpl.solution)

    def field_value(m: re.Match[str]) -> str:
        return fmt(safe_eval(_compiled(m.group(1)), env))

    return FIELD.sub(field_value, text)


def answer_value(tpl: Template, env: dict[str, Any]) -> str | None:
    value = _num(safe_eval(tpl.answer_code, env))
    if isinstance(value, Fraction) and value.denominator != 1:
        return normalize_number(format(float(value), ".10g"))
    return normalize_number(fmt(value)) if isinstance(value, (int, float, Fraction)) else None


class Rejected(Exception):
    """A draw that violates a condition or whose solution disagrees with the answer formula."""


def _bind(line: InitLine, value: Any, rng: random.Random, env: dict[str, Any], display: dict[str, str],
          pick: bool = True) -> None:
    """Assign an init line's value(s); with ``pick`` a collection for one variable is sampled from first."""
    value = _num(value)
    if len(line.targets) == 1:
        if pick and isinstance(value, (list, range)):
            if not value:
                raise Rejected("empty candidate set")
            value = rng.choice(list(value))
        values = [value]
    else:
        values = list(value)
        if len(values) != len(line.targets):
            raise Rejected(f"{line.source!r} gave {len(values)} values for {len(line.targets)} targets")
    for name, v in zip(line.targets, values):
        v = _num(v)
        if _is_pair(v):
            display[name], env[name] = fmt(v[0]), _num(v[1])
        else:
            display.pop(name, None)
            env[name] = v


#: templates whose ``#answer`` formula disagrees with their own solution's ``####`` expression; Apple's released
#: instances follow the solution, so for these the solution's number is the gold and the formula is not checked.
ANSWER_FORMULA_EXCEPTIONS: dict[tuple[str, int], str] = {
    ("symbolic", 57): "#answer indexes a sampled value (frac1[1], mult1[1]) that conditions and solution use as a number",
    ("symbolic", 62): "#answer is 2 * (n1 + p/100*n1); the question and the solution count n1 + (n1 + p% more) twice",
    ("symbolic", 95): "#answer indexes a sampled value (mult[1]) that conditions and solution use as a number",
    ("p1", 74): "#answer divides by total; the solution (and the question) divide by the students present",
    ("p1", 89): "#answer leaves out the insurance cost (+ extra) that the P1 question and solution add",
    ("p1", 95): "#answer indexes a sampled value (mult[1]) that conditions and solution use as a number",
    ("p2", 26): "#answer has ((n1 + n2) * (1+frac) - 1) in its last term; the solution has no '- 1'",
}

#: this many complete draws whose #answer disagrees with the solution (and none agreeing) mean a buggy formula
MAX_FORMULA_MISMATCHES = 200

_DRAW_ERRORS = (Rejected, ZeroDivisionError, ValueError, TypeError, OverflowError, IndexError, KeyError)


def _conditions_by_line(tpl: Template) -> list[list[Condition]]:
    """Each condition is checked right after the init line that binds the last variable it reads."""
    order = {name: k for k, line in enumerate(tpl.init) for name in line.targets}
    at: list[list[Condition]] = [[] for _ in tpl.init]
    for cond in tpl.conditions:
        lines = [order[n] for n in cond.reads if n in order]
        at[max(lines) if lines else 0].append(cond)
    return at


def _first_failing(conds: list[Condition], env: dict[str, Any]) -> Condition | None:
    for c in conds:
        try:
            if not eval(c.code, _NO_BUILTINS, env):  # noqa: S307 - AST checked by compile_expr
                return c
        except _DRAW_ERRORS:
            return c
    return None


def _candidates(line: InitLine, env: dict[str, Any], rng: random.Random, cap: int,
                static: list[Any] | None) -> Any:
    """Values to try for an init line, in random order: ``(True, value)`` for each of (up to ``cap`` of) its
    domain when the line binds one variable with an enumerable domain, else ``(False, None)`` ``cap`` times,
    meaning "draw the line afresh"."""
    domain = static if static is not None else init_domain(line, env) if len(line.targets) == 1 else None
    if domain is not None:
        for value in rng.sample(domain, min(cap, len(domain))):
            yield True, value
        return
    for _ in range(cap):
        yield False, None


class _OutOfBudget(Exception):
    pass


def draw(tpl: Template, rng: random.Random, budget: int = 2_000_000, cap: int = 200) -> dict[str, Any]:
    """One instance: ``{"question", "answer" (solution), "gold", "values"}``.

    A randomised depth-first search over the init lines with conflict-directed backjumping: each line's values
    are tried in random order, a condition is checked as soon as the variables it reads are bound, and when a
    line runs out of values the search jumps back to the latest line that the failing conditions read (not just
    the previous line). A complete assignment is accepted only if the solution's ``####`` number equals the
    ``#answer`` formula (except ``ANSWER_FORMULA_EXCEPTIONS``). Searches restart with fresh random orders and
    step limits growing from 1,000 to 64,000 until ``budget`` steps are spent (then DataError).
    """
    ns = namespace(rng)
    at = _conditions_by_line(tpl)
    n_lines = len(tpl.init)
    line_of = {name: k for k, line in enumerate(tpl.init) for name in line.targets}
    variables = set(line_of)
    static = [init_domain(line, {}) if len(line.targets) == 1 and not line.reads & variables else None
              for line in tpl.init]
    depends = [{line_of[v] for v in line.reads if v in line_of} for line in tpl.init]
    cond_lines = {id(c): {line_of[v] for v in c.reads if v in line_of} for c in tpl.conditions}
    skip_formula = (tpl.variant, tpl.template_id) in ANSWER_FORMULA_EXCEPTIONS
    state: dict[str, Any] = {"left": 0, "error": "no draw", "mismatches": 0}
    result: dict[str, Any] = {}
    everything = set(range(n_lines))

    def complete(env: dict[str, Any]) -> bool:
        try:
            solution = render_solution(tpl, env)
            gold = solution_number(solution)
        except _DRAW_ERRORS as exc:
            state["error"] = f"{type(exc).__name__}: {exc}"
            return False
        try:
            answer = gold if skip_formula else answer_value(tpl, env)
        except _DRAW_ERRORS as exc:  # counts as a disagreement: a formula that never evaluates is buggy
            answer = f"{type(exc).__name__}: {exc}"
        if gold is None or answer != gold:
            state["error"] = f"the solution's #### number ({gold}) disagrees with #answer ({answer})"
            state["mismatches"] += 1
            if state["mismatches"] >= MAX_FORMULA_MISMATCHES:
                raise DataError(
                    f"GSM-Symbolic {tpl.variant} template {tpl.template_id}: the #answer formula disagreed with the "
                    f"solution's #### expression on {MAX_FORMULA_MISMATCHES} draws that meet every condition (last: "
                    f"{answer} vs {gold}); a buggy formula: add it to ANSWER_FORMULA_EXCEPTIONS")
            return False
        result.update(solution=solution, gold=gold)
        return True

    def search(k: int, env: dict[str, Any], display: dict[str, str]) -> bool | set[int]:
        """True when lines k.. are bound consistently; else the set of earlier lines to blame."""
        if k == n_lines:
            return True if complete(env) else set(everything)
        line = tpl.init[k]
        conflict = set(depends[k])
        for from_domain, value in _candidates(line, env, rng, cap, static[k]):
            state["left"] -= 1
            if state["left"] < 0:
                raise _OutOfBudget
            try:
                if from_domain:
                    _bind(line, value, rng, env, display, pick=False)
                else:
                    _bind(line, safe_eval(line.code, env), rng, env, display)
            except _DRAW_ERRORS as exc:
                state["error"] = f"{line.source!r}: {type(exc).__name__}: {exc}"
                conflict |= set(range(k))
                continue
            failed = _first_failing(at[k], env)
            if failed is not None:
                state["error"] = f"no value of {line.source!r} satisfies {failed.source!r}"
                conflict |= cond_lines[id(failed)]
                continue
            sub = search(k + 1, env, display)
            if isinstance(sub, bool):  # search returns True or the lines to blame, never False
                return True
            if k not in sub:
                return sub
            conflict |= sub
        conflict.discard(k)
        return conflict

    limit = 1000
    while budget > 0:
        step = min(limit, budget)
        budget -= step
        limit = min(2 * limit, 64000)
        env: dict[str, Any] = dict(ns)
        display: dict[str, str] = {}
        state["left"] = step
        try:
            found = search(0, env, display)
        except _OutOfBudget:
            continue
        except NameError as exc:  # a helper or list this instantiator does not provide
            raise DataError(f"GSM-Symbolic {tpl.variant} template {tpl.template_id}: {exc}") from None
        if found is True:
            values = {name: env[name] for name in tpl.variables}
            return {"question": render_question(tpl, env, display), "answer": result["solution"],
                    "gold": result["gold"], "values": values}
        # the (capped) search space is exhausted: try again with other random orders and subsets
    raise DataError(f"GSM-Symbolic {tpl.variant} template {tpl.template_id}: no valid instance found "
                    f"(last failure: {state['error']})")


def solution_number(solution: str) -> str | None:
    lines = [ln for ln in solution.strip().splitlines() if "####" in ln]
    return normalize_number(lines[-1].split("####", 1)[1]) if lines else None


def instantiate(tpl: Template, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct instances of one template, reproducible from (seed, variant, template id)."""
    rng = random.Random(f"gsm-symbolic:{seed}:{tpl.variant}:{tpl.template_id}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    repeats = 0
    while len(out) < n:
        inst = draw(tpl, rng)
        if inst["question"] in seen and repeats < 50 * n:
            repeats += 1
            continue
        seen.add(inst["question"])
        out.append(inst)
    return out


# ------------------------------------------------------------------------------------------------------------
# checking official instances against their template
# ------------------------------------------------------------------------------------------------------------
_WORD_NUM = {w: i for i, w in enumerate(_WORDS_0_19)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_ORDINALS = {"half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4, "fourth": 4, "fourths": 4}
_ORDINALS |= {w: d for d, w in _ORD_SINGULAR.items()} | {w: d for d, w in _ORD_PLURAL.items()}
_MULTIPLIERS = {"twice": 2, "thrice": 3, "double": 2, "triple": 3, "quadruple": 4}


def parse_shown_number(text: str) -> Any:
    """The number a question shows: "1,200", "3.5", "1/3", "thirty five", "twice", "two-sixths", "a quarter"."""
    s = text.strip().lower().replace(",", "")
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    if re.fullmatch(r"-?\d*\.\d+", s):
        return float(s)
    if re.fullmatch(r"-?\d+\s*/\s*\d+", s):
        a, b = s.split("/")
        return Fraction(int(a), int(b))
    if s in _MULTIPLIERS:
        return _MULTIPLIERS[s]
    words = re.split(r"[\s\-]+", s)
    if words and words[-1] == "times":
        inner = parse_shown_number(" ".join(words[:-1]))
        return inner if isinstance(inner, int) else None
    if words and words[-1] in _ORDINALS:
        num = 1 if len(words) == 1 or words[0] in ("a", "an", "one") else _words_to_int(words[:-1])
        return Fraction(num, _ORDINALS[words[-1]]) if num is not None else None
    return _words_to_int(words)


def _words_to_int(words: Sequence[str]) -> int | None:
    total, seen = 0, False
    for w in words:
        if w == "and":
            continue
        if w in _WORD_NUM:
            total += _WORD_NUM[w]
            seen = True
        elif w == "hundred" and seen:
            total *= 100
        else:
            return None
    return total if seen else None


def _flexible(literal: str) -> str:
    parts = re.split(r"(\s+)", literal)
    return "".join((r"[ \t]*\n[ \t\n]*" if "\n" in p else r"[ \t]+") if k % 2 else re.escape(p)
                   for k, p in enumerate(parts))


_NUMBER_SHOWN = (r"(?:-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+|[A-Za-z]+(?:[ -][A-Za-z]+)*?"
                 r"|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*)")
_NUMBER_PRINTED = r"(?:-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?:/\d+)?|-?\.\d+|inf|nan)"


def _slot_regex(template_text: str, pattern: re.Pattern[str], key_of: Callable[[re.Match[str]], str],
                group_pattern: Callable[[str], str]) -> tuple[re.Pattern[str], list[str]]:
    """Regex for a rendered template: each slot becomes a capture group (a repeat -> backreference)."""
    out: list[str] = []
    pos = 0
    groups: dict[str, str] = {}
    names: list[str] = []
    for m in pattern.finditer(template_text):
        out.append(_flexible(template_text[pos : m.start()]))
        key = key_of(m)
        if key in groups:
            out.append(f"(?P={groups[key]})")
        else:
            gname = f"g{len(names)}"
            groups[key] = gname
            names.append(key)
            out.append(f"(?P<{gname}>{group_pattern(key)})")
        pos = m.end()
    out.append(_flexible(template_text[pos:]))
    return re.compile(r"\s*" + "".join(out) + r"\s*", re.IGNORECASE), names


@dataclass
class _Matchers:
    question: re.Pattern[str]
    question_vars: list[str]
    solution: re.Pattern[str]
    solution_fields: list[str]
    field_codes: list[Any]
    final_code: Any


_MATCHERS: dict[int, tuple[Template, _Matchers]] = {}


def _matchers(tpl: Template) -> _Matchers:
    """Question/solution regexes of a template: numeric ``$`` variables and computed fields only match numbers
    (or number words, in the question), which keeps adjacent slots ("thirty five 42-pound") unambiguous."""
    cached = _MATCHERS.get(id(tpl))
    if cached is not None and cached[0] is tpl:
        return cached[1]
    numeric = {t for line in tpl.init for t, num in zip(line.targets, line.numeric) if num}
    text_vars = set(tpl.variables) - numeric
    shown_pattern = {}
    for line in tpl.init:  # numbers shown as text from the template's own (text, number) items
        if len(line.targets) == 1 and line.targets[0] in numeric:
            domain = init_domain(line, {}) or []
            texts = sorted({fmt(d[0]) for d in domain if _is_pair(d)}, key=len, reverse=True)
            if texts:
                shown_pattern[line.targets[0]] = "(?:" + "|".join(re.escape(t) for t in texts) + "|" + _NUMBER_SHOWN + ")"
    q_re, q_vars = _slot_regex(tpl.question, SLOT, lambda m: m.group(1),
                               lambda v: shown_pattern.get(v, _NUMBER_SHOWN) if v in numeric else r"[^\n]+?")
    solution = CALC.sub("", tpl.solution)
    a_re, a_fields = _slot_regex(solution, FIELD, lambda m: m.group(1).strip(),
                                 lambda f: r"[^\n]+?" if f in text_vars or not re.fullmatch(r"[\w\s.()+\-*/%,]+", f) or f in ("True", "False") else _NUMBER_PRINTED)
    codes = []
    for expr in a_fields:
        try:
            codes.append(compile_expr(expr)[0])
        except UnsafeExpression:
            codes.append(None)
    finals = FIELD.findall(solution.rsplit("####", 1)[1]) if "####" in solution else []
    final_code = compile_expr(finals[0])[0] if len(finals) == 1 else None
    m = _Matchers(q_re, q_vars, a_re, a_fields, codes, final_code)
    _MATCHERS[id(tpl)] = (tpl, m)
    return m


class _Pick:
    """What ``sample`` returns while enumerating an init line's domain."""

    def __init__(self, items: Any, k: int | None = None):
        self.items, self.k = list(items), k


def _domain_namespace() -> dict[str, Any]:
    global _DOMAIN_NS
    if _DOMAIN_NS is None:
        _DOMAIN_NS = {**_BASE_NAMESPACE, "sample": lambda items, k=None: _Pick(items, k),
                      "sample_sequential": lambda items, k: _Pick(items, k), "shuffle_list": list, "np": _DomainNumpy()}
    return _DOMAIN_NS


_DOMAIN_NS: dict[str, Any] | None = None


class _DomainNumpy:
    def __init__(self) -> None:
        self.arange = arange
        self.random = _DomainRandom()


class _DomainRandom:
    @staticmethod
    def randint(low: int, high: int | None = None, size: int | None = None) -> range:
        return range(0, int(low)) if high is None else range(int(low), int(high))


def _same_value(a: Any, b: Any) -> bool:
    a, b = _num(a), _num(b)
    if isinstance(a, str) or isinstance(b, str):
        return str(a).strip().lower() == str(b).strip().lower()
    try:
        return abs(float(a) - float(b)) < 1e-9 * max(1.0, abs(float(a)))
    except (TypeError, ValueError):
        return a == b


def init_domain(line: InitLine, env: dict[str, Any]) -> list[Any] | None:
    """The candidate values of a single-target init line (pairs kept), or None when not enumerable."""
    try:
        value = safe_eval(line.code, {**_domain_namespace(), **env})
    except Exception:  # noqa: BLE001 - not enumerable
        return None
    if isinstance(value, _Pick):
        return value.items if value.k is None else None
    if isinstance(value, (list, range)):
        return list(value)
    return [value]


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    answer_formula_ok: bool = False
    fields_checked: int = 0
    fields_matched: int = 0
    domain_checked: int = 0


def question_slots(tpl: Template, question: str) -> dict[str, str] | None:
    """The text each slot variable shows in a rendered question (None when the question does not fit)."""
    qm = _matchers(tpl).question.fullmatch(question)
    if not qm:
        return None
    shown: dict[str, str] = {}
    for k, name in enumerate(_matchers(tpl).question_vars):
        shown.setdefault(name, qm.group(f"g{k}"))
    return shown


def recover_values(tpl: Template, question: str, solution: str) -> dict[str, Any] | str:
    """The variable values of an official instance, or a failure reason.

    Each variable's value is read from its question slot (numbers, "1/3", number words, "twice", "two-sixths"),
    else from a bare ``{var}`` field of the solution; a word that is the text of a ``(text, number)`` item of
    the variable's #init domain takes that number ("quadruplets" -> 4).
    """
    mt = _matchers(tpl)
    shown = question_slots(tpl, question)
    if shown is None:
        return "question does not match the template text"
    am = mt.solution.fullmatch(solution.strip())
    in_answer: dict[str, str] = {}
    if am:
        for k, expr in enumerate(mt.solution_fields):
            if re.fullmatch(r"\w+", expr):
                in_answer.setdefault(expr, am.group(f"g{k}"))
    values: dict[str, Any] = {}
    for line in tpl.init:
        domain = init_domain(line, values) if len(line.targets) == 1 else None
        for name, is_numeric in zip(line.targets, line.numeric):
            value: Any = None
            if not is_numeric:  # text ("fourth" stays a word), but digits are still a number (count = range(2, 6))
                value = shown.get(name, in_answer.get(name))
                if value is not None:
                    digits = re.fullmatch(r"\s*-?[\d,]*\.?\d+(?:\s*/\s*\d+)?\s*", value)
                    values[name] = parse_shown_number(value) if digits else value
                continue
            if name in shown:
                value = parse_shown_number(shown[name])
                if value is None and domain:
                    value = next((_num(d[1]) for d in domain if _is_pair(d) and _same_value(d[0], shown[name])), None)
            if value is None and name in in_answer:
                value = parse_shown_number(in_answer[name])
            if value is None:
                value = shown.get(name, in_answer.get(name))
            if value is not None:
                values[name] = value
    return values


def check_instance(tpl: Template, question: str, solution: str) -> CheckResult:
    """Do an official instance's values satisfy its template?

    Values are recovered from the texts (``recover_values``); then every condition must hold, every value must lie
    in its #init domain (lines that read a named list such as ``names`` are skipped: Apple's lists are not public),
    and the solution's ``####`` expression must give the instance's final number. ``answer_formula_ok`` says
    whether the ``#answer`` formula gives it too, and the solution's ``{expression}`` fields are re-evaluated and
    compared with the text (``fields_matched`` / ``fields_checked``).
    """
    got = recover_values(tpl, question, solution)
    if isinstance(got, str):
        return CheckResult(False, got)
    values = got
    mt = _matchers(tpl)
    missing = {v for v in tpl.variables if v not in values}
    needed = set().union(*(c.reads for c in tpl.conditions), *(ln.reads for ln in tpl.init))
    if mt.final_code is not None:
        needed |= set(mt.final_code.co_names)
    if missing & needed:
        return CheckResult(False, f"cannot recover {sorted(missing & needed)}", values)
    env = {**_domain_namespace(), **values}
    for cond in tpl.conditions:
        try:
            ok = bool(safe_eval(cond.code, env))
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            return CheckResult(False, f"condition {cond.source!r} raised {type(exc).__name__}: {exc}", values)
        if not ok:
            return CheckResult(False, f"condition {cond.source!r} is false", values)
    domain_checked = 0
    for line in tpl.init:
        if len(line.targets) != 1 or line.reads & set(NAMED_LISTS) or line.targets[0] in missing:
            continue
        domain = init_domain(line, env)
        if domain is None:
            continue
        name = line.targets[0]
        if not any(_same_value(_num(d[1]) if _is_pair(d) else d, values[name]) for d in domain):
            return CheckResult(False, f"{name}={values[name]!r} is outside its #init domain {line.source!r}", values)
        domain_checked += 1
    official = solution_number(solution)
    try:
        from_solution = normalize_number(fmt(safe_eval(mt.final_code, env))) if mt.final_code is not None else None
    except Exception as exc:  # noqa: BLE001
        return CheckResult(False, f"the solution's #### expression raised {type(exc).__name__}: {exc}", values)
    if from_solution != official:
        return CheckResult(False, f"the solution's #### expression gives {from_solution}, the instance says {official}", values)
    try:
        formula_ok = answer_value(tpl, env) == official
    except Exception:  # noqa: BLE001
        formula_ok = False
    checked = matched = 0
    am = mt.solution.fullmatch(solution.strip())
    if am:
        for k, code in enumerate(mt.field_codes):
            if code is None:
                continue
            try:
                want = normalize_number(fmt(safe_eval(code, env)))
            except Exception:  # noqa: BLE001 - a field that does not evaluate is just not counted
                continue
            have = normalize_number(am.group(f"g{k}"))
            if want is None or have is None:
                continue
            checked += 1
            matched += want == have
    return CheckResult(True, "", values, formula_ok, checked, matched, domain_checked)
