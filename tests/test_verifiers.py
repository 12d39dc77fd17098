"""Verifiers on real GSM8K and MATH-500 gold solutions: the gold verifies, a perturbed number does not."""

import json
import re

import pytest

from curate import verifiers
from curate.formats.records import hash_answer
from curate.verifiers import extract_answer, normalize, verify_exact, verify_math


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _perturb_last_number(text: str) -> str | None:
    """The last integer of text plus one (None if it has none)."""
    found = list(re.finditer(r"\d+", text))
    if not found:
        return None
    m = found[-1]
    return text[: m.start()] + str(int(m.group()) + 1) + text[m.end():]


def test_gsm8k_gold_solutions_verify_and_perturbed_ones_do_not(real_data):
    rows = _jsonl(real_data / "gsm8k" / "test.lines1-300.jsonl")
    rows += _jsonl(real_data / "gsm8k" / "train.lines1-2000.jsonl")[:500]
    for r in rows:
        record = {"ground_truth": hash_answer(r["answer"])}
        assert verify_math(record, r["answer"]).correct, r["answer"]
        wrong = _perturb_last_number(r["answer"])
        v = verify_math(record, wrong)
        assert v.parseable and not v.correct, wrong[-40:]


def test_math500_gold_solutions_verify_and_perturbed_ones_do_not(real_data):
    rows = _jsonl(real_data / "math500" / "math500.lines1-250.jsonl")
    perturbed = 0
    for r in rows:
        record = {"ground_truth": r["answer"]}
        assert verify_math(record, r["solution"]).correct, (r["answer"], r["solution"][-80:])
        assert verify_math(record, f"So the answer is $\\boxed{{{r['answer']}}}$.").correct
        wrong_answer = _perturb_last_number(r["answer"])
        if wrong_answer is None:   # e.g. \text{Evelyn}: no number to perturb
            continue
        v = verify_math(record, f"The final answer is \\boxed{{{wrong_answer}}}")
        assert v.parseable and not v.correct, (r["answer"], wrong_answer)
        perturbed += 1
    assert perturbed > 200


@pytest.mark.parametrize("reply, answer", [
    ("so 16 - 3 - 4 = 9 eggs\n#### 18", "18"),
    ("The answer is \\boxed{\\frac{1}{2}} and not \\boxed{3}", "3"),
    ("Total: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("She pays 1,250 dollars, then 30.", "30"),
    ("no number here", None),
    ("#### ", None),
])
def test_extract_answer(reply, answer):
    assert extract_answer(reply) == answer


@pytest.mark.parametrize("a, b", [
    ("70,000", "70000"), ("18.00", "18"), ("$18", "18"), ("18 dollars", "18"), ("\\frac{3}{4}", "0.75"),
    ("3/4", "\\dfrac{3}{4}"), ("\\frac43", "4/3"), ("10,\\!080", "10080"), ("90^\\circ", "90"),
    ("x = 5", "5"), ("-\\frac{35}{9}", "-35/9"), (".5", "1/2"), ("\\text{(C)}", "(C)"), ("3, 5, 7", "3,5,7"),
])
def test_normalize_equivalences(a, b):
    assert normalize(a) == normalize(b)


@pytest.mark.parametrize("a, b", [("18", "19"), ("1/2", "2/1"), ("0.0000672", "672"), ("p - q", "q - p"), ("1,-2", "1,2")])
def test_normalize_distinguishes(a, b):
    assert normalize(a) != normalize(b)


def test_unparseable_and_missing_truth():
    assert verify_math({"ground_truth": "5"}, "I cannot say.") == verifiers.Verdict(False, False)
    assert not verify_math({"ground_truth": None}, "#### 5").correct


def test_exact_recorded_and_user_function():
    assert verify_exact({"ground_truth": "Paris"}, " paris. ").correct
    assert verify_exact({"ground_truth": "Paris"}, "I think \\boxed{Paris}").correct
    assert not verify_exact({"ground_truth": "Paris"}, "Lyon").correct
    recorded = verifiers.get("recorded")
    assert recorded({"reward": 1.0}, "").correct and not recorded({"reward": 0.75}, "").correct
    assert recorded({"reward": 0.75}, "").score == 0.75 and not recorded({"reward": None}, "").parseable
    assert verifiers.get("recorded", success_threshold=0.5)({"reward": 0.75}, "").correct

    user = verifiers.get("tests.test_verifiers:judge")
    assert user({"ground_truth": "ok"}, "ok").correct
    assert not user({"ground_truth": "ok"}, "nope").correct and user({"ground_truth": "ok"}, "nope").parseable
    assert not user({"ground_truth": "ok"}, "").parseable
    assert verifiers.get("tests.test_verifiers:half_credit")({}, "x") == verifiers.Verdict(True, False, "x", 0.5)
    for bad in ("tests.test_verifiers:missing", "no_such_module_xyz:f", "regex"):
        with pytest.raises(ValueError):
            verifiers.get(bad)


def judge(record: dict, reply: str):
    """A user verifier: None when the reply is empty (unparseable), else exact match."""
    return None if not reply else reply == record["ground_truth"]


def half_credit(record: dict, reply: str) -> float:
    return 0.5
