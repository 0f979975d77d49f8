"""The baselines the paper compares Model Stock with, as merge methods that need no statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import Coefficients, MergeMethod, fixed


@dataclass(frozen=True)
class Uniform(MergeMethod):
    """The uniform average of the fine-tuned models ("model soup"): c_i = 1 / N, i.e.
    w0 + mean_i(w_i - w0) = mean_i(w_i)."""

    name = "uniform"
    min_models = 1

    def coefficients(self, stats, n: int, rows: int) -> Coefficients:
        return Coefficients(fixed(1.0, rows))


@dataclass(frozen=True)
class WiseFT(MergeMethod):
    """WiSE-FT (Wortsman et al., CVPR 2022): one fine-tuned model interpolated with the base,
    w0 + alpha (w1 - w0); alpha = 0.5 is the paper's usual choice, 1 the fine-tuned model."""

    alpha: float = 0.5

    name = "wise_ft"
    min_models = 1
    max_models = 1

    def __post_init__(self):
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")

    def coefficients(self, stats, n: int, rows: int) -> Coefficients:
        return Coefficients(fixed(float(self.alpha), rows))

    def describe(self) -> dict:
        return {"method": self.name, "alpha": self.alpha}
