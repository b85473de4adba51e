"""Paired intervals against closed forms and scipy, the exact test's error rate, and the run plan's warning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunepipe.deployments.run_plan import detection_warnings
from tunepipe.tasks.evaluate.paired import (
    PairedDifference,
    clears,
    detectable_difference,
    exact_difference_interval,
    mean_interval,
    paired_difference,
    promotion_probability,
)
from tunepipe.tasks.runtime.config import GateConfig, MetricRule


def _binary(wins: int, losses: int, n: int, both_right: int = 0) -> tuple[list[float], list[float]]:
    """Candidate and other on n examples: `wins` only the candidate has right, `losses` only the other."""
    ties = n - wins - losses
    candidate = [1.0] * wins + [0.0] * losses + [1.0] * both_right + [0.0] * (ties - both_right)
    other = [0.0] * wins + [1.0] * losses + [1.0] * both_right + [0.0] * (ties - both_right)
    return candidate, other


def test_a_01_metric_gets_the_exact_interval_of_its_discordant_counts():
    # All 6 discordant examples won, of 20: Clopper-Pearson's lower end for 6 of 6 is 0.025 ** (1/6).
    interval = paired_difference("exact_match", *_binary(6, 0, 20, both_right=9), confidence=0.95)
    assert (interval.method, interval.wins, interval.losses, interval.n) == ("exact", 6, 0, 20)
    assert interval.difference == pytest.approx(0.3)
    assert interval.low == pytest.approx(6 / 20 * (2 * 0.025 ** (1 / 6) - 1))
    assert interval.high == pytest.approx(0.3)

    # A general case against scipy's own exact binomial interval of the wins among the discordant examples.
    from scipy.stats import binomtest

    ci = binomtest(12, 15).proportion_ci(confidence_level=0.9, method="exact")
    interval = paired_difference("exact_match", *_binary(12, 3, 50), confidence=0.9)
    assert (interval.low, interval.high) == pytest.approx((15 / 50 * (2 * ci.low - 1), 15 / 50 * (2 * ci.high - 1)))
    assert interval.difference == pytest.approx(9 / 50)


def test_the_exact_lower_end_clears_zero_exactly_when_mcnemars_one_sided_exact_test_rejects():
    from scipy.stats import binomtest

    for wins in range(0, 21):
        for losses in range(0, 21 - wins):
            low, _ = exact_difference_interval(wins, losses, 60, 0.95)
            discordant = wins + losses
            rejects = discordant > 0 and binomtest(wins, discordant, alternative="greater").pvalue < 0.025
            assert (low > 0) == rejects, (wins, losses)


def test_no_discordant_example_is_an_interval_of_zero_width_that_a_margin_0_rule_does_not_pass():
    interval = paired_difference("valid_json_rate", [1.0, 0.0, 1.0], [1.0, 0.0, 1.0], confidence=0.95)
    assert (interval.low, interval.high, interval.difference) == (0.0, 0.0, 0.0)
    assert not clears(interval, 0.0)  # equal is not better: the champion stays
    assert clears(interval, -0.01)  # but it is not worse than a tolerated point


def test_the_bootstrap_is_too_narrow_for_few_discordant_examples_where_the_exact_interval_is_not():
    candidate, other = _binary(5, 0, 50)
    exact = paired_difference("exact_match", candidate, other, confidence=0.95)
    # Weights force the bootstrap onto the same 0/1 values.
    bootstrap = paired_difference("exact_match", candidate, other, confidence=0.95, weights=[1.0] * 50)
    assert bootstrap.method == "bootstrap" and bootstrap.low > 0
    assert exact.low < 0 and not clears(exact, 0.0)


def test_the_paired_bootstrap_matches_the_normal_interval_and_is_seeded():
    rng = np.random.default_rng(1)
    other = rng.random(400)
    candidate = np.clip(other + rng.normal(0.05, 0.2, 400), 0, 1)
    interval = paired_difference("rouge_l", candidate, other, confidence=0.95)
    differences = candidate - other
    half = 1.96 * differences.std(ddof=1) / math.sqrt(400)
    assert interval.method == "bootstrap" and interval.wins is None
    assert interval.difference == pytest.approx(differences.mean())
    assert interval.low == pytest.approx(differences.mean() - half, abs=0.1 * half)
    assert interval.high == pytest.approx(differences.mean() + half, abs=0.1 * half)
    assert paired_difference("rouge_l", candidate, other, confidence=0.95) == interval  # a re-run decides the same
    assert paired_difference("rouge_l", candidate, other, confidence=0.95, seed=1) != interval


def test_eval_loss_is_lower_is_better_and_token_weighted():
    # Per-example mean losses; the first example has 3 answer tokens, the second 1.
    interval = paired_difference("eval_loss", [1.0, 2.0], [2.0, 2.0], confidence=0.95, versus="base", weights=[3, 1])
    assert interval.difference == pytest.approx((3 * (2.0 - 1.0) + 1 * 0.0) / 4)  # the loss fell: positive
    assert interval.statement("the base") == (
        "eval_loss -0.750 [-1.000, -0.000] against the base on 2 test examples (lower is better)"
    )
    worse = paired_difference("eval_loss", [3.0, 3.0], [2.0, 2.5], confidence=0.95)
    assert worse.difference < 0 and worse.high < 0


def test_the_difference_is_said_in_plain_words():
    interval = PairedDifference(
        metric="field_accuracy",
        versus="champion",
        n=200,
        difference=0.07,
        low=0.03,
        high=0.11,
        confidence=0.95,
        method="bootstrap",
    )
    assert interval.statement("the champion") == (
        "field_accuracy +0.07 [+0.03, +0.11] over the champion on 200 test examples"
    )
    assert interval.statement("the base", "validation examples").endswith("over the base on 200 validation examples")


def test_a_mean_interval_is_exact_for_01_values_and_bootstrapped_otherwise():
    from scipy.stats import binomtest

    interval = mean_interval("valid_json_rate", [1.0] * 45 + [0.0] * 5, confidence=0.95)
    ci = binomtest(45, 50).proportion_ci(confidence_level=0.95, method="exact")
    assert (interval.method, interval.mean) == ("exact", 0.9)
    assert (interval.low, interval.high) == pytest.approx((ci.low, ci.high))
    loss = mean_interval("eval_loss", [1.0, 3.0], confidence=0.95, weights=[3, 1])
    assert loss.method == "bootstrap" and loss.mean == pytest.approx(1.5) and 1.0 <= loss.low < loss.high <= 3.0


def test_exact_promotion_probabilities_match_a_simulation_of_the_gate():
    rng = np.random.default_rng(0)
    n, share, truth, trials = 50, 0.2, 0.1, 1500
    u = rng.random((trials, n))
    wins, losses = (u < (share + truth) / 2).sum(axis=1), ((u >= (share + truth) / 2) & (u < share)).sum(axis=1)
    simulated = np.mean(
        [
            clears(paired_difference("exact_match", *_binary(won, lost, n), confidence=0.95), 0.0)
            for won, lost in zip(wins, losses)
        ]
    )
    exact = promotion_probability(n, share, truth, 0.95)
    assert simulated == pytest.approx(exact, abs=3 * math.sqrt(exact * (1 - exact) / trials))
    # An equal candidate passes a margin-0 rule at most (1 - confidence) / 2 of the time; a worse one less.
    for n in (16, 50, 200):
        assert promotion_probability(n, 0.2, 0.0, 0.95) <= 0.025
        assert promotion_probability(n, 0.2, -0.02, 0.95) < promotion_probability(n, 0.2, 0.0, 0.95) + 1e-12


def test_the_detectable_difference_is_where_the_gate_passes_80_percent_of_the_time():
    assert detectable_difference(16, 0.2, 0.95) == math.inf  # 3 discordant examples cannot show anything
    gains = [detectable_difference(n, 0.2, 0.95) for n in (50, 100, 200, 500)]
    assert gains == sorted(gains, reverse=True) and 0.05 < gains[-1] < gains[0] <= 0.2
    gain = detectable_difference(200, 0.2, 0.95)
    assert promotion_probability(200, 0.2, gain, 0.95) >= 0.8 > promotion_probability(200, 0.2, gain - 0.002, 0.95)
    # A tolerated regression (non-inferiority) needs less; a required margin more.
    assert (
        detectable_difference(200, 0.2, 0.95, margin=-0.05) < gain < detectable_difference(200, 0.2, 0.95, margin=0.02)
    )


def test_the_run_plan_warns_when_the_test_split_cannot_detect_the_margin():
    gated = GateConfig(rules={"exact_match": MetricRule(min=0.5)}, must_beat_champion_by={"valid_json_rate": 0.01})
    assert detection_warnings(GateConfig(), 16) == []  # no rule, no champion rule
    assert detection_warnings(GateConfig(rules={"eval_loss": MetricRule(max=2.0)}), 16) == []  # not a share
    few = detection_warnings(gated, 16)
    assert few == [
        "the test split's 16 examples are too few for the champion rule on exact_match (margin 0): no candidate "
        "passes it 80% of the time, however good (at 95% confidence, if candidate and champion disagree on 20% of "
        "the examples of a right/wrong metric); use more test examples",
        "the test split's 16 examples are too few for the champion rule on valid_json_rate (margin 0.01): no "
        "candidate passes it 80% of the time, however good (at 95% confidence, if candidate and champion disagree "
        "on 20% of the examples of a right/wrong metric); use more test examples",
    ]
    needed = detectable_difference(200, 0.2, 0.95)
    (margin_0, margin_1) = detection_warnings(gated, 200)
    assert margin_0.startswith(
        "the test split's 200 examples are too few to detect the margin of the champion rule "
        f"on exact_match (margin 0): a candidate passes it 80% of the time only when it is "
        f"truly {needed:+.2f} or more better"
    )
    assert "on valid_json_rate (margin 0.01)" in margin_1
    # A large split resolves a 5-point margin-0 rule; a margin wider than twice what it needs is fine too.
    assert detection_warnings(GateConfig(rules={"exact_match": MetricRule(min=0.5)}), 3000) == []
    assert detection_warnings(GateConfig(must_beat_champion_by={"exact_match": 0.1}), 500) == []
