"""Execution accuracy: run predicted and reference code, compare the results.

Generated text is untrusted, so nothing here calls ``eval`` or ``exec``:

* ``language="arithmetic"``: the expression is parsed with ``ast`` and
  evaluated by a small interpreter that accepts only numbers, ``+ - * / //
  % **``, unary ``+``/``-`` and parentheses. Exponents are bounded (the
  result may not exceed ``MAX_INT_BITS`` bits) so ``9**9**9`` fails fast
  instead of exhausting memory, as does any integer result larger than that.
  Integers compare exactly; a float compares equal to a number within a
  relative tolerance of 1e-9 (``1/3*3`` matches ``1``).
* ``language="sql"``: an in-memory SQLite database is built from the
  caller's ``sql_setup`` script (trusted: CREATE/INSERT statements), then an
  authorizer allows nothing but reading (``SELECT``, column reads, functions
  other than ``load_extension``), one statement per query, a progress handler
  aborts any query running longer than ``timeout_s``, and values are capped at
  1 MB. Results compare as multisets of rows, or as ordered lists when the
  reference query has an ``ORDER BY``.

A prediction that fails to parse, is rejected, errs or times out scores 0;
it never raises. A reference that fails is a bug in the data and raises.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence

from flaxtune.errors import FlaxtuneError

__all__ = ["MAX_INT_BITS", "execution_accuracy", "execution_matches"]

MAX_INT_BITS = 4096
_MAX_SOURCE_CHARS = 10_000


class _ExpressionRejectedError(FlaxtuneError):
    """The expression uses something outside the whitelist or exceeds a bound."""


# Everything parsing and evaluating an expression raises for an expression
# that is malformed, not allowed, or has no finite value (1/0, 1e308**2).
_UNUSABLE_EXPRESSION = (
    SyntaxError,
    ValueError,
    ArithmeticError,
    RecursionError,
    _ExpressionRejectedError,
)


# ----------------------------------------------------------------------------
# Arithmetic.
# ----------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _ExpressionRejectedError(f"integer result over {MAX_INT_BITS} bits")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    # Bound an integer power before computing it: |base| ** e has about
    # e * log2|base| bits.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and exponent * math.log2(abs(base)) > MAX_INT_BITS
    ):
        raise _ExpressionRejectedError("exponent too large")
    result = base**exponent  # floats overflow with an OverflowError
    if isinstance(result, complex):
        raise _ExpressionRejectedError("complex result")
    return _check_size(result)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):  # not bool, str, complex, ...
            return node.value
        raise _ExpressionRejectedError(f"constant {node.value!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if type(node.op) in _BINARY:
            return _check_size(_BINARY[type(node.op)](left, right))
    raise _ExpressionRejectedError(f"{type(node).__name__} is not allowed")


def evaluate_arithmetic(expression: str) -> int | float:
    """Value of a whitelisted arithmetic expression; raises on anything else."""
    if len(expression) > _MAX_SOURCE_CHARS:
        raise _ExpressionRejectedError("expression too long")
    return _evaluate(ast.parse(expression.strip(), mode="eval"))


def _same_number(a: int | float, b: int | float) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


# ----------------------------------------------------------------------------
# SQL.
# ----------------------------------------------------------------------------

_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_ALLOWED_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)


def _authorize(action: int, arg1, arg2, database, trigger) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() == "load_extension":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class _SqlSandbox:
    """A read-only in-memory database with a per-query time limit."""

    def __init__(self, setup: str, timeout_s: float):
        self._connection = sqlite3.connect(":memory:")
        self._connection.executescript(setup)
        self._connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)
        self._connection.set_authorizer(_authorize)
        self._timeout_s = timeout_s
        self._deadline = 0.0
        # Called every 1000 virtual-machine instructions; non-zero aborts.
        self._connection.set_progress_handler(lambda: time.monotonic() > self._deadline, 1000)

    def run(self, query: str) -> list[tuple]:
        self._deadline = time.monotonic() + self._timeout_s
        return self._connection.execute(query).fetchall()

    def close(self) -> None:
        self._connection.close()


# ----------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------


def execution_matches(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    language: str = "arithmetic",
    sql_setup: str | None = None,
    timeout_s: float = 1.0,
) -> list[bool]:
    """Per example: does the prediction execute to the reference's result?

    See :func:`execution_accuracy` for the arguments.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, one per example.")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; "
            "pass one reference per prediction."
        )
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}.")
    if language == "arithmetic":
        if sql_setup is not None:
            raise ValueError("sql_setup is only used with language='sql'.")
        return [
            _arithmetic_match(p, r, i)
            for i, (p, r) in enumerate(zip(predictions, references, strict=True))
        ]
    if language == "sql":
        if sql_setup is None:
            raise ValueError(
                "language='sql' needs sql_setup: the CREATE TABLE / INSERT script of the "
                "database the queries run against."
            )
        sandbox = _SqlSandbox(sql_setup, timeout_s)
        try:
            return [
                _sql_match(sandbox, p, r, i)
                for i, (p, r) in enumerate(zip(predictions, references, strict=True))
            ]
        finally:
            sandbox.close()
    raise ValueError(f"Unknown language {language!r}; use 'arithmetic' or 'sql'.")


def _arithmetic_match(prediction: str, reference: str, index: int) -> bool:
    try:
        expected = evaluate_arithmetic(reference)
    except _UNUSABLE_EXPRESSION as err:
        raise ValueError(f"references[{index}] = {reference!r} does not evaluate: {err}") from err
    try:
        return _same_number(evaluate_arithmetic(prediction), expected)
    except (*_UNUSABLE_EXPRESSION, MemoryError):
        return False


def _sql_match(sandbox: _SqlSandbox, prediction: str, reference: str, index: int) -> bool:
    try:
        expected = sandbox.run(reference)
    except sqlite3.Error as err:
        raise ValueError(f"references[{index}] = {reference!r} fails to run: {err}") from err
    try:
        got = sandbox.run(prediction)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        return False
    if _ORDER_BY.search(reference):
        return got == expected
    return Counter(got) == Counter(expected)


def execution_accuracy(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    language: str = "arithmetic",
    sql_setup: str | None = None,
    timeout_s: float = 1.0,
) -> float:
    """Fraction of predictions whose execution result equals the reference's.

    Args:
      predictions: Generated expressions or queries, one per example.
      references: The reference expression or query per example.
      language: ``"arithmetic"`` or ``"sql"`` (see the module docstring).
      sql_setup: For SQL, the script that creates and fills the database.
      timeout_s: For SQL, the time limit of each query.
    """
    matches = execution_matches(
        predictions, references, language=language, sql_setup=sql_setup, timeout_s=timeout_s
    )
    if not matches:
        raise ValueError("No examples to score; pass at least one prediction.")
    return sum(matches) / len(matches)
