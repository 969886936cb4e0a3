"""The command line: files with empty lines and Unicode, several references, errors."""

import json
import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from flaxtune.eval.__main__ import main, read_segments


def write(path, lines, end="\n"):
    path.write_text(end.join(lines) + end, encoding="utf-8")
    return str(path)


PREDICTIONS = ["The cat sat on the mat.", "", "我爱北京天安门", "Ünïcödé text, naïve café!", "same"]
REFERENCES = [
    "The cat was on the mat.",
    "something",
    "我爱北京",
    "Unicode text, naive cafe!",
    "same",
]
REFERENCES_2 = ["A cat sat on a mat.", "", "我爱北京天安门", "Ünïcödé text", "other"]


def run_cli(args, capsys):
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_rouge_and_bleu_on_files(tmp_path, capsys):
    pred = write(tmp_path / "pred.txt", PREDICTIONS)
    ref = write(tmp_path / "ref.txt", REFERENCES)
    ref2 = write(tmp_path / "ref2.txt", REFERENCES_2, end="\r\n")
    out = run_cli(
        [
            "--predictions",
            pred,
            "--references",
            ref,
            "--references",
            ref2,
            "--metrics",
            "rouge,bleu,exact_match",
            "--rouge-tokenizer",
            "rouge_score",
        ],
        capsys,
    )
    assert read_segments(ref2) == REFERENCES_2
    theirs = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, REFERENCES_2])
    assert out["bleu"]["score"] == theirs.score / 100
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    rouge1 = [
        scorer.score_multi([a, b], p)["rouge1"].fmeasure
        for p, a, b in zip(PREDICTIONS, REFERENCES, REFERENCES_2, strict=True)
    ]
    assert out["rouge"]["rouge1"]["fmeasure"] == pytest.approx(sum(rouge1) / len(rouge1), rel=1e-12)
    assert out["exact_match"] == 3 / 5  # "" (second reference), 我爱北京天安门, same


def test_chinese_scores_under_auto_and_bootstrap(tmp_path, capsys):
    pred = write(tmp_path / "pred.txt", ["我爱北京天安门"])
    out = run_cli(
        ["--predictions", pred, "--references", pred, "--metrics", "rouge", "--bootstrap", "20"],
        capsys,
    )
    assert out["rouge"]["rougeL"]["fmeasure"] == 1.0
    assert out["rouge_bootstrap"]["rougeL"]["mid"]["fmeasure"] == 1.0


def test_module_entry_point(tmp_path):
    pred = write(tmp_path / "pred.txt", ["a b c d"])
    result = subprocess.run(
        [sys.executable, "-m", "flaxtune.eval", "--predictions", pred, "--references", pred],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["bleu"]["score"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("ref_lines", "extra", "message"),
    [
        (["one", "two"], [], "has 2 lines but"),
        (["one"], ["--metrics", "meteor"], "unknown or no metrics"),
        (["one"], ["--rouge-types", "rouge0"], "Unknown rouge type"),
        (["one"], ["--bleu-tokenize", "moses"], "invalid choice"),
    ],
)
def test_errors_exit_with_a_message(tmp_path, capsys, ref_lines, extra, message):
    pred = write(tmp_path / "pred.txt", ["one"])
    ref = write(tmp_path / "ref.txt", ref_lines)
    with pytest.raises(SystemExit) as exit_info:
        main(["--predictions", pred, "--references", ref, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--predictions", str(tmp_path / "nope.txt"), "--references", str(tmp_path / "x")])
    assert "nope.txt" in capsys.readouterr().err
