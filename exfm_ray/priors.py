"""Base rates: where every fresh head (student or FM) starts, so it predicts the constant
base-rate predictor (NE 1) before it has learned anything."""

from __future__ import annotations

import math

import torch


def smoothed_rate(positives: float, rows: int) -> float:
    """(pos + 0.5) / (n + 1): a positive rate that is finite with no positive."""
    return (positives + 0.5) / (rows + 1)


def base_rate(labels: torch.Tensor) -> float:
    """Smoothed positive rate of a label vector."""
    return smoothed_rate(float(labels.sum()), len(labels))


def prior_logit(rate: float) -> float:
    """logit of a base rate, clamped to [1e-4, 1 - 1e-4]."""
    rate = min(max(rate, 1e-4), 1 - 1e-4)
    return math.log(rate / (1 - rate))
