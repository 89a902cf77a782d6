"""The learning rate is a pure function of the iteration; the warm-up switches once and moves no milestone."""

from __future__ import annotations

import logging

import pytest

from resnet_repro.optim import Schedule, Warmup, lr_at

PAPER = {"base_lr": 0.1, "milestones": [32000, 48000], "gamma": 0.1}


@pytest.mark.parametrize(
    "iteration,expected",
    [(0, 0.1), (31999, 0.1), (32000, 0.01), (47999, 0.01), (48000, 0.001), (63999, 0.001)],
)
def test_paper_schedule_at_boundaries(iteration, expected):
    assert lr_at(iteration, **PAPER) == pytest.approx(expected, rel=1e-12)


def test_schedule_is_exact_powers_of_gamma():
    assert lr_at(32000, **PAPER) == 0.1 * 0.1
    assert lr_at(48000, **PAPER) == 0.1 * 0.1**2


def test_warmup_holds_until_error_drops_below_80_then_returns_to_schedule():
    warmup = Warmup(lr=0.01, until_err=80.0, window=5, max_iter=2000)
    schedule = Schedule(warmup=warmup, **PAPER)
    for it in range(300):
        assert schedule.lr(it) == 0.01
        warmup.observe(it, [90.0])
    assert warmup.active
    warmup.observe(300, [50.0])  # window 90,90,90,90,50: mean 82 >= 80, still warming up
    assert warmup.active and schedule.lr(301) == 0.01
    warmup.observe(301, [50.0])  # window 90,90,90,50,50: mean 74 < 80 -> lr 0.1 from the next iteration
    assert not warmup.active and warmup.ended_at == 302
    assert schedule.lr(302) == 0.1
    warmup.observe(302, [99.0])  # it never comes back
    assert schedule.lr(303) == 0.1
    assert schedule.lr(31999) == 0.1 and schedule.lr(32000) == pytest.approx(0.01)
    assert schedule.lr(48000) == pytest.approx(0.001)


def test_warmup_uses_the_window_mean_not_one_batch():
    warmup = Warmup(lr=0.01, until_err=80.0, window=4, max_iter=2000)
    for it, err in enumerate([95, 95, 95, 10]):  # one lucky batch: mean 73.75 < 80 only with the full window
        warmup.observe(it, [err])
    assert not warmup.active
    warmup2 = Warmup(lr=0.01, until_err=80.0, window=4, max_iter=2000)
    for it, err in enumerate([95, 95, 95, 60]):  # mean 86.25
        warmup2.observe(it, [err])
    assert warmup2.active


def test_warmup_cap_ends_it_with_a_warning(caplog):
    warmup = Warmup(lr=0.01, until_err=80.0, window=3, max_iter=10)
    with caplog.at_level(logging.WARNING):
        for it in range(10):
            warmup.observe(it, [95.0])
    assert not warmup.active and warmup.ended_at == 10
    assert "warm-up never reached" in caplog.text


def test_warmup_state_round_trips():
    warmup = Warmup(window=3)
    warmup.observe(0, [90.0])
    warmup.observe(1, [85.0])
    other = Warmup(window=3)
    other.load_state_dict(warmup.state_dict())
    assert other.state_dict() == warmup.state_dict()
