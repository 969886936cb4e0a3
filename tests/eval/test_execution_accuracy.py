"""Execution accuracy: correct results, and untrusted text that never escapes."""

import time

import pytest

from flaxtune.eval import execution_accuracy
from flaxtune.eval.execution import execution_matches

WORLD = """
CREATE TABLE city (name TEXT, country TEXT, population INTEGER);
INSERT INTO city VALUES ('Paris', 'FR', 2100000), ('Lyon', 'FR', 520000),
                        ('Berlin', 'DE', 3600000), ('Hamburg', 'DE', 1800000);
"""


def test_arithmetic():
    predictions = ["2 + 3 * 4", "(2+3)*4", "7 // 2", "1/3*3", "2**10", "-(-5) % 3", "8/4"]
    references = ["14", "14", "3", "1", "1024", "2", "2"]
    assert execution_matches(predictions, references) == [True, False, True, True, True, True, True]


@pytest.mark.parametrize(
    "attack",
    [
        "__import__('os').system('echo pwned')",
        "open('/etc/passwd').read()",
        "(1).__class__",
        "[1, 2]",
        "x + 1",
        "lambda: 1",
        "'a' * 3",
        "True + 1",
        "1j * 1j",
        "9 ** 9 ** 9",
        "10 ** 100000",
        "(2 ** 4000) * (2 ** 4000)",
        "1 / 0",
        "(-8) ** 0.5",
        "((((((((((((((((((((((1))))))))))))))))))))))" * 500,
        "1 +",
        "",
    ],
)
def test_arithmetic_rejects_everything_else_fast_without_raising(attack):
    start = time.monotonic()
    assert execution_accuracy([attack], ["1"]) == 0.0
    assert time.monotonic() - start < 1.0


def test_arithmetic_bad_reference_raises():
    with pytest.raises(ValueError, match=r"references\[0\] = 'os' does not evaluate"):
        execution_accuracy(["1"], ["os"])


def test_sql_results_compare_as_multisets_unless_ordered():
    predictions = [
        "SELECT name FROM city WHERE country = 'FR' ORDER BY name DESC",
        "SELECT name FROM city WHERE country = 'FR' ORDER BY name DESC",
        "SELECT count(*) FROM city",
        "select COUNT(*) from city where population > 0",
        "SELECT nme FROM city",
    ]
    references = [
        "SELECT name FROM city WHERE country = 'FR'",
        "SELECT name FROM city WHERE country = 'FR' ORDER BY name",
        "SELECT 4",
        "SELECT count(*) FROM city",
        "SELECT name FROM city",
    ]
    assert execution_matches(predictions, references, language="sql", sql_setup=WORLD) == [
        True,
        False,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    "attack",
    [
        "DROP TABLE city",
        "DELETE FROM city",
        "INSERT INTO city VALUES ('x', 'y', 1)",
        "UPDATE city SET population = 0",
        "CREATE TABLE t (x)",
        "ATTACH DATABASE '/tmp/evil.db' AS evil",
        "PRAGMA writable_schema = 1",
        "SELECT 1; DROP TABLE city",
        "SELECT load_extension('x')",
        "SELECT zeroblob(100000000)",
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r",
        "not sql at all",
    ],
)
def test_sql_sandbox_allows_only_bounded_reads(attack):
    start = time.monotonic()
    assert (
        execution_accuracy(
            [attack, "SELECT count(*) FROM city"],
            ["SELECT 4", "SELECT 4"],
            language="sql",
            sql_setup=WORLD,
            timeout_s=0.2,
        )
        == 0.5  # the attack scores 0, and the table is intact afterwards
    )
    assert time.monotonic() - start < 3.0


def test_argument_errors():
    with pytest.raises(ValueError, match="needs sql_setup"):
        execution_accuracy(["SELECT 1"], ["SELECT 1"], language="sql")
    with pytest.raises(ValueError, match="Unknown language 'python'"):
        execution_accuracy(["1"], ["1"], language="python")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        execution_accuracy(["1", "2"], ["1"])
    with pytest.raises(ValueError, match=r"references\[0\] = 'SELECT nope FROM city' fails"):
        execution_accuracy(["SELECT 1"], ["SELECT nope FROM city"], language="sql", sql_setup=WORLD)
