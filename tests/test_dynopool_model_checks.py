"""Checks a model with DynOPool2d layers makes for its user: a map made too small for a later
layer is an error naming the DynOPool2d (not that layer's own), and a state dict whose names
of one shared layer disagree is refused."""
import pytest
import torch
from torch import nn

from dynopool import DynOPool2d, read_sizes_once, replace_pooling
from dynopool.pool import remove_read_sizes_once


def small_net():
    # a 3x3 convolution without padding after the pool: it needs a 3x3 map
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.MaxPool2d(3, 2, ceil_mode=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_a_map_too_small_for_the_next_layer_names_the_dynopool_its_alpha_and_sizes():
    torch.manual_seed(0)
    net = small_net()
    report = replace_pooling(net, (1, 3, 32, 32))
    assert isinstance(net[1], DynOPool2d) and len(report) >= 1
    with torch.no_grad():
        net[1].alpha.fill_(8.0)
    net(torch.randn(1, 3, 32, 32))  # 32 / 8 = 4 cells: the conv takes them
    with pytest.raises(ValueError) as err:
        net(torch.randn(1, 3, 20, 24))  # 20 / 8 -> 2 cells: the 3x3 conv cannot
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("DynOPool2d '1'", "alpha=(8.0, 8.0)", "makes 2x3 maps", "'3'", "gets 2x3", "3x3 it needs"):
        assert part in msg, (part, msg)


def test_the_check_refuses_no_size_the_layers_take():
    # with and without the check the same sizes run or fail alike: the check's error comes
    # only where torch's own would (ceil-mode pooling, 'same' padding, padded windows take
    # small maps), and always instead of it
    torch.manual_seed(1)
    pool = DynOPool2d(2.0, 0.25)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool, nn.MaxPool2d(3, 2, ceil_mode=True),
                        nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                        nn.Conv2d(4, 4, 2))
    read_sizes_once(net)
    outcomes = []
    for size in (2, 3, 4, 5, 6, 8, 9, 12):
        got = []
        for with_check in (True, False):
            if not with_check:
                remove_read_sizes_once(net)
            try:
                net(torch.randn(1, 3, size, size))
                got.append("ok")
            except ValueError as e:  # the check's, and only with it
                assert with_check and "DynOPool2d '1'" in str(e)
                got.append("too small")
            except RuntimeError:  # torch's, and only without the check
                assert not with_check
                got.append("too small")
            if not with_check:
                read_sizes_once(net)
        outcomes.append(got)
        assert got[0] == got[1], (size, got)
    assert ["ok", "ok"] in outcomes and ["too small", "too small"] in outcomes


class Shared(nn.Module):
    """One DynOPool2d at two sites (as replace_pooling shares one per feature level)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        pool = DynOPool2d(2.0, 0.25)
        self.a, self.b = pool, pool

    def forward(self, x):
        x = self.stem(x)
        return self.a(x) + self.b(x)


def test_disagreeing_names_of_one_shared_layer_are_refused_in_one_line():
    model = nn.Sequential(Shared())
    for alpha in ([2.5, 1.5], [3.0, 2.0]):  # agreeing names load, each load on its own
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for key in ("0.a.alpha", "0.b.alpha"):
            state[key] = torch.tensor(alpha)
        model.load_state_dict(state)
        assert model[0].a.alpha.tolist() == alpha
    copy = nn.Sequential(Shared())
    copy.load_state_dict(model.state_dict())
    assert copy[0].a is copy[0].b and copy[0].a.alpha.tolist() == [3.0, 2.0]
    # a state dict with one of the names only (strict=False) is no conflict
    copy.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("0.b.")}, strict=False)
    # names that disagree: refused, whether the state dict is a copy or this model's own
    state = model.state_dict()
    assert {"0.a.alpha", "0.b.alpha"} <= set(state)
    bad = dict(state)
    bad["0.b.alpha"] = torch.tensor([3.0, 2.5])
    with pytest.raises(ValueError) as err:
        model.load_state_dict(bad)
    msg = str(err.value)
    assert "\n" not in msg and "'0.a.alpha'" in msg and "'0.b.alpha'" in msg and "[3.0, 2.5]" in msg
    bad = dict(state)
    bad["0.a.delta"] = torch.tensor([0.3, 0.25])
    with pytest.raises(ValueError, match="'0.a.delta' and '0.b.delta'"):
        model.load_state_dict(bad)
