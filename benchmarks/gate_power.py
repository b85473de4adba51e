"""Gate power: how often the gate promotes a candidate of known true quality over the champion, by test-set size
and by the share of examples on which the two models disagree.

Each trial draws per-example outcomes of a candidate and a champion on n test examples and decides the champion
rule at the defaults (margin 0, gate.confidence 0.95) with the gate's own functions: `paired_difference` and
`clears`, what `tunepipe.tasks.evaluate.gate.decide` runs for each metric (tests/test_gate.py checks that they agree).

- A 0/1 metric (exact match): on each example the models disagree with probability `share`; a disagreement is
  a win of the candidate with probability (share + truth) / (2 share), so the candidate is truly `truth` better
  (−0.02: two points worse). Beside the simulated rate, the exact probability (`promotion_probability`, which
  the run plan's warning uses); and, on the same test sets, the rule before intervals (mean not lower).
- A continuous metric (field accuracy over 4 fields; each field disagrees with probability 0.2, the same way),
  decided by the paired bootstrap: fewer trials, and 2,000 resamples per decision instead of the gate's 10,000
  so it runs in about a minute on 2 cores (the percentile ends move by about a thousandth).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gate_power.py [--trials 2000] [--continuous-trials 400]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tunepipe.tasks.evaluate.paired import clears, detectable_difference, paired_difference, promotion_probability

SIZES = (16, 50, 100, 200, 500)
SHARES = (0.1, 0.2, 0.3)
TRUTHS = (0.0, -0.02, -0.05, 0.05)
CONFIDENCE, MARGIN = 0.95, 0.0  # the defaults: gate.confidence, and the champion margin of a metric with a rule
FIELDS, FIELD_RIGHT = 4, 0.8  # the continuous metric: fields per example; chance an agreed field is right
BOOTSTRAP_RESAMPLES = 2_000


def outcomes(rng, shape: tuple[int, ...], share: float, truth: float) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, champion) 0/1 outcomes with `share` disagreements and the candidate `truth` better."""
    u = rng.random(shape)
    win, loss = u < (share + truth) / 2, (u >= (share + truth) / 2) & (u < share)
    agreed_right = rng.random(shape) < FIELD_RIGHT
    candidate = np.where(win, 1.0, np.where(loss, 0.0, agreed_right))
    champion = np.where(win, 0.0, np.where(loss, 1.0, agreed_right))
    return candidate, champion


def promoted(candidate: np.ndarray, champion: np.ndarray, metric: str, resamples: int = 10_000) -> bool:
    interval = paired_difference(metric, candidate, champion, confidence=CONFIDENCE, resamples=resamples)
    return clears(interval, MARGIN)


def binary_rates(trials: int, rng) -> dict[tuple[float, float, int], tuple[float, float, float]]:
    """(truth, share, n) -> (simulated promotion rate, exact probability, the rate of the rule before intervals:
    the candidate's mean not below the champion's)."""
    rates = {}
    for truth in TRUTHS:
        for share in SHARES:
            for n in SIZES:
                candidate, champion = outcomes(rng, (trials, n), share, truth)
                hits = sum(promoted(c, o, "exact_match") for c, o in zip(candidate, champion))
                on_means = np.mean(candidate.mean(axis=1) >= champion.mean(axis=1))
                rates[truth, share, n] = (
                    hits / trials,
                    promotion_probability(n, share, truth, CONFIDENCE, MARGIN),
                    on_means,
                )
    return rates


def continuous_rates(trials: int, rng, share: float = 0.2) -> dict[tuple[float, int], float]:
    rates = {}
    for truth in TRUTHS:
        for n in SIZES:
            candidate, champion = outcomes(rng, (trials, n, FIELDS), share, truth)
            hits = sum(
                promoted(c, o, "field_accuracy", BOOTSTRAP_RESAMPLES)
                for c, o in zip(candidate.mean(axis=2), champion.mean(axis=2))
            )
            rates[truth, n] = hits / trials
    return rates


def describe(truth: float) -> str:
    return "equal" if truth == 0 else f"{truth * 100:+.0f} points"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--continuous-trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    started = time.perf_counter()
    binary = binary_rates(args.trials, rng)
    binary_s = time.perf_counter() - started
    header = "| true difference | disagree on | " + " | ".join(f"n = {n}" for n in SIZES) + " |"
    print(f"## 0/1 metric (exact match): promoted, simulated over {args.trials} test sets (exact probability)\n")
    print(header + "\n|---|---:|" + "---:|" * len(SIZES))
    for truth in TRUTHS:
        for share in SHARES:
            cells = [f"{binary[truth, share, n][0]:.1%} ({binary[truth, share, n][1]:.1%})" for n in SIZES]
            print(f"| {describe(truth)} | {share:.0%} | " + " | ".join(cells) + " |")

    print("\n## The rule before intervals (mean not below the champion's), the same test sets\n")
    print(header + "\n|---|---:|" + "---:|" * len(SIZES))
    for truth in TRUTHS:
        for share in SHARES:
            cells = [f"{binary[truth, share, n][2]:.1%}" for n in SIZES]
            print(f"| {describe(truth)} | {share:.0%} | " + " | ".join(cells) + " |")

    started = time.perf_counter()
    continuous = continuous_rates(args.continuous_trials, rng)
    continuous_s = time.perf_counter() - started
    print(
        f"\n## field accuracy over {FIELDS} fields, each disagreeing on 20%: promoted, simulated over "
        f"{args.continuous_trials} test sets (paired bootstrap, {BOOTSTRAP_RESAMPLES} resamples)\n"
    )
    print("| true difference | " + " | ".join(f"n = {n}" for n in SIZES) + " |\n|---|" + "---:|" * len(SIZES))
    for truth in TRUTHS:
        print(f"| {describe(truth)} | " + " | ".join(f"{continuous[truth, n]:.1%}" for n in SIZES) + " |")

    print("\n## The smallest true gain promoted 80% of the time (0/1 metric; what `tunepipe check` warns with)\n")
    print("| disagree on | " + " | ".join(f"n = {n}" for n in SIZES) + " |\n|---:|" + "---:|" * len(SIZES))
    for share in SHARES:
        cells = [detectable_difference(n, share, CONFIDENCE) for n in SIZES]
        print(f"| {share:.0%} | " + " | ".join("none" if d == float("inf") else f"{d:+.3f}" for d in cells) + " |")

    worst_binary = max(binary[t, s, n][0] for t in (0.0, -0.02) for s in SHARES for n in SIZES)
    worst_exact = max(binary[t, s, n][1] for t in (0.0, -0.02) for s in SHARES for n in SIZES)
    worst_continuous = max(continuous[t, n] for t in (0.0, -0.02) for n in SIZES)
    print(
        f"\nTarget: equal or 2 points worse promoted at most 5% of the time. Highest rate: 0/1 simulated "
        f"{worst_binary:.1%} (exact {worst_exact:.1%}), field accuracy {worst_continuous:.1%}: "
        f"{'met' if max(worst_binary, worst_exact, worst_continuous) <= 0.05 else 'NOT met'}."
    )
    print(f"Time: 0/1 {binary_s:.1f} s, field accuracy {continuous_s:.1f} s.")


if __name__ == "__main__":
    main()
