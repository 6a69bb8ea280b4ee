"""Linear probe: logistic regression on frozen image features (the CLIP paper's protocol).

The inverse regularisation C is chosen on a validation split carved from the training
features (a coarse sweep over powers of 100 from 1e-6 to 1e6, then a finer one around the best), the
classifier is refit on train + validation with that C and scored on the test features.
L-BFGS on a fixed split is deterministic. Works for every model with ``encode_image``
(SimCLR and MoCo included). Without a ``train`` dataset, the eval set itself is split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from pipeline.evaluation import metrics, plots
from pipeline.evaluation.datasets import DatasetConfig, EvalSet
from pipeline.evaluation.features import EvalContext
from pipeline.evaluation.task import TASKS, TaskConfig, TaskResult
from pipeline.evaluation.tasks.zeroshot_classification import labels_of
from pipeline.core.log import get_logger

log = get_logger(__name__)


def fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def sweep(train, val, grid: np.ndarray, max_iter: int) -> dict[float, float]:
    """Validation accuracy for each C of ``grid``, fit in increasing order, each fit starting
    from the previous solution (the regularisation path; about twice as fast, same order every run)."""
    probe = LogisticRegression(max_iter=max_iter, warm_start=True)
    return {float(c): probe.set_params(C=float(c)).fit(*train).score(*val) for c in np.sort(grid)}


def choose_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], max_iter: int) -> tuple[float, float]:
    """(best C, its validation accuracy); on ties the smaller C (stronger regularisation) wins."""
    scores = sweep(train, val, 10.0 ** np.arange(-6.0, 7.0, 2.0), max_iter)
    coarse = max(scores, key=scores.get)  # dicts keep the increasing order: the first best is the smallest C
    scores.update(sweep(train, val, coarse * 10.0 ** np.array([-1.0, -0.5, 0.5, 1.0]), max_iter))
    best = max(sorted(scores), key=scores.get)
    log.info("linear probe: C=%g (validation accuracy %.4f over %d values)", best, scores[best], len(scores))
    return best, scores[best]


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into its first ``fraction`` and the rest."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return order[:cut], order[cut:]


@TASKS.register("linear_probe")
class LinearProbe:
    @dataclasses.dataclass(kw_only=True)
    class Config(TaskConfig):
        train: DatasetConfig | None = None  # training images; None: split the eval set
        train_fraction: float = 0.5  # of the eval set used for training when `train` is None
        val_fraction: float = 0.2  # of the training features held out to choose C
        seed: int = 0
        max_iter: int = 1000

        def validate(self) -> None:
            if not (0 < self.val_fraction < 1 and 0 < self.train_fraction < 1):
                raise ValueError("train_fraction and val_fraction must be in (0, 1)")

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _features(self, ctx: EvalContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        def of(context: EvalContext) -> tuple[np.ndarray, np.ndarray]:
            images = context.images()
            return images["features"].numpy(), labels_of(images["records"], context.data.cfg.name).numpy()

        x, y = of(ctx)
        if self.cfg.train is None:
            fit_idx, test_idx = split(len(y), self.cfg.train_fraction, self.cfg.seed)
            (fit_x, fit_y), test = (x[fit_idx], y[fit_idx]), (x[test_idx], y[test_idx])
        else:
            (fit_x, fit_y), test = of(dataclasses.replace(ctx, data=EvalSet(self.cfg.train), _images=None)), (x, y)
        train_idx, val_idx = split(len(fit_y), 1.0 - self.cfg.val_fraction, self.cfg.seed)
        return {"train": (fit_x[train_idx], fit_y[train_idx]), "val": (fit_x[val_idx], fit_y[val_idx]), "test": test}

    def run(self, ctx: EvalContext) -> TaskResult:
        data = self._features(ctx)
        c, val_acc = choose_c(data["train"], data["val"], self.cfg.max_iter)
        train_x = np.concatenate([data["train"][0], data["val"][0]])
        train_y = np.concatenate([data["train"][1], data["val"][1]])
        probe = fit(train_x, train_y, c, self.cfg.max_iter)
        test_x, test_y = data["test"]
        logits = torch.full((len(test_y), int(max(train_y.max(), test_y.max())) + 1), -torch.inf)
        logits[:, probe.classes_] = torch.as_tensor(probe.predict_log_proba(test_x), dtype=torch.float32)
        labels = torch.as_tensor(test_y)
        result = {f"lp_{k}": v for k, v in metrics.classification(logits, labels).items()}
        result.update(lp_C=c, lp_val_acc1=val_acc, lp_train_samples=len(train_y), lp_test_samples=len(test_y))
        classnames = ctx.data.classnames if ctx.data.cfg.classnames else [str(i) for i in range(logits.shape[1])]
        return TaskResult(result, {"predictions": logits.argmax(1), "labels": labels, "classnames": classnames})

    def plot(self, result: TaskResult, prefix: str) -> list[str]:
        d = result.details
        return [plots.confusion_matrix(d["labels"], d["predictions"], d["classnames"], f"{prefix}_confusion.png")]
