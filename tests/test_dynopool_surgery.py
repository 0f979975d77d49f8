"""replace_pooling on the CNNs people use (torchvision, timm; random weights, offline): the
spec's two rules (same shapes as the original at init, at 224 px and at an odd size; sizes that
meet stay agreed whatever alpha does), the summary it gives, and what it leaves or refuses.

Cost on 2 CPU cores: the surgery takes 97 x 131 as its example (its own checks run there and at
99 x 135); this file's shape checks run forward only, batch 1, at 224 and at 97 x 131 (the
issue's sizes); the random-alpha forward/backward and the SGD steps run at 64 x 72, batch 2
(batch norm in training mode needs 2 values per channel where a map has shrunk to 1 x 1)."""
import copy
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynopool import DynOPool2d, count_macs, replace_pooling

timm = pytest.importorskip("timm")

NETWORKS = [("torchvision", n) for n in ("resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0",
                                         "densenet121", "convnext_tiny", "regnet_x_400mf", "shufflenet_v2_x1_0")] + \
           [("timm", n) for n in ("resnet18", "regnetx_002", "efficientnet_b0", "resnetv2_50")]


def build(lib, name):
    torch.manual_seed(0)
    if lib == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def shapes_by_name(model, x):
    """{module name: [(input shapes, output shape) per call]} for every named module, and the
    model's output shape. Written apart from the surgery's own check (which goes by identity)."""
    seen = {}

    def record(name):
        def hook(module, args, output):
            ins = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            outs = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            seen.setdefault(name, []).append((ins, outs))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, tuple(out.shape)


def assert_same_shapes(original, surgical, x):
    want, want_out = shapes_by_name(original, x)
    got, got_out = shapes_by_name(surgical, x)
    assert got_out == want_out
    modules = dict(surgical.named_modules(remove_duplicate=False))
    for name, calls in want.items():
        assert name in modules, name
        # a pool site is now a DynOPool that may serve several sites: what it produced is
        # checked as the next module's input
        if not isinstance(modules[name], DynOPool2d):
            assert got.get(name) == calls, f"{name}: {calls[:1]} -> {got.get(name, [])[:1]}"


def pools(model):
    return list(dict.fromkeys(m for m in model.modules() if isinstance(m, DynOPool2d)))


@pytest.mark.parametrize("lib,name", NETWORKS, ids=[f"{lib}-{n}" for lib, n in NETWORKS])
def test_surgery_keeps_shapes_and_trains_with_alphas_anywhere(lib, name):
    original = build(lib, name).eval()
    model = copy.deepcopy(original)
    report = replace_pooling(model, (1, 3, 97, 131))  # its own checks: there and at 99 x 135
    assert len(report.sites) >= 3 and report.pools, str(report)
    assert {id(p.module) for p in report.pools} == {id(p) for p in pools(model)}
    # same sizes as the original at init, at 224 and at an odd, non-square size
    for h, w in ((224, 224), (97, 131)):
        assert_same_shapes(original, model, torch.randn(1, 3, h, w))

    # every alpha moved at random in [1.2, 3.5]: forward and backward run (at 64 x 72)
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pools(model):
            p.alpha.copy_(torch.empty(2).uniform_(1.2, 3.5, generator=g))
    x = torch.randn(2, 3, 64, 72, generator=g)
    model(x).square().mean().backward()
    assert all(p.alpha.grad is not None and torch.isfinite(p.alpha.grad).all() for p in pools(model))

    # a few SGD steps with every parameter in one group stay finite (the drift that crashed
    # timm's and torchvision's RegNets within 3-8 steps cannot happen: shared levels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    y = torch.randint(0, 10, (2,), generator=g)
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.alpha).all() for p in pools(model))


@pytest.fixture(scope="module")
def resnet18_surgery():
    original = torchvision.models.resnet18(weights=None).eval()
    model = copy.deepcopy(original)
    return original, model, replace_pooling(model, (1, 3, 224, 224))


def test_residual_levels_share_one_pool_and_the_summary_says_so(resnet18_surgery):
    _, model, report = resnet18_surgery
    block = model.layer2[0]
    assert block.conv1[0].stride == (1, 1) and block.conv1[1] is block.downsample[0][1]
    assert [p.sites for p in report.pools] == [
        ["conv1"], ["layer2.0.conv1", "layer2.0.downsample.0"], ["layer3.0.conv1", "layer3.0.downsample.0"],
        ["layer4.0.conv1", "layer4.0.downsample.0"]]
    assert [(p.input_size, p.output_size) for p in report.pools] == [
        ((224, 224), (112, 112)), ((56, 56), (28, 28)), ((28, 28), (14, 14)), ((14, 14), (7, 7))]
    text = str(report)
    assert "pool 1 (layer2.0.conv1.1): 56x56 -> 28x28, floor(H / alpha + 0.5) (W alike), drives layer2.0.conv1, " \
           "layer2.0.downsample.0" in text
    assert "layer2.0.downsample.0 (Conv2d 1x1 stride 2x2)" in text.split("changed function:")[1]
    assert report.left == [("maxpool", "MaxPool2d 3x3 stride 2x2: only 2x2 windows at stride 2 and stride-2 "
                                       "convolutions are replaced")]


def test_cost_at_init_against_the_original(resnet18_surgery):
    # the stride-1 convs cost more than the original at init: the summary says by how much,
    # and its two figures are those of torch's own flop counter
    original, model, report = resnet18_surgery
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        original(torch.zeros(1, 3, 224, 224))
    flops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert report.macs_original == (flops["aten.convolution"] + flops["aten.addmm"]) // 2
    assert report.macs_at_init == int(count_macs(model, (1, 3, 224, 224)))
    assert 1.50 < report.macs_at_init / report.macs_original < 1.52
    assert f"{report.macs_at_init / report.macs_original:.2f}x the original's" in str(report)


def test_average_pooling_becoming_max_is_reported():
    model = torchvision.models.densenet121(weights=None)
    report = replace_pooling(model, (1, 3, 64, 64))
    changed = {s.name: s.change for s in report.changed_function}
    for t in (1, 2, 3):
        assert changed[f"features.transition{t}.pool"].startswith("average -> max")
    assert changed["features.conv0"].startswith("stride-2 conv -> the same conv at stride 1 + a max")
    assert "average -> max" in str(report)


def test_max_pool_sites_keep_their_function_and_floor_rule():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 21, 19)
    want = net[2](net[1](net[0](x)))
    report = replace_pooling(net, (1, 3, 21, 19))
    assert [s.change for s in report.sites][0] is None  # max pool -> DynOPool at alpha 2: a max pool
    assert net[1].size_rule() == "floor(H / alpha) (W alike)"  # floor mode: 21 -> 10
    assert net[3].size_rule() == "floor(H / alpha + 0.5) (W alike)"  # ceil mode: 10 -> 5, 9 -> 5
    assert net(x).shape[-2:] == (5, 5)
    with torch.no_grad():
        x_even = torch.randn(1, 3, 20, 18)
        torch.testing.assert_close(net[1](net[0](x_even)), nn.functional.max_pool2d(net[0](x_even), 2), rtol=0, atol=0)
    assert want.shape == net[2](net[1](net[0](x))).shape


class MeetsAFixedPath(nn.Module):
    """An Inception-style reduction: a stride-2 conv beside a 3x3 stride-2 max pool (not a site),
    concatenated; then an ordinary 2x2 pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fixed = nn.MaxPool2d(3, 2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.pool(torch.cat([self.branch(x), self.fixed(x)], 1)))


def test_a_site_whose_maps_meet_a_fixed_path_is_left_with_a_warning():
    net = MeetsAFixedPath()
    with pytest.warns(UserWarning, match="branch: its level's alpha cannot move"):
        report = replace_pooling(net, (1, 3, 32, 32))
    assert [s.name for s in report.sites] == ["pool"] and isinstance(net.branch, nn.Conv2d)
    assert ("branch", next(why for n, why in report.left if n == "branch")) in report.left
    with torch.no_grad():
        net.pool.alpha.fill_(2.7)
    assert net(torch.randn(1, 3, 32, 32)).shape[-2:] == (5, 5)  # floor(16 / 2.7)


def test_excluded_sites_are_left():
    net = MeetsAFixedPath()
    report = replace_pooling(net, (1, 3, 32, 32), exclude=["bra*"])
    assert ("branch", "excluded") in report.left and [s.name for s in report.sites] == ["pool"]


def test_a_network_whose_sizes_cannot_move_is_refused_and_restored():
    # open_clip's ModifiedResNet: its attention pool is built for a 7 x 7 grid, so no alpha can
    # move without breaking it. Refused at surgery time (the model as it was), not at step n;
    # learn_alpha=False replaces the sites and learns delta only.
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    # RN50's tower at a quarter of its width and 64 px (a 2 x 2 grid for its attention pool)
    tower = open_clip.model.ModifiedResNet(layers=(3, 4, 6, 3), output_dim=64, heads=2, image_size=64, width=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = tower(x)
    keys = list(tower.state_dict())
    with pytest.raises(ValueError, match=r"no site can take a DynOPool2d whose alpha moves(.|\n)*learn_alpha=False"):
        replace_pooling(tower, x)
    assert list(tower.state_dict()) == keys and not pools(tower)
    with torch.no_grad():
        assert torch.equal(tower(x), before)
    report = replace_pooling(tower, x, learn_alpha=False)
    assert len(report.sites) == 8 and len(report.pools) == 5
    assert tower.layer2[0].avgpool is tower.layer2[0].downsample[0]  # one level, one pool ("-1" is first)
    assert all(not p.alpha.requires_grad and p.delta.requires_grad for p in pools(tower))
    with torch.no_grad():
        assert tower(x).shape == before.shape


def test_a_second_surgery_finds_nothing_and_keeps_the_first(resnet18_surgery):
    _, model, _ = resnet18_surgery
    again = replace_pooling(copy.deepcopy(model), (1, 3, 64, 64))
    assert len(again.sites) == 0 and not again.pools
    twice = copy.deepcopy(model)
    replace_pooling(twice, (1, 3, 64, 64))
    assert len(twice._forward_pre_hooks) == 1 and len(pools(twice)) == 4  # the one size read per forward stays
