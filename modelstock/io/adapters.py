"""PEFT LoRA adapter folders (``adapter_config.json`` beside ``adapter_model.safetensors`` or
``adapter_model.bin``), read as factors rather than weights: for each weight of the base it
targets, B (m x r), A (r x n) and the scale s, so that the weight's update is s B A.

Knows nothing of the merge. What peft saves, and how it maps to the base's names:
  base_model.model.<module>.lora_A.weight            (r, in) or (r, in, *kernel)   Linear, Conv
  base_model.model.<module>.lora_B.weight            (out, r) or (out, r, 1, ...)
  base_model.model.<module>.lora_embedding_A         (r, num_embeddings)            Embedding
  base_model.model.<module>.lora_embedding_B         (embedding_dim, r)
each the update of ``<module>.weight``; s = lora_alpha / r, or lora_alpha / sqrt(r) with
``use_rslora`` (``alpha_pattern`` gives a module its own alpha; r is the factors' own rank).
Factors are returned as 2-D ``(bm, am)`` with ``update.reshape(shape[0], -1) = s bm @ am``:
for an embedding (weight = (B A)^T) and ``fan_in_fan_out`` (GPT-2's Conv1D) bm = A^T, am = B^T.

Anything that is not plain LoRA is refused in one line naming it (DoRA, LoRA biases, other
PEFT types such as IA3, LoHa, LoKr, ``modules_to_save`` tensors): the merge of such an adapter
is not the merge of these factors.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight|(?P<emodule>.+)\.(?P<ekind>lora_embedding_[AB])"
                  r"|(?P<bmodule>.+)\.base_layer\.(?P<param>weight|bias)")
# config entries that change what an adapter computes beyond s B A: refused when set
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "layer_replication": "layer_replication",
                "lora_bias": "LoRA biases (lora_bias)", "trainable_token_indices": "trainable_token_indices",
                "use_qalora": "QALoRA (use_qalora)", "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
                "target_parameters": "LoRA on parameters (target_parameters)"}


def is_adapter(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


@dataclass(frozen=True)
class Factors:
    """One targeted weight: its name in the base, the factors' names in the adapter file."""

    target: str      # the module path in the model ("model.layers.0.self_attn.q_proj")
    a: str
    b: str
    rank: int
    alpha: float
    scale: float
    layout: str      # "linear" (incl. conv), "embedding", "transposed" (fan_in_fan_out)


class Adapter:
    """An open LoRA adapter folder."""

    def __init__(self, path: str | os.PathLike):
        from . import open_checkpoint

        folder = Path(path)
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{CONFIG_NAME} is not readable JSON ({e})", str(path)) from None
        self._setup(config, None, str(path))
        weights = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
        if not weights:
            raise InputError(f"an adapter folder holds {' or '.join(WEIGHT_NAMES)}; this one has neither", self.path)
        self._setup(config, open_checkpoint(weights[0], files_only=True), str(path))

    @classmethod
    def from_source(cls, config: dict, source, name: str) -> "Adapter":
        """An adapter held elsewhere than a folder: its config and its saved-form tensors (a
        ``TensorSource``; peft's ``get_peft_model_state_dict`` of a live model)."""
        adapter = cls.__new__(cls)
        adapter._setup(config, None, name)
        adapter._setup(config, source, name)
        return adapter

    def _setup(self, config: dict, source, path: str) -> None:
        """The config checked first (a refused type is named before its tensors are read)."""
        self.path, self.config, self.source = path, config, source
        if source is None:
            self._check_config()
            return
        self.meta = source.tensors()  # {name: (dtype, shape)} of the factors, read once
        try:
            self.factors = self._pair_factors()
        except BaseException:
            source.close()
            raise

    # --- the config ---------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        kind = c.get("peft_type", "LORA")
        kind = str(getattr(kind, "value", kind)).upper()  # a live model's config holds peft's enum
        if kind != "LORA":
            raise InputError(f"a PEFT {kind} adapter: only LoRA adapters can be merged (their update is s B A)",
                             self.path)
        for key, what in _UNSUPPORTED.items():
            if c.get(key):
                raise InputError(f"a LoRA adapter with {what}: not supported (its update is not s B A)", self.path)
        if c.get("bias", "none") != "none":
            raise InputError(f"a LoRA adapter with trained biases (bias={c['bias']!r}): not supported", self.path)
        if c.get("modules_to_save"):
            raise InputError(f"a LoRA adapter with modules_to_save {c['modules_to_save']}: not supported (whole "
                             "modules saved beside the factors)", self.path)

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def _alpha(self, module: str) -> float:
        """lora_alpha for a module, or its entry in alpha_pattern (peft's matching: the pattern
        is the module name or a regex matching its end)."""
        for pattern, alpha in (self.config.get("alpha_pattern") or {}).items():
            if module == pattern or re.match(rf"(.*\.)?({pattern})$", module):
                return float(alpha)
        return float(self.config.get("lora_alpha", 8))

    def _pair_factors(self) -> dict[str, Factors]:
        pairs: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        self.base_copies: dict[str, str] = {}  # base tensor name -> the adapter's copy of it
        for name in self.meta:
            key = name[len(PREFIX):] if name.startswith(PREFIX) else name
            m = _KEY.fullmatch(key)
            if m is None:
                if "lora_magnitude_vector" in key:
                    raise InputError("a DoRA adapter (lora_magnitude_vector): not supported", self.path, name)
                raise InputError("is not a LoRA factor (lora_A, lora_B, lora_embedding_A/B): not supported",
                                 self.path, name)
            if m.group("bmodule"):  # the base's own weight, saved beside the factors (save_embedding_layers)
                self.base_copies[f"{m.group('bmodule')}.{m.group('param')}"] = name
                continue
            module = m.group("module") or m.group("emodule")
            side = (m.group("kind") or m.group("ekind"))[-1]
            if m.group("emodule"):
                embedding.add(module)
            pairs.setdefault(module, {})[side] = name
        shapes = self.meta
        out = {}
        rslora = bool(self.config.get("use_rslora"))
        transposed = bool(self.config.get("fan_in_fan_out"))
        for module, names in pairs.items():
            if set(names) != {"A", "B"}:
                raise InputError(f"holds lora_{'AB'.replace(''.join(names), '')} of this module but not its pair",
                                 self.path, next(iter(names.values())))
            a_shape, b_shape = shapes[names["A"]][1], shapes[names["B"]][1]
            rank = int(a_shape[0])
            if module in embedding:
                rank = int(b_shape[1])
            elif len(b_shape) < 2 or b_shape[1] != rank or any(k != 1 for k in b_shape[2:]):
                raise InputError(f"lora_B of shape {list(b_shape)} does not pair with lora_A of {list(a_shape)}",
                                 self.path, names["B"])
            alpha = self._alpha(module)
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            layout = "embedding" if module in embedding else ("transposed" if transposed else "linear")
            out[module] = Factors(module, names["A"], names["B"], rank, alpha, scale, layout)
        return out

    # --- the factors --------------------------------------------------------------------------
    def factors_2d(self, f: Factors, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(bm (m, r), am (r, n)) in ``dtype`` with the module's update, reshaped to (m, n) as
        the base's weight is, equal to ``f.scale * bm @ am``."""
        a = self._read(f.a, dtype)
        b = self._read(f.b, dtype)
        if f.layout == "embedding":   # weight (num_embeddings, dim) = (B A)^T = A^T B^T
            return a.T, b.T
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        if f.layout == "transposed":  # weight stored (in, out) = (B A)^T
            return a2.T, b2.T
        return b2, a2

    def raw(self, name: str) -> np.ndarray:
        """A factor as stored (its dtype, bfloat16 as bits)."""
        return self.source.read(name)

    def dtype_of(self, name: str) -> str:
        return self.meta[name][0]

    def _read(self, name: str, dtype) -> np.ndarray:
        from ..backends.numpy_ops import to_float

        stored, shape = self.meta[name]
        out = np.empty(shape, dtype=dtype)
        return to_float(self.source.read(name), stored, out)

    def files(self) -> list[str]:
        return [str(Path(self.path) / CONFIG_NAME), *self.source.files()]

    def close(self) -> None:
        self.source.close()


def target_weight(module: str, base_names) -> str | None:
    """The base tensor a module's factors update: ``<module>.weight`` under the base's names
    (``base_names``: canonical name -> the base's name)."""
    return base_names.get(f"{module}.weight")
