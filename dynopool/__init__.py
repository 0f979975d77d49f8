"""DynOPool (Jang, Chu, Kim, Han, CVPR 2022): pooling whose output size and receptive field
are learned end to end.

    from dynopool import DynOPool2d, ComputeCostLoss, replace_pooling
    pool = DynOPool2d(alpha=2.0, delta=0.25)     # starts as 2x2 max pooling, then learns
    replace_pooling(resnet)                      # stride-2 convs and 2x2 pools -> DynOPool2d
    loss = task_loss + ComputeCostLoss(resnet, (1, 3, 224, 224), budget=1.5e9)()
"""
from .cost import ComputeCostLoss, count_macs
from .pool import DynOPool2d, dynopool2d, plan_sizes, read_sizes_once
from .surgery import replace_pooling
from .training import param_groups

__all__ = ["DynOPool2d", "dynopool2d", "count_macs", "ComputeCostLoss", "replace_pooling", "plan_sizes",
           "read_sizes_once", "param_groups"]
