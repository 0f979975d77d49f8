"""Triton kernels and their launchers. Imports nothing from the packages above it."""

from ._version import __version__  # noqa: E402,F401
