"""Paired differences between two models on the same test examples, with a confidence interval; and how large a
difference a test split of n examples can tell from noise.

Candidate and champion (or base) answer the same examples, so the gate compares per-example differences: their
spread is much smaller than either model's, and the interval narrower for the same n. The method follows the
values:

- **0/1 metrics** (exact_match, valid_json_rate, field_accuracy.<key>, ...: every per-example value is 0 or 1 for
  both models): only the discordant examples carry information, `wins` (candidate right, the other wrong) and
  `losses`. Given their number d, wins ~ Binomial(d, p) and the mean difference (wins − losses) / n is
  d/n · (2p − 1). The interval is the exact (Clopper-Pearson) interval of p mapped through d/n · (2p − 1): exact
  given d, so "the lower end is above 0" is McNemar's exact test at (1 − confidence) / 2 one-sided, and it keeps
  its error rate at any n. The percentile bootstrap does not there: five wins and no losses in 50 examples give
  a bootstrap interval above 0 but an exact one that reaches below it. No discordant example at all: [0, 0].
- **Everything else** (field_accuracy over several fields, ROUGE-L, chrF, a judge's 1 / 0.5 / 0, eval_loss): the
  paired bootstrap (Koehn 2004): resample the examples with replacement 10,000 times with a fixed seed (a re-run
  decides the same), the mean difference of each resample, and the percentile interval.

eval_loss is lower-is-better and token-weighted: the split's eval_loss is the mean over every answer token, so
with `weights` (each example's answer tokens) the difference and each resample's difference are token-weighted
means too, the mean the reported eval_loss is (the gate's interval covers the examples samples.jsonl holds, the
first eval.max_samples; the reported value every test row).

A difference is in the metric's better direction: positive means the candidate is better (for eval_loss, the
other's loss minus the candidate's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Literal

from pydantic import BaseModel

from tunepipe.tasks.runtime.config import LOWER_IS_BETTER

RESAMPLES = 10_000
# Bootstrap resamples are drawn in blocks of at most this many indices (memory stays flat at any n).
BLOCK = 2_000_000
# A rounding error (0.3 − 0.2 − 0.1) must not put an interval's end past a limit it sits on.
SLACK = 1e-6
# The run plan's "detectable": promoted this often.
POWER = 0.8


class PairedDifference(BaseModel):
    """candidate − `versus` on `metric` over the `n` examples both have it, in the metric's better direction."""

    metric: str
    versus: str  # "champion" | "base"
    n: int
    difference: float  # the mean difference (token-weighted for eval_loss); positive: the candidate is better
    low: float
    high: float
    confidence: float
    method: Literal["bootstrap", "exact"]
    wins: int | None = None  # 0/1 metrics: examples the candidate has right and the other wrong
    losses: int | None = None  # ... and the other way round

    def statement(self, who: str, examples: str = "test examples") -> str:
        """'field_accuracy +0.07 [+0.03, +0.11] over the champion on 200 test examples'; for eval_loss the change
        of the loss itself: 'eval_loss -0.120 [-0.160, -0.080] against the base on 200 test examples'."""
        if self.metric in LOWER_IS_BETTER:
            return (
                f"{self.metric} {-self.difference:+.3f} [{-self.high:+.3f}, {-self.low:+.3f}] against {who} on "
                f"{self.n} {examples} (lower is better)"
            )
        return (
            f"{self.metric} {self.difference:+.2f} [{self.low:+.2f}, {self.high:+.2f}] over {who} on {self.n} "
            f"{examples}"
        )


class MeanInterval(BaseModel):
    """One model's mean of `metric` over `n` examples, with its interval (exact for 0/1 values, else bootstrap)."""

    metric: str
    n: int
    mean: float
    low: float
    high: float
    confidence: float
    method: Literal["bootstrap", "exact"]


def is_binary(*values: Sequence[float]) -> bool:
    return all(value in (0.0, 1.0) for column in values for value in column)


def paired_difference(
    metric: str,
    candidate: Sequence[float],
    other: Sequence[float],
    *,
    confidence: float,
    seed: int = 0,
    versus: str = "champion",
    weights: Sequence[float] | None = None,
    resamples: int = RESAMPLES,
) -> PairedDifference:
    """The paired difference of `candidate` and `other`, aligned per example, with its `confidence` interval.

    `weights`: per-example weights of the mean (eval_loss: answer tokens); they make the 0/1 shortcut inapplicable.
    """
    import numpy as np

    if len(candidate) != len(other) or not len(candidate):
        raise ValueError(
            f"{metric}: {len(candidate)} candidate and {len(other)} {versus} values; need as many, at least one"
        )
    mine, theirs = np.asarray(candidate, dtype=float), np.asarray(other, dtype=float)
    per_example = theirs - mine if metric in LOWER_IS_BETTER else mine - theirs
    n = len(per_example)
    if weights is None and is_binary(mine, theirs):
        wins, losses = int((per_example > 0).sum()), int((per_example < 0).sum())
        low, high = exact_difference_interval(wins, losses, n, confidence)
        return PairedDifference(
            metric=metric,
            versus=versus,
            n=n,
            difference=(wins - losses) / n,
            low=low,
            high=high,
            confidence=confidence,
            method="exact",
            wins=wins,
            losses=losses,
        )
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    low, high = _bootstrap(per_example, w, confidence, seed, resamples)
    return PairedDifference(
        metric=metric,
        versus=versus,
        n=n,
        difference=float((per_example * w).sum() / w.sum()),
        low=low,
        high=high,
        confidence=confidence,
        method="bootstrap",
    )


def mean_interval(
    metric: str,
    values: Sequence[float],
    *,
    confidence: float,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    resamples: int = RESAMPLES,
) -> MeanInterval:
    """One model's mean with its interval: Clopper-Pearson for 0/1 values, else the percentile bootstrap."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if not len(x):
        raise ValueError(f"{metric}: no values")
    if weights is None and is_binary(x):
        low, high = clopper_pearson(int(x.sum()), len(x), confidence)
        return MeanInterval(
            metric=metric,
            n=len(x),
            mean=float(x.mean()),
            low=float(low),
            high=float(high),
            confidence=confidence,
            method="exact",
        )
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=float)
    low, high = _bootstrap(x, w, confidence, seed, resamples)
    return MeanInterval(
        metric=metric,
        n=len(x),
        mean=float((x * w).sum() / w.sum()),
        low=low,
        high=high,
        confidence=confidence,
        method="bootstrap",
    )


def clears(interval: PairedDifference, margin: float) -> bool:
    """The gate's rule: the interval's lower end is above `margin`. A positive margin: the candidate is better by
    more than it (superiority); 0 or negative: it is not worse than |margin| (non-inferiority), so at margin 0
    it must be shown better, and a candidate of equal quality passes at most (1 − confidence) / 2 of the time.
    Strictly above: "at least 0" would pass every candidate that answers as the champion does ([0, 0]), which on
    few examples is most equal ones (on 16 examples disagreeing on 10% of them, 0.9 ** 16 = 19%)."""
    return interval.low > margin + SLACK


def clopper_pearson(successes, trials, confidence: float):
    """The exact interval of a binomial proportion (vectorised over `successes`)."""
    import numpy as np
    from scipy.stats import beta

    k, d = np.asarray(successes), np.asarray(trials)
    tail = (1 - confidence) / 2
    low = np.where(k > 0, beta.ppf(tail, np.maximum(k, 1), d - k + 1), 0.0)
    high = np.where(k < d, beta.ppf(1 - tail, k + 1, np.maximum(d - k, 1)), 1.0)
    return low, high


def exact_difference_interval(wins: int, losses: int, n: int, confidence: float) -> tuple[float, float]:
    """The interval of the mean paired difference of a 0/1 metric from its discordant counts (see above)."""
    discordant = wins + losses
    if discordant == 0:
        return 0.0, 0.0
    p_low, p_high = clopper_pearson(wins, discordant, confidence)
    return float(discordant / n * (2 * p_low - 1)), float(discordant / n * (2 * p_high - 1))


def _bootstrap(per_example, weights, confidence: float, seed: int, resamples: int) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(per_example)
    weighted = per_example * weights
    means = np.empty(resamples)
    block = max(1, BLOCK // n)
    for start in range(0, resamples, block):
        picks = rng.integers(0, n, size=(min(block, resamples - start), n))
        means[start : start + len(picks)] = weighted[picks].sum(axis=1) / weights[picks].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def promotion_probability(
    n: int, discordant_share: float, true_difference: float, confidence: float, margin: float = 0.0
) -> float:
    """The chance that the gate passes a 0/1 metric's champion rule with `margin`, computed exactly: the models
    disagree on each of `n` examples with probability `discordant_share`, and the candidate is truly
    `true_difference` better (wins − losses per example, so |true_difference| <= discordant_share)."""
    import numpy as np
    from scipy.stats import binom

    if not abs(true_difference) <= discordant_share:
        raise ValueError(
            f"a true difference of {true_difference} needs at least as many discordant examples "
            f"(share {discordant_share})"
        )
    if discordant_share == 0:
        return float(margin + SLACK < 0)
    d = np.arange(n + 1)
    win_share = (discordant_share + true_difference) / (2 * discordant_share)
    fewest = _fewest_wins(n, confidence, margin)
    return float((binom.pmf(d, n, discordant_share) * binom.sf(fewest - 1, d, win_share)).sum())


@cache
def _fewest_wins(n: int, confidence: float, margin: float):
    """For d = 0..n discordant examples: the fewest wins whose exact interval clears `margin` (d + 1: none).

    The lower end grows with the wins, so all d are bisected at once."""
    import numpy as np

    d = np.arange(n + 1)
    low, high = np.zeros(n + 1, dtype=int), d + 1  # d + 1 stands for "none": the search ends there
    while (searching := low < high).any():
        middle = (low + high) // 2
        p_low, _ = clopper_pearson(np.minimum(middle, d), np.maximum(d, 1), confidence)
        end = np.where(d > 0, d / n * (2 * p_low - 1), 0.0)  # no discordant example: [0, 0]
        passes = (end > margin + SLACK) & (middle <= d)
        high = np.where(searching & passes, middle, high)
        low = np.where(searching & ~passes, middle + 1, low)
    return low


def detectable_difference(
    n: int, discordant_share: float, confidence: float, *, margin: float = 0.0, power: float = POWER
) -> float:
    """The smallest true difference of a 0/1 metric that the gate's champion rule with `margin` passes `power` of
    the time on `n` test examples when the models disagree on `discordant_share` of them; inf: none does, however
    good. At margin 0, the smallest gain the split can tell from noise.

    What the run plan warns with; the gate-power benchmark tabulates the same `promotion_probability`."""

    def promoted(difference: float) -> bool:
        return promotion_probability(n, discordant_share, difference, confidence, margin) >= power

    if n < 1 or not promoted(discordant_share):
        return math.inf
    low, high = -discordant_share, discordant_share
    while high - low > 1e-4:  # promotion grows with the true difference: bisect
        middle = (low + high) / 2
        low, high = (low, middle) if promoted(middle) else (middle, high)
    return high
