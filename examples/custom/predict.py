"""A custom-code pod: the type hints of ``predict`` are the pod's schema.

    modelpod pack examples/custom --name sentiment
    modelpod show sentiment      # input text BYTES [-1]; output score FP32 [-1], label BYTES [-1]
"""

from __future__ import annotations

from typing import TypedDict

from modelpod import Model

POSITIVE = {"good", "great", "excellent", "love", "nice", "happy"}
NEGATIVE = {"bad", "awful", "terrible", "hate", "poor", "sad"}


class Scored(TypedDict):
    score: list[float]
    label: list[str]


class WordCount(Model):
    """Scores text by counting positive and negative words: a stand-in for a real model."""

    def load(self) -> None:
        self.positive, self.negative = POSITIVE, NEGATIVE
        super().load()

    def predict(self, text: list[str]) -> Scored:
        scores = []
        for t in text:
            words = t.lower().split()
            hits = sum(w in self.positive for w in words) - sum(w in self.negative for w in words)
            scores.append(hits / max(len(words), 1))
        return {"score": scores, "label": ["positive" if s > 0 else "negative" if s < 0 else "neutral"
                                           for s in scores]}
