"""DynOPool (Jang, Chu, Kim, Han, CVPR 2022): pooling whose output size and receptive field
are learned end to end.

    from dynopool import DynOPool2d, dynopool2d
    pool = DynOPool2d(alpha=2.0, delta=0.25)    # starts as 2x2 max pooling, then learns
"""
from .pool import DynOPool2d, dynopool2d

__all__ = ["DynOPool2d", "dynopool2d"]
