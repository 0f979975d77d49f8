"""The error a user sees for a bad input, and the checks every entry point shares."""
from __future__ import annotations


class InputError(ValueError):
    """A bad input, named by where it came from (file or argument) and the tensor at fault."""

    def __init__(self, message: str, source: str | None = None, tensor: str | None = None):
        self.message, self.source, self.tensor = message, source, tensor
        where = [s for s in (source, f"tensor '{tensor}'" if tensor is not None else None) if s]
        super().__init__(": ".join(where + [message]))


class MergeWarning(UserWarning):
    """Something a merge did that the user may not have meant (a pattern that matched nothing);
    the command line prints each as one line."""


def require_two_finetuned(count: int) -> None:
    """Model Stock needs the base and at least two fine-tuned models: an angle needs two."""
    if count < 2:
        raise InputError(f"needs at least two fine-tuned checkpoints, got {count}")
