"""Verifiers: did a reply answer the record correctly? `get(spec)` -> (record, reply) -> Verdict.

- `math`: the final answer is the text after the last "####", else the last \\boxed{...} (braces
  balanced), else the last number; both sides are normalised (commas, $, units, degrees, trailing zeros,
  a/b and \\frac{a}{b} compared as exact fractions) before comparing to `ground_truth`.
- `exact`: the reply (or its "####"/\\boxed answer, if it has one) equals `ground_truth` after case,
  whitespace and trailing-period normalisation.
- `recorded`: the record's own `reward` is the outcome; nothing is generated, the trajectory is the rollout.
- `module:function`: a user callable (record: dict, reply: str) -> bool | float | (parseable, bool | float)
  | None (None: no parseable answer). A number counts as correct when it reaches `success_threshold`.

A Verdict also carries the normalised answer (the repetition penalty counts distinct answers) and a score
(1/0, or the number a recorded reward or user function gave)."""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Callable, NamedTuple

from curate.formats.records import last_boxed


class Verdict(NamedTuple):
    """A verifier's judgement of one reply: parseable, correct, the normalised answer (None when
    unparseable) and the score."""

    parseable: bool
    correct: bool
    answer: str | None = None     # normalised final answer (None when unparseable)
    score: float = 0.0


Verifier = Callable[[dict, str], Verdict]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_FRAC = re.compile(r"^(-?)\\frac(?:\{([^{}]+)\}|(\d))(?:\{([^{}]+)\}|(\d))$")
_UNIT_TAIL = re.compile(r"^(.*?[\d}.])\s*[a-zA-Z][a-zA-Z .]*$")   # "18 dollars", "\frac{270}7 degrees"
_VAR_EQ = re.compile(r"^[a-zA-Z]\s*=\s*(?!=)")                        # "x = 5" -> "5"
_LATEX_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$", "^\\circ", "^{\\circ}",
                "°", "\\%", "%", "\\displaystyle")


def extract_answer(reply: str) -> str | None:
    """The final answer a reply commits to: "#### X", else \\boxed{X}, else the last number."""
    head, sep, tail = reply.rpartition("####")
    if sep:
        line = tail.strip().splitlines()[0].strip() if tail.strip() else ""
        return line or None
    boxed = last_boxed(reply)
    if boxed:
        return boxed
    numbers = _NUMBER.findall(reply)
    return numbers[-1].rstrip(".,") if numbers else None


def normalize(answer: str) -> str:
    """A canonical string: numbers as reduced fractions ("3/2", "18"), other answers with LaTeX noise,
    spaces, \\text{} wrappers and trailing punctuation removed."""
    s = answer.strip().rstrip(".").strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s).replace("\\mbox", "")
    for noise in _LATEX_NOISE:
        s = s.replace(noise, "")
    s = _VAR_EQ.sub("", s.strip())
    value = to_number(s)
    if value is None:
        tail = _UNIT_TAIL.match(s)
        value = to_number(tail.group(1)) if tail else None
    if value is not None:
        return str(value)
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def to_number(s: str) -> Fraction | None:
    """An exact value for "1,234.50", "-.5", "3/4", "\\frac{3}{4}", "\\frac43"; None if not a number."""
    s = s.strip().replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _FRAC.match(s)
    if m:
        sign, a1, a2, b1, b2 = m.groups()
        s = f"{sign}{a1 or a2}/{b1 or b2}"
    if s.count("/") == 1:
        a, b = s.split("/")
        try:
            return Fraction(Fraction(a), Fraction(b)) if Fraction(b) != 0 else None
        except (ValueError, ZeroDivisionError):
            return None
    try:
        return Fraction(s)
    except ValueError:
        return None


def verify_math(record: dict, reply: str) -> Verdict:
    """`math`: the reply's final answer (`extract_answer`) equals `ground_truth` once both are normalised;
    unparseable when the reply commits to no answer."""
    answer = extract_answer(reply)
    if answer is None:
        return Verdict(False, False)
    key = normalize(answer)
    truth = record.get("ground_truth")
    correct = truth is not None and key == normalize(truth)
    return Verdict(True, correct, key, float(correct))


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def verify_exact(record: dict, reply: str) -> Verdict:
    """`exact`: the reply (or its "####" / \\boxed{} answer) equals `ground_truth` after case, whitespace
    and trailing-period normalisation; unparseable when blank."""
    answer = reply if "####" not in reply and last_boxed(reply) is None else extract_answer(reply)
    if answer is None or not answer.strip():
        return Verdict(False, False)
    key, truth = _plain(answer), record.get("ground_truth")
    correct = truth is not None and key == _plain(truth)
    return Verdict(True, correct, key, float(correct))


def verify_recorded(record: dict, reply: str, success_threshold: float = 1.0) -> Verdict:
    """`recorded`: the record's own `reward` is the score, correct when >= success_threshold; unparseable
    without one (the reply is not read)."""
    reward = record.get("reward")
    if reward is None:
        return Verdict(False, False)
    return Verdict(True, reward >= success_threshold, None, float(reward))


def _from_user(value, reply: str, success_threshold: float) -> Verdict:
    parseable = True
    if isinstance(value, tuple):
        parseable, value = value
    if value is None or not parseable:
        return Verdict(False, False)
    score = float(value)
    return Verdict(True, score >= success_threshold, _plain(reply), score)


def load_callable(spec: str) -> Callable:
    """The callable "module:function" names, its module imported; ValueError when it cannot be imported or
    is not callable."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier {spec!r}: cannot import {name!r} from module {module!r} ({e})") from e
    if not callable(fn):
        raise ValueError(f"verifier {spec!r} is not callable")
    return fn


def get(spec: str, success_threshold: float = 1.0) -> Verifier:
    """A verifier by name (math, exact, recorded) or a user function "package.module:function"."""
    if spec == "math":
        return verify_math
    if spec == "exact":
        return verify_exact
    if spec == "recorded":
        return lambda record, reply: verify_recorded(record, reply, success_threshold)
    if ":" in spec:
        fn = load_callable(spec)
        return lambda record, reply: _from_user(fn(record, reply), reply, success_threshold)
    raise ValueError(f"unknown verifier {spec!r}: use math, exact, recorded or module:function")


def needs(spec: str) -> str | None:
    """The record field a verifier cannot do without (checked before any generation)."""
    return {"math": "ground_truth", "exact": "ground_truth", "recorded": "reward"}.get(spec)
