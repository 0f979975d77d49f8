"""Sizes in bytes as users write them: ``2GB``, ``500MiB``, ``5e9`` (this package's options) and
mergekit's ``5B`` / ``500M`` / ``200K`` (thousand, million, billion)."""
from __future__ import annotations

_UNITS = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(size: int | str | None, what: str = "size") -> int | None:
    """Bytes from an int or a size such as "2GB", "500MiB", "5e9"; ValueError naming ``what``."""
    if size is None or isinstance(size, int):
        return size
    s = str(size).strip().upper().removesuffix("B")
    try:
        for suffix in sorted(_UNITS, key=len, reverse=True):
            if s.endswith(suffix):
                return int(float(s[: -len(suffix)]) * _UNITS[suffix])
        return int(float(s))
    except ValueError:
        raise ValueError(f"{what}: {size!r} is not a size like 2GB, 500MiB or 1000000") from None


def parse_kmb(size: str, what: str = "--out-shard-size") -> int:
    """mergekit's sizes: K, M, B for thousand, million, billion (bytes)."""
    s = str(size).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if scale != 1 else s) * scale)
    except ValueError:
        raise ValueError(f"{what}: {size!r} is not a size like 5B, 500M or 200K") from None
