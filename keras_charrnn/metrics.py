"""Units of language-model loss: nats per character, bits per character, perplexity."""

from __future__ import annotations

import math


def bits_per_char(nats: float) -> float:
    """Converts a mean cross-entropy in nats per character to bits per character."""
    return nats / math.log(2.0)


def perplexity(nats: float) -> float:
    """exp(loss): the effective number of equally likely next characters."""
    return math.exp(nats) if nats < 700 else float("inf")
