"""DynOPool (Jang, Chu, Kim, Han, CVPR 2022): pooling whose output size and receptive field
are learned end to end.

    from dynopool import DynOPool2d, ComputeCostLoss, replace_pooling, freeze
    pool = DynOPool2d(alpha=2.0, delta=0.25)     # starts as 2x2 max pooling, then learns
    print(replace_pooling(resnet, (1, 3, 224, 224)))  # stride-2 convs and pools -> DynOPool2d
    loss = task_loss + ComputeCostLoss(resnet, (1, 3, 224, 224), budget=1.5e9)()
    deployable = freeze(resnet, (1, 3, 224, 224))  # static sizes: torch.export, ONNX, TorchScript
"""
from msdp_kernels._version import __version__

from .cost import ComputeCostLoss, count_macs
from .freeze import FrozenDynOPool2d, freeze
from .pool import DynOPool2d, dynopool2d, plan_sizes, read_sizes_once
from .surgery import SurgeryReport, replace_pooling, restore_pooling, sizes
from .training import param_groups, split_parameters

__all__ = ["__version__", "DynOPool2d", "dynopool2d", "count_macs", "ComputeCostLoss", "replace_pooling",
           "SurgeryReport", "restore_pooling", "sizes",
           "plan_sizes", "read_sizes_once", "param_groups", "split_parameters", "freeze", "FrozenDynOPool2d"]
