"""
MATH answer checker: the reward for GRPO on MATH, safe on text written by a model.

    math_reward(completion, gold) -> 1.0 if the completion's last \\boxed{} answer
    is equivalent to the gold answer, else 0.0. It never raises.

Pipeline, one function per stage, read top to bottom:

1. `extract_boxed`: the content of the last `\\boxed{...}` / `\\fbox{...}` (or
   `\\boxed x`) by a linear brace scan (no regex, so no backtracking on an
   unclosed `\\boxed{`). None when there is none or it never closes.
2. `normalize_answer`: the Hendrycks `strip_string` family and its descendants
   (Minerva, PRM800K): `\\text{}` units dropped (or unwrapped when the text is the
   answer), plain trailing unit words, degrees, percent, dollars, spacing
   commands (`\\! \\, \\; \\quad ~`), `\\left`/`\\right`, `\\dfrac`/`\\tfrac`/`\\cfrac`,
   `\\frac12` and `\\sqrt3` shorthand, thousands separators (`12,\\!441`, `23{,}000`,
   `1,000`), a trailing period, a leading `x =` or `x \\in`, `.5` -> `0.5`,
   `0.\\overline{3}` -> `\\frac{3}{9}`, `(E)` -> `E`, `1011_2` -> `1011_{2}`, all
   whitespace. Units are dropped, not converted: the question fixes the unit.
3. `is_equiv`: equal strings after normalisation (also when one side leaves
   out the base: `141` vs `141_{13}`); else both sides are parsed into a
   structure and compared:
       set      `\\{a, b\\}`, a bare list `a, b`, `a \\pm b`, a union `I \\cup J`:
                order-free, with multiplicity
       seq      `(a, b)`, `[a, b)`, ...: the brackets must match (open and closed
                ends matter), then element by element
       matrix   `\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}`: element by element
       equation `l = r`: l - r equal to l' - r' up to sign; when l is a
                variable (x, a_1, f(x)), r alone also counts, so `x = 2, x = 3`
                matches `2, 3`; `y = 3x - 2` normalises to `3x - 2`, and is also
                compared as written, so it matches `3x - y = 2`
       expr     through the parser below
   Two expressions are equal when they are the same sympy object; else, if both
   are rational numbers, never (exact: 1/3 != 0.3333); else when their values
   agree to a relative 1e-9 at 30 digits, at three fixed positive sample points
   for their variables (identity testing by evaluation: no `simplify`, which can
   take unbounded time).
4. `strict_match`: the paper's reference-code reward, for comparing with the paper:
   the last `\\boxed{}`'s content equal to the gold as a string after a light
   normalisation (it rejects `0.5` for `\\frac{1}{2}`, `x = 5` for `5`).
   `gsm8k_strict_match` / `gsm8k_reward`: GSM8K's answer by the reference code's
   rule (the last `\\boxed{}`, else "Final answer: N", else the last number),
   compared as the reference does, or through `is_equiv`.
5. `score_batch`: the training loop's entry. A persistent pool of spawned worker
   processes that ignore Ctrl-C, one pipe each; an item that runs past the
   timeout scores 0 and its worker is killed and replaced.

The parser is a recursive descent over a tokenised string that builds sympy
objects directly (no eval, exec, sympify, parse_expr or latex2sympy on model text):

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/' | '\\cdot' | '\\times' | '\\div') unary | power)*
               # a bare `power` is implicit multiplication: 2x, 3\\sqrt{2}, 8\\frac47 (mixed number)
    unary   := ('-' | '+')* power
    power   := postfix (('^' | '**') unary)?                        # right-assoc
    postfix := atom ('!' | '^\\circ')*                              # degrees only inside trig
    atom    := number | letter ('_' subscript)? | \\pi | \\infty | \\alpha...
             | '(' expr ')' | '{' expr '}' | '|' expr '|'
             | \\frac arg arg | \\sqrt ('[' expr ']')? arg | \\binom arg arg
             | function ('^' unary)? ('_' arg)? power                 # \\sin^2 x, \\log_2 8
    arg     := postfix, or one digit of a number                    # {group} or one token

Letters are variables except `i` (imaginary unit) and `e` (Euler's number);
runs of three or more letters must be a known name (sin, sqrt, pi, ...), so a
word answer like `odd` never parses as the product o*d*d. Only numbers are
simplified as the tree is built (exactly: 2^{10} is 1024, 1/2 + 1/3 is 5/6);
everything else is kept as written and compared by value, because sympy's
automatic simplification of expressions can itself take unbounded time.

Safety guards (model text is untrusted; each guard rejects, it never truncates):
- answers over MAX_ANSWER_CHARS are never equal (bounds every later stage);
- nesting over MAX_NESTING (brackets, `\\frac\\sqrt...`, nested tuples) is
  rejected before it reaches Python's recursion limit;
- number literals have at most MAX_DIGITS digits;
- powers: `a^b` (and exp, sinh, cosh of b) is built only if |b| <= MAX_EXPONENT,
  judged at the sample points when b has variables, and, for a number b, only
  if the result has at most MAX_RESULT_BITS bits. Checked from the inside out,
  before sympy evaluates anything: 9^{9^{9^9}} stops at 9^{387420489}, and
  e^{e^{e^{100}}} at its second e;
- roots: the index (a rational b's denominator) is at most MAX_ROOT_INDEX and
  the numbers under a root have at most MAX_ROOT_BITS bits (sympy factors
  radicands, and for a 999th root computes 998th powers);
- `n!` and `\\binom{n}{k}` only for integers n, k <= MAX_FACTORIAL, or symbols;
- a function's argument (sin, cos, log, ...) has at most MAX_ARGUMENT_BITS bits
  of magnitude: `\\cos(5000! \\cdot 60)` is refused, not evaluated;
- a set holds at most MAX_ELEMENTS elements (the matching is quadratic).
Parsed expressions are never formatted into strings (printing some sympy
objects can itself take unbounded time). What slips past these is bounded by
`score_batch`'s per-item timeout, and each worker's address space by
WORKER_MEMORY_BYTES (RLIMIT_AS), so a huge number raises MemoryError (scored 0)
instead of waking the kernel's OOM killer.
"""

import multiprocessing
import os
import re
import signal
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from multiprocessing.connection import Connection, wait

import sympy

MAX_ANSWER_CHARS = 400  # the longest MATH answer is 159 characters
MAX_NESTING = 32  # brackets / commands inside one another
MAX_DIGITS = 100  # digits in one number literal
MAX_EXPONENT = 10_000  # |b| in a^b
MAX_RESULT_BITS = 100_000  # bits of a number built by a^b
MAX_ROOT_BITS = 64  # bits of the numbers under a root
MAX_ROOT_INDEX = 100  # n in the n-th root, or in a^{m/n}
MAX_FACTORIAL = 5000  # n in n! and \binom{n}{k}
MAX_ARGUMENT_BITS = 1024  # magnitude of a function's argument: sin, cos, log, ...
WORKER_MEMORY_BYTES = 2 * 2**30  # address space a scoring worker may add to what it holds at start
MAX_ELEMENTS = 32  # elements of one tuple, set or matrix
REL_TOL = 1e-9  # numeric equality: |a - b| <= REL_TOL * max(|a|, |b|)
ABS_TOL = 1e-20  # ... or below this (values that are zero up to rounding)
EVAL_DIGITS = 30  # precision of the numeric comparison
N_SAMPLE_POINTS = 3  # points at which expressions with variables are compared


# ----------------------------------------------------------------------------
# 1. Extraction


def _match_brace(text, start):
    """Index of the `}` closing the `{` at text[start], or -1. One linear scan;
    escaped characters (`\\{`, `\\}`, `\\\\`) are skipped, as TeX does.
        _match_brace("a{b{c}d}e", 1) -> 7      _match_brace("{\\}}", 0) -> 3
    """
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def extract_boxed(text):
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in text, or None.
        "so $\\boxed{\\frac{1}{2}}$."  -> "\\frac{1}{2}"
        "answer: $\\boxed 9$."          -> "9"       (no braces: up to `$` or end of line)
        "\\boxed{1} then \\boxed{2"      -> None      (the last one never closes)
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    j = i
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        end = _match_brace(text, j)
        return None if end < 0 else text[j + 1 : end]
    if j == i:  # `\boxedx` is some other command, not a boxed answer
        return None
    stops = [k for k in (text.find("$", j), text.find("\n", j)) if k >= 0]
    content = text[j : min(stops, default=len(text))].strip()
    return content or None


# ----------------------------------------------------------------------------
# 2. Normalisation

_UNICODE = {"π": "\\pi", "√": "\\sqrt", "−": "-", "×": "\\times", "·": "\\cdot",
            "∞": "\\infty", "±": "\\pm", "÷": "\\div", "\n": " ", "\t": " "}
_DEGREE_MARKS = ["^{\\circ}", "^\\circ", "\\circ", "^\\degree", "\\degree"]  # longest first
_TRIG = ("sin", "cos", "tan", "sec", "csc", "cot")
_TEXT_COMMANDS = {"text", "textbf", "textit", "textrm", "textnormal", "textup",
                  "mbox", "mathrm", "mathbf", "mathit", "operatorname"}
_DROPPED_COMMANDS = {"left", "right", "big", "Big", "bigl", "bigr", "Bigl", "Bigr",
                     "displaystyle", "textstyle", "quad", "qquad"}
_COMMAND_ALIASES = {"dfrac": "frac", "tfrac": "frac", "cfrac": "frac",
                    "dbinom": "binom", "tbinom": "binom",
                    "varnothing": "emptyset"}
_SPACING_ESCAPES = {"!", ",", ";", ":", " "}
_UNIT_POWERS = {"", "^2", "^{2}", "^3", "^{3}"}
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")  # anchored by fullmatch, no nested quantifier
_VARIABLE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?(?:\^\{-1\})?(?:\([A-Za-z]\))?")  # x, a_1, f(x), f^{-1}(x)
_VARIABLE_PREFIX = re.compile(_VARIABLE.pattern + r"(=|\\in(?![A-Za-z]))(.*)")
_BASE_SUBSCRIPT = re.compile(r"(-?[0-9A-Z.]+)_\{?(\d+)\}?")
_REPEATING_DECIMAL = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")
_AND_OR = re.compile(r",?\s+(?:and|or)\s+")
_NAMES = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan",
          "sinh", "cosh", "tanh", "ln", "log", "exp", "sqrt", "pi"}  # words the parser knows


def _is_ascii_letter(char):
    return len(char) == 1 and (("a" <= char <= "z") or ("A" <= char <= "Z"))


def _is_digit(char):
    return len(char) == 1 and "0" <= char <= "9"


def _read_command(text, i):
    """End of the command name starting after the backslash at text[i]."""
    j = i + 1
    while j < len(text) and _is_ascii_letter(text[j]):
        j += 1
    return j


def _drop_text_commands(s):
    """`\\text{...}` after the answer is a unit and is dropped with what follows
    (`^2`, a period); any other `\\text{...}` is unwrapped.
        "441\\text{ pounds}"  -> "441"         "45 \\text{ units}^2" -> "45 "
        "\\text{(E)}"         -> "(E)"          "\\mbox{four}"         -> "four"
    """
    out = []
    i = 0
    while True:
        j = s.find("\\", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        end = _read_command(s, j)
        brace = end
        while brace < len(s) and s[brace] == " ":
            brace += 1
        close = _match_brace(s,
                             brace) if s[j + 1 : end] in _TEXT_COMMANDS and s.startswith("{", brace) else -1
        if close < 0:  # not a text command, or an unclosed one: keep as is
            out.append(s[i : max(end, j + 2)])
            i = max(end, j + 2)
            continue
        out.append(s[i:j])
        tail = s[close + 1 :].strip().rstrip(".").strip()
        if "".join(out).strip() and tail in _UNIT_POWERS:
            return "".join(out)
        out.append(s[brace + 1 : close])
        i = close + 1


def _drop_unit_words(s):
    """Plain words after a number (or a `}`) are units: "5 inches" -> "5",
    "3\\sqrt{2} sq ft" -> "3\\sqrt{2}"; "two lines" is kept."""
    words = s.split()
    while len(words) > 1 and words[-1].isascii() and words[-1].isalpha() and len(words[-1]) > 1 \
            and words[-1].lower() not in _NAMES and (_is_digit(words[-2][-1]) or words[-2][-1] == "}"):
        words.pop()
    return " ".join(words)


def _rewrite_commands(s):
    """Command-aware pass: drop `\\left`/`\\right`/sizing and spacing commands,
    apply aliases (`\\dfrac` -> `\\frac`), delete whitespace. A space is kept only
    where it separates a command from a letter (`\\pi r`). Reading whole command
    names keeps `\\leq` and `\\rightarrow` intact.
        "\\left( \\dfrac{1}{2}, 3 \\right)" -> "(\\frac{1}{2},3)"
    """
    out = []
    i = 0
    while i < len(s):
        char = s[i]
        if char == "\\" and i + 1 < len(s) and _is_ascii_letter(s[i + 1]):
            end = _read_command(s, i)
            name = s[i + 1 : end]
            if name in _DROPPED_COMMANDS:
                if name in ("left", "right") and s.startswith(".", end):
                    end += 1  # `\left.` is an invisible delimiter
            else:
                out.append("\\" + _COMMAND_ALIASES.get(name, name))
                following = s[end:].lstrip(" ")
                if following and _is_ascii_letter(following[0]):
                    out.append(" ")
            i = end
        elif char == "\\":
            escaped = s[i + 1 : i + 2]
            if escaped and escaped not in _SPACING_ESCAPES:
                out.append(char + escaped)  # `\{`, `\}`, `\\`
            i += 2
        else:
            if not (char.isspace() or char == "~"):
                out.append(char)
            i += 1
    return "".join(out)


def _brace_short_arguments(s):
    """LaTeX takes one character as an argument when there are no braces.
        "\\frac12" -> "\\frac{1}{2}"    "\\frac1{72}" -> "\\frac{1}{72}"    "\\sqrt3" -> "\\sqrt{3}"
    """
    inserts = {}  # position -> text inserted before it
    for command, n_arguments in (("\\frac", 2), ("\\binom", 2), ("\\sqrt", 1)):
        start = s.find(command)
        while start >= 0:
            i = start + len(command)
            if command == "\\sqrt" and s.startswith("[", i):
                i = s.find("]", i) + 1 or len(s)
            for _ in range(n_arguments):
                if s.startswith(" ", i):
                    i += 1
                if i >= len(s) or s[i] in "}^_":
                    break
                if s[i] == "{":
                    close = _match_brace(s, i)
                    if close < 0:
                        break
                    i = close + 1
                    continue
                end = i + 1
                if s[i] == "\\":
                    end = _read_command(s, i) if _is_ascii_letter(s[i + 1 : i + 2]) else i + 2
                inserts[i] = inserts.get(i, "") + "{"
                inserts[end] = "}" + inserts.get(end, "")
                i = end
            start = s.find(command, start + 1)
    if not inserts:
        return s
    pieces, last = [], 0
    for position in sorted(inserts):
        pieces += [s[last:position], inserts[position]]
        last = position
    return "".join(pieces) + s[last:]


def _add_leading_zeros(s):
    """".5" -> "0.5", "-.5" -> "-0.5"."""
    out = []
    for i, char in enumerate(s):
        if char == "." and i + 1 < len(s) and _is_digit(s[i + 1]) and (i == 0 or not _is_digit(s[i - 1])):
            out.append("0")
        out.append(char)
    return "".join(out)


def _repeating_decimal(match):
    """0.1\\overline{6} -> \\frac{15}{90}: (digits through one period - digits before it)
    / (10^k (10^r - 1))."""
    sign, whole, fixed, period = match.groups()
    numerator = int(whole + fixed + period) - int(whole + fixed or "0")
    denominator = 10 ** len(fixed) * (10 ** len(period) - 1)
    return f"{sign}\\frac{{{numerator}}}{{{denominator}}}"


def _normalize_latex(s):
    """Every normalisation of normalize_answer up to, not including, dropping a
    leading `x =` (is_equiv also compares equations as written)."""
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    s = s.replace("{,}", "").replace(",\\!", "")  # thousands: 23{,}000, 12,\!441
    s = s.replace("{bmatrix}", "{pmatrix}")
    degree = "^\\circ" if any(name in s for name in _TRIG) else ""
    for mark in _DEGREE_MARKS:
        s = s.replace(mark, "°")
    s = s.replace("°", degree)
    for sign in ("\\%", "%", "\\$", "$"):
        s = s.replace(sign, "")
    s = _drop_text_commands(s)
    s = _AND_OR.sub(",", s)  # lists: "6, 8, and 10" -> "6, 8,10", "x = 2 or x = 3" -> "x = 2,x = 3"
    s = _drop_unit_words(s.strip())
    s = _rewrite_commands(s)
    s = _brace_short_arguments(s)
    s = s.rstrip(".")
    s = _add_leading_zeros(s)
    exact, approx, approximation = s.partition("\\approx")
    if approx:
        s = exact or approximation  # "\\sqrt{2}\\approx1.414" -> "\\sqrt{2}"
    return _REPEATING_DECIMAL.sub(_repeating_decimal, s)


def normalize_answer(s):
    """Canonical string form of an answer (the Hendrycks strip_string family).
        "\\left( 3, \\dfrac{\\pi}{2} \\right)" -> "(3,\\frac{\\pi}{2})"
        "\\$12,\\!441.50"                    -> "12441.50"
        "x = \\frac12."                      -> "\\frac{1}{2}"
        "117^\\circ"                         -> "117"      ("\\tan 15^\\circ" keeps its degrees)
        "\\text{(E)}"                        -> "E"
        "0.\\overline{3}"                    -> "\\frac{3}{9}"
    Answers longer than MAX_ANSWER_CHARS are returned stripped, unnormalised.
    """
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = _normalize_latex(s)
    variable = _VARIABLE_PREFIX.fullmatch(s)
    if variable and "=" not in variable.group(2):
        s = variable.group(2)  # x = 5 -> 5, x \in [0, 1] -> [0, 1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if len(s) == 3 and s[0] == "(" and s[2] == ")" and "A" <= s[1] <= "Z":
        s = s[1]  # multiple choice: (E) -> E
    base = _BASE_SUBSCRIPT.fullmatch(s)
    if base and any(_is_digit(char) for char in base.group(1)):
        s = f"{base.group(1)}_{{{base.group(2)}}}"  # 141_13 -> 141_{13}
    return s


def _without_base(s):
    """141_{13} -> 141, for a model that leaves out the base; other answers unchanged."""
    return s.split("_{")[0] if _BASE_SUBSCRIPT.fullmatch(s) else s


# ----------------------------------------------------------------------------
# 3. Parsing into sympy, with guards


class _Unparsable(Exception):
    """The text is not an answer the grammar accepts, or it trips a guard."""


_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta",
          "theta", "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho",
          "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega"}
_FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec,
              "csc": sympy.csc, "cot": sympy.cot, "arcsin": sympy.asin, "arccos": sympy.acos,
              "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh,
              "ln": sympy.log, "log": sympy.log, "exp": sympy.exp}
_ATOM_COMMANDS = {"frac", "sqrt", "binom", "pi", "infty"} | _GREEK | set(_FUNCTIONS)


def _tokenize(text):
    """Numbers, letters (or a known word), `\\commands`, `**`, and single characters.
        "2\\sqrt{x}+sin(y)^2.5" -> ["2", "\\sqrt", "{", "x", "}", "+", "sin", "(", "y", ")", "^", "2.5"]
    """
    tokens = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if _is_digit(char) or (char == "." and _is_digit(text[i + 1 : i + 2])):
            j = i
            while j < len(text) and (_is_digit(text[j]) or text[j] == "."):
                j += 1
            tokens.append(text[i:j])
        elif _is_ascii_letter(char):
            j = i
            while j < len(text) and _is_ascii_letter(text[j]):
                j += 1
            word = text[i:j]
            if word in _NAMES:
                tokens.append(word)
            elif len(word) <= 2:
                tokens.extend(word)  # "xy" is x times y
            else:
                raise _Unparsable  # a word such as "odd": compared as text only
        elif char == "\\":
            j = _read_command(text, i) if _is_ascii_letter(text[i + 1 : i + 2]) else i + 2
            tokens.append(text[i:j])
        elif text.startswith("**", i):
            j = i + 2
            tokens.append("**")
        else:
            j = i + 1
            tokens.append(char)
        i = j
    return tokens


def _sample_value(name, point):
    """Fixed value of variable `name` at sample point `point`, in [0.5, 2): the same
    in every process (crc32, not Python's salted hash). Positive, as MATH's
    variables mostly are: \\sqrt{x}\\sqrt{y} equals \\sqrt{xy}, and so |x| equals x.
    A Float, not a Rational: substituting exact values lets sympy simplify exactly
    (99999999999^{1/x} at x = 1/2 would be factored)."""
    thousandths = 500 + zlib.crc32(f"{name}:{point}".encode()) % 1500
    return sympy.Float(sympy.Rational(thousandths, 1000), EVAL_DIGITS)


def _fingerprint(expr, digits=EVAL_DIGITS):
    """expr's complex values at N_SAMPLE_POINTS points (the same values of a variable
    for every expression), or None when a value is not a finite number."""
    symbols = sorted(expr.free_symbols, key=lambda symbol: symbol.name)
    values = []
    for point in range(N_SAMPLE_POINTS if symbols else 1):
        value = expr.evalf(digits, subs={s: _sample_value(s.name, point) for s in symbols})
        real, imaginary = value.as_real_imag()
        if not (real.is_Number and imaginary.is_Number and real.is_finite and imaginary.is_finite):
            return None
        values.append(value)
    return values * (N_SAMPLE_POINTS // len(values))


def _number_bits(expr):
    """Bits of the largest numerator or denominator in expr."""
    rationals = [expr] if expr.is_Rational else expr.atoms(sympy.Rational)
    return max([max(abs(r.p).bit_length(), abs(r.q).bit_length()) for r in rationals], default=0)


def _build(*args):
    """Whether to let sympy simplify while building: only numbers. That is exact
    and cheap (2^{10} is 1024, 1/2 + 1/3 is 5/6); on expressions it is unbounded,
    as (y^{1000})^{\\sqrt{i}} / 2 expands a 1000th power. The rest is left as
    written and compared by value."""
    return all(arg.is_Number for arg in args)


def _check_exponent(exponent):
    """Refuse an exponent (or the argument of exp, sinh, cosh) larger than
    MAX_EXPONENT, at the sample points if it has variables. Every exponent
    inside it passed this check, so evaluating it is cheap: e^{e^{e^{100}}} stops
    at its second e, before anything computes e^{e^{100}}."""
    if exponent.is_Number:  # a rational's denominator is a root's index: 2^{1/999} is a 999th root
        small = abs(exponent) <= MAX_EXPONENT and (not exponent.is_Rational or exponent.q <= MAX_ROOT_INDEX)
    else:
        values = _fingerprint(exponent, digits=15)
        small = values is not None and all(abs(value) <= MAX_EXPONENT for value in values)
    if not small:
        raise _Unparsable


def _safe_pow(base, exponent):
    """base ** exponent, refused when it would be a huge number (sympy computes
    integer powers as soon as they are built)."""
    _check_exponent(exponent)
    if exponent.is_Number and float(abs(exponent)) * _number_bits(base) > MAX_RESULT_BITS:
        raise _Unparsable
    if exponent.is_Rational and not exponent.is_Integer and _number_bits(base) > MAX_ROOT_BITS:
        raise _Unparsable  # sympy factors a root's radicand, which can take seconds
    return sympy.Pow(base, exponent, evaluate=_build(base, exponent))


def _small_integer_or_symbol(n):
    return n.is_Integer and 0 <= n <= MAX_FACTORIAL or n.is_Symbol


def _add(a, b):
    return sympy.Add(a, b, evaluate=_build(a, b))


def _multiply(a, b):
    return sympy.Mul(a, b, evaluate=_build(a, b))


def _negate(a):
    return _multiply(sympy.Integer(-1), a)


def _divide(a, b):
    return _multiply(a, _safe_pow(b, sympy.Integer(-1)))


def _apply(function, argument):
    """function(argument) as written, even on a number: sympy's log asks whether
    a 4000-digit integer is prime. Refused when the argument is huge (more than
    MAX_ARGUMENT_BITS bits, exactly or at the sample points): cos(5000!) at 30
    digits needs 16,000 digits of pi."""
    if _number_bits(argument) > MAX_ARGUMENT_BITS:
        raise _Unparsable
    if not argument.is_Number:
        values = _fingerprint(argument, digits=15)
        if values is not None and any(abs(value) > 2**MAX_ARGUMENT_BITS for value in values):
            raise _Unparsable
    return function(argument, evaluate=False)


def _safe_factorial(n):
    if _small_integer_or_symbol(n):
        return sympy.factorial(n)
    raise _Unparsable


def _safe_binomial(n, k):
    if _small_integer_or_symbol(n) and _small_integer_or_symbol(k):
        return sympy.binomial(n, k)
    raise _Unparsable


def _number(token):
    """Exact value of a literal: "2.50" -> Rational(5, 2)."""
    whole, _, fraction = token.partition(".")
    if "." in fraction or not whole + fraction or len(whole) + len(fraction) > MAX_DIGITS:
        raise _Unparsable
    return sympy.Rational(int(whole or "0") * 10 ** len(fraction) + int(fraction or "0"), 10 ** len(fraction))


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, text):
        self.tokens = _tokenize(text)
        self.pos = 0
        self.nesting = 0  # atoms inside atoms

    def peek(self, offset=0):
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else ""

    def take(self):
        token = self.peek()
        if not token:
            raise _Unparsable
        self.pos += 1
        return token

    def expect(self, token):
        if self.take() != token:
            raise _Unparsable

    def parse(self):
        value = self.expr()
        if self.pos != len(self.tokens):
            raise _Unparsable
        return value

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            operator = self.take()
            right = self.term()
            value = _add(value, right if operator == "+" else _negate(right))
        return value

    def starts_factor(self, token):
        return bool(token) and (_is_digit(token[0]) or token[0] == "." or _is_ascii_letter(token[0])
                                or token in ("(", "{") or token[1:] in _ATOM_COMMANDS and token[0] == "\\")

    def term(self):
        signs = 0
        while self.peek(signs) in ("-", "+"):
            signs += 1
        first_token = self.peek(signs)
        value = self.unary()
        n_factors = 1
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                value = _multiply(value, self.unary())
            elif token in ("/", "\\div"):
                self.take()
                value = _divide(value, self.unary())
            elif self.starts_factor(token):
                factor = self.power()
                is_mixed_number = (n_factors == 1 and token == "\\frac" and first_token.isdigit()
                                   and value.is_Integer and factor.is_Rational and 0 < factor < 1)
                value = value + sympy.sign(value) * factor if is_mixed_number else _multiply(value, factor)
            else:
                return value
            n_factors += 1

    def unary(self):
        sign = 1
        while self.peek() in ("-", "+"):
            if self.take() == "-":
                sign = -sign
        value = self.power()
        return _negate(value) if sign < 0 else value

    def power(self):
        base = self.postfix()
        if self.peek() in ("^", "**"):
            self.take()
            return _safe_pow(base, self.unary())
        return base

    def postfix(self):
        value = self.atom()
        while True:
            if self.peek() == "!":
                self.take()
                value = _safe_factorial(value)
            elif self.peek() == "^" and self.peek(1) == "\\circ":
                self.pos += 2
                value = _multiply(value, sympy.pi / 180)
            else:
                return value

    def argument(self):
        """A command's argument: a {group}, or one token; of a number, one digit
        as in TeX (`\\log_28` is log base 2 of 8)."""
        token = self.peek()
        if len(token) > 1 and _is_digit(token[0]):
            self.tokens[self.pos] = token[1:]
            return sympy.Integer(int(token[0]))
        return self.postfix()

    def atom(self):
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise _Unparsable
        value = self.atom_inner()
        self.nesting -= 1
        return value

    def atom_inner(self):
        token = self.take()
        name = token[1:] if token.startswith("\\") else token  # \sqrt and sqrt, \sin and sin
        if _is_digit(token[0]) or token[0] == ".":
            return _number(token)
        if token in ("(", "{", "|"):
            value = self.expr()
            self.expect({"(": ")", "{": "}", "|": "|"}[token])
            return _apply(sympy.Abs, value) if token == "|" else value
        if token == "\\frac":
            numerator = self.argument()
            return _divide(numerator, self.argument())
        if name == "sqrt":
            if token == "\\sqrt" and self.peek() == "[":
                self.take()
                index = self.expr()
                self.expect("]")
                return _safe_pow(self.argument(), _divide(sympy.Integer(1), index))
            return _safe_pow(self.argument(), sympy.Rational(1, 2))
        if token == "\\binom":
            n = self.argument()
            return _safe_binomial(n, self.argument())
        if name == "pi":
            return sympy.pi
        if token == "\\infty":
            return sympy.oo
        if name in _FUNCTIONS:
            return self.function(_FUNCTIONS[name])
        if token.startswith("\\") and name in _GREEK:
            return sympy.Symbol(name)
        if len(token) == 1 and _is_ascii_letter(token):
            return self.letter(token)
        raise _Unparsable

    def function(self, function):
        exponent = None
        if self.peek() == "^":  # \sin^2 x
            self.take()
            exponent = self.unary()
        base = None
        if self.peek() == "_":  # \log_2 8
            self.take()
            base = self.argument()
        argument = self.power()
        if function in (sympy.exp, sympy.sinh, sympy.cosh):
            _check_exponent(argument)
        value = _apply(function, argument)
        if base is not None:
            value = _divide(value, _apply(sympy.log, base))
        return value if exponent is None else _safe_pow(value, exponent)

    def letter(self, token):
        if token == "i":
            return sympy.I
        if token == "e":
            return sympy.E
        if self.peek() != "_":
            return sympy.Symbol(token)
        self.take()  # a subscript names the variable: a_1, x_{10}
        if self.peek() != "{":
            return sympy.Symbol(token + "_" + self.take())
        end = self.tokens.index("}", self.pos)  # raises ValueError if missing: caught as unparsable
        subscript = "".join(self.tokens[self.pos + 1 : end])
        self.pos = end + 1
        return sympy.Symbol(token + "_" + subscript)


def _expression_of(expr):
    return ("expr", expr, _fingerprint(expr))


def _split_top_level(s, separator):
    """Split s at `separator` outside brackets (`()[]{}` and `\\{ \\}`).
        _split_top_level("(1,2),3", ",") -> ["(1,2)", "3"]
    """
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            i += len(separator)
            start = i
            continue
        char = s[i]
        if char == "\\":
            depth += {"{": 1, "}": -1}.get(s[i + 1 : i + 2], 0)
            i = _read_command(s, i) if _is_ascii_letter(s[i + 1 : i + 2]) else i + 2
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        i += 1
    parts.append(s[start:])
    return parts


def _outer_brackets(s):
    """(opening, inside, closing) when one bracket pair wraps all of s, else None.
        "[0,1)" -> ("[", "0,1", ")")     "(1)+(2)" -> None     "\\{1,2\\}" -> ("\\{", "1,2", "\\}")
    """
    if s.startswith("\\{") and s.endswith("\\}"):
        opening, closing = "\\{", "\\}"
    elif s[:1] in ("(", "[") and s[-1:] in (")", "]"):
        opening, closing = s[0], s[-1]
    else:
        return None
    inside = s[len(opening) : -len(closing)]
    if any(len(_split_top_level(inside, closer)) > 1 for closer in (")", "]", "\\}")):
        return None  # the first bracket closes before the end: "(1)+(2)"
    return opening, inside, closing


def _expand_plus_minus(items):
    """Elements of a list, each `a \\pm b` read as the two elements a + b and a - b."""
    expanded = []
    for item in items:
        if item.count("\\pm") == 1:
            expanded += [item.replace("\\pm", "+"), item.replace("\\pm", "-")]
        else:
            expanded.append(item)
    return expanded


def _parse_answer(s, nesting=0):
    """Structured form of a normalised answer (see the module docstring), built
    from nested tuples: ("set", items), ("seq", brackets, items), ("matrix", rows),
    ("equation", l - r, right side if l is a variable else None),
    ("expr", sympy_expr, fingerprint)."""
    if nesting > MAX_NESTING or not s:
        raise _Unparsable

    def parse_all(pieces):
        if len(pieces) > MAX_ELEMENTS:
            raise _Unparsable
        return [_parse_answer(piece, nesting + 1) for piece in pieces]

    pieces = _split_top_level(s, "\\cup")
    if len(pieces) > 1:
        return ("set", parse_all(pieces))
    if s.startswith("\\begin{pmatrix}") and s.endswith("\\end{pmatrix}"):
        rows = _split_top_level(s[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")], "\\\\")
        return ("matrix", [parse_all(_split_top_level(row, "&")) for row in rows if row])
    wrapped = _outer_brackets(s)
    if wrapped:
        opening, inside, closing = wrapped
        items = _split_top_level(inside, ",")
        if opening == "\\{":
            return ("set", parse_all(_expand_plus_minus(items)))
        if len(items) > 1:
            return ("seq", opening + closing, parse_all(items))
    pieces = _expand_plus_minus(_split_top_level(s, ","))
    if len(pieces) > 1:
        return ("set", parse_all(pieces))
    sides = _split_top_level(s, "=")
    if len(sides) == 2:
        lhs, rhs = _Parser(sides[0]).parse(), _Parser(sides[1]).parse()
        right_side = _parse_answer(sides[1], nesting + 1) if _VARIABLE.fullmatch(sides[0]) else None
        return ("equation", _add(lhs, _negate(rhs)), right_side)
    if len(sides) > 2:
        raise _Unparsable
    return _expression_of(_Parser(s).parse())


# ----------------------------------------------------------------------------
# 4. Comparison


def _values_close(a, b):
    difference = abs(a - b)
    return bool(difference <= max(REL_TOL * max(abs(a), abs(b)), ABS_TOL))


def _exprs_equal(a, b):
    """a, b: ("expr", sympy_expr, fingerprint)."""
    _, expr_a, values_a = a
    _, expr_b, values_b = b
    if expr_a == expr_b:
        return True
    if expr_a.is_Rational and expr_b.is_Rational:
        return False  # exact numbers: equal only if identical
    if values_a is None or values_b is None:
        return False
    return all(_values_close(x, y) for x, y in zip(values_a, values_b))


def _answers_equal(a, b):
    kind = a[0]
    if kind != b[0]:  # `x = 2` against `2`: the right side is the answer
        if kind == "equation" and a[2] is not None:
            return _answers_equal(a[2], b)
        if b[0] == "equation" and b[2] is not None:
            return _answers_equal(a, b[2])
        return False
    if kind == "expr":
        return _exprs_equal(a, b)
    if kind == "equation":  # l - r equal up to sign: y = 2x + 1 is 2x + 1 = y
        if a[2] is not None and b[2] is not None and _answers_equal(a[2], b[2]):
            return True  # x = 5 and y = 5, as normalize_answer has it
        a_expr, b_expr = _expression_of(a[1]), _expression_of(b[1])
        return _exprs_equal(a_expr, b_expr) or _exprs_equal(a_expr, _expression_of(_negate(b[1])))
    if kind == "seq":
        return a[1] == b[1] and _lists_equal(a[2], b[2])
    if kind == "matrix":
        return len(a[1]) == len(b[1]) and all(_lists_equal(x, y) for x, y in zip(a[1], b[1]))
    # set: every element of a matched to a distinct equal element of b
    unmatched = list(b[1])
    if len(a[1]) != len(unmatched):
        return False
    for item in a[1]:
        match = next((k for k, other in enumerate(unmatched) if _answers_equal(item, other)), None)
        if match is None:
            return False
        unmatched.pop(match)
    return True


def _lists_equal(a, b):
    return len(a) == len(b) and all(_answers_equal(x, y) for x, y in zip(a, b))


def is_equiv(pred, gold):
    """True when the two answers (contents of a box, not whole solutions) are equivalent.
        is_equiv("\\dfrac{1}{2}", "0.5") -> True      is_equiv("(1,2)", "[1,2]") -> False
    """
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm or (pred_norm.isalpha() and pred_norm.lower() == gold_norm.lower()):
        return True
    if _without_base(pred_norm) == gold_norm or pred_norm == _without_base(gold_norm):
        return True
    try:
        if _answers_equal(_parse_answer(pred_norm), _parse_answer(gold_norm)):
            return True
        # normalisation dropped a leading `y =`; as written, `3x - y = 2` may be that same line
        pred_written, gold_written = _normalize_latex(pred), _normalize_latex(gold)
        rewritten = (pred_written, gold_written) != (pred_norm, gold_norm)
        if "=" in pred_written and "=" in gold_written and rewritten:
            return _answers_equal(_parse_answer(pred_written), _parse_answer(gold_written))
        return False
    except Exception:  # _Unparsable, or sympy failing on odd input: not equal
        return False


def math_reward(completion, gold):
    """1.0 if the last boxed answer of completion is equivalent to gold, else 0.0.
    gold is a bare answer or a full solution (its last boxed answer is used).
    Never raises."""
    try:
        pred = extract_boxed(completion)
        if "\\boxed" in gold or "\\fbox" in gold:
            gold = extract_boxed(gold)
        return 1.0 if pred is not None and gold is not None and is_equiv(pred, gold) else 0.0
    except Exception:  # includes RecursionError and MemoryError
        return 0.0


def _last_boxed_strict(text):
    """The content of the last `\\boxed{` with balanced braces, as the reference code reads it:
    None when there is none or that last one never closes (no fallback to an earlier box)."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 1, start + len("\\boxed{")
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start + len("\\boxed{") : i - 1] if depth == 0 else None


def _normalize_strict(s):
    """The reference code's light normalisation, in its order (its docstring says lowercase; its
    code does not, and neither does this): strip, whitespace runs to one space, trailing periods
    dropped, `\\left` `\\right` `\\,` `\\;` `\\!` `\\text` deleted, `\\dfrac` `\\tfrac` -> `\\frac`, strip."""
    s = re.sub(r"\s+", " ", s.strip()).rstrip(".")
    for command in ("\\left", "\\right", "\\,", "\\;", "\\!", "\\text"):
        s = s.replace(command, "")
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip()


def strict_match(completion, gold):
    """1.0 if the completion's last `\\boxed{}` equals the gold answer as a string after `_normalize_strict`,
    else 0.0: the reward of the paper's reference code (README, "This implementation and the reference
    code").

    gold is a bare answer or a full solution (its last box is used). Linear time, never raises.
        strict_match("so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}") -> 1.0
        strict_match("\\boxed{0.5}", "\\frac{1}{2}") -> 0.0      (math_reward: 1.0)
    """
    pred = _last_boxed_strict(completion)
    if "\\boxed{" in gold:
        gold = _last_boxed_strict(gold)
    if pred is None or gold is None:
        return 0.0
    return 1.0 if _normalize_strict(pred) == _normalize_strict(gold) else 0.0


# ----------------------------------------------------------------------------
# 4b. GSM8K: the reference code's answer rule (its tasks/gsm8k.py), strict and symbolic

# Each pattern is linear on any text: no two adjacent parts can match the same characters.
_GSM8K_BOXED = re.compile(r"\\boxed\{([^{}]+)\}")  # a box without nested braces, as the reference reads it
_GSM8K_NUMBER_PATTERN = r"[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"  # -1,234.5, $12, 3/4
_GSM8K_FINAL = re.compile(r"(?:final answer|answer|therefore|thus|so)\s*(?:(?:is|=|:)\s*)?"
                          "(" + _GSM8K_NUMBER_PATTERN + ")", re.IGNORECASE)
_GSM8K_NUMBER = re.compile(_GSM8K_NUMBER_PATTERN)


def gsm8k_answer(completion):
    """The answer a GSM8K completion gives, as written: the content of its last `\\boxed{}` if any, else
    the number of its last "Final answer: N" (or "answer is N", "so N", "thus N", ...), else its last
    number; None when it has none of these.
        gsm8k_answer("6 * 7 = 42 apples.\\nFinal answer: 42") -> "42"
        gsm8k_answer("so she pays $1,200 in all") -> "$1,200"
    """
    for pattern in (_GSM8K_BOXED, _GSM8K_FINAL, _GSM8K_NUMBER):
        matches = pattern.findall(completion)
        if matches:
            return matches[-1]
    return None


def _decimal_text(value):
    """A Decimal as the reference writes it: no exponent, no trailing zeros (1234.00 -> "1234", 2.50 ->
    "2.5")."""
    rendered = format(value.normalize(), "f")
    return (rendered.rstrip("0").rstrip(".") if "." in rendered else rendered) or "0"


def _normalize_gsm8k(text):
    """The reference code's comparison form: separators, `$` and `%` removed, a trailing period dropped,
    numbers through _decimal_text, a/b as its decimal value (3/4 -> "0.75"), other text lowercased."""
    text = text.strip().replace("\u2212", "-")
    for separator in ",$%":
        text = text.replace(separator, "")
    text = text.strip().rstrip(". ")
    if re.fullmatch(r"[-+]?\d+/\d+", text):
        try:
            fraction = Fraction(text)
        except ZeroDivisionError:
            return text
        return _decimal_text(Decimal(fraction.numerator) / Decimal(fraction.denominator))
    if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", text):
        return _decimal_text(Decimal(text))
    return text.lower()


def gsm8k_strict_match(completion, gold):
    """1.0 if the completion's answer (gsm8k_answer) equals the gold number after `_normalize_gsm8k`,
    else 0.0: the reference code's GSM8K reward. Linear time, never raises.
        gsm8k_strict_match("\\boxed{1,234}", "1234") -> 1.0;  gsm8k_strict_match("12340", "1234") -> 0.0
    """
    try:
        pred = gsm8k_answer(completion)
        return 1.0 if pred is not None and _normalize_gsm8k(pred) == _normalize_gsm8k(gold) else 0.0
    except Exception:
        return 0.0


def gsm8k_reward(completion, gold):
    """1.0 if the completion's answer (gsm8k_answer, as written) is equivalent to the gold under
    is_equiv, else 0.0: GSM8K under the symbolic checker. Never raises."""
    try:
        pred = gsm8k_answer(completion)
        return 1.0 if pred is not None and is_equiv(pred, gold) else 0.0
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------
# 5. Batch scoring in worker processes with a hard timeout


def _limit_address_space(extra_bytes):
    """RLIMIT_AS = what this process maps now + extra_bytes (Linux; elsewhere nothing)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes,
                                                resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, OSError, ValueError):
        pass


def _worker_main(connection):
    """Loop of one worker: receive (scorer, completion, gold), send the score.
    Ctrl-C is for the trainer; the parent decides when a worker ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_address_space(WORKER_MEMORY_BYTES)
    connection.send("ready")
    while True:
        try:
            scorer, completion, gold = connection.recv()
        except EOFError:  # the parent closed the pipe
            return
        connection.send(float(scorer(completion, gold)))


@dataclass
class _Worker:
    process: multiprocessing.Process
    connection: Connection  # the parent's end of the worker's pipe
    ready: bool = False  # set when the worker has imported everything and said so


class _WorkerPool:
    """n spawned processes, each with its own pipe. One pipe per worker (not a
    shared queue) so that killing a stuck worker cannot corrupt a lock others use."""

    def __init__(self, n_workers):
        self.context = multiprocessing.get_context("spawn")
        self.workers = [self.start_worker() for _ in range(n_workers)]

    def start_worker(self):
        connection, child_connection = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(child_connection,), daemon=True)
        # A child inherits an ignored SIGINT (and Python then installs no
        # KeyboardInterrupt handler), which covers its imports, before _worker_main runs.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
        try:
            process.start()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_handler)
        child_connection.close()
        return _Worker(process, connection)

    def replace_worker(self, slot):
        worker = self.workers[slot]
        worker.process.kill()
        worker.process.join()
        worker.connection.close()
        self.workers[slot] = self.start_worker()

    def close(self):
        for worker in self.workers:
            worker.process.kill()
            worker.process.join()
            worker.connection.close()

    def score(self, completions, golds, timeout, scorer):
        """Give each idle, ready worker one item; wait for a result or the nearest
        deadline; kill and replace a worker whose item is past its deadline.

        A worker found dead (killed while idle, or between items) is replaced; an
        item it was given, or was being given, scores 0 and is counted like a hung
        one. Workers that keep dying while starting (more than 2 per worker in one
        call: the environment is broken, not one input) end the call with an error."""
        scores = [0.0] * len(completions)
        n_timeouts = 0
        start_failures = 0
        todo = deque(range(len(completions)))
        running = {}  # slot -> (item, deadline)

        def worker_died(slot):
            nonlocal n_timeouts, start_failures
            if not self.workers[slot].ready:
                start_failures += 1
                if start_failures > 2 * len(self.workers):
                    raise RuntimeError("score_batch: worker processes keep exiting while starting "
                                       f"({start_failures} in this call)")
            if running.pop(slot, None) is not None:
                n_timeouts += 1
            self.replace_worker(slot)

        while todo or running:
            for slot, worker in enumerate(self.workers):
                if todo and worker.ready and slot not in running:
                    item = todo.popleft()
                    running[slot] = (item, time.monotonic() + timeout)
                    try:
                        worker.connection.send((scorer, completions[item], golds[item]))
                    except OSError:  # BrokenPipe / ConnectionReset: it died while idle
                        worker_died(slot)
            next_deadline = min((deadline for _, deadline in running.values()), default=None)
            wait_s = None if next_deadline is None else max(0.0, next_deadline - time.monotonic())
            ready_connections = wait([worker.connection for worker in self.workers], timeout=wait_s)
            for slot, worker in enumerate(self.workers):
                if worker.connection not in ready_connections:
                    continue
                try:
                    message = worker.connection.recv()
                except (EOFError, OSError):  # the worker died: its item, if any, scores 0
                    worker_died(slot)
                    continue
                if message == "ready":
                    worker.ready = True
                else:
                    item, _ = running.pop(slot)
                    scores[item] = message
            now = time.monotonic()
            for slot, (item, deadline) in list(running.items()):
                if now >= deadline:
                    del running[slot]
                    n_timeouts += 1
                    self.replace_worker(slot)
        return scores, n_timeouts


_pool = None  # kept between calls: starting a worker (spawn, import sympy) takes 0.5 to 1 s


def score_batch(completions, golds, timeout=2.0, n_workers=min(4, os.cpu_count() or 1), scorer=math_reward):
    """Score completions against golds in worker processes.

    Returns (scores, n_timeouts): scores[i] = scorer(completions[i], golds[i]),
    or 0.0 if that item ran past `timeout` seconds (its worker is killed and
    replaced) or its worker died; n_timeouts counts those items. The pool is
    started on the first call (0.5 to 2 s) and kept: a later call of 32 items
    costs about 3 ms more than scoring them in this process. `scorer` must be a
    module-level function (it is pickled by name); tests pass one that hangs.
    The caller's script needs the usual `if __name__ == "__main__":` guard
    (spawned workers re-import the main module).
    """
    global _pool
    if _pool is None or len(_pool.workers) != n_workers:
        if _pool is not None:
            _pool.close()
        _pool = _WorkerPool(n_workers)
    try:
        return _pool.score(list(completions), list(golds), timeout, scorer)
    except BaseException:  # e.g. Ctrl-C mid-batch: workers may hold stale items
        _pool.close()
        _pool = None
        raise
