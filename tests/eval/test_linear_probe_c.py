"""The linear probe's C: the best validation accuracy over the coarse grid and the finer sweep around
its best, the smallest C among ties, each accuracy checked against an independent cold-start fit."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from pipeline.evaluation.tasks.linear_probe import choose_c


def noisy_problem(seed: int = 0):
    """One informative feature among 30 noise features and 15% flipped labels: C matters both ways
    (tiny C predicts one class, huge C fits the noise)."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 31))
        x[:, 0] += 1.5 * (2 * y - 1)
        flip = rng.random(n) < 0.15
        return x, np.where(flip, 1 - y, y)

    return draw(60), draw(80)


def test_choose_c_takes_the_best_validation_accuracy_of_both_sweeps_smallest_on_ties():
    train, val = noisy_problem()
    c, accuracy = choose_c(train, val, max_iter=1000)

    def score(value):
        return LogisticRegression(C=value, max_iter=1000).fit(*train).score(*val)

    coarse = {float(v): score(v) for v in 10.0 ** np.arange(-6.0, 7.0, 2.0)}
    best_coarse = min(v for v, s in coarse.items() if s == max(coarse.values()))
    scores = {**coarse, **{float(v): score(v) for v in best_coarse * 10.0 ** np.array([-1.0, -0.5, 0.5, 1.0])}}
    assert accuracy == max(scores.values()) > scores[1e-6]  # better than predicting one class
    assert c == min(v for v, s in scores.items() if s == accuracy), (c, scores)
    assert 1e-6 < c < 1e6, scores
