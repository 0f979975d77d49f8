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

from dynopool import DynOPool2d, count_macs, replace_pooling, restore_pooling, sizes

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
    # pool first: every replaced conv runs on the pooled map, so the network costs what it did
    assert abs(report.macs_at_init / report.macs_original - 1) <= 0.05, str(report)
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

    # 3 plain SGD steps at lr 0.1 with every parameter in one group: the loss stays finite (the
    # drift that crashed timm's and torchvision's RegNets cannot happen: shared levels) and
    # alpha moves by a fraction of itself, inside its range (its gradient is the mean over the
    # layer's outputs: as the sum over them, one step moved it by tens and pinned it to a bound)
    model.zero_grad()
    before = [p.alpha.detach().clone() for p in pools(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.randint(0, 10, (2,), generator=g)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    for p, a in zip(pools(model), before):
        lo, hi = p.alpha_range
        assert lo < p.alpha.min() and p.alpha.max() < hi, (p, a)
        assert (p.alpha.detach() - a).abs().max() < 0.5, (p, a)


@pytest.fixture(scope="module")
def resnet18_surgery():
    original = torchvision.models.resnet18(weights=None).eval()
    model = copy.deepcopy(original)
    return original, model, replace_pooling(model, (1, 3, 224, 224))


def test_residual_levels_share_one_pool_and_the_summary_says_so(resnet18_surgery):
    _, model, report = resnet18_surgery
    block = model.layer2[0]
    # pool first: the shared DynOPool, then each conv at stride 1 on the pooled map
    assert block.conv1[1].stride == (1, 1) and block.conv1[0] is block.downsample[0][0]
    assert isinstance(block.conv1[0], DynOPool2d) and isinstance(model.maxpool, DynOPool2d)
    assert [p.sites for p in report.pools] == [
        ["conv1"], ["maxpool"], ["layer2.0.conv1", "layer2.0.downsample.0"],
        ["layer3.0.conv1", "layer3.0.downsample.0"], ["layer4.0.conv1", "layer4.0.downsample.0"]]
    assert [(p.input_size, p.output_size) for p in report.pools] == [
        ((224, 224), (112, 112)), ((112, 112), (56, 56)), ((56, 56), (28, 28)), ((28, 28), (14, 14)),
        ((14, 14), (7, 7))]
    text = str(report)
    assert "pool 2 (layer2.0.conv1.0): 56x56 -> 28x28, floor(H / alpha + 0.5) (W alike), drives layer2.0.conv1, " \
           "layer2.0.downsample.0" in text
    assert "layer2.0.downsample.0 (Conv2d 1x1 stride 2x2)" in text.split("changed function:")[1]
    assert "maxpool (MaxPool2d 3x3 stride 2x2)" in text.split("changed function:")[1]
    assert report.left == []


def test_cost_at_init_against_the_original(resnet18_surgery):
    # pool first: each replaced conv runs on the pooled map, so the network costs what the
    # original did; both figures are those of torch's own flop counter
    original, model, report = resnet18_surgery
    macs = []
    for net in (original, model):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(torch.zeros(1, 3, 224, 224))
        flops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        macs.append((flops["aten.convolution"] + flops["aten.addmm"]) // 2)
    assert report.macs_original == macs[0] and report.macs_at_init == macs[1]
    assert report.macs_at_init == int(count_macs(model, (1, 3, 224, 224)))
    assert abs(report.macs_at_init / report.macs_original - 1) < 0.05
    assert f"{report.macs_at_init / report.macs_original:.2f}x the original's" in str(report)


def test_conv_first_on_request_keeps_the_stride_1_conv_before_the_pool():
    original = torchvision.models.resnet18(weights=None).eval()
    model = copy.deepcopy(original)
    report = replace_pooling(model, (1, 3, 64, 64), placement="conv_first")
    block = model.layer2[0]
    assert block.conv1[0].stride == (1, 1) and block.conv1[1] is block.downsample[0][1]
    assert 1.45 < report.macs_at_init / report.macs_original < 1.6  # the convs at full resolution
    assert "(conv_first)" in str(report)
    assert_same_shapes(original, model, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="placement must be one of"):
        replace_pooling(copy.deepcopy(original), (1, 3, 64, 64), placement="after")


def test_pool_first_is_a_max_pool_then_the_conv_at_stride_1():
    # the function at init, against torch's own ops: a 3x3 / pad 1 stride-2 conv becomes
    # max_pool2d(x, 2) (even sizes) then the same weights at stride 1, pad 1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1))
    w, b = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    replace_pooling(net, (1, 3, 20, 18))
    x = torch.randn(2, 3, 20, 18)
    with torch.no_grad():
        want = nn.functional.conv2d(nn.functional.max_pool2d(net[0](x), 2), w, b, padding=1)
        torch.testing.assert_close(net(x), want)


def test_average_pooling_becoming_max_is_reported():
    model = torchvision.models.densenet121(weights=None)
    report = replace_pooling(model, (1, 3, 64, 64))
    changed = {s.name: s.change for s in report.changed_function}
    for t in (1, 2, 3):
        assert changed[f"features.transition{t}.pool"].startswith("average -> max")
    assert changed["features.conv0"].startswith("stride-2 conv -> a max over each 2x2 window (DynOPool) + the same "
                                                "conv at stride 1")
    assert changed["features.pool0"].startswith("k x k max pool at stride 2 -> DynOPool")
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
    """An Inception-style reduction: a stride-2 conv beside a 3x3 stride-2 average pool (not a
    site), concatenated; then an ordinary 2x2 pool."""

    def __init__(self, fixed=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fixed = fixed or nn.AvgPool2d(3, 2, padding=1)
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
    # refused at surgery time either way: no level moves alone, or the levels fail moving together
    with pytest.raises(ValueError, match=r"(no site can take a DynOPool2d whose alpha moves|fails when its DynOPool "
                                         r"levels move together)(.|\n)*learn_alpha=False"):
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to replace, but not a network without sites: no warning
        again = replace_pooling(copy.deepcopy(model), (1, 3, 64, 64))
    assert len(again.sites) == 0 and not again.pools
    twice = copy.deepcopy(model)
    replace_pooling(twice, (1, 3, 64, 64))
    assert len(twice._forward_pre_hooks) == 1 and len(pools(twice)) == 5  # the one size read per forward stays


def test_a_max_pool_beside_a_conv_shares_its_level_and_both_are_replaced():
    # the 3x3 stride-2 max pool of an Inception-style reduction is a site now: it and the conv
    # beside it take the same level with the same rule, so they share one DynOPool
    net = MeetsAFixedPath(nn.MaxPool2d(3, 2, padding=1))
    report = replace_pooling(net, (1, 3, 32, 32))
    assert sorted(s.name for s in report.sites) == ["branch", "fixed", "pool"]
    assert net.branch[0] is net.fixed and net.fixed.delta.tolist() == [0.5, 0.5]  # the widest window's
    with torch.no_grad():
        net.fixed.alpha.fill_(2.7)
    assert net(torch.randn(1, 3, 29, 33)).shape[-2:] == (5, 6)  # floor(floor(29 / 2.7 + 0.5) / 2)


THREE_BY_THREE = [("googlenet", dict(aux_logits=False, init_weights=False)),
                  ("inception_v3", dict(aux_logits=False, init_weights=False)),
                  ("squeezenet1_0", {}), ("alexnet", {})]


@pytest.mark.parametrize("name,kwargs", THREE_BY_THREE, ids=[n for n, _ in THREE_BY_THREE])
def test_three_by_three_stride_2_max_pools_are_replaced(name, kwargs):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs).eval()
    model = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inception: levels that meet F.max_pool2d in forward are left
        report = replace_pooling(model, (1, 3, 97, 131))
    def windows(net):  # GoogLeNet's branch pools (3x3 at stride 1) are not down-sampling
        return [n for n, m in net.named_modules() if isinstance(m, nn.MaxPool2d) and m.stride in (2, (2, 2))]

    assert windows(original) and {s.name for s in report.sites} >= set(windows(original))
    assert not windows(model)
    assert any(original.get_submodule(n).kernel_size in (3, (3, 3)) for n in windows(original))
    for n in windows(original):
        pool, k = model.get_submodule(n), original.get_submodule(n).kernel_size
        k = k if isinstance(k, int) else k[0]
        assert isinstance(pool, DynOPool2d) and pool.delta.tolist() == [(k - 1) / 4] * 2  # taps span the k pixels
        change = next(s for s in report.sites if s.name == n).change
        assert k == 2 or change.startswith("k x k max pool at stride 2")
    for h, w in ((97, 131), (100, 120)):
        assert_same_shapes(original, model, torch.randn(1, 3, h, w))


def test_restore_pooling_gives_back_the_original_modules_with_their_trained_weights():
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    model = copy.deepcopy(original)
    replace_pooling(model, (1, 3, 64, 64))
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 72)
    # untrained: the original back, exactly
    restore_pooling(model)
    assert not pools(model) and not model._forward_pre_hooks and not model._forward_hooks
    assert list(model.state_dict()) == list(original.state_dict())
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in original.named_modules()]
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    # trained after surgery (a copy, which restores by name): the trained weights, the original strides
    clone.train()
    opt = torch.optim.SGD(clone.parameters(), lr=0.05)
    nn.functional.cross_entropy(clone(x), torch.tensor([1, 2])).backward()
    opt.step()
    trained = clone.layer2[0].conv1[1].weight.detach().clone()
    restore_pooling(clone)
    assert clone.layer2[0].conv1.stride == (2, 2) and torch.equal(clone.layer2[0].conv1.weight, trained)
    fresh = torchvision.models.resnet18(weights=None, num_classes=10)
    fresh.load_state_dict(clone.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), clone.eval()(x))
    assert restore_pooling(clone) is clone  # nothing left to undo


def test_the_report_shows_the_sizes_and_cost_now():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    report = replace_pooling(model, (1, 3, 64, 64))
    assert " now " not in str(report)
    with torch.no_grad():
        model.layer2[0].conv1[0].alpha.copy_(torch.tensor([2.6, 3.1]))
    text = str(report)
    # 16 / 2.6 + 0.5 -> 6, 16 / 3.1 + 0.5 -> 5; layer3's pool: ceil(6 / 2), ceil(5 / 2)
    assert "pool 2 (layer2.0.conv1.0): 16x16 -> 8x8 at init, now 16x16 -> 6x5 (alpha 2.600, 3.100)" in text
    assert "pool 3 (layer3.0.conv1.0): 8x8 -> 4x4 at init, now 6x5 -> 3x3 (alpha 2.000, 2.000)" in text
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 64, 64))
    flops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    now = (flops["aten.convolution"] + flops["aten.addmm"]) // 2
    assert f"cost now: {now / 1e6:,.1f} M MACs, {now / report.macs_original:.2f}x" in text
    found = sizes(model, (1, 3, 64, 64))
    assert found["macs"] == now
    assert [(n, i, o) for n, _, i, o in found["calls"]][2:4] == [
        ("layer2.0.conv1.0", (16, 16), (6, 5)), ("layer2.0.conv1.0", (16, 16), (6, 5))]  # the shared pool, twice


class PoolsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(nn.functional.max_pool2d(self.a(x), 2))


def test_a_surgery_that_replaces_nothing_warns():
    with pytest.warns(UserWarning, match=r"replaced nothing(.|\n)*F.max_pool2d"):
        report = replace_pooling(PoolsInForward(), (1, 3, 16, 16))
    assert len(report) == 0
