"""Speed of flaxtune.eval's ROUGE and BLEU against rouge-score and sacrebleu.

Scores N prediction/reference pairs of about 60 words of seeded synthetic
text (capitals, digits, punctuation, one sentence per line) with all four
ROUGE types (stemmer off) and with corpus BLEU (13a), timing the reference
implementation on the same data in the same process. Each timing is the best
of ``--repeats`` runs, alternating ours and theirs so that load from other
processes hits both alike. Prints one JSON object per measurement, including
whether the numbers were identical, and the speed-up ratios.

    python3 benchmarks/eval_metrics.py [--pairs 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import random
import sys
import time

import sacrebleu
from rouge_score import rouge_scorer

# Measure this checkout, not whichever flaxtune happens to be installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from flaxtune.eval import bleu, rouge

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def synthetic_pairs(n: int, seed: int = 0, words: int = 60) -> tuple[list[str], list[str]]:
    """Predictions and references that share most words, sentence per line."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(1, 9))) for _ in range(5000)]
    # Zipf-like frequencies: a few words are very common, as in real text.
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    punct = [",", ",", ";", ":", "'s", ")", '"', "-", "%"]

    def word() -> str:
        if rng.random() < 0.05:
            return str(rng.randint(0, 2030))
        w = rng.choices(vocab, weights)[0]
        if rng.random() < 0.08:
            w = w.capitalize()
        if rng.random() < 0.08:
            w += rng.choice(punct)
        return w

    def sentence(k: int) -> list[str]:
        ws = [word() for _ in range(k)]
        ws[0] = ws[0].capitalize()
        ws[-1] += rng.choice([".", ".", "!", "?"])
        return ws

    def perturb(ws: list[str]) -> list[str]:
        out = []
        for w in ws:
            r = rng.random()
            if r < 0.12:
                out.append(word())  # substitution
            elif r < 0.17:
                continue  # deletion
            elif r < 0.22:
                out.extend([w, word()])  # insertion
            else:
                out.append(w)
        return out or ws

    predictions, references = [], []
    for _ in range(n):
        sentences, left = [], words
        while left > 0:
            k = min(left, rng.randint(8, 20))
            sentences.append(sentence(k))
            left -= k
        predictions.append("\n".join(" ".join(s) for s in sentences))
        references.append("\n".join(" ".join(perturb(s)) for s in sentences))
    return predictions, references


def best_of(repeats: int, fns: dict) -> tuple[dict[str, float], dict[str, float], dict]:
    """Best CPU time and best wall time of each function, alternating between them."""
    cpu = {name: float("inf") for name in fns}
    wall = dict(cpu)
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            results[name] = fn()
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
    return cpu, wall, results


def timing_fields(cpu: dict[str, float], wall: dict[str, float], theirs: str) -> dict:
    return {
        "flaxtune_cpu_s": round(cpu["flaxtune"], 4),
        f"{theirs}_cpu_s": round(cpu[theirs], 4),
        "speedup": round(cpu[theirs] / cpu["flaxtune"], 2),
        "flaxtune_wall_s": round(wall["flaxtune"], 4),
        f"{theirs}_wall_s": round(wall[theirs], 4),
        "speedup_wall": round(wall[theirs] / wall["flaxtune"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    predictions, references = synthetic_pairs(args.pairs, args.seed)
    common = {"pairs": args.pairs, "repeats": args.repeats, "python": platform.python_version()}

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    cpu, wall, results = best_of(
        args.repeats,
        {
            "flaxtune": lambda: rouge(
                predictions,
                references,
                rouge_types=ROUGE_TYPES,
                tokenizer="rouge_score",
                aggregate=False,
            ),
            "rouge_score": lambda: [
                scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)
            ],
        },
    )
    identical = all(
        tuple(ours[t]) == tuple(theirs[t])
        for ours, theirs in zip(results["flaxtune"], results["rouge_score"], strict=True)
        for t in ROUGE_TYPES
    )
    print(
        json.dumps(
            {
                "metric": "rouge(rouge1,rouge2,rougeL,rougeLsum; stemmer off)",
                **common,
                **timing_fields(cpu, wall, "rouge_score"),
                "identical": identical,
            }
        )
    )

    cpu, wall, results = best_of(
        args.repeats,
        {
            "flaxtune": lambda: bleu(predictions, references, tokenize="13a"),
            "sacrebleu": lambda: sacrebleu.corpus_bleu(predictions, [references], tokenize="13a"),
        },
    )
    ours, theirs = results["flaxtune"], results["sacrebleu"]
    print(
        json.dumps(
            {
                "metric": "corpus_bleu(13a, exp)",
                **common,
                **timing_fields(cpu, wall, "sacrebleu"),
                "score": ours.score,
                "abs_diff_vs_sacrebleu_over_100": abs(ours.score - theirs.score / 100),
                "identical": ours.score == theirs.score / 100
                and (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len),
            }
        )
    )


if __name__ == "__main__":
    main()
