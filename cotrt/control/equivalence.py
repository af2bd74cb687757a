"""Answer equivalence: ``normalize`` (LaTeX wrappers, units, spacing, thousands separators
dropped) and ``equivalent`` (numerically for numbers and simple LaTeX expressions, by a
small parser of our own, never ``eval``; else by normalized string).

Also the brace matching the extractors of cotrt/control/answers.py share.
"""
from __future__ import annotations

import ast
import math
import operator
import random
import re
from fractions import Fraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _close_brace(text: str, start: int) -> int:
    """Index of the '}' balancing the '{' just before ``start``, or -1. A backslash escapes
    the next character, so ``\\{`` and ``\\}`` are literal braces and ``\\\\}`` closes."""
    depth, i, n = 1, start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


# ---------------------------------------------------------------------------- normalization

_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SPACING = re.compile(r"\\(?:left|right|displaystyle|q?quad)(?![A-Za-z])|\\[!,;:> ]|~")
_TEXT_CMD = re.compile(r"\\(?:text|textrm|textnormal|mbox|mathrm|operatorname)\s*\{")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b")
_ASSIGN = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=(?!=)")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# Words separated by required spaces: "(?:[A-Za-z]{2,}\s*)+" would backtrack exponentially.
_UNIT_WORDS = re.compile(r"^([-+]?[\d.,/]+%?)\s+[A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?)*$")
_UNIT_POWER = re.compile(r"\s*\^\s*(?:\d|\{\s*\d\s*\})")
_MACRO = re.compile(r"\\([A-Za-z]+)")


def _replace_text_groups(s: str) -> str:
    """``\\text{...}``-like groups: dropped when they are units next to something else
    ("5\\text{ cm}" -> "5"), their content kept when they are all there is ("\\text{(A)}")."""
    groups, out, pos = [], [], 0
    for m in _TEXT_CMD.finditer(s):
        if m.start() < pos:  # nested inside a group already taken
            continue
        end = _close_brace(s, m.end())
        if end < 0:
            break
        out.append(s[pos:m.start()])
        groups.append(s[m.end():end])
        pos = end + 1
        unit_power = _UNIT_POWER.match(s, pos)  # cm^2 is a unit, not a square
        if unit_power:
            pos = unit_power.end()
    out.append(s[pos:])
    rest = "".join(out)
    if groups and not rest.strip(" \t^{}()"):
        return " ".join(g.strip() for g in groups)
    return rest


def normalize(ans) -> str | None:
    """A canonical spelling of an answer, for string comparison and for the parser.

    Strips math delimiters (``$``, ``\\(``, ``\\[``), a whole-string ``\\boxed{}``, ``\\left``/
    ``\\right`` and LaTeX spacing, ``\\text{}`` units (see ``_replace_text_groups``), degree
    signs, a leading "x =" on a single-variable assignment, thousands separators, trailing
    unit words after a number ("18 dollars" -> "18"), trailing periods, and whitespace next
    to symbols. ``\\dfrac``/``\\tfrac`` become ``\\frac``; ``\\%`` becomes ``%`` (kept: see
    ``equivalent``). Case is kept. None or an empty result -> None.
    """
    if ans is None:
        return None
    s = str(ans).strip()
    for _ in range(4):  # peel nested wrappers: "$\boxed{5}$", "\boxed{$5$}"
        before = s
        for lo, hi in _DELIMS:
            if len(s) >= len(lo) + len(hi) and s.startswith(lo) and s.endswith(hi):
                s = s[len(lo):len(s) - len(hi)].strip()
        m = _BOX_RE.match(s)
        if m and _close_brace(s, m.end()) == len(s) - 1:
            s = s[m.end():-1].strip()
        if s == before:
            break
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = s.replace("\\%", "%").replace("\\$", "").replace("{,}", ",")
    s = _DEGREES.sub("", s)
    s = _replace_text_groups(s)
    s = s.replace("$", "")
    s = _ASSIGN.sub("", s, count=1) if s.count("=") == 1 else s
    s = re.sub(r"\s+", " ", s).strip().rstrip(" .")
    m = _UNIT_WORDS.match(s)
    if m:
        s = m.group(1)
    s = re.sub(r"\s*([^\w\s\\])\s*", r"\1", s)  # "1, 2" -> "1,2"; "x + 1" -> "x+1"
    if _THOUSANDS.match(s.rstrip("%")):
        s = s.replace(",", "")
    return s or None


# ---------------------------------------------------------------------------- evaluation

class _NotMath(Exception):
    """The string is not an expression the evaluator reads."""


def _take_arg(s: str, i: int) -> tuple[str, int]:
    """One macro argument at s[i:]: a {group}, a \\command, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise _NotMath("missing argument")
    if s[i] == "{":
        end = _close_brace(s, i + 1)
        if end < 0:
            raise _NotMath("unbalanced braces")
        return s[i + 1:end], end + 1
    if s[i] == "\\":
        m = _MACRO.match(s, i)
        if m:
            return m.group(0), m.end()
    return s[i], i + 1


def _latex_to_expr(s: str) -> str:
    """LaTeX math -> the parser's syntax: \\frac{a}{b} -> ((a)/(b)), \\sqrt[n]{x} ->
    root((x),(n)), \\pi -> pi, \\cdot/\\times -> *, braces -> parentheses."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = _MACRO.match(s, i)
            if not m:
                raise _NotMath("stray backslash")
            name, i = m.group(1), m.end()
            if name == "frac":
                a, i = _take_arg(s, i)
                b, i = _take_arg(s, i)
                out.append(f"(({_latex_to_expr(a)})/({_latex_to_expr(b)}))")
            elif name == "sqrt":
                n = None
                if i < len(s) and s[i] == "[":
                    j = s.find("]", i)
                    if j < 0:
                        raise _NotMath("unclosed [")
                    n, i = s[i + 1:j], j + 1
                a, i = _take_arg(s, i)
                x = _latex_to_expr(a)
                out.append(f"root(({x}),({_latex_to_expr(n)}))" if n else f"sqrt({x})")
            elif name == "pi":
                out.append(" pi ")
            elif name in ("cdot", "times", "ast"):
                out.append("*")
            elif name == "div":
                out.append("/")
            else:
                raise _NotMath(f"unsupported macro \\{name}")
        else:
            out.append("(" if c == "{" else ")" if c == "}" else c)
            i += 1
    return "".join(out)


_TOKEN_RE = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d+))?|([A-Za-z]+)|(\*\*|[-+*/^(),]))")
_FUNCS = {"sqrt", "root"}
_MAX_EXP10 = 4000  # 10**4000 is a 13k-bit integer: exact and cheap; beyond, refuse


def _to_python(expr: str) -> tuple[str, dict, set]:
    """Tokenize, then spell the expression in Python syntax for ``ast.parse``: numbers
    become names bound to exact Fractions (so "1e400" stays exact instead of a float
    inf), "^" becomes "**", and juxtaposition gets an explicit "*" ("2pi", "2(3)", "xy").
    Returns (source, number bindings, variable names)."""
    out, nums, names, pos, prev = [], {}, set(), 0, None
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None or m.end() == pos:
            raise _NotMath(f"unexpected character at {expr[pos:pos + 10]!r}")
        pos = m.end()
        num, exp, name, op = m.groups()
        if num is not None:
            if exp is not None and abs(int(exp)) > _MAX_EXP10:
                raise _NotMath("exponent too large")
            key = f"_n{len(nums)}"
            nums[key] = Fraction(num) * Fraction(10) ** int(exp or 0)  # ValueError past 4300 digits
            toks = [("num", key)]
        elif name is not None:
            if name in _FUNCS or name == "pi":
                toks = [("fn" if name in _FUNCS else "name", name)]
            elif len(name) <= 3:  # "xy" is x*y; a longer word is prose, not math
                toks = [("name", ch) for ch in name]
                names.update(name)
            else:
                raise _NotMath(f"word {name!r}")
        else:
            toks = [("op", "**" if op == "^" else op)]
        for kind, text in toks:
            if prev in ("num", "name", ")") and (kind in ("num", "name", "fn") or text == "("):
                if prev == kind == "num":  # "1 000", "2 3": ambiguous
                    raise _NotMath("two numbers side by side")
                out.append("*")
            out.append(text)
            prev = ")" if text == ")" else kind if kind != "op" else None
    return " ".join(out), nums, names


def _to_float(v) -> float:
    f = float(v)  # OverflowError for a Fraction past 1.8e308
    if not math.isfinite(f):
        raise OverflowError
    return f


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}  # truediv: ZeroDivisionError refuses the answer


def _arith(op, a, b):
    exact = isinstance(a, Fraction) and isinstance(b, Fraction)
    if isinstance(op, ast.Pow):
        if exact and b.denominator == 1 and abs(b) <= 1024 and \
                max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(b) <= 65536:
            return a ** int(b)  # exact up to ~64k bits; 9^(9^9) goes to floats and overflows
        return math.pow(_to_float(a), _to_float(b))  # ValueError for (-8)^(1/3): refused
    if type(op) not in _OPS:
        raise _NotMath(type(op).__name__)
    return _OPS[type(op)](a, b) if exact else _OPS[type(op)](_to_float(a), _to_float(b))


def _walk(node, env):
    """Evaluate a parsed expression: + - * / ** unary ±, names from ``env``, sqrt and root.
    Anything else (attributes, subscripts, other calls, constants) is refused."""
    if isinstance(node, ast.BinOp):
        return _arith(node.op, _walk(node.left, env), _walk(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _walk(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and not node.keywords and len(node.args) == (2 if node.func.id == "root" else 1):
        return _root(*(_walk(a, env) for a in node.args))
    raise _NotMath(type(node).__name__)


def _root(x, n=None):
    n = Fraction(2) if n is None else n
    if isinstance(x, Fraction) and isinstance(n, Fraction) and n.denominator == 1 and 0 < n <= 64 \
            and x >= 0:
        k = int(n)
        p, q = round(x.numerator ** (1 / k)), round(x.denominator ** (1 / k))
        if p ** k == x.numerator and q ** k == x.denominator:  # a perfect power: stay exact
            return Fraction(p, q)
    return math.pow(_to_float(x), 1 / _to_float(n))  # ValueError for a negative x


_MIXED = re.compile(r"^([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")


def _parse(s: str):
    """Normalized answer -> (ast, number bindings, variable names), or None when it is not
    math we read."""
    m = _MIXED.match(s)  # "2\frac{1}{2}" is a mixed number (2.5), not 2 * 1/2
    if m:
        s = f"{m.group(1)}({m.group(2)}+{m.group(3)}/{m.group(4)})"
    try:
        src, nums, names = _to_python(_latex_to_expr(s))
        return ast.parse(src, mode="eval").body, nums, names
    except (_NotMath, ValueError, SyntaxError, RecursionError, MemoryError):
        return None


def _values(tree, nums, envs) -> list | None:
    try:
        return [_walk(tree, {"pi": math.pi, **nums, **env}) for env in envs]
    except (_NotMath, ValueError, ZeroDivisionError, OverflowError, KeyError, RecursionError):
        return None


def _close(a, b, rel_tol: float) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):  # exact, any magnitude
        return a == b or abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))
    try:
        return math.isclose(_to_float(a), _to_float(b), rel_tol=rel_tol, abs_tol=1e-12)
    except OverflowError:
        return False


# Points where expressions with variables are compared (a polynomial identity test):
# fixed, so results are reproducible; irrational-looking so coincidences are unlikely.
_RNG = random.Random(20250601)
_POINTS = [[_RNG.uniform(0.5, 2.5) for _ in range(52)] for _ in range(3)]


def _scalar_equiv(x: str, y: str, rel_tol: float) -> bool:
    px, py = x.endswith("%"), y.endswith("%")
    tx, ty = _parse(x.rstrip("%")), _parse(y.rstrip("%"))
    if tx is None or ty is None or tx[2] != ty[2]:
        return False
    order = sorted(tx[2])
    envs = [dict(zip(order, pt)) for pt in _POINTS] if order else [{}]
    vx, vy = _values(tx[0], tx[1], envs), _values(ty[0], ty[1], envs)
    if vx is None or vy is None:
        return False
    if all(_close(a, b, rel_tol) for a, b in zip(vx, vy)):
        return True
    if px != py and not order:  # "50%" vs "0.5": also accept the fraction reading
        pct, plain = (vx[0], vy[0]) if px else (vy[0], vx[0])
        return _close(pct / 100, plain, rel_tol)
    return False


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _as_items(s: str) -> tuple[str, list[str]]:
    """("", [s]) for a scalar; ("()", items) / ("[)", items) ... for a bracketed tuple or
    interval; ("{}", items) for a set; ("", items) for a bare list."""
    s = s.replace("\\{", "{").replace("\\}", "}")
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        inner = _split_top(s[1:-1])
        if len(inner) > 1 and _close_brace(s.replace("(", "{").replace("[", "{")
                                           .replace(")", "}").replace("]", "}"), 1) == len(s) - 1:
            return s[0] + s[-1], inner
    return "", _split_top(s)


def equivalent(a, b, rel_tol: float = 1e-6) -> bool:
    """Whether two answers agree.

    Numbers compare by value, exactly where both are rational ("1,000" == "1000.0",
    "1/2" == "0.5" == "\\frac{1}{2}", "1e400" == "10^{400}"), within ``rel_tol`` otherwise
    ("\\sqrt{2}", "2\\pi"); expressions with variables are compared at three fixed points.
    Percent: "50%" equals both "50" and "0.5" (graders differ on whether a gold "0.5"
    wants the percent stripped or divided; both readings are accepted, as Qwen2.5-Math's
    evaluator does). Tuples and intervals compare in order with their brackets, sets
    and bare lists ("2, 3" vs "3, 2": roots of an equation) as multisets. Otherwise,
    normalized strings compare case-insensitively. A missing or empty answer is never
    equivalent to anything.
    """
    if not (isinstance(rel_tol, (int, float)) and 0 <= rel_tol < 1):
        raise ValueError(f"rel_tol must be a number in [0, 1), got {rel_tol!r}")
    x, y = normalize(a), normalize(b)
    if x is None or y is None:
        return False
    if x.casefold() == y.casefold():
        return True
    (kx, ix), (ky, iy) = _as_items(x), _as_items(y)
    if len(ix) != len(iy):
        return False
    if len(ix) == 1:
        return _scalar_equiv(x, y, rel_tol)
    same = lambda p, q: p.casefold() == q.casefold() or _scalar_equiv(p, q, rel_tol)
    if kx in ("", "{}") and ky in ("", "{}"):  # multisets: greedy matching is enough for
        left = list(iy)                         # an equivalence relation
        for p in ix:
            hit = next((j for j, q in enumerate(left) if same(p, q)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    if kx != ky and kx and ky:
        return False
    return all(same(p, q) for p, q in zip(ix, iy))
