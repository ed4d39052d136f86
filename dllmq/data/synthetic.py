"""Synthetic training data and held-out evaluation tasks for the tiny diffusion LM.

Three task families, all generated offline and deterministically from a seed
(``random.Random`` seeded with strings, plus ``hashlib`` for the split):

* **math** (GSM8K-like): word problems from 22 templates (7 one-step, 11
  two-step, 4 three-step), names/objects/verbs varied.  Solutions are the
  calculations, one per line (``23 + 15 = 38``), then ``#### <answer>``.
* **code** (HumanEval/MBPP-like): small Python functions from 30 templates
  (arithmetic, list filters/maps/sums, string operations, conditionals, loops
  with accumulators), each with a HumanEval-style ``prompt`` (signature +
  docstring), ``canonical_solution`` (the body), ``entry_point`` and ``test``
  (``def check(candidate):`` with 4 asserts whose expected values come from an
  independent Python reference, not from the canonical body).
* **knowledge** (ARC/MMLU-like multiple choice) about an invented world
  (:func:`build_world`): 40 countries with capitals and flag colours, 40
  animals with food and habitat, 40 inventors with invention and birthplace and
  30 chemical elements with atomic numbers (230 named entities, 270 facts),
  names made of syllables, fixed by the seed.

Train/test disjointness (by construction, independent of the seed):

* math and code: every problem has a *canonical key*, the template name plus
  the numbers/constants that define it (names, objects, function and argument
  names are surface only and are not part of the key).  A problem belongs to
  ``test`` iff ``int(sha256(repr(("math"|"code", key))).hexdigest()[:8], 16) %
  1000 < TEST_PERMILLE[family]``, else to ``train``.  Generators draw
  candidates and keep only those of the requested split, so no test problem
  (under any surface form) is ever produced for training.
* knowledge: the *facts* are shared (training must teach them), the question
  *templates* are not: training text and chat use ``_TRAIN_QUESTIONS`` and the
  fact phrasings in ``_FACT_PHRASINGS``; test multiple-choice items use the
  disjoint ``_TEST_QUESTIONS``.  No test question string occurs in training
  text.

For a given seed, training (:func:`training_stream`) and evaluation
(:func:`mc_examples`, :func:`write_task_files`) see the same world, so use the
same seed for both.

Code chat format: the SFT prompt is the task's ``prompt`` verbatim (signature
+ docstring) and the response is the **function body** (``canonical_solution``),
as in HumanEval's completion format; evaluation executes ``prompt + response``
and calls ``entry_point``.  (A full-function response made the tiny model
re-type the signature and get the name wrong.)

Arithmetic drills (``arith_text``): lines of random equations over the number
ranges of the math templates.  They teach the arithmetic a worked solution
needs; they are drawn at random, not from test problems, whose held-out part is
the (template, numbers) problem as a whole.

Multiple choice scoring: each item carries ``context``
(``"Question: <question>\\nAnswer:"``) and ``continuations`` (``" " + choice``);
score ``log p(continuation | context)`` for each and pick the argmax.  The plain
text stream contains ``Question: ...\\nAnswer: ...`` blocks built from the
*training* question templates, so the format is familiar but the test
questions are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "DEFAULT_SEED",
    "MIXTURE",
    "TEST_PERMILLE",
    "MATH_TEMPLATES",
    "CODE_TEMPLATES",
    "split_of",
    "math_examples",
    "code_examples",
    "mc_examples",
    "build_world",
    "world_facts",
    "training_stream",
    "item_text",
    "approx_tokens",
    "STDLIB_CHARS_PER_DOC",
    "tokenizer_corpus",
    "write_task_files",
]

DEFAULT_SEED = 0

#: Target share of *tokens* per source in :func:`training_stream` (sums to 1):
#: math 35 %, code 25 %, knowledge 20 %, stdlib text 20 %.  Items differ a lot
#: in length (a knowledge answer is ~30 tokens, a stdlib chunk ~200), so the
#: stream draws a source with probability proportional to
#: ``MIXTURE[source] / running mean length of that source`` (length measured by
#: ``length_fn``, by default :func:`approx_tokens`).
MIXTURE: dict[str, float] = {
    "math_chat": 0.38,  # {"prompt": question, "response": solution}
    "arith_text": 0.10,  # {"text": lines of random equations, ``a op b = c``}
    "arith_chat": 0.0,  # {"prompt": ``a op b``, "response": its worked equation}; for arithmetic-heavy fine-tunes
    "code_chat": 0.22,  # {"prompt": signature+docstring, "response": function body}
    "code_text": 0.05,  # {"text": one to three generated functions}
    "knowledge_chat": 0.08,  # {"prompt": question, "response": answer sentence}
    "knowledge_text": 0.12,  # {"text": fact paragraph or Question/Answer block}
    "stdlib_text": 0.05,  # {"text": chunk of CPython stdlib source}
}

#: Characters per stdlib chunk in the training stream (~200 tokens, fits 256).
STDLIB_CHARS_PER_DOC = 700

_APPROX_TOKEN = re.compile(r"\d|[A-Za-z]+|[^\w\s]|\s+|\w")


def approx_tokens(text: str) -> int:
    """Cheap, tokenizer-free length proxy: digits, letter runs, punctuation and
    whitespace runs count one each (within ~25 % of the trained BPE's count)."""
    return len(_APPROX_TOKEN.findall(text))


#: Per-mille of canonical keys that belong to the test split.
TEST_PERMILLE: dict[str, int] = {"math": 100, "code": 200}

_SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def split_of(family: str, key: tuple) -> str:
    """The split a canonical problem key belongs to (seed independent)."""
    h = hashlib.sha256(repr((family, tuple(key))).encode("utf-8")).hexdigest()
    return "test" if int(h[:8], 16) % 1000 < TEST_PERMILLE[family] else "train"


# ---------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------

# (name, subject pronoun, possessive).  No name is a suffix of another, so a
# question can never be a substring of a question about someone else.
_PEOPLE = [
    ("Tom", "he", "his"), ("Anna", "she", "her"), ("Ben", "he", "his"),
    ("Lucy", "she", "her"), ("Omar", "he", "his"), ("Maya", "she", "her"),
    ("Sam", "he", "his"), ("Nora", "she", "her"), ("Leo", "he", "his"),
    ("Emma", "she", "her"), ("Jack", "he", "his"), ("Zara", "she", "her"),
    ("Ravi", "he", "his"), ("Ella", "she", "her"), ("Finn", "he", "his"),
    ("Rosa", "she", "her"), ("Hugo", "he", "his"), ("Iris", "she", "her"),
    ("Kofi", "he", "his"), ("Mia", "she", "her"), ("Noah", "he", "his"),
    ("Lena", "she", "her"), ("Oscar", "he", "his"), ("Tara", "she", "her"),
    ("Ivan", "he", "his"), ("Grace", "she", "her"), ("Diego", "he", "his"),
    ("Sofia", "she", "her"), ("Paul", "he", "his"), ("Hana", "she", "her"),
]
_OBJECTS = [
    "apples", "marbles", "stickers", "pencils", "books", "cookies", "cards",
    "shells", "coins", "stamps", "crayons", "balloons", "oranges", "eggs",
    "beads", "flowers", "candies", "rocks", "buttons", "toy cars", "pebbles",
    "feathers", "muffins", "peaches",
]
_CONTAINERS = ["boxes", "bags", "baskets", "jars", "crates", "bowls", "packs", "trays"]
_ITEMS = [
    ("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"),
    ("sandwich", "sandwiches"), ("book", "books"), ("toy", "toys"),
    ("cake", "cakes"), ("ball", "balls"), ("hat", "hats"), ("kite", "kites"),
    ("lamp", "lamps"), ("cup", "cups"), ("shirt", "shirts"), ("plant", "plants"),
]
_GAIN = ["buys", "finds", "gets", "collects", "wins", "receives", "picks up"]
_LOSE_PAST = ["gave away", "lost", "sold", "used", "traded"]
_LOSE = ["gives away", "loses", "sells", "uses", "trades"]
_PLACES = [("garden", "gardens"), ("room", "rooms"), ("field", "fields"),
           ("carpet", "carpets"), ("pool", "pools"), ("yard", "yards")]
_ACTIVITIES = [
    ("runs", "km"), ("walks", "km"), ("cycles", "km"), ("reads", "pages"),
    ("writes", "pages"), ("bakes", "cookies"), ("picks", "apples"),
    ("folds", "paper cranes"),
]


class _Surface:
    """Random surface choices (names, objects) for one problem."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self._people = rng.sample(_PEOPLE, 3)

    def person(self, i: int = 0) -> tuple[str, str, str]:
        return self._people[i]

    def obj(self) -> str:
        return self.rng.choice(_OBJECTS)

    def choice(self, seq: Sequence[Any]) -> Any:
        return self.rng.choice(seq)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _op(a: int, op: str, b: int) -> tuple[str, int]:
    if op == "+":
        v = a + b
    elif op == "-":
        v = a - b
    elif op == "*":
        v = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise ValueError("inexact division")
        v = a // b
    else:  # pragma: no cover
        raise ValueError(op)
    return f"{a} {op} {b}", v


def _sum3(a: int, b: int, c: int) -> tuple[str, int]:
    return f"{a} + {b} + {c}", a + b + c


@dataclass(frozen=True)
class MathTemplate:
    name: str
    steps: int
    # fn(rng, surface) -> (numbers, question, [(expression, value), ...])
    fn: Callable[[random.Random, _Surface], tuple[tuple[int, ...], str, list[tuple[str, int]]]]


def _m_add_more(r, s):
    a, b = r.randint(5, 200), r.randint(2, 150)
    (n, he, _), o = s.person(), s.obj()
    q = f"{n} has {a} {o}. {_cap(he)} {s.choice(_GAIN)} {b} more. How many {o} does {n} have now?"
    return (a, b), q, [_op(a, "+", b)]


def _m_take_away(r, s):
    a = r.randint(20, 250)
    b = r.randint(2, a - 1)
    (n, he, _), o = s.person(), s.obj()
    q = f"{n} had {a} {o}. {_cap(he)} {s.choice(_LOSE_PAST)} {b} of them. How many {o} does {n} have left?"
    return (a, b), q, [_op(a, "-", b)]


def _m_groups(r, s):
    a, b = r.randint(2, 12), r.randint(2, 30)
    o, c = s.obj(), s.choice(_CONTAINERS)
    q = f"There are {a} {c} with {b} {o} in each. How many {o} are there in all?"
    return (a, b), q, [_op(a, "*", b)]


def _m_share(r, s):
    k, each = r.randint(2, 9), r.randint(2, 30)
    t = k * each
    (n, _, _), o = s.person(), s.obj()
    q = f"{n} shares {t} {o} equally among {k} friends. How many {o} does each friend get?"
    return (t, k), q, [_op(t, "/", k)]


def _m_compare(r, s):
    b = r.randint(5, 150)
    a = b + r.randint(1, 120)
    (n, _, _), (m, _, _), o = s.person(0), s.person(1), s.obj()
    q = f"{n} has {a} {o} and {m} has {b} {o}. How many more {o} does {n} have than {m}?"
    return (a, b), q, [_op(a, "-", b)]


def _m_price(r, s):
    p, k = r.randint(2, 25), r.randint(2, 9)
    one, many = s.choice(_ITEMS)
    q = f"One {one} costs {p} dollars. How many dollars do {k} {many} cost?"
    return (p, k), q, [_op(k, "*", p)]


def _m_area(r, s):
    length, width = r.randint(3, 30), r.randint(2, 15)
    place = s.choice(_PLACES)[0]
    q = f"A {place} is {length} meters long and {width} meters wide. What is its area in square meters?"
    return (length, width), q, [_op(length, "*", width)]


def _m_gain_lose(r, s):
    a, b = r.randint(10, 150), r.randint(5, 100)
    c = r.randint(2, a + b - 1)
    (n, he, _), o = s.person(), s.obj()
    x = _op(a, "+", b)
    q = (f"{n} has {a} {o}. {_cap(he)} {s.choice(_GAIN)} {b} more and then "
         f"{s.choice(_LOSE)} {c}. How many {o} does {he} have now?")
    return (a, b, c), q, [x, _op(x[1], "-", c)]


def _m_more_than_together(r, s):
    a, b = r.randint(5, 150), r.randint(2, 80)
    (n, _, _), (m, _, _), o = s.person(0), s.person(1), s.obj()
    x = _op(a, "+", b)
    q = f"{n} has {a} {o}. {m} has {b} more {o} than {n}. How many {o} do they have together?"
    return (a, b), q, [x, _op(a, "+", x[1])]


def _m_packs_plus(r, s):
    k, per, c = r.randint(2, 9), r.randint(2, 20), r.randint(1, 90)
    (n, he, _), o = s.person(), s.obj()
    x = _op(k, "*", per)
    q = (f"{n} buys {k} packs of {o}. Each pack has {per} {o}. {_cap(he)} already had "
         f"{c} {o}. How many {o} does {he} have now?")
    return (k, per, c), q, [x, _op(x[1], "+", c)]


def _m_pages(r, s):
    per, d = r.randint(3, 25), r.randint(2, 9)
    p = per * d + r.randint(1, 150)
    n, _, _ = s.person()
    x = _op(per, "*", d)
    q = (f"A book has {p} pages. {n} reads {per} pages every day for {d} days. "
         f"How many pages are left to read?")
    return (p, per, d), q, [x, _op(p, "-", x[1])]


def _m_change(r, s):
    k, p = r.randint(2, 9), r.randint(2, 20)
    m = k * p + r.randint(0, 100)
    n, he, _ = s.person()
    one, many = s.choice(_ITEMS)
    x = _op(k, "*", p)
    q = (f"{n} has {m} dollars. {_cap(he)} buys {k} {many} that cost {p} dollars each. "
         f"How many dollars does {he} have left?")
    return (m, k, p), q, [x, _op(m, "-", x[1])]


def _m_half_find(r, s):
    h, c = r.randint(3, 100), r.randint(1, 80)
    (n, he, _), (m, _, _), o = s.person(0), s.person(1), s.obj()
    x = _op(2 * h, "/", 2)
    q = (f"{n} had {2 * h} {o}. {_cap(he)} gave half of them to {m} and then found {c} more. "
         f"How many {o} does {n} have now?")
    return (2 * h, c), q, [x, _op(x[1], "+", c)]


def _m_saving(r, s):
    sv, w = r.randint(2, 30), r.randint(2, 10)
    c = r.randint(1, sv * w)
    n, he, _ = s.person()
    one, _ = s.choice(_ITEMS)
    x = _op(sv, "*", w)
    q = (f"{n} saves {sv} dollars every week for {w} weeks. Then {he} spends {c} dollars "
         f"on a {one}. How many dollars are left?")
    return (sv, w, c), q, [x, _op(x[1], "-", c)]


def _m_chairs(r, s):
    rows, per = r.randint(2, 15), r.randint(3, 20)
    k = r.randint(1, rows * per - 1)
    x = _op(rows, "*", per)
    q = (f"A hall has {rows} rows of chairs with {per} chairs in each row. {k} chairs are empty. "
         f"How many chairs are taken?")
    return (rows, per, k), q, [x, _op(x[1], "-", k)]


def _m_three_days(r, s):
    a, b, c = r.randint(2, 60), r.randint(2, 60), r.randint(2, 60)
    n, he, _ = s.person()
    verb, unit = s.choice(_ACTIVITIES)
    x = _op(a, "+", b)
    q = (f"{n} {verb} {a} {unit} on Monday, {b} {unit} on Tuesday and {c} {unit} on Wednesday. "
         f"How many {unit} is that in total?")
    return (a, b, c), q, [x, _op(x[1], "+", c)]


def _m_pick_compare(r, s):
    a, d = r.randint(2, 20), r.randint(2, 9)
    b = r.randint(1, a * d - 1)
    (n, _, _), (m, _, _), o = s.person(0), s.person(1), s.obj()
    x = _op(a, "*", d)
    q = (f"{n} collects {a} {o} each day for {d} days. {m} collects {b} {o} in total. "
         f"How many more {o} did {n} collect than {m}?")
    return (a, d, b), q, [x, _op(x[1], "-", b)]


def _m_weekly(r, s):
    a, w = r.randint(2, 9), r.randint(2, 6)
    n, he, _ = s.person()
    x = _op(a, "*", 7)
    q = f"{n} drinks {a} glasses of water every day. How many glasses does {he} drink in {w} weeks?"
    return (a, w), q, [x, _op(x[1], "*", w)]


def _m_shop_day(r, s):
    a = r.randint(60, 300)
    b = r.randint(5, a // 2)
    c = r.randint(1, a - b)
    d = r.randint(5, 120)
    o = s.obj()
    x = _op(a, "-", b)
    y = _op(x[1], "-", c)
    q = (f"A shop had {a} {o}. It sold {b} in the morning and {c} in the afternoon. "
         f"Then it got {d} more. How many {o} does the shop have now?")
    return (a, b, c, d), q, [x, y, _op(y[1], "+", d)]


def _m_twice_fewer(r, s):
    a = r.randint(3, 60)
    c = r.randint(1, 2 * a - 1)
    (n, _, _), (m, _, _), (k, _, _), o = s.person(0), s.person(1), s.person(2), s.obj()
    x = _op(a, "*", 2)
    y = _op(x[1], "-", c)
    q = (f"{n} has {a} {o}. {m} has twice as many {o} as {n}. {k} has {c} fewer {o} than {m}. "
         f"How many {o} do they have altogether?")
    return (a, c), q, [x, y, _sum3(a, x[1], y[1])]


def _m_two_items(r, s):
    k1, p1, k2, p2 = r.randint(2, 9), r.randint(2, 20), r.randint(2, 9), r.randint(2, 20)
    n, he, _ = s.person()
    (_, many1), (_, many2) = s.rng.sample(_ITEMS, 2)
    x, y = _op(k1, "*", p1), _op(k2, "*", p2)
    q = (f"{n} buys {k1} {many1} for {p1} dollars each and {k2} {many2} for {p2} dollars each. "
         f"How many dollars does {he} spend in total?")
    return (k1, p1, k2, p2), q, [x, y, _op(x[1], "+", y[1])]


def _m_bus(r, s):
    a = r.randint(20, 90)
    b = r.randint(1, a - 1)
    c = r.randint(1, 60)
    d = r.randint(1, a - b + c)
    x = _op(a, "-", b)
    y = _op(x[1], "+", c)
    q = (f"A bus has {a} passengers. At the first stop {b} people get off and {c} get on. "
         f"At the second stop {d} people get off. How many passengers are on the bus now?")
    return (a, b, c, d), q, [x, y, _op(y[1], "-", d)]


MATH_TEMPLATES: tuple[MathTemplate, ...] = (
    MathTemplate("add_more", 1, _m_add_more),
    MathTemplate("take_away", 1, _m_take_away),
    MathTemplate("groups", 1, _m_groups),
    MathTemplate("share", 1, _m_share),
    MathTemplate("compare", 1, _m_compare),
    MathTemplate("price", 1, _m_price),
    MathTemplate("area", 1, _m_area),
    MathTemplate("gain_lose", 2, _m_gain_lose),
    MathTemplate("more_than_together", 2, _m_more_than_together),
    MathTemplate("packs_plus", 2, _m_packs_plus),
    MathTemplate("pages", 2, _m_pages),
    MathTemplate("change", 2, _m_change),
    MathTemplate("half_find", 2, _m_half_find),
    MathTemplate("saving", 2, _m_saving),
    MathTemplate("chairs", 2, _m_chairs),
    MathTemplate("three_days", 2, _m_three_days),
    MathTemplate("pick_compare", 2, _m_pick_compare),
    MathTemplate("weekly", 2, _m_weekly),
    MathTemplate("shop_day", 3, _m_shop_day),
    MathTemplate("twice_fewer", 3, _m_twice_fewer),
    MathTemplate("two_items", 3, _m_two_items),
    MathTemplate("bus", 3, _m_bus),
)

#: Share of problems by number of steps (one template drawn uniformly within).
MATH_STEP_SHARE = {1: 0.35, 2: 0.45, 3: 0.20}


def _math_weights() -> list[float]:
    counts = {k: sum(1 for t in MATH_TEMPLATES if t.steps == k) for k in MATH_STEP_SHARE}
    return [MATH_STEP_SHARE[t.steps] / counts[t.steps] for t in MATH_TEMPLATES]


_MATH_WEIGHTS = _math_weights()


def _math_candidate(rng: random.Random, fmt: str = "plain") -> tuple[tuple, dict]:
    t = rng.choices(MATH_TEMPLATES, weights=_MATH_WEIGHTS, k=1)[0]
    nums, q, steps = t.fn(rng, _Surface(rng))
    for _, v in steps:
        if v < 0:  # pragma: no cover - templates guarantee this
            raise AssertionError(f"negative intermediate in {t.name}")
    answer = steps[-1][1]
    solution = "\n".join(format_step(e, v, fmt) for e, v in steps) + f"\n#### {answer}"
    key = (t.name,) + tuple(nums)
    return key, {"question": q, "solution": solution, "answer": int(answer),
                 "template": t.name, "steps": t.steps}


def _draw(family: str, split: str, n: int, rng: random.Random,
          candidate: Callable[[random.Random], tuple[tuple, dict]]) -> list[dict]:
    _check_split(split)
    out: list[dict] = []
    seen: set[tuple] = set()
    attempts, max_attempts = 0, 200 * max(n, 1) + 10_000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could not draw {n} distinct {family} {split} items")
        key, item = candidate(rng)
        if key in seen or split_of(family, key) != split:
            continue
        seen.add(key)
        out.append(item)
    return out


def math_examples(split: str, n: int, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` distinct math problems of ``split``: keys question, solution, answer (int).

    Items also carry ``template`` and ``steps`` (informational).
    """
    return _draw("math", split, n, random.Random(f"math-{split}-{seed}"), _math_candidate)


# ---------------------------------------------------------------------------
# code
# ---------------------------------------------------------------------------

_INT_ARGS = ["x", "n", "num", "value"]
_LIST_ARGS = ["xs", "nums", "values", "numbers"]
_STR_ARGS = ["s", "text", "word"]
_WORDS = [
    "apple", "banana", "river", "stone", "garden", "window", "planet", "yellow",
    "pencil", "rocket", "silver", "forest", "button", "candle", "dragon", "marble",
    "orange", "puzzle", "summer", "tunnel", "violin", "wizard", "castle", "meadow",
]
_AFFIXES = ["pre", "un", "re", "sub", "tri", "mini", "ex", "co", "over", "non",
            "ing", "ed", "er", "ly", "ful", "ness", "able", "est", "ish", "less"]
_LETTERS = "abcdefghijklmnoprstuvwy"


@dataclass
class CodeSpec:
    key: tuple
    names: Sequence[str]  # candidate function names
    args: Sequence[str]  # argument names
    doc: str
    body: str  # indented body, newline terminated
    ref: Callable[..., Any]
    gen: Callable[[random.Random], tuple]  # draws one argument tuple
    extra: dict = field(default_factory=dict)


def _ints(r, lo=-20, hi=60):
    return (r.randint(lo, hi),)


def _list(r, lo=0, hi=30, kmin=3, kmax=6):
    return ([r.randint(lo, hi) for _ in range(r.randint(kmin, kmax))],)


def _sentence(r, kmin=2, kmax=5):
    return (" ".join(r.choice(_WORDS + ["a", "an", "the", "big", "old", "red", "sky"])
                     for _ in range(r.randint(kmin, kmax))),)


def _word(r):
    return (r.choice(_WORDS) + r.choice(["", "", "s", "ing", "ed", "er", "ly"]),)


def _c_add_const(r, arg):
    a = r.randint(1, 99)
    return CodeSpec(("add_const", a), ["add_offset", "plus_const", "shift_up", "add_amount"],
                    [arg], f"Return {arg} plus {a}.", f"    return {arg} + {a}\n",
                    lambda x: x + a, _ints)


def _c_affine(r, arg):
    a, b = r.randint(2, 9), r.randint(1, 50)
    return CodeSpec(("affine", a, b), ["scale_and_shift", "affine", "linear_value", "times_plus"],
                    [arg], f"Return {arg} multiplied by {a}, plus {b}.",
                    f"    return {arg} * {a} + {b}\n", lambda x: x * a + b, _ints)


def _c_abs_diff(r, arg):
    a = r.randint(1, 99)
    return CodeSpec(("abs_diff", a), ["distance_to", "abs_gap", "how_far"],
                    [arg], f"Return the absolute difference between {arg} and {a}.",
                    f"    return abs({arg} - {a})\n", lambda x: abs(x - a), _ints)


def _c_divisible(r, arg):
    a = r.randint(2, 12)

    def gen(rr):
        return (rr.randint(1, 20) * a,) if rr.random() < 0.5 else (rr.randint(1, 200),)

    return CodeSpec(("divisible", a), ["is_divisible", "divides_evenly", "is_multiple"],
                    [arg], f"Return True if {arg} is divisible by {a}, otherwise return False.",
                    f"    return {arg} % {a} == 0\n", lambda x: x % a == 0, gen)


def _c_clamp(r, arg):
    lo = r.randint(0, 20)
    hi = lo + r.randint(5, 60)
    return CodeSpec(("clamp", lo, hi), ["clamp", "limit_range", "bound_value"],
                    [arg], f"Return {arg} clamped to the range from {lo} to {hi}.",
                    f"    return max({lo}, min({hi}, {arg}))\n",
                    lambda x: max(lo, min(hi, x)), lambda rr: (rr.randint(lo - 20, hi + 20),))


def _c_sum_greater(r, arg):
    t = r.randint(0, 20)
    return CodeSpec(("sum_greater", t), ["sum_above", "total_over", "sum_large"],
                    [arg], f"Return the sum of the numbers in {arg} that are greater than {t}.",
                    f"    return sum(v for v in {arg} if v > {t})\n",
                    lambda xs: sum(v for v in xs if v > t), _list)


def _c_count_less(r, arg):
    t = r.randint(1, 25)
    return CodeSpec(("count_less", t), ["count_below", "how_many_small", "count_under"],
                    [arg], f"Return how many numbers in {arg} are less than {t}.",
                    f"    return len([v for v in {arg} if v < {t}])\n",
                    lambda xs: len([v for v in xs if v < t]), _list)


def _c_scale_list(r, arg):
    a = r.randint(2, 9)
    return CodeSpec(("scale_list", a), ["scale_all", "multiply_each", "times_list"],
                    [arg], f"Return a new list with each number in {arg} multiplied by {a}.",
                    f"    return [v * {a} for v in {arg}]\n",
                    lambda xs: [v * a for v in xs], _list)


def _c_filter_mod(r, arg):
    m = r.randint(2, 5)
    rem = r.randint(0, m - 1)
    return CodeSpec(("filter_mod", m, rem), ["keep_remainder", "filter_mod", "select_by_mod"],
                    [arg], f"Return the numbers in {arg} that leave remainder {rem} when divided by {m}.",
                    f"    return [v for v in {arg} if v % {m} == {rem}]\n",
                    lambda xs: [v for v in xs if v % m == rem], _list)


def _c_max_plus(r, arg):
    a = r.randint(1, 50)
    mode = r.choice(["largest", "smallest"])
    fn = "max" if mode == "largest" else "min"
    return CodeSpec(("max_plus", mode, a), [f"{fn}_plus", f"{mode}_plus", f"shifted_{fn}"],
                    [arg], f"Return the {mode} number in {arg} plus {a}.",
                    f"    return {fn}({arg}) + {a}\n",
                    (lambda xs: max(xs) + a) if fn == "max" else (lambda xs: min(xs) + a), _list)


def _c_repeat_str(r, arg):
    a = r.randint(2, 5)
    sep = r.choice(["", "-", " "])
    if sep:
        doc = f"Return {a} copies of {arg} joined by '{sep}'."
        body = f"    return '{sep}'.join([{arg}] * {a})\n"
    else:
        doc = f"Return the string {arg} repeated {a} times."
        body = f"    return {arg} * {a}\n"
    return CodeSpec(("repeat_str", a, sep), ["repeat_text", "echo", "copies"],
                    [arg], doc, body, lambda s: sep.join([s] * a), _word)


def _c_affix(r, arg):
    p = r.choice(_AFFIXES)
    front = r.random() < 0.5
    if front:
        doc, body, ref = (f"Return {arg} with '{p}' added to the front.",
                          f"    return '{p}' + {arg}\n", lambda s: p + s)
    else:
        doc, body, ref = (f"Return {arg} with '{p}' added to the end.",
                          f"    return {arg} + '{p}'\n", lambda s: s + p)
    return CodeSpec(("affix", p, front), ["add_affix", "attach", "decorate_word"],
                    [arg], doc, body, ref, _word)


def _c_ends_with(r, arg):
    p = r.choice(_AFFIXES + ["s", "y", "e", "a"])
    start = r.random() < 0.5
    meth = "startswith" if start else "endswith"
    verb = "starts" if start else "ends"

    def gen(rr):
        w = rr.choice(_WORDS)
        if rr.random() < 0.5:
            w = p + w if start else w + p
        return (w,)

    ref = (lambda s: s.startswith(p)) if start else (lambda s: s.endswith(p))
    return CodeSpec(("ends_with", p, start), [f"{verb}_with", "has_affix", "check_affix"],
                    [arg], f"Return True if {arg} {verb} with '{p}', otherwise return False.",
                    f"    return {arg}.{meth}('{p}')\n", ref, gen)


def _c_count_char(r, arg):
    c = r.choice(_LETTERS)
    return CodeSpec(("count_char", c), ["count_letter", "letter_count", "occurrences"],
                    [arg], f"Return how many times the letter '{c}' appears in {arg}.",
                    f"    return {arg}.count('{c}')\n", lambda s: s.count(c), _sentence)


def _c_sum_range(r, arg):
    lo, a = r.randint(0, 5), r.randint(1, 9)
    body = (f"    total = 0\n    for i in range({lo}, {arg} + 1):\n"
            f"        total += i\n    return total * {a}\n")
    return CodeSpec(("sum_range", lo, a), ["sum_range_scaled", "triangle_times", "range_total"],
                    [arg], f"Return the sum of the whole numbers from {lo} to {arg}, multiplied by {a}.",
                    body, lambda n: sum(range(lo, n + 1)) * a, lambda rr: (rr.randint(lo, lo + 15),))


def _c_cap_value(r, arg):
    a, b = r.randint(0, 50), r.randint(0, 50)
    body = f"    if {arg} > {b}:\n        return {a}\n    return {arg}\n"
    return CodeSpec(("cap_value", a, b), ["replace_large", "cap_value", "cut_off"],
                    [arg], f"Return {a} if {arg} is greater than {b}, otherwise return {arg}.",
                    body, lambda x: a if x > b else x, lambda rr: (rr.randint(b - 20, b + 20),))


_LABEL_PAIRS = [("big", "small"), ("high", "low"), ("hot", "cold"), ("pass", "fail"),
                ("yes", "no"), ("adult", "child"), ("fast", "slow"), ("long", "short")]


def _c_label(r, arg):
    a = r.randint(1, 100)
    hi, lo = r.choice(_LABEL_PAIRS)
    body = f"    if {arg} >= {a}:\n        return '{hi}'\n    return '{lo}'\n"
    return CodeSpec(("label", a, hi), ["classify", "label_value", "describe"],
                    [arg], f"Return '{hi}' if {arg} is at least {a}, otherwise return '{lo}'.",
                    body, lambda x: hi if x >= a else lo, lambda rr: (rr.randint(a - 20, a + 20),))


def _c_product_plus(r, arg):
    a = r.randint(0, 30)
    body = (f"    result = 1\n    for v in {arg}:\n        result *= v\n"
            f"    return result + {a}\n")
    return CodeSpec(("product_plus", a), ["product_plus", "multiply_all", "prod_shift"],
                    [arg], f"Return the product of the numbers in {arg}, plus {a}.",
                    body, lambda xs: _prod(xs) + a, lambda rr: _list(rr, 1, 6, 1, 4))


def _prod(xs):
    p = 1
    for v in xs:
        p *= v
    return p


def _c_reverse_append(r, arg):
    a = r.randint(0, 99)
    return CodeSpec(("reverse_append", a), ["reverse_and_add", "flip_append", "backwards_plus"],
                    [arg], f"Return {arg} reversed, with {a} added at the end.",
                    f"    return {arg}[::-1] + [{a}]\n", lambda xs: xs[::-1] + [a], _list)


def _c_slice(r, arg):
    k = r.randint(1, 5)
    mode = r.choice(["first", "last", "drop"])
    items = "item" if k == 1 else f"{k} items"
    if mode == "first":
        doc, body, ref = f"Return the first {items} of {arg}.", f"    return {arg}[:{k}]\n", lambda xs: xs[:k]
    elif mode == "last":
        doc, body, ref = f"Return the last {items} of {arg}.", f"    return {arg}[-{k}:]\n", lambda xs: xs[-k:]
    else:
        doc, body, ref = (f"Return {arg} without its first {items}.",
                          f"    return {arg}[{k}:]\n", lambda xs: xs[k:])
    return CodeSpec(("slice", mode, k), ["take_items", "slice_list", "part_of"],
                    [arg], doc, body, ref, lambda rr: _list(rr, 0, 50, k + 1, k + 5))


def _c_head_chars(r, arg):
    k = r.randint(1, 5)
    case = r.choice(["upper", "lower", "plain"])
    chars = "character" if k == 1 else f"{k} characters"
    if case == "plain":
        doc, body = f"Return the first {chars} of {arg}.", f"    return {arg}[:{k}]\n"
        ref = lambda s: s[:k]  # noqa: E731
    else:
        doc = f"Return the first {chars} of {arg} in {case} case."
        body = f"    return {arg}[:{k}].{case}()\n"
        ref = (lambda s: s[:k].upper()) if case == "upper" else (lambda s: s[:k].lower())
    return CodeSpec(("head_chars", k, case), ["head", "prefix_of", "first_chars"],
                    [arg], doc, body, ref,
                    lambda rr: (rr.choice(_WORDS).capitalize() if rr.random() < 0.5 else rr.choice(_WORDS),))


def _c_max_two(r, arg):
    c = r.randint(0, 40)
    mode = r.choice(["larger", "smaller"])
    fn = "max" if mode == "larger" else "min"
    return CodeSpec(("max_two", mode, c), [f"{fn}_pair_plus", f"{mode}_plus", "pick_one"],
                    ["a", "b"], f"Return the {mode} of a and b, plus {c}.",
                    f"    return {fn}(a, b) + {c}\n",
                    (lambda a, b: max(a, b) + c) if fn == "max" else (lambda a, b: min(a, b) + c),
                    lambda rr: (rr.randint(-10, 50), rr.randint(-10, 50)))


def _c_mul_sub(r, arg):
    c = r.randint(1, 50)
    minus = r.random() < 0.5
    word, op = ("minus", "-") if minus else ("plus", "+")
    return CodeSpec(("mul_sub", c, minus), ["product_shift", "mul_then_add", "combine"],
                    ["a", "b"], f"Return a times b {word} {c}.",
                    f"    return a * b {op} {c}\n",
                    (lambda a, b: a * b - c) if minus else (lambda a, b: a * b + c),
                    lambda rr: (rr.randint(0, 12), rr.randint(0, 12)))


def _c_long_words(r, arg):
    k = r.randint(2, 6)
    return CodeSpec(("long_words", k), ["count_long_words", "long_word_count", "wordy"],
                    [arg], f"Return the number of words in {arg} that have more than {k} letters.",
                    f"    return len([w for w in {arg}.split() if len(w) > {k}])\n",
                    lambda s: len([w for w in s.split() if len(w) > k]), _sentence)


def _c_power_plus(r, arg):
    k, b = r.randint(2, 3), r.randint(0, 30)
    return CodeSpec(("power_plus", k, b), ["power_shift", "raise_plus", "poly"],
                    [arg], f"Return {arg} raised to the power {k}, plus {b}.",
                    f"    return {arg} ** {k} + {b}\n", lambda x: x ** k + b,
                    lambda rr: (rr.randint(-9, 12),))


def _c_replace_char(r, arg):
    a = r.choice("aeiou")
    b = r.choice([c for c in "xyz*-_" if c != a])
    return CodeSpec(("replace_char", a, b), ["swap_letter", "replace_letter", "mask_vowel"],
                    [arg], f"Return {arg} with every '{a}' replaced by '{b}'.",
                    f"    return {arg}.replace('{a}', '{b}')\n",
                    lambda s: s.replace(a, b), _sentence)


def _c_digit_sum(r, arg):
    a = r.randint(0, 30)
    return CodeSpec(("digit_sum", a), ["digit_sum_plus", "sum_digits", "digits_total"],
                    [arg], f"Return the sum of the digits of {arg}, plus {a}.",
                    f"    return sum(int(d) for d in str({arg})) + {a}\n",
                    lambda n: sum(int(d) for d in str(n)) + a, lambda rr: (rr.randint(0, 9999),))


def _c_count_multiples(r, arg):
    m = r.randint(2, 7)
    body = (f"    count = 0\n    for v in {arg}:\n        if v % {m} == 0:\n"
            f"            count += 1\n    return count\n")
    return CodeSpec(("count_multiples", m), ["count_multiples", "how_many_divisible", "tally"],
                    [arg], f"Return how many numbers in {arg} are multiples of {m}.",
                    body, lambda xs: sum(1 for v in xs if v % m == 0), _list)


def _c_floor_mean(r, arg):
    a = r.randint(2, 9)
    return CodeSpec(("floor_div_sum", a), ["share_total", "split_sum", "sum_div"],
                    [arg], f"Return the sum of {arg} divided by {a}, rounded down.",
                    f"    return sum({arg}) // {a}\n", lambda xs: sum(xs) // a, _list)


def _c_join_words(r, arg):
    sep = r.choice(["-", ", ", " ", "_", "+", "/", ":", " | "])
    up = r.random() < 0.5
    if up:
        doc = f"Return the words in {arg} in upper case, joined with '{sep}'."
        body = f"    return '{sep}'.join(w.upper() for w in {arg})\n"
        ref = lambda ws: sep.join(w.upper() for w in ws)  # noqa: E731
    else:
        doc = f"Return the words in {arg} joined with '{sep}'."
        body = f"    return '{sep}'.join({arg})\n"
        ref = lambda ws: sep.join(ws)  # noqa: E731
    return CodeSpec(("join_words", sep, up), ["join_words", "glue", "combine_words"],
                    [arg], doc, body, ref,
                    lambda rr: ([rr.choice(_WORDS) for _ in range(rr.randint(2, 4))],))


# (builder, argument-name pool)
CODE_TEMPLATES: tuple[tuple[Callable[[random.Random, str], CodeSpec], Sequence[str]], ...] = (
    (_c_add_const, _INT_ARGS), (_c_affine, _INT_ARGS), (_c_abs_diff, _INT_ARGS),
    (_c_divisible, _INT_ARGS), (_c_clamp, _INT_ARGS), (_c_sum_greater, _LIST_ARGS),
    (_c_count_less, _LIST_ARGS), (_c_scale_list, _LIST_ARGS), (_c_filter_mod, _LIST_ARGS),
    (_c_max_plus, _LIST_ARGS), (_c_repeat_str, _STR_ARGS), (_c_affix, _STR_ARGS),
    (_c_ends_with, _STR_ARGS), (_c_count_char, _STR_ARGS), (_c_sum_range, ["n", "limit", "top"]),
    (_c_cap_value, _INT_ARGS), (_c_label, _INT_ARGS), (_c_product_plus, _LIST_ARGS),
    (_c_reverse_append, _LIST_ARGS), (_c_slice, _LIST_ARGS), (_c_head_chars, _STR_ARGS),
    (_c_max_two, ["a"]), (_c_mul_sub, ["a"]), (_c_long_words, ["sentence", "text", "s"]),
    (_c_power_plus, _INT_ARGS), (_c_replace_char, _STR_ARGS), (_c_digit_sum, ["n", "num", "number"]),
    (_c_count_multiples, _LIST_ARGS), (_c_floor_mean, _LIST_ARGS), (_c_join_words, ["words", "parts", "items"]),
)


def _code_candidate(rng: random.Random) -> tuple[tuple, dict]:
    builder, argpool = rng.choice(CODE_TEMPLATES)
    spec = builder(rng, rng.choice(argpool))
    name = rng.choice(list(spec.names))
    sig = ", ".join(spec.args)
    prompt = f'def {name}({sig}):\n    """{spec.doc}"""\n'
    # 4 distinct test inputs with expected values from the independent reference
    cases: list[tuple] = []
    tries = 0
    while len(cases) < 4 and tries < 100:
        tries += 1
        inp = spec.gen(rng)
        if inp not in cases:
            cases.append(inp)
    lines = ["def check(candidate):"]
    for inp in cases:
        expected = spec.ref(*[list(v) if isinstance(v, list) else v for v in inp])
        args = ", ".join(repr(v) for v in inp)
        lines.append(f"    assert candidate({args}) == {expected!r}")
    test = "\n".join(lines) + "\n"
    return spec.key, {
        "prompt": prompt,
        "canonical_solution": spec.body,
        "entry_point": name,
        "test": test,
        "template": spec.key[0],
    }


def code_examples(split: str, n: int, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` distinct code tasks of ``split``.

    Keys: task_id, prompt, canonical_solution, entry_point, test (plus
    ``template``).  ``prompt + canonical_solution`` is the full function and
    ``test`` defines ``check(candidate)``.
    """
    items = _draw("code", split, n, random.Random(f"code-{split}-{seed}"), _code_candidate)
    return [{"task_id": f"tiny-code/{split}/{i}", **it} for i, it in enumerate(items)]


# ---------------------------------------------------------------------------
# knowledge world
# ---------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "th", "br", "kr", "st", "dr", "sh", "gl", "tr"]
_VOWELS = ["a", "e", "i", "o", "u"] * 3 + ["ai", "ou", "ei"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "k"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden"]
_FOODS = ["fish", "berries", "seeds", "grass", "insects", "leaves", "roots", "honey",
          "nuts", "mushrooms", "worms", "fruit"]
_HABITATS = ["forest", "desert", "river", "mountains", "swamp", "grassland", "jungle",
             "tundra", "caves", "coast"]
_INVENTION_SUFFIXES = ["scope", "meter", "graph", "wheel", "lamp", "loom", "press", "phone", "clock"]

N_COUNTRIES, N_ANIMALS, N_PEOPLE, N_ELEMENTS = 40, 40, 40, 30

# relation -> (subject kind, object kind, functional in reverse?)
_RELATIONS = {
    "capital": ("country", "city", True),
    "flag": ("country", "colour", False),
    "eats": ("animal", "food", False),
    "habitat": ("animal", "habitat", False),
    "invented": ("person", "invention", True),
    "born": ("person", "country", False),
    "number": ("element", "number", True),
}

# {s} subject, {o} object; {S}/{O}: capitalised.  Used for training text only.
_FACT_PHRASINGS = {
    "capital": ["The capital of {s} is {o}.", "{o} is the capital city of {s}.",
                "{s} has its capital at {o}.", "{s}'s capital is {o}."],
    "flag": ["The flag of {s} is {o}.", "{s} has a {o} flag.",
             "The colour of the flag of {s} is {o}."],
    "eats": ["{S} eats {o}.", "The food of {s} is {o}.", "{S} feeds on {o}."],
    "habitat": ["{S} lives in the {o}.", "The home of {s} is the {o}.", "{S} is found in the {o}."],
    "invented": ["{s} invented {o}.", "{O} was invented by {s}.", "The inventor of {o} was {s}."],
    "born": ["{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} came from {o}."],
    "number": ["The atomic number of {s} is {o}.", "{S} has atomic number {o}.",
               "{S} is element number {o}."],
}
# (template, direction) with direction "fwd" (answer = object) or "rev" (answer = subject).
_TRAIN_QUESTIONS = {
    "capital": [("What is the capital of {s}?", "fwd"), ("Name the capital of {s}.", "fwd"),
                ("Tell me the capital of {s}.", "fwd"), ("What city is the capital of {s}?", "fwd"),
                ("{o} is the capital of which country?", "rev"), ("Of which country is {o} the capital?", "rev")],
    "flag": [("What colour is the flag of {s}?", "fwd"), ("What is the colour of the flag of {s}?", "fwd"),
             ("Name the colour of the flag of {s}.", "fwd")],
    "eats": [("What does {s} eat?", "fwd"), ("What food does {s} eat?", "fwd"),
             ("What does {s} feed on?", "fwd"), ("Name the food of {s}.", "fwd")],
    "habitat": [("Where does {s} live?", "fwd"), ("Where is {s} found?", "fwd"),
                ("What is the home of {s}?", "fwd"), ("Where does {s} usually live?", "fwd")],
    "invented": [("Who invented {o}?", "rev"), ("Name the inventor of {o}.", "rev"),
                 ("What did {s} invent?", "fwd"), ("What was invented by {s}?", "fwd")],
    "born": [("Where was {s} born?", "fwd"), ("What is the birthplace of {s}?", "fwd"),
             ("Where did {s} come from?", "fwd"), ("What country was {s} born in?", "fwd")],
    "number": [("What is the atomic number of {s}?", "fwd"), ("What number is {s} in the table?", "fwd"),
               ("Which element has atomic number {o}?", "rev"), ("What element has number {o}?", "rev")],
}
# Held out: never used in training text.
_TEST_QUESTIONS = {
    "capital": [("Which city is the capital of {s}?", "fwd"),
                ("Which country has {o} as its capital?", "rev")],
    "flag": [("Which colour is on the flag of {s}?", "fwd"),
             ("The flag of {s} has which colour?", "fwd")],
    "eats": [("Which food does {s} usually eat?", "fwd"),
             ("What is the usual food of {s}?", "fwd")],
    "habitat": [("In which place is {s} usually found?", "fwd"),
                ("What kind of place is home to {s}?", "fwd")],
    "invented": [("Which person invented {o}?", "rev"),
                 ("Which invention is credited to {s}?", "fwd")],
    "born": [("In which country was {s} born?", "fwd"),
             ("Which country is the birthplace of {s}?", "fwd")],
    "number": [("Which number is the atomic number of {s}?", "fwd"),
               ("Which element is number {o} in the table?", "rev")],
}


@dataclass(frozen=True)
class World:
    seed: int
    entities: dict[str, tuple[str, ...]]  # kind -> names
    facts: tuple[tuple[str, str, str], ...]  # (relation, subject, object)

    def objects(self, relation: str) -> list[str]:
        return [o for r, _, o in self.facts if r == relation]

    def subjects(self, relation: str) -> list[str]:
        return [s for r, s, _ in self.facts if r == relation]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _fresh(rng: random.Random, used: set[str], make: Callable[[], str]) -> str:
    while True:
        name = make()
        low = name.lower()
        if len(low) < 4 or low in used:
            continue
        # no name may be a prefix of another (keeps MC continuations unambiguous)
        if any(u.startswith(low) or low.startswith(u) for u in used):
            continue
        used.add(low)
        return name


_WORLD_CACHE: dict[int, World] = {}


def build_world(seed: int = DEFAULT_SEED) -> World:
    """The invented world for ``seed`` (cached)."""
    seed = int(seed)
    if seed in _WORLD_CACHE:
        return _WORLD_CACHE[seed]
    rng = random.Random(f"world-{seed}")
    used: set[str] = set()

    def word(k1: int, k2: int) -> str:
        return "".join(_syllable(rng) for _ in range(rng.randint(k1, k2)))

    countries = [_fresh(rng, used, lambda: (word(1, 2) + rng.choice(["ia", "or", "and", "ara", "en", "ica"])).capitalize())
                 for _ in range(N_COUNTRIES)]
    cities = [_fresh(rng, used, lambda: (word(2, 2) + rng.choice(["", "o", "a", "burg", "mar"])).capitalize())
              for _ in range(N_COUNTRIES)]
    animals = ["the " + _fresh(rng, used, lambda: word(2, 2) + rng.choice(["", "et", "ok", "ling"]))
               for _ in range(N_ANIMALS)]
    people = [_fresh(rng, used, lambda: word(1, 2).capitalize() + " " + word(2, 2).capitalize())
              for _ in range(N_PEOPLE)]
    inventions = ["the " + _fresh(rng, used, lambda: word(1, 2) + rng.choice(_INVENTION_SUFFIXES))
                  for _ in range(N_PEOPLE)]
    elements = [_fresh(rng, used, lambda: (word(1, 1) + rng.choice(["ium", "on", "ine", "ite"])).lower())
                for _ in range(N_ELEMENTS)]
    numbers = [str(v) for v in rng.sample(range(1, 100), N_ELEMENTS)]

    facts: list[tuple[str, str, str]] = []
    for c, city in zip(countries, cities):
        facts.append(("capital", c, city))
        facts.append(("flag", c, rng.choice(_COLOURS)))
    for a in animals:
        facts.append(("eats", a, rng.choice(_FOODS)))
        facts.append(("habitat", a, rng.choice(_HABITATS)))
    for p, inv in zip(people, inventions):
        facts.append(("invented", p, inv))
        facts.append(("born", p, rng.choice(countries)))
    for e, num in zip(elements, numbers):
        facts.append(("number", e, num))
    world = World(
        seed=seed,
        entities={"country": tuple(countries), "city": tuple(cities), "animal": tuple(animals),
                  "person": tuple(people), "invention": tuple(inventions),
                  "element": tuple(elements)},
        facts=tuple(facts),
    )
    _WORLD_CACHE[seed] = world
    return world


def _fill(template: str, s: str, o: str) -> str:
    out = template.format(s=s, o=o, S=_cap(s), O=_cap(o))
    return _cap(out)


def world_facts(seed: int = DEFAULT_SEED) -> list[str]:
    """One canonical sentence per fact of the world (first phrasing)."""
    w = build_world(seed)
    return [_fill(_FACT_PHRASINGS[r][0], s, o) for r, s, o in w.facts]


def _mc_pool(world: World, templates: dict) -> list[tuple[str, str, str, str, str]]:
    """All (relation, subject, object, template, direction) question candidates."""
    pool = []
    for r, s, o in world.facts:
        for tpl, direction in templates[r]:
            pool.append((r, s, o, tpl, direction))
    return pool


def _mc_item(world: World, rng: random.Random, r: str, s: str, o: str, tpl: str, direction: str) -> dict:
    if direction == "rev" and not _RELATIONS[r][2]:  # pragma: no cover - template bug
        raise AssertionError(f"reverse question on non-functional relation {r}")
    question = _fill(tpl, s, o)
    if direction == "fwd":
        answer = o
        # any value of the object's kind other than the true one (relations are
        # functional forward, so each is certainly wrong)
        cand = [x for x in _object_values(world, r) if x != o]
    else:
        answer = s
        # subjects whose object differs (so the distractors are certainly wrong)
        cand = sorted({sub for rr, sub, ob in world.facts if rr == r and ob != o})
    distractors = rng.sample(cand, 3)
    choices = [answer] + distractors
    rng.shuffle(choices)
    label = choices.index(answer)
    return {
        "question": question,
        "choices": choices,
        "label": label,
        "context": f"Question: {question}\nAnswer:",
        "continuations": [" " + c for c in choices],
        "relation": r,
    }


def _object_values(world: World, relation: str) -> list[str]:
    kind = _RELATIONS[relation][1]
    fixed = {"colour": _COLOURS, "food": _FOODS, "habitat": _HABITATS}
    if kind in fixed:
        return list(fixed[kind])
    if kind == "number":
        return world.objects("number")
    return list(world.entities[kind])


def mc_examples(split: str, n: int, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` distinct multiple-choice items about the world of ``seed``.

    Keys: question, choices (4 distinct strings), label (index of the right
    one), context (``"Question: ...\\nAnswer:"``) and continuations
    (``" " + choice``, to score after ``context``), relation.  ``test`` items use
    held-out question templates; ``train`` items the training templates.
    """
    _check_split(split)
    world = build_world(seed)
    pool = _mc_pool(world, _TEST_QUESTIONS if split == "test" else _TRAIN_QUESTIONS)
    rng = random.Random(f"mc-{split}-{seed}")
    rng.shuffle(pool)
    if n > len(pool):
        raise ValueError(f"only {len(pool)} distinct {split} MC questions exist, asked for {n}")
    return [_mc_item(world, rng, *p) for p in pool[:n]]


def _fact_sentence(rng: random.Random, r: str, s: str, o: str) -> str:
    return _fill(rng.choice(_FACT_PHRASINGS[r]), s, o)


def _train_qa(rng: random.Random, world: World) -> tuple[str, str, str]:
    """(question, short answer, answer sentence) from a training template."""
    r, s, o = rng.choice(world.facts)
    tpl, direction = rng.choice(_TRAIN_QUESTIONS[r])
    q = _fill(tpl, s, o)
    short = o if direction == "fwd" else s
    return q, short, _fact_sentence(rng, r, s, o)


def _knowledge_chat(rng: random.Random, world: World) -> dict:
    q, short, sentence = _train_qa(rng, world)
    resp = sentence if rng.random() < 0.6 else _cap(short) + "."
    return {"prompt": q, "response": resp}


def _knowledge_text(rng: random.Random, world: World) -> dict:
    u = rng.random()
    if u < 0.4:
        # paragraph about one subject (all its facts) plus a few random facts
        _, subj, _ = rng.choice(world.facts)
        own = [f for f in world.facts if f[1] == subj]
        others = rng.sample(world.facts, rng.randint(1, 3))
        facts = own + others
        rng.shuffle(facts)
        text = " ".join(_fact_sentence(rng, *f) for f in facts)
    elif u < 0.7:
        facts = rng.sample(world.facts, rng.randint(3, 6))
        text = " ".join(_fact_sentence(rng, *f) for f in facts)
    else:
        blocks = []
        for _ in range(rng.randint(1, 3)):
            q, short, _ = _train_qa(rng, world)
            blocks.append(f"Question: {q}\nAnswer: {short}")
        text = "\n\n".join(blocks)
    return {"text": text}


# ---------------------------------------------------------------------------
# training stream
# ---------------------------------------------------------------------------


def _code_text(rng: random.Random) -> dict:
    funcs = []
    for _ in range(rng.choices([1, 2, 3], weights=[0.5, 0.3, 0.2])[0]):
        key, item = _code_candidate(rng)
        while split_of("code", key) != "train":
            key, item = _code_candidate(rng)
        src = item["prompt"] + item["canonical_solution"]
        if rng.random() < 0.25:
            src += "\n\n" + item["test"]
        if funcs and sum(map(len, funcs)) + len(src) > 700:  # keep within ~256 tokens
            break
        funcs.append(src)
    return {"text": "\n\n".join(funcs)}


def _arith_equation(rng: random.Random, fmt: str = "plain") -> str:
    op = rng.choices("+-*/", weights=[0.35, 0.3, 0.25, 0.1])[0]
    if op == "+":
        a, b = rng.randint(1, 400), rng.randint(1, 300)
    elif op == "-":
        a = rng.randint(2, 450)
        b = rng.randint(1, a)
    elif op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
    else:
        b, q = rng.randint(2, 12), rng.randint(1, 40)
        a = b * q
    expr, v = _op(a, op, b)
    return format_step(expr, v, fmt)


def _arith_text(rng: random.Random, fmt: str = "plain") -> dict:
    return {"text": "\n".join(_arith_equation(rng, fmt) for _ in range(rng.randint(4, 10)))}


def _arith_chat(rng: random.Random, fmt: str = "plain") -> dict:
    """One equation as an SFT pair: the operands stay clean in the prompt, so the whole loss goes to the working
    and the result (in a text drill most masked tokens are random operands, which cannot be learnt)."""
    line = _arith_equation(rng, fmt)
    expr = re.split(r" = |: ", line, maxsplit=1)[0]
    return {"prompt": expr, "response": line}


#: Solution formats for math training items. "plain": ``53 - 49 = 4``; "columns": the same equation worked one
#: digit column at a time, least significant first, carries and borrows written out, then the result:
#: ``53 - 49: 13-9=4,5-4-1=0>4`` (benchmarks/arith_format_probe.py measures why: the plain format is barely learnt
#: by a small masked-diffusion model). Equations without a column form (two multi-digit factors, three terms) stay
#: plain. The held-out test files are unchanged: only the final ``#### n`` is scored.
MATH_FORMATS = ("plain", "columns")


def _digits_lsb(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def column_work(a: int, op: str, b: int) -> str | None:
    """The digit-column working of ``a op b`` (without the result), or None when it has no column form here."""
    if op == "+":
        da, db = _digits_lsb(a), _digits_lsb(b)
        out, carry = [], 0
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            s = x + y + carry
            out.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
            carry = s // 10
        return ",".join(out)
    if op == "-":
        if b > a:
            return None
        da, db = _digits_lsb(a), _digits_lsb(b)
        out, borrow = [], 0
        for i in range(len(da)):
            x, y = da[i], (db[i] if i < len(db) else 0)
            s = x - y - borrow
            nb = s < 0
            out.append(f"{x + 10 if nb else x}-{y}" + ("-1" if borrow else "") + f"={s + 10 if nb else s}")
            borrow = int(nb)
        return ",".join(out)
    if op == "*":
        if min(a, b) >= 10:
            return None
        big, k = (a, b) if b < 10 else (b, a)
        out, carry = [], 0
        for d in _digits_lsb(big):
            s = d * k + carry
            out.append(f"{d}*{k}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
        return ",".join(out)
    if op == "/":
        if b >= 10 or b == 0 or a % b:
            return None
        out, r = [], 0
        for d in str(a):  # long division, most significant digit first
            cur = r * 10 + int(d)
            out.append(f"{cur}/{b}={cur // b}r{cur % b}")
            r = cur % b
        return ",".join(out)
    return None


def format_step(expr: str, value: int, fmt: str = "plain") -> str:
    """One solution line: ``expr = value`` or, in the columns format, ``expr: <columns>>value``."""
    if fmt not in MATH_FORMATS:
        raise ValueError(f"unknown math format {fmt!r}; known: {', '.join(MATH_FORMATS)}")
    parts = expr.split(" ")
    if fmt == "columns" and len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
        work = column_work(int(parts[0]), parts[1], int(parts[2]))
        if work is not None:
            return f"{expr}: {work}>{value}"
    return f"{expr} = {value}"


def _train_candidate(family: str, rng: random.Random,
                     candidate: Callable[[random.Random], tuple[tuple, dict]]) -> dict:
    while True:
        key, item = candidate(rng)
        if split_of(family, key) == "train":
            return item


def training_stream(seed: int = DEFAULT_SEED,
                    length_fn: Callable[[str], int] | None = None, shard: int = 0,
                    mixture: dict[str, float] | None = None, math_format: str = "plain") -> Iterator[dict]:
    """Infinite deterministic mix of training items (token shares: :data:`MIXTURE`).

    Yields ``{"prompt": str, "response": str}`` (chat SFT: wrap the prompt as a
    user message, the response is the assistant's) or ``{"text": str}`` (plain
    language modelling).  Every item also has ``"source"`` (a MIXTURE key).
    Only train-split math/code problems and training question templates are
    used.  ``length_fn`` measures an item's text (:func:`item_text`) for the
    token-share balancing; pass ``lambda s: len(tok(s).input_ids)`` for exact
    token shares (default :func:`approx_tokens`).  The stdlib part depends on
    the interpreter version.  ``shard`` > 0 gives an independent stream over the same
    world (one per data-loader worker); shard 0 is the historical stream. ``mixture`` replaces
    :data:`MIXTURE`'s token shares (same keys; e.g. a math-heavy fine-tuning mix). ``math_format``: how
    math solutions and arithmetic drills are written (:data:`MATH_FORMATS`).
    """
    from dllmq.data.corpus import stdlib_documents  # local: loads files lazily

    measure = length_fn or approx_tokens
    rng = random.Random(f"train-stream-{seed}" + (f"-{shard}" if shard else ""))
    world = build_world(seed)
    shares = dict(MIXTURE if mixture is None else mixture)
    unknown = set(shares) - set(MIXTURE)
    if unknown:
        raise ValueError(f"unknown training sources {sorted(unknown)}; known: {sorted(MIXTURE)}")
    sources = [k for k in shares if shares[k] > 0]
    # running (total length, item count) per source, with a weak common prior
    total = {k: 100.0 for k in sources}
    count = {k: 1.0 for k in sources}
    stdlib: list[str] | None = None
    while True:
        weights = [shares[k] * count[k] / total[k] for k in sources]
        src = rng.choices(sources, weights=weights, k=1)[0]
        if src == "math_chat":
            it = _train_candidate("math", rng, lambda r: _math_candidate(r, math_format))
            out = {"prompt": it["question"], "response": it["solution"]}
        elif src == "code_chat":
            it = _train_candidate("code", rng, _code_candidate)
            out = {"prompt": it["prompt"], "response": it["canonical_solution"]}
        elif src == "arith_text":
            out = _arith_text(rng, math_format)
        elif src == "arith_chat":
            out = _arith_chat(rng, math_format)
        elif src == "code_text":
            out = _code_text(rng)
        elif src == "knowledge_chat":
            out = _knowledge_chat(rng, world)
        elif src == "knowledge_text":
            out = _knowledge_text(rng, world)
        else:
            if stdlib is None:
                stdlib = stdlib_documents(max_chars_per_doc=STDLIB_CHARS_PER_DOC, seed=seed)
            out = {"text": rng.choice(stdlib)}
        total[src] += max(1, measure(item_text(out)))
        count[src] += 1
        out["source"] = src
        yield out


def item_text(item: dict) -> str:
    """Plain text of a stream item (``prompt + "\\n\\n" + response`` for chat items)."""
    if "text" in item:
        return item["text"]
    return item["prompt"] + "\n\n" + item["response"]


def tokenizer_corpus(seed: int = DEFAULT_SEED, n_items: int = 20_000) -> Iterator[str]:
    """The first ``n_items`` items of :func:`training_stream` as plain text,
    plus the chat role words, for training the tokenizer."""
    yield "user\n\nassistant\n\nsystem\n\n"
    stream = training_stream(seed)
    for _ in range(n_items):
        yield item_text(next(stream))


# ---------------------------------------------------------------------------
# task files
# ---------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def write_task_files(out_dir: str | os.PathLike, seed: int = DEFAULT_SEED, n_math: int = 150,
                     n_code: int = 80, n_mc: int = 200) -> dict[str, Path]:
    """Write the held-out ``tiny-math.jsonl``, ``tiny-code.jsonl``, ``tiny-mc.jsonl``.

    All items come from the ``test`` split; the MC items are about the world of
    ``seed`` (use the training seed).  Returns ``{task name: path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    math_rows = [dict(id=f"tiny-math/{i}", **it) for i, it in enumerate(math_examples("test", n_math, seed))]
    code_rows = code_examples("test", n_code, seed)
    for i, row in enumerate(code_rows):
        row["task_id"] = f"tiny-code/{i}"
    mc_rows = [dict(id=f"tiny-mc/{i}", **it) for i, it in enumerate(mc_examples("test", n_mc, seed))]
    paths = {}
    for name, rows in (("tiny-math", math_rows), ("tiny-code", code_rows), ("tiny-mc", mc_rows)):
        p = out / f"{name}.jsonl"
        _write_jsonl(p, rows)
        paths[name] = p
    return paths
