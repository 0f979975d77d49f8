"""One probing forward pass of a model: what count_macs, replace_pooling and freeze use to see
sizes. Eval mode (no running-statistics updates), the hooks removed and the mode restored
whatever happens."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def example_tensor(model: nn.Module, example, requires_grad: bool = False) -> Tensor:
    """``example`` as it is if it is a tensor; a shape (batch included) as zeros on the model's
    device, in its floating dtype."""
    if isinstance(example, Tensor):
        return example
    param = next(model.parameters(), None)
    return torch.zeros(tuple(example), device=param.device if param is not None else None,
                       dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32,
                       requires_grad=requires_grad)


def run(model: nn.Module, x: Tensor, handles=(), grad: bool = False):
    """model(x) in eval mode, with autograd on or off; removes ``handles`` afterwards."""
    training = model.training
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            return model(x)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
