"""Base rates: where every fresh head (student or FM) starts, so it predicts the constant
base-rate predictor (NE 1) before it has learned anything."""

from __future__ import annotations

import math

import torch


def base_rate(labels: torch.Tensor) -> float:
    """Smoothed positive rate (pos + 0.5) / (n + 1) of a label vector: finite with no positive."""
    return (float(labels.sum()) + 0.5) / (len(labels) + 1)


def prior_logit(rate: float) -> float:
    """logit of a base rate, clamped to [1e-4, 1 - 1e-4]."""
    rate = min(max(rate, 1e-4), 1 - 1e-4)
    return math.log(rate / (1 - rate))
