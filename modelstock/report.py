"""The merge's per-layer figures: what the spec's "report" section lists, as JSON and a plot."""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .extras import require
from .ratio import Ratio


@dataclass
class LayerStats:
    name: str
    shape: list[int]
    numel: int
    kind: str                    # "merge" | "average" (excluded) | "copy" (non-float) | "base" (missing elsewhere)
    rows: int = 1                # ratios in this layer (granularity "row": one per row)
    norms: list[float] = field(default_factory=list)      # ||d_i|| over the whole tensor
    cos_pairs: list[float] = field(default_factory=list)  # cos_ij, i < j (mean over rows)
    cos: float | None = None     # mean cos after the clamp (mean over rows)
    angle_deg: float | None = None
    t: float | None = None       # the ratio (mean over rows)
    t_min: float | None = None
    t_max: float | None = None
    clamped: bool = False        # the [0, 1] clamp changed t (in any row)
    rows_clamped: int = 0
    differs: bool = False        # a non-float tensor that differed between the models (int_tensors policy)

    @classmethod
    def from_ratio(cls, name: str, shape, r: Ratio) -> "LayerStats":
        norms = (r.norms ** 2).sum(0) ** 0.5  # numpy or torch alike
        cos = float(r.cos.mean())
        # the angle between the updates is geometry: from the mean cos before the clamp (which
        # only decides t), so a layer whose updates point apart shows an angle above 90 degrees
        between = float(r.cos_pairs.mean())
        n_clamped = int(r.clamped.sum())
        return cls(
            name=name, shape=list(shape), numel=math.prod(shape), kind="merge", rows=len(r.t),
            norms=[float(x) for x in norms], cos_pairs=[float(x) for x in r.cos_pairs.mean(0)],
            cos=cos, angle_deg=math.degrees(math.acos(max(-1.0, min(1.0, between)))),
            t=float(r.t.mean()), t_min=float(r.t.min()), t_max=float(r.t.max()),
            clamped=n_clamped > 0, rows_clamped=n_clamped,
        )


@dataclass
class MergeReport:
    """Per-layer figures of one merge, plus what was merged and how long it took."""

    n: int = 0
    granularity: str = "tensor"
    clamp: bool = True
    eps: float = 1e-8
    inputs: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    int_tensors: str = "max"     # the policy for non-float tensors that differ (layer.INT_POLICIES)
    missing: str = "refuse"      # what was done with tensors some models lack (plan.MISSING)
    dropped: list[str] = field(default_factory=list)  # "source: name" of tensors the base lacks, left out
    method: str = "model_stock"  # the merge method (modelstock/methods); t is its scale (c_i = t w_i / N)

    # --- summaries -------------------------------------------------------------------------
    def merged_layers(self) -> list[LayerStats]:
        return [layer for layer in self.layers if layer.kind == "merge"]

    @property
    def parameters(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def by_depth(self, layers: list[LayerStats] | None = None) -> list[LayerStats]:
        """``layers`` (all by default) ordered by depth: ``layers.2`` before ``layers.10``
        (files store names sorted as text; state dicts in construction order)."""
        return sorted(self.layers if layers is None else layers, key=lambda layer: depth_key(layer.name))

    @property
    def clamped_layers(self) -> list[str]:
        return [layer.name for layer in self.by_depth() if layer.clamped]

    @property
    def ratio_outside_layers(self) -> list[str]:
        """The layers where t left [0, 1] (in any row; only without the clamp), by depth."""
        return [layer.name for layer in self._outside()]

    def _outside(self) -> list[LayerStats]:
        return [layer for layer in self.by_depth() if layer.kind == "merge" and layer.t_min is not None
                and (layer.t_min < 0 or layer.t_max > 1)]

    @property
    def differing_int_tensors(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.differs]

    @property
    def mean_angle_deg(self) -> float | None:
        """Mean angle between the fine-tuned deltas, weighted by each layer's size (None when
        the method computed no angles: uniform, WiSE-FT)."""
        merged = [m for m in self.merged_layers() if m.angle_deg is not None]
        total = sum(m.numel for m in merged)
        return sum(m.angle_deg * m.numel for m in merged) / total if total else None

    def summary(self) -> str:
        kinds = {k: sum(1 for layer in self.layers if layer.kind == k) for k in ("merge", "average", "copy", "base")}
        angle = self.mean_angle_deg
        moved = self.bytes_read + self.bytes_written
        differ = self.differing_int_tensors
        how = {"max": "given the largest value", "base": "given the base's"}.get(self.int_tensors, "")
        parts = [
            f"Merged {self.n} fine-tuned checkpoints into {', '.join(self.output) or 'memory'}: "
            f"{len(self.layers)} tensors ({self.parameters:,} values); "
            f"{kinds['merge']} merged ({self.granularity} granularity), {kinds['average']} excluded "
            f"(plain average), {kinds['copy']} non-float copied from the base.",
            f"{len(differ)} non-float tensor(s) differed between the models, {how}: {_first(differ)}."
            if differ else "",
            f"{kinds['base']} tensor(s) missing in some fine-tuned models taken from the base." if kinds["base"] else "",
            f"{len(self.dropped)} tensor(s) the base lacks left out: {_first(self.dropped)}." if self.dropped else "",
            f"Mean angle between fine-tuned updates {angle:.2f} deg." if angle is not None else "",
            self._clamp_summary(),
            f"{self.seconds:.2f} s, {moved / 1e9:.2f} GB read and written"
            + (f" ({moved / 1e9 / self.seconds:.2f} GB/s)." if self.seconds > 0 else "."),
        ]
        return " ".join(p for p in parts if p)

    def _clamp_summary(self) -> str:
        if self.clamp:
            return (f"The [0, 1] clamp acted on {len(self.clamped_layers)} layer(s)"
                    + (f": {_first(self.clamped_layers)}." if self.clamped_layers else "."))
        outside = self.ratio_outside_layers
        return ("No clamp (the authors' formula): t left [0, 1] in "
                + (f"{len(outside)} layer(s): {_first(outside)}." if outside else "no layer."))

    def warn_ratio_outside(self) -> None:
        """Without the clamp, a t outside [0, 1] extrapolates past the base or the fine-tuned
        average (t = -36456 where updates nearly cancel): one warning naming the layers."""
        import warnings

        from .errors import MergeWarning

        outside = self._outside()
        if self.clamp or not outside:
            return
        worst = ", ".join(f"{layer.name} (t = {layer.t_min if layer.t_min < 0 else layer.t_max:.4g})"
                          for layer in outside[:5])
        warnings.warn(f"without the clamp, the ratio t left [0, 1] in {len(outside)} layer(s), extrapolating "
                      f"past the base or the fine-tuned average: {worst}{' ...' if len(outside) > 5 else ''}",
                      MergeWarning, stacklevel=3)

    # --- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(method=self.method, layers=[asdict(layer) for layer in self.by_depth()], parameters=self.parameters,
                 mean_angle_deg=self.mean_angle_deg, clamped_layers=self.clamped_layers,
                 ratio_outside_layers=self.ratio_outside_layers, differing_int_tensors=self.differing_int_tensors)
        return d

    def write_json(self, path) -> None:
        """To ``path``, atomically (a temporary renamed into place), or into a binary file."""
        _write(path, json.dumps(self.to_dict(), indent=1, allow_nan=False).encode())

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> "MergeReport":
        d = json.loads(Path(path).read_text())
        layers = [LayerStats(**layer) for layer in d.pop("layers")]
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**fields, layers=layers)

    def plot(self, path) -> None:
        """Angle and ratio per merged layer, by depth, as the paper's layer-wise figures;
        layers where the clamp acted are marked. ``path`` as ``write_json``'s."""
        matplotlib = require("matplotlib", "the plot")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        merged = self.by_depth(self.merged_layers())
        x = range(len(merged))
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(merged) / 25), 6), sharex=True)
        ax1.plot(x, [m.angle_deg for m in merged], ".", ms=3)
        ax1.set_ylabel("angle between updates (deg)")
        ax1.axhline(90, color="0.7", lw=0.8)
        ax2.plot(x, [m.t for m in merged], ".", ms=3, color="C1", label="t")
        clamped = [i for i, m in enumerate(merged) if m.clamped]
        if clamped:
            ax2.plot(clamped, [merged[i].t for i in clamped], "x", color="C3", label="clamped")
        ax2.set_ylabel("ratio t")
        ticks, labels = layer_groups([m.name for m in merged])
        ax2.set_xticks(ticks, labels, rotation=90, fontsize="x-small")
        ax2.set_xlabel("layer, by block (by depth)")
        ax2.legend(loc="upper right", fontsize="small")
        fig.suptitle(f"Model Stock, N = {self.n}, {self.granularity} granularity: "
                     f"mean angle {self.mean_angle_deg or float('nan'):.1f} deg")
        fig.tight_layout()
        png = io.BytesIO()
        try:
            fig.savefig(png, dpi=120, format="png")
        finally:
            plt.close(fig)
        _write(path, png.getvalue())


def _write(path, data: bytes) -> None:
    """``path``: a binary file (a temporary the caller renames), or a path written atomically."""
    if hasattr(path, "write"):
        path.write(data)
    else:
        from .io.atomic import write_atomic

        write_atomic(path, data)


def layer_groups(names: list[str], most: int = 40) -> tuple[list[int], list[str]]:
    """Where each block of layers starts and its name, for a plot's x axis: a name up to its
    first number (``visual.transformer.resblocks.3``, ``model.layers.0``), or its first part
    (``token_embedding``); at most ``most`` labels, evenly thinned."""
    starts, labels = [], []
    for i, name in enumerate(names):
        m = re.match(r"(.*?\.\d+)(?:\.|$)", name)
        group = m.group(1) if m else name.split(".")[0]
        if not labels or labels[-1] != group:
            starts.append(i)
            labels.append(group)
    step = max(1, -(-len(starts) // most))
    return starts[::step], labels[::step]


def depth_key(name: str) -> tuple:
    """Sort key ordering names by the numbers in them: ``blocks.2.mlp`` before ``blocks.10.attn``
    (the text between numbers, then each number as a number)."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name)))


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")
