"""Answer extractors and answer equivalence (cotrt/control/answers.py)."""
from __future__ import annotations

import time

import pytest

from cotrt.control.answers import (equivalent, extract, extract_answer_is, extract_boxed,
                                   extract_hash, extract_last_number, normalize)


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1}, then \boxed{2}", "2"),                     # the last box
    (r"\fbox{7}", "7"),
    (r"\boxed {x+1}", "x+1"),                                      # space before the brace
    (r"\boxed{\boxed{3}}", "3"),                                   # a box wrapping a box
    (r"\boxed{2 + \boxed{3}}", r"2 + \boxed{3}"),                  # inner box is content
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                              # escaped braces
    (r"\boxed{a \\} b", r"a \\"),                                   # "\\" is a line break: } closes
    (r"\boxed{\left(1, \frac{2}{3}\right)}", r"\left(1, \frac{2}{3}\right)"),
    (r"\boxed{}", None),                                           # empty: no answer
    (r"\boxed{   }", None),
    (r"\boxed{5", None),                                           # unterminated
    (r"\boxed{3} and later \boxed{4", None),                       # the last box decides
    (r"The \boxed command {wraps} answers", None),                 # prose, not a box
    (r"\boxedx{3}", None),
    ("no box here", None),
    ("", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_extract_boxed_partial():
    assert extract_boxed(r"\boxed{3} and \boxed{\frac{1}{2", partial=True) == r"\frac{1}{2"
    assert extract_boxed(r"\boxed{12", partial=True) == "12"
    assert extract_boxed(r"\boxed{", partial=True) is None
    assert extract_boxed(r"\boxed{7}", partial=True) == "7"   # closed boxes are unaffected
    assert extract_boxed(None) is None


def test_extract_boxed_is_linear_on_long_text():
    text = r"\boxed{1} " * 20000 + r"\boxed{\frac{" + "{" * 1000 + "}" * 1000 + "}{2}}"
    t0 = time.perf_counter()
    assert extract_boxed(text).startswith(r"\frac{")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234", "1,234"),
    ("#### -5.", "-5"),
    ("#### 3\n#### 4\n", "4"),
    ("no marker", None),
    ("####   \n", None),
])
def test_extract_hash(text, want):
    assert extract_hash(text) == want


@pytest.mark.parametrize("text, want", [
    ("So the answer is 42.", "42"),
    ("The answer is 3.5.", "3.5"),
    ("THE ANSWER IS: 7", "7"),
    ("Final answer: 12", "12"),
    ("final answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("**Answer:** $42$", "42"),
    ("**Answer**: 17!", "17"),
    ("Final answer: **x = 3**", "x = 3"),
    ("The answer is 5. Then I checked again.", "5"),
    ("The answer is 5.\nActually the answer is 6.", "6"),       # the last one
    ("the answer is \\boxed{9}, done", "9"),
    ("Let me answer this question: no.", None),                  # no "is"/":" right after
    ("answers: 5", None),
    ("nothing", None),
])
def test_extract_answer_is(text, want):
    assert extract_answer_is(text) == want


@pytest.mark.parametrize("text, want", [
    ("It costs $1,234 in total", "1234"),
    ("1,234,567 people", "1234567"),
    ("from 3 to -5", "-5"),
    ("3-5", "5"),                     # a binary minus is not a sign
    ("pi is about 3.14159.", "3.14159"),
    ("about 1.5e10 stars", "1.5e10"),
    ("6.02E-23", "6.02E-23"),
    ("ratio 3/4.", "3/4"),
    ("half is .5", ".5"),
    ("x2 and H2O", None),             # digits glued to letters are not numbers
    ("12,34", "34"),                  # not a thousands grouping
    ("no numbers", None),
])
def test_extract_last_number(text, want):
    assert extract_last_number(text) == want


def test_extract_order_and_errors():
    text = "The answer is 5.\n#### 6\n\\boxed{7} and 8"
    assert extract(text) == "7"
    assert extract(text, ("hash", "boxed")) == "6"
    assert extract(text, ("answer_is",)) == "5"
    assert extract(text, "last_number") == "8"
    assert extract("nothing here") is None
    with pytest.raises(ValueError, match="unknown extractor 'regex'"):
        extract(text, ("regex",))


@pytest.mark.parametrize("raw, want", [
    (r"$\boxed{5}$", "5"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    ("x = 3", "3"),
    ("18 dollars", "18"),
    ("1,000", "1000"),
    (r"1{,}000", "1000"),
    (r"\text{(A)}", "(A)"),
    (r"5\text{ cm}^2", "5"),
    (r"30^\circ", "30"),
    (r"50\%", "50%"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    ("42.", "42"),
    (None, None),
    ("  ", None),
])
def test_normalize(raw, want):
    assert normalize(raw) == want


EQUIVALENT = [
    ("1,000", "1000.0"), ("1/2", "0.5"), (r"\frac{1}{2}", "0.5"), (r"\dfrac12", "1/2"),
    (r"\tfrac{3}{4}", ".75"), ("-0.5", r"-\frac{1}{2}"), ("+5", "5"), ("5.000", "5"),
    (r"\sqrt{2}", "1.41421356"), (r"\frac{\sqrt{3}}{2}", "0.8660254"), (r"\sqrt[3]{8}", "2"),
    (r"2\pi", "6.283185307"), (r"\pi r^2", r"r^2\pi"), ("x=3", "3"), (r"$x = \frac{1}{2}$", "0.5"),
    (r"5\text{ cm}", "5"), (r"5\mbox{ meters}", "5"), (r"\left(3\right)", "3"),
    ("1e400", "10^{400}"), ("1e400", "1E400"), ("2^{10}", "1024"), ("-2^2", "-4"), ("2^-1", "0.5"),
    ("2x+1", "1+2x"), ("x^2-1", "(x-1)(x+1)"), (r"2\frac{1}{2}", "2.5"), (r"-2\frac{1}{2}", "-2.5"),
    ("0.1+0.2", "0.3"), ("0.3333333", "1/3"), ("50%", "50"), ("50%", "0.5"), (r"50\%", "50 %"),
    ("(1, 2)", "(1,2)"), (r"\{1, 2\}", r"\{2, 1\}"), ("2, 3", "3, 2"), ("[0, 1)", r"\left[0,1\right)"),
    ("New York", "new york"), (r"\text{(B)}", "(B)"), ("18 apples", "18"), (r"\boxed{7}", "7"),
    (r"10^\circ", "10"), ("1e5000", "1E5000"),
]
NOT_EQUIVALENT = [
    ("1", "2"), ("x", "y"), ("(1,2)", "(2,1)"), ("[1,2)", "(1,2)"), ("3.14", r"\pi"),
    ("1/3", "0.333"), ("2, 3", "2, 3, 4"), ("50%", "5"), ("1e400", "1e401"),
    ("10^{100000}", "1"), (r"9^{9^{9}}", "1"), ("1/0", "1"), (r"\sqrt{-1}", "1"),
    ("2 3", "6"), ("", ""), (None, "1"), ("1", None), (r"\boxed{}", r"\boxed{}"),
    ("__import__('os')", "1"), ("().__class__", "1"), ("1e-13", "0"),
    ("(" * 3000 + "1" + ")" * 3000, "2"), (r"\frac{" * 400 + "1" + "}{2}" * 400, "0"),
    (r"\infty", "1"), ("Paris", "London"),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(a, b):
    assert equivalent(a, b), (a, b, normalize(a), normalize(b))
    assert equivalent(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_not_equivalent(a, b):
    assert not equivalent(a, b), (a, b, normalize(a), normalize(b))
    assert not equivalent(b, a)


def test_equivalent_rel_tol():
    assert equivalent("1.0000001", "1")                       # within the default 1e-6
    assert not equivalent("1.0001", "1")
    assert equivalent("1.0001", "1", rel_tol=1e-3)
    assert not equivalent("1.0000001", "1", rel_tol=0)
    assert equivalent("1e400", "1.0000000001e400")            # relative, exact past floats
    for bad in (-1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="rel_tol"):
            equivalent("1", "1", rel_tol=bad)


def test_equivalent_adversarial_inputs_are_fast():
    t0 = time.perf_counter()
    assert not equivalent("9" * 5000, "1")                    # past int-from-str's digit limit
    assert equivalent("9" * 5000, "9" * 5000)                 # equal strings still compare
    assert not equivalent("2^{2^{2^{2^{2^{2}}}}}", "1")
    assert not equivalent("1e99999999", "1")
    assert not equivalent("x" * 10000, "1")
    assert time.perf_counter() - t0 < 2.0


def test_extract_then_equivalent_round_trip():
    gold = "#### 1,250"
    pred = r"... so she earns $\boxed{1250.00}$ dollars."
    assert equivalent(extract(pred), extract(gold))
