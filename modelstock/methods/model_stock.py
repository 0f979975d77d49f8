"""Model Stock as a merge method: c_i = t / N, t from the angle between the deltas (the Gram)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, require_two_finetuned
from ..ratio import EPS, ratio
from . import Coefficients, MergeMethod


@dataclass(frozen=True)
class ModelStock(MergeMethod):
    eps: float = EPS
    clamp: bool = True

    name = "model_stock"
    statistics = "gram"
    min_models = 2

    def check_count(self, n: int) -> None:
        require_two_finetuned(n)

    def coefficients(self, gram, n: int, rows: int) -> Coefficients:
        r = ratio(gram, eps=self.eps, clamp=self.clamp)
        return Coefficients(r.t, None, r)

    def undefined(self, layer_name: str) -> InputError:
        return InputError("the ratio is undefined: the mean cosine is -1/(N-1), where the authors' "
                          "formula divides by zero (merge with clamp on)", None, layer_name)

    def layer_stats(self, name: str, shape, c: Coefficients):
        from ..report import LayerStats

        return LayerStats.from_ratio(name, shape, c.figures)

    def describe(self) -> dict:
        return {"method": self.name, "clamp": self.clamp, "eps": self.eps}
