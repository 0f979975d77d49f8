"""The usual optimizer recipe for a network with DynOPool layers: the pooling parameters in a
group of their own, without weight decay (decay would pull alpha towards 0, i.e. towards
upsampling) and with their own learning rate."""
from __future__ import annotations

from torch import nn

from .pool import DynOPool2d


def param_groups(model: nn.Module, *, lr: float, weight_decay: float = 0.0, pool_lr_scale: float = 0.01,
                 pool_weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for any torch optimizer: ``[{"params": the rest, "lr": lr,
    "weight_decay": weight_decay}, {"params": every DynOPool2d's alpha and delta, "lr":
    pool_lr_scale * lr, "weight_decay": pool_weight_decay}]``. Shared layers are listed once,
    frozen parameters not at all.

    Why 0.01: with the spec's gradient (``DynOPool2d(grad_scale="sum")``) alpha's and delta's
    gradients are sums over every output of the layer (tens at initialisation in a ResNet-18
    on 32 px images, against ~0.01-1 per weight), so at the network's learning rate one SGD
    step would move the output size by whole cells. With the default ``grad_scale="mean"``
    (the mean over the outputs) one group at the network's rate trains too
    (``pool_lr_scale=1.0``, or ``model.parameters()`` as they are); 0.01 stays the default so
    that runs set up with it move alpha more slowly than the weights.

        opt = torch.optim.SGD(dynopool.param_groups(model, lr=0.1, weight_decay=1e-4), lr=0.1, momentum=0.9)
    """
    rest, pool = split_parameters(model)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if pool:
        groups.append({"params": pool, "lr": pool_lr_scale * lr, "weight_decay": pool_weight_decay})
    return groups


def split_parameters(model: nn.Module) -> tuple[list, list]:
    """(the network's trainable parameters, every DynOPool2d's trainable alpha and delta), each
    shared parameter once: for a separate optimizer on the pooling parameters, the recipe
    that lands on a cost budget (docs/dynopool.md):

        weights, pools = dynopool.split_parameters(model)
        opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=1e-4)
        pool_opt = torch.optim.Adam(pools, lr=0.01)  # steps of ~0.01 in alpha whatever the gradients' scale
    """
    pool_ids = {id(p) for m in model.modules() if isinstance(m, DynOPool2d) for p in (m.alpha, m.delta)}
    pool, rest = [], []
    for p in model.parameters():  # each shared parameter once
        if p.requires_grad:
            (pool if id(p) in pool_ids else rest).append(p)
    return rest, pool
