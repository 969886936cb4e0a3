"""Scoring generated text: ROUGE, BLEU, bootstrap intervals, simple metrics, the harness."""

from flaxtune.eval.bleu import BleuResult, bleu, sentence_bleu
from flaxtune.eval.rouge import Score, rouge

__all__ = ["BleuResult", "Score", "bleu", "rouge", "sentence_bleu"]
