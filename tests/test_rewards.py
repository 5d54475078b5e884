"""Verifiers: answer extraction and equivalence on tricky answers, registry, threads."""

import concurrent.futures

import pytest

from megatron_rift.rewards import (
    Verifier,
    available_verifiers,
    extract_final_answer,
    get_verifier,
    last_boxed_content,
    register_verifier,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\frac{\\sqrt{2}}{\\{a\\}}} end", "\\frac{\\sqrt{2}}{\\{a\\}}"),
        ("first \\boxed{3}, then \\boxed{4}", "4"),  # multiple boxes: the last one
        ("\\boxed {7}", "7"),
        ("\\fbox{8} and \\boxed{9}", "9"),
        ("\\boxed{9} and \\fbox{8}", "8"),
        ("\\boxed{5} and then \\boxed{6", "5"),  # an unclosed (truncated) last box: the earlier one
        ("no box here 12", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("37+48=85. 85-19=66. \\boxed{66}", "66"),
        ("37+48=85. 85-19=66.", "66"),  # missing box: the last number
        ("the total is 1,000 apples", "1,000"),
        ("it drops to -3", "-3"),
        ("about 2.50 dollars", "2.50"),
        ("no answer at all", None),
        ("\\boxed{}", None),  # an empty box is no answer, and the fallback finds no number
        ("\\boxed{ 12 }", "12"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


MATH_CASES = [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("we get 1,000.", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("first \\boxed{3}, then \\boxed{4}", "4", 1.0),
    ("first \\boxed{3}, then \\boxed{4}", "3", 0.0),
    ("\\boxed{66}", "67", 0.0),
    ("I give up", "5", 0.0),  # missing answer is wrong
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{12}", "\\boxed{12}", 1.0),  # a boxed reference is unwrapped
]


@pytest.mark.parametrize("response, reference, reward", MATH_CASES)
def test_math_verifier(response, reference, reward):
    assert get_verifier("math").verify(response, reference) == reward


@pytest.mark.parametrize(
    "response, reference, reward",
    [
        ("\\boxed{Yes}", "yes", 1.0),
        ("\\boxed{ \\text{ north  pole } }", "North Pole", 1.0),
        ("\\boxed{$42$}", "42", 1.0),
        ("\\boxed{42.}", "42", 1.0),
        ("\\boxed{1,000}", "1000", 0.0),  # exact: separators matter
        ("\\boxed{\\frac{1}{2}}", "0.5", 0.0),
        ("nothing", "nothing", 0.0),  # no box and no number: no answer
    ],
)
def test_exact_verifier(response, reference, reward):
    assert get_verifier("exact").verify(response, reference) == reward


@pytest.mark.parametrize(
    "response, reference, reward",
    [
        ("\\boxed{1,000}", "1000", 1.0),
        ("total 1,000", "1000", 1.0),
        ("\\boxed{12.0}", "12", 1.0),
        ("\\boxed{+7}", "7", 1.0),
        ("\\boxed{-7}", "7", 0.0),
        ("\\boxed{12.5}", "12", 0.0),
        ("\\boxed{x}", "12", 0.0),
        ("no number", "12", 0.0),
    ],
)
def test_integer_verifier(response, reference, reward):
    assert get_verifier("integer").verify(response, reference) == reward


def test_integer_verifier_rejects_non_integer_reference():
    with pytest.raises(ValueError, match="not an integer"):
        get_verifier("integer").verify("\\boxed{1}", "0.5")


def test_rewards_are_zero_or_one_on_all_verifiers():
    for name in ("math", "exact", "integer"):
        for response, reference, _ in MATH_CASES:
            if name == "integer" and reference in ("0.5", "\\frac{1}{2}", "\\frac{1}{\\sqrt{2}}"):
                continue
            assert get_verifier(name).verify(response, reference) in (0.0, 1.0)


def test_registry_lookup_and_registration():
    assert {"math", "exact", "integer"} <= set(available_verifiers())
    with pytest.raises(ValueError, match="unknown verifier 'nope'.*exact"):
        get_verifier("nope")

    @register_verifier("test-suffix")
    class SuffixVerifier(Verifier):
        def is_equivalent(self, answer, reference):
            return answer.endswith(reference)

    verifier = get_verifier("test-suffix")
    assert verifier.verify("\\boxed{1234}", "34") == 1.0
    assert verifier.verify("\\boxed{1234}", "12") == 0.0
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("math")(SuffixVerifier)


def test_math_verifier_in_worker_threads():
    # math_verify's signal-based timeouts cannot be armed outside the main thread; ours turns them off.
    verifier = get_verifier("math")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        rewards = list(pool.map(lambda case: verifier.verify(case[0], case[1]), MATH_CASES))
    assert rewards == [reward for _, _, reward in MATH_CASES]


def _verify_in_process(case):
    return get_verifier("math").verify(case[0], case[1])


def test_math_verifier_in_worker_processes():
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        rewards = list(pool.map(_verify_in_process, MATH_CASES[:4]))
    assert rewards == [reward for _, _, reward in MATH_CASES[:4]]
