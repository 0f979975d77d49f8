"""Saving and deploying a DynOPool network: whole-model save and pickle, ``freeze`` (static
sizes) and what a static graph then takes: torch.export, ONNX (both exporters, the file run in
onnxruntime), TorchScript (trace, script), compile(fullgraph=True). The unfrozen model's
exports fail with one error that names freeze.

Truth for the frozen outputs: the trained model evaluated in fp64 (the reference path). The
frozen fp32 model may be as far from it as PyTorch's own fp32 evaluation of the trained model,
times 4 for a different order of the same roundings."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dynopool import DynOPool2d, FrozenDynOPool2d, freeze, param_groups, replace_pooling

from .helpers import DEVICE, assert_within

SIZE = (56, 72)  # non-square: h and w take different alphas and sizes


def pools(model):
    return list(dict.fromkeys(m for m in model.modules() if isinstance(m, DynOPool2d)))


@pytest.fixture(scope="module")
def trained():
    """A ResNet-18 after surgery, a few SGD steps (weights, BN statistics, delta moved), then
    every alpha set apart (h != w), in eval mode; and an input batch."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    replace_pooling(model, (1, 3, *SIZE))
    opt = torch.optim.SGD(param_groups(model, lr=0.05), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(4, 3, *SIZE, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i, p in enumerate(pools(model)):
            p.alpha.copy_(torch.tensor([1.7 + 0.2 * i, 2.4 - 0.15 * i]))
    model.eval()
    return model, torch.randn(2, 3, *SIZE, generator=g)


@pytest.fixture(scope="module")
def frozen(trained):
    model, x = trained
    return freeze(model, x)


@pytest.fixture(scope="module")
def truth(trained):
    """(fp32 eager output, fp64 output, the fp32 output's distance from the fp64 one)."""
    model, x = trained
    with torch.no_grad():
        out = model(x)
        out64 = copy.deepcopy(model).double()(x.double())
    return out, out64, float((out.double() - out64).abs().max())


def assert_like_fp32(got, truth, what):
    _, out64, err32 = truth
    assert_within(torch.as_tensor(got), out64, 4 * err32, what)


def test_frozen_model_equals_the_trained_one(trained, frozen, truth):
    model, x = trained
    assert not pools(frozen) and pools(model)  # a copy: the trained model keeps its DynOPools
    layers = [m for m in frozen.modules() if isinstance(m, FrozenDynOPool2d)]
    assert len(layers) == 5 and frozen.layer2[0].conv1[0] is frozen.layer2[0].downsample[0][0]  # still shared
    assert layers[1].output_size == pools(model)[1].output_size(*layers[1].input_size)
    assert not frozen._forward_pre_hooks and not frozen._forward_hooks  # no size read left
    with torch.no_grad():
        assert_like_fp32(frozen(x), truth, "frozen")
        with pytest.raises(ValueError, match="frozen for 56x72 inputs"):  # the first pool: after conv1
            layers[0](torch.randn(1, 64, 30, 36))


@pytest.mark.parametrize("alpha,delta,shape", [((1.7, 2.3), (0.31, 0.18), (2, 3, 11, 9)),
                                               ((0.73, 1.31), (0.21, 0.43), (1, 2, 5, 7)),
                                               ((2.6, 3.1), (0.9, 1.4), (2, 2, 13, 12))])
def test_frozen_layer_is_the_same_operator(alpha, delta, shape):
    torch.manual_seed(3)
    x = torch.randn(shape)
    pool = DynOPool2d(alpha, delta, delta_range=(0.0, 2.0), size_offset=(0.5, 0.0))
    want = pool(x)
    layer = FrozenDynOPool2d.from_pool(pool, shape[-2:])
    # two bilinear mixes in another order than the reference's matrix product: a few fp32
    # roundings of the input's magnitude
    assert_within(layer(x), want, 4 * torch.finfo(torch.float32).eps * x.abs().max(), "frozen layer")
    # at alpha 2, delta 1/4 on even sizes every tap weight is 0 or 1: max pooling, exactly
    even = torch.randn(2, 3, 10, 14)
    assert torch.equal(FrozenDynOPool2d.from_pool(DynOPool2d(), (10, 14))(even), F.max_pool2d(even, 2))


def test_freeze_takes_the_last_input_size_or_asks_for_an_example():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), DynOPool2d(1.7, 0.3))
    with pytest.raises(ValueError, match="example_input"):
        freeze(net)
    x = torch.randn(1, 1, 12, 10)
    want = net(x)
    assert torch.allclose(freeze(net)(x), want, rtol=0, atol=1e-6)
    assert freeze(net, (1, 1, 20, 20))[1].input_size == (20, 20)


def test_torch_export_of_the_frozen_model(trained, frozen, truth):
    _, x = trained
    for strict in (False, True):
        program = torch.export.export(frozen, (x,), strict=strict)
        with torch.no_grad():
            assert_like_fp32(program.module()(x), truth, f"torch.export strict={strict}")


def test_torchscript_and_fullgraph_compile_of_the_frozen_model(trained, frozen, truth):
    _, x = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no silently baked-in condition
        traced = torch.jit.trace(frozen, x)
    scripted = torch.jit.script(frozen)
    compiled = torch.compile(frozen, fullgraph=True, backend="eager")
    with torch.no_grad():
        for name, m in (("trace", traced), ("script", scripted), ("compile", compiled)):
            assert_like_fp32(m(x), truth, name)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_onnx_export_of_the_frozen_model_runs_in_onnxruntime(trained, frozen, truth, tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript" if dynamo else "onnx")
    _, x = trained
    path = tmp_path / "resnet18-dynopool.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation notes
        torch.onnx.export(frozen, (x,), str(path), dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_like_fp32(out, truth, f"onnxruntime (dynamo={dynamo})")


EXPORTS = {
    "torch.export": lambda m, x, tmp: torch.export.export(m, (x,)),
    "torch.export strict": lambda m, x, tmp: torch.export.export(m, (x,), strict=True),
    "jit.trace": lambda m, x, tmp: torch.jit.trace(m, x),
    "jit.script": lambda m, x, tmp: torch.jit.script(m),
    "compile fullgraph": lambda m, x, tmp: torch.compile(m, fullgraph=True, backend="eager")(x),
    "onnx dynamo": lambda m, x, tmp: torch.onnx.export(m, (x,), str(tmp / "a.onnx")),
    "onnx torchscript": lambda m, x, tmp: torch.onnx.export(m, (x,), str(tmp / "b.onnx"), dynamo=False),
}


@pytest.mark.parametrize("export", list(EXPORTS))
def test_exporting_the_unfrozen_model_fails_with_an_error_that_names_freeze(trained, export, tmp_path):
    model, x = trained
    model(x)  # a forward before: jit.trace used to freeze these sizes without a word
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match=r"dynopool\.freeze\(model, example_input\)"):
            EXPORTS[export](model, x, tmp_path)
    with torch.no_grad():  # and the model still runs as before
        assert model(x).shape == (2, 10)


def test_whole_model_save_pickle_and_deepcopy(trained, truth, tmp_path):
    model, x = trained
    want = truth[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {"torch.save": torch.load(buffer, weights_only=False), "pickle": pickle.loads(pickle.dumps(model)),
              "deepcopy": copy.deepcopy(model)}
    for name, m in copies.items():
        with torch.no_grad():
            assert torch.equal(m(x), want), name
        assert m.layer2[0].conv1[0] is m.layer2[0].downsample[0][0], name  # sharing survives
        assert len(m._forward_pre_hooks) == 1, name  # the one size read per forward too
    frozen = pickle.loads(pickle.dumps(freeze(model, x)))
    with torch.no_grad():
        assert_like_fp32(frozen(x), truth, "pickled frozen model")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the kernel path runs on CUDA")
def test_frozen_model_on_cuda_equals_the_kernels_output(trained, truth):
    # unmeasured here (no GPU in the session that wrote it). TF32 off: it would round the two
    # paths' slightly different conv inputs to 10-bit mantissas apart
    model, x = trained
    model = copy.deepcopy(model).to(DEVICE)
    x = x.to(DEVICE)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = model(x)  # the Triton kernels
            got = freeze(model, x)(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert_within(got, want, 8 * truth[2], "frozen vs kernels on CUDA")


# ---- frozen means one size everywhere it goes (issue 27): a small network, cheap to export

FROZEN_AT, OTHER_SIZES = (24, 28), {"larger": (32, 32), "smaller": (16, 20)}
DYNAMIC_HW = "frozen for 12x14 inputs \\(the model's: 24x28\\): a dynamic height or width cannot be exported"
OTHER_SIZE = "frozen for 12x14 inputs \\(the model's: 24x28\\); freeze the model again"


@pytest.fixture(scope="module")
def small_frozen():
    """A conv, two DynOPools with moved, non-square alphas, frozen at 24x28; its eager output."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), DynOPool2d((1.7, 2.3), 0.3),
                              torch.nn.Conv2d(4, 4, 3, padding=1), DynOPool2d((1.4, 1.1), 0.2),
                              torch.nn.Flatten(1)).eval()
    x = torch.randn(2, 3, *FROZEN_AT)
    with torch.no_grad():
        want = net(x)
    return freeze(net, x), x, want


@pytest.mark.parametrize("how", ["jit.trace", "jit.script"])
def test_traced_or_scripted_frozen_model_refuses_another_size(small_frozen, how):
    frozen, x, want = small_frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        m = torch.jit.trace(frozen, x) if how == "jit.trace" else torch.jit.script(frozen)
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(m(x[:1]), want[:1])  # the batch is free
        for size in OTHER_SIZES.values():  # a trace used to run at a larger size, silently wrong
            with pytest.raises(Exception, match=OTHER_SIZE):
                m(torch.randn(2, 3, *size))


EXPORTERS = {"dynamo": True, "torchscript": False}


def _onnx_export(model, x, path, dynamo, dims):
    """torch.onnx.export with the dims of x (0: batch, 2: H, 3: W) dynamic."""
    names = {0: "n", 2: "h", 3: "w"}
    if dynamo:
        kw = {"dynamic_shapes": ({d: torch.export.Dim(names[d], min=2, max=256) for d in dims},)} if dims else {}
    else:
        kw = {"input_names": ["x"], "dynamic_axes": {"x": {d: names[d] for d in dims}}} if dims else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kw)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_onnx_export_of_the_frozen_model_refuses_dynamic_hw_and_onnxruntime_other_sizes(small_frozen, tmp_path, exporter):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript" if EXPORTERS[exporter] else "onnx")
    frozen, x, want = small_frozen
    for dims in ((2, 3), (0, 2, 3), (3,)):  # the exporters wrote these without a word
        # (the dynamo exporter wraps the error: its summary quotes the line, its cause is it)
        with pytest.raises(Exception, match=DYNAMIC_HW) as e:
            _onnx_export(frozen, x, tmp_path / "dyn.onnx", EXPORTERS[exporter], dims)
        assert isinstance(e.value if EXPORTERS[exporter] is False else e.value.__cause__, ValueError)
        assert not (tmp_path / "dyn.onnx").exists()
    path = tmp_path / "frozen.onnx"
    _onnx_export(frozen, x, path, EXPORTERS[exporter], (0,))  # a dynamic batch is fine
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    torch.testing.assert_close(torch.from_numpy(session.run(None, {name: x[:1].numpy()})[0]), want[:1])
    for size in OTHER_SIZES.values():  # the file declares the frozen size, which onnxruntime holds to
        with pytest.raises(Exception, match=r"index: 2 Got: \d+ Expected: 24"):
            session.run(None, {name: torch.randn(2, 3, *size).numpy()})


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_the_frozen_model_refuses_dynamic_hw(small_frozen, strict):
    frozen, x, want = small_frozen
    h = torch.export.Dim("h", min=2, max=256)
    with pytest.raises(ValueError, match=DYNAMIC_HW):
        torch.export.export(frozen, (x,), dynamic_shapes=({2: h},), strict=strict)
    program = torch.export.export(frozen, (x,), strict=strict)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want)
        for size in OTHER_SIZES.values():  # the program's own input check names the frozen size
            with pytest.raises(Exception, match="24|28"):
                program.module()(torch.randn(2, 3, *size))
