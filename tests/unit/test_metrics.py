import math

import numpy as np
import pytest

from exfm_ray.metrics import auc, calibration, evaluate, log_loss, ne, snapshot_transfer_ratio, transfer_ratio

pytestmark = pytest.mark.unit


def test_ne_matches_a_hand_computed_value():
    y = [1, 0, 0, 1]
    p = [0.8, 0.3, 0.1, 0.6]
    # log loss = -(ln .8 + ln .7 + ln .9 + ln .6) / 4 ; base rate 0.5 -> entropy ln 2
    ll = -(math.log(0.8) + math.log(0.7) + math.log(0.9) + math.log(0.6)) / 4
    assert ll == pytest.approx(0.2990, abs=1e-4)
    assert ne(y, p) == pytest.approx(ll / math.log(2), rel=1e-6)
    assert ne(y, p) == pytest.approx(0.43137, abs=1e-4)


def test_ne_of_the_base_rate_predictor_is_one():
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.03).astype(float)
    assert ne(y, np.full(len(y), y.mean())) == pytest.approx(1.0, abs=1e-6)


def test_ne_is_nan_with_one_class():
    assert math.isnan(ne([0, 0, 0], [0.1, 0.2, 0.3]))


def test_auc_calibration_logloss():
    y = [0, 0, 1, 1]
    assert auc(y, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert calibration(y, [0.2, 0.2, 0.4, 0.4]) == pytest.approx(0.6)
    assert log_loss([1], [0.5]) == pytest.approx(math.log(2))
    out = evaluate(y, [0.1, 0.4, 0.35, 0.8])
    assert out["rows"] == 4 and out["positives"] == 2


def test_snapshot_transfer_ratio():
    # FM NE improves 10% relative, VM NE improves 2% relative -> TR 0.2
    assert snapshot_transfer_ratio(1.0, 0.9, 0.8, 0.784) == pytest.approx(0.2)


def test_transfer_ratio_is_the_share_of_the_fm_gain():
    # alone 0.95, FM 0.85: a gain of 0.10; the student at 0.92 captures 0.03 of it
    assert transfer_ratio(0.95, 0.92, 0.85) == pytest.approx(0.3)
    assert transfer_ratio(0.95, 0.85, 0.85) == pytest.approx(1.0)
    assert transfer_ratio(0.95, 0.97, 0.85) == pytest.approx(-0.2)
    assert math.isnan(transfer_ratio(0.95, 0.92, 0.96))  # the FM is worse than the student alone
