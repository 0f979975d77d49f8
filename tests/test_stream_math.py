"""The numpy math of the streamed file merge against the torch reference it mirrors."""
import numpy as np
import pytest
import torch

from modelstock import reference
from modelstock.backends import numpy_ops as stream_math
from modelstock.io import to_numpy, to_torch


@pytest.mark.parametrize("rows,k", [(1, 1), (1, 257), (1, 300_007), (5, 70_001), (700, 3), (3, 512)])
def test_gram_matches_reference(rows, k):
    w = 1 + torch.rand(4, rows * k)
    got = stream_math.gram(w[0].numpy(), [x.numpy() for x in w[1:]], rows)
    want = reference.gram(w[0], list(w[1:]), rows).numpy()
    # Both sum exact fp32 deltas' products in runs of 256 and the runs in fp64; only the order
    # inside a run differs (numpy's and torch's matmul): a few fp32 ulps of each run's sum.
    scale = np.einsum("rik,rjk->rij", *(2 * [np.abs((w[1:] - w[0]).view(4 - 1, rows, k).numpy().transpose(1, 0, 2)).astype(np.float64)]))
    assert np.all(np.abs(got - want) <= 8 * np.finfo(np.float32).eps * scale)


@pytest.mark.parametrize("rows,k,n", [(1, 300_007, 2), (6, 70_001, 3), (700, 3, 4), (1, 1, 2), (3, 600, 5)])
@pytest.mark.parametrize("how", ["merge_into", "from_gram", "average"])
def test_merge_is_bitwise_the_reference(rows, k, n, how):
    # from_gram: the file merge's form, the deltas' mean kept by the Gram pass (whole runs of
    # 256 and the columns past them) and the merge made from it
    w = torch.randn(n + 1, rows * k)
    t = torch.rand(rows, dtype=torch.float64)
    with_base = how != "average"
    want = reference.merge_into(torch.empty(rows * k), w[0] if with_base else None, list(w[1:]), t if with_base else None)
    arrays = [x.numpy() for x in w]
    out = np.full(rows * k, np.nan, np.float32)
    if how == "from_gram":
        g = stream_math.gram(arrays[0], arrays[1:], rows, mean_delta=out)
        assert np.array_equal(g, stream_math.gram(arrays[0], arrays[1:], rows))  # the Gram is untouched
        got = stream_math.merge_from_mean_delta(out, arrays[0], t.numpy())
    else:
        got = stream_math.merge_into(out, arrays[0] if with_base else None, arrays[1:], t.numpy() if with_base else None)
    assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("rows,k", [(1, 1_000_003), (9, 70_001), (3000, 300)])
def test_results_do_not_depend_on_the_number_of_threads(monkeypatch, rows, k):
    # Several tiles per layer: the tiles run on a pool, their Gram partials are added in tile
    # order, so one thread and four give the same bits.
    w = [np.random.default_rng(i).standard_normal(rows * k, dtype=np.float32) for i in range(3)]
    t = np.random.default_rng(9).random(rows)
    results = []
    for threads in ("1", "4"):
        monkeypatch.setenv("MODELSTOCK_THREADS", threads)
        results.append((stream_math.gram(w[0], w[1:], rows),
                        stream_math.merge_into(np.empty(rows * k, np.float32), w[0], w[1:], t)))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("fail_in", ["caller", "worker"])
def test_a_failing_tile_stops_every_thread_before_the_error_leaves(monkeypatch, fail_in):
    # The caller may unmap the arrays as soon as the error reaches it (Ctrl-C mid-merge): by
    # then no thread may still be working, and none takes a tile after the failure.
    import threading
    import time

    monkeypatch.setenv("MODELSTOCK_THREADS", "3")
    done, failed = [], []

    def work(taken):
        mine = []
        for index, item in taken:
            time.sleep(0.002)
            failing = (threading.current_thread() is threading.main_thread()) == (fail_in == "caller")
            if failing and index >= 6 and not failed:
                failed.append(index)
                raise KeyboardInterrupt if fail_in == "caller" else ValueError("a bad tile")
            done.append(time.perf_counter())
            mine.append((index, item))
        return mine

    with pytest.raises(KeyboardInterrupt if fail_in == "caller" else ValueError):
        stream_math._in_parallel(work, list(range(400)))
    left = time.perf_counter()
    count = len(done)
    time.sleep(0.05)
    assert len(done) == count and max(done) <= left  # nothing ran after the error left
    if fail_in == "caller":
        assert count < 100  # the others stopped taking tiles (they would take ~400 otherwise)


def test_bfloat16_round_trip_matches_torch():
    x = torch.cat([torch.randn(100_000) * 10.0 ** torch.randint(-30, 30, (100_000,)),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-40,
                                 # exact ties between two bf16 values: rounded to even
                                 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8)])])
    bits = stream_math.cast(x.numpy(), "bfloat16")
    assert bits.dtype == np.uint16
    assert torch.equal(to_torch(bits, "bfloat16"), x.to(torch.bfloat16))
    back = stream_math.to_float(bits, "bfloat16", np.empty(bits.shape, np.float32))
    assert torch.equal(torch.from_numpy(back), x.to(torch.bfloat16).float())
    assert np.array_equal(to_numpy(x.to(torch.bfloat16)), bits)


def test_float16_cast_matches_torch():
    x = torch.randn(10_000) * 100
    assert torch.equal(torch.from_numpy(stream_math.cast(x.numpy(), "float16")), x.half())
