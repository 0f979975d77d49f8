"""Triton kernels and their launchers. Imports nothing from the packages above it."""
