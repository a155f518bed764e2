"""refattn.distributed: Dask graphs equal to the single-process tiled kernel, on a real cluster.

Most cases run the graph on Dask's synchronous scheduler (the same tasks, in one process); the
cluster tests run it on a ``distributed.LocalCluster`` of worker processes, started and torn
down by the fixture, and check that the result is bitwise the one of the synchronous run, also
when a worker is killed in the middle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import refattn

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

from refattn import distributed as rd  # noqa: E402
from refattn.distributed import blocks  # noqa: E402

RTOL64 = 1e-13


@pytest.fixture(autouse=True, scope="module")
def _restore_environment():
    """Dask's nanny writes its worker variables (``MALLOC_TRIM_THRESHOLD_``, ``OMP_NUM_THREADS``
    ...) into this process's ``os.environ`` before spawning and leaves them there; later tests
    that start subprocesses (the malloc probes of test_backend.py) must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max-norm error relative to ``b``'s max-norm, on the entries where ``b`` is finite; the
    non-finite entries (``lse = -inf`` rows) must match exactly."""
    finite = np.isfinite(b)
    np.testing.assert_array_equal(np.isfinite(a), finite)
    np.testing.assert_array_equal(a[~finite], b[~finite])
    if not finite.any():
        return 0.0
    return float(np.max(np.abs(a[finite] - b[finite])) / max(np.max(np.abs(b[finite])), 1e-300))


def _inputs(batch, h_q, h_kv, n_q, n_k, d_k, d_v, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*batch, h_q, n_q, d_k)).astype(dtype)
    k = rng.standard_normal((*batch, h_kv, n_k, d_k)).astype(dtype)
    v = rng.standard_normal((*batch, h_kv, n_k, d_v)).astype(dtype)
    do = rng.standard_normal((*batch, h_q, n_q, d_v)).astype(dtype)
    return q, k, v, do


def _chunked(x: np.ndarray, rows: tuple[int, ...]) -> da.Array:
    return da.from_array(x, chunks=(*x.shape[:-2], rows, x.shape[-1]))


def _reference(q, k, v, do, *, is_causal, causal_alignment, key_lengths, scale=None):
    """The single-process tiled kernel, with the same key lengths."""
    (o, lse), pullback = refattn.vjp(
        refattn.scaled_dot_product_attention,
        q,
        k,
        v,
        key_lengths=key_lengths,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        scale=scale,
        implementation="tiled",
        return_lse=True,
    )
    return (o, lse, *pullback((do, None)))


def _distributed(q, k, v, do, q_rows, k_rows, scheduler="sync", **options):
    q, k, v, do = (
        _chunked(x, rows) for x, rows in ((q, q_rows), (k, k_rows), (v, k_rows), (do, q_rows))
    )
    (o, lse), pullback = rd.vjp(q, k, v, **options)
    grads = pullback(do)
    return dask.compute(o, lse, *grads, scheduler=scheduler)


CASES = {
    # name: (batch, Hq, Hkv, n_q, n_k, q chunks, k chunks, causal, alignment, key_lengths)
    "full": ((2,), 2, 2, 96, 96, (32, 32, 32), (32, 32, 32), False, "upper_left", None),
    "causal-upper-left": (
        (1,),
        2,
        2,
        100,
        100,
        (40, 35, 25),
        (30, 30, 40),
        True,
        "upper_left",
        None,
    ),
    "causal-lower-right-nq<nk": (
        (1,),
        2,
        1,
        60,
        130,
        (20, 40),
        (50, 50, 30),
        True,
        "lower_right",
        None,
    ),
    "causal-lower-right-nq>nk": (
        (1,),
        1,
        1,
        130,
        60,
        (50, 50, 30),
        (25, 35),
        True,
        "lower_right",
        None,
    ),
    "causal-upper-left-nq>nk": (
        (1,),
        1,
        1,
        90,
        40,
        (30, 30, 30),
        (20, 20),
        True,
        "upper_left",
        None,
    ),
    "gqa-uneven": ((2,), 6, 2, 77, 91, (7, 50, 20), (64, 27), False, "upper_left", None),
    "key-lengths": ((3,), 2, 1, 64, 80, (16, 48), (20, 20, 40), False, "upper_left", [80, 23, 0]),
    "key-lengths-causal": (
        (2,),
        4,
        2,
        64,
        64,
        (32, 32),
        (16, 16, 32),
        True,
        "lower_right",
        [50, 9],
    ),
    # each sequence on its own diagonal k_b - n_q (the core op's rule, FlashAttention's)
    "key-lengths-lower-right-nq<nk": (
        (3,),
        2,
        1,
        30,
        90,
        (10, 20),
        (40, 50),
        True,
        "lower_right",
        [90, 50, 31],
    ),
    "two-batch-axes": (
        (2, 2),
        2,
        1,
        48,
        48,
        (24, 24),
        (16, 32),
        True,
        "upper_left",
        [48, 1, 30, 17],
    ),
    "one-block": ((), 2, 2, 33, 45, (33,), (45,), True, "upper_left", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_single_process_tiled_kernel(name):
    batch, h_q, h_kv, n_q, n_k, q_rows, k_rows, causal, alignment, lengths = CASES[name]
    q, k, v, do = _inputs(batch, h_q, h_kv, n_q, n_k, 16, 12)
    options = dict(is_causal=causal, causal_alignment=alignment, key_lengths=lengths)
    got = _distributed(q, k, v, do, q_rows, k_rows, **options)
    want = _reference(q, k, v, do, **options)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, label
        assert _rel(a, b) <= RTOL64, f"{label}: {_rel(a, b):.2e}"


def test_float32_and_scale():
    q, k, v, do = _inputs((1,), 4, 2, 70, 70, 8, 8, dtype=np.float32)
    options = dict(is_causal=True, causal_alignment="upper_left", key_lengths=None, scale=0.3)
    got = _distributed(q, k, v, do, (30, 40), (35, 35), **options)
    want = _reference(q, k, v, do, **options)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == np.float32, label
        assert _rel(a, b) <= 1e-5, f"{label}: {_rel(a, b):.2e}"


@pytest.mark.parametrize("lengths, n_visible", [(None, 7), ([115, 12], 7), ([55, 12], 6)])
def test_only_visible_pairs_are_scheduled(lengths, n_visible):
    """One pair task per (query block, key block) holding a visible entry, found by brute force
    from the full causal + padding mask (of the 9 pairs, the causal rule hides 2, and lengths
    <= 60 hide the last key block's 3)."""
    q, k, v, _ = _inputs((2,), 1, 1, 100, 120, 4, 4)
    q_rows, k_rows = (30, 30, 40), (10, 50, 60)
    out = rd.scaled_dot_product_attention(
        _chunked(q, q_rows),
        _chunked(k, k_rows),
        _chunked(v, k_rows),
        is_causal=True,
        causal_alignment="upper_left",
        key_lengths=lengths,
    )
    i, j = np.arange(100)[:, None], np.arange(120)[None, :]
    keep = (j <= i) & (j < np.asarray(lengths or [120, 120])[:, None, None])
    q_edges, k_edges = np.cumsum((0, *q_rows)), np.cumsum((0, *k_rows))
    visible = sum(
        bool(keep[:, q_edges[r] : q_edges[r + 1], k_edges[c] : k_edges[c + 1]].any())
        for r in range(3)
        for c in range(3)
    )
    names = [key[0] if isinstance(key, tuple) else key for key in dict(out.__dask_graph__())]
    scheduled = sum(str(name).startswith("pair_forward") for name in names)
    assert scheduled == visible == n_visible


def test_merge_partials_is_the_softmax_over_the_union():
    """Two partials over disjoint key sets, merged, equal one softmax over all keys (direct
    formula); rows masked in every partial stay 0 / -inf."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((5, 9)) * 4
    v = rng.standard_normal((9, 3))
    s[4] = -np.inf  # a row that sees nothing

    def partial(cols):
        with np.errstate(invalid="ignore"):
            lse = np.logaddexp.reduce(s[:, cols], axis=1)
            w = np.where(np.isfinite(lse)[:, None], np.exp(s[:, cols] - lse[:, None]), 0.0)
        return w @ v[cols], lse

    o, lse = blocks.merge_partials(partial([0, 2, 3]), partial([1, 4, 5, 6]), partial([7, 8]))
    w = np.exp(s[:4] - s[:4].max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(o[:4], w @ v, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(lse[:4], np.log(np.exp(s[:4]).sum(axis=1)), rtol=1e-14)
    assert np.all(o[4] == 0) and lse[4] == -np.inf


def test_block_functions_run_on_array_api_strict():
    """A task's code is namespace-generic (the path CuPy chunks take): on array-api-strict
    chunks it gives NumPy's numbers."""
    xps = pytest.importorskip("array_api_strict")
    q, k, v, do = _inputs((1,), 2, 1, 24, 20, 4, 5)
    options = dict(delta=3, c0=8, key_lengths=[17], scale=0.5)
    o, lse = blocks.pair_forward(q, k, v, **options)
    o_s, lse_s = blocks.pair_forward(*(xps.asarray(x) for x in (q, k, v)), **options)
    grads = blocks.pair_backward(q, k, v, o, lse, do, **options)
    strict = (xps.asarray(x) for x in (q, k, v, o, lse, do))
    grads_s = blocks.pair_backward(*strict, **options)
    merged = blocks.merge_partials((o_s, lse_s), blocks.empty_partial(xps.asarray(q), 5))
    for a, b in zip((o_s, lse_s, *grads_s, merged[0]), (o, lse, *grads, o), strict=True):
        assert type(a).__module__.startswith("array_api_strict")
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------------- bad input


def _good():
    q, k, v, do = _inputs((1,), 2, 1, 40, 40, 4, 4)
    return (
        _chunked(q, (20, 20)),
        _chunked(k, (20, 20)),
        _chunked(v, (20, 20)),
        _chunked(do, (20, 20)),
    )


def _call(**changes):
    q, k, v, _ = _good()
    args = {"q": q, "k": k, "v": v, **{n: changes.pop(n) for n in ("q", "k", "v") if n in changes}}
    return rd.scaled_dot_product_attention(args["q"], args["k"], args["v"], **changes)


BAD = [
    ("q-numpy", lambda: _call(q=np.zeros((1, 2, 40, 4))), TypeError, "q must be a dask array"),
    (
        "heads-chunked",
        lambda: _call(q=da.zeros((1, 2, 40, 4), chunks=(1, 1, 20, 4))),
        ValueError,
        "axis 1 has 2 chunks",
    ),
    (
        "features-chunked",
        lambda: _call(k=da.zeros((1, 1, 40, 4), chunks=(1, 1, 20, 2))),
        ValueError,
        "k must be chunked along the sequence axis",
    ),
    (
        "kv-chunks-differ",
        lambda: _call(v=da.zeros((1, 1, 40, 4), chunks=(1, 1, 10, 4))),
        ValueError,
        "k and v must have the same chunks",
    ),
    (
        "int-dtype",
        lambda: _call(q=da.zeros((1, 2, 40, 4), dtype=int, chunks=(1, 2, 20, 4))),
        TypeError,
        "float32 or float64",
    ),
    (
        "float16",
        lambda: _call(
            **{
                n: da.zeros(s, dtype="f2", chunks=(*s[:-2], 20, 4))
                for n, s in (("q", (1, 2, 40, 4)), ("k", (1, 1, 40, 4)), ("v", (1, 1, 40, 4)))
            }
        ),
        TypeError,
        "float32 or float64",
    ),
    (
        "mixed-dtypes",
        lambda: _call(v=da.zeros((1, 1, 40, 4), dtype="f4", chunks=(1, 1, 20, 4))),
        TypeError,
        "share one dtype",
    ),
    (
        "heads-not-multiple",
        lambda: _call(
            k=da.zeros((1, 3, 40, 4), chunks=(1, 3, 20, 4)),
            v=da.zeros((1, 3, 40, 4), chunks=(1, 3, 20, 4)),
        ),
        ValueError,
        "Hq a multiple of Hkv",
    ),
    ("two-dims", lambda: _call(q=da.zeros((40, 4), chunks=(20, 4))), ValueError, "at least 3"),
    ("key-lengths-count", lambda: _call(key_lengths=[3, 4]), ValueError, "must hold 1 ints"),
    ("key-lengths-range", lambda: _call(key_lengths=[41]), ValueError, r"\[0, n_k = 40\]"),
    ("key-lengths-float", lambda: _call(key_lengths=[3.5]), ValueError, "must hold 1 ints"),
    ("key-lengths-dask", lambda: _call(key_lengths=da.ones(1, dtype=int)), TypeError, "concrete"),
    (
        "alignment",
        lambda: _call(is_causal=True, causal_alignment="diag"),
        ValueError,
        "causal_alignment",
    ),
    ("causal-not-bool", lambda: _call(is_causal=1), TypeError, "is_causal must be a bool"),
    ("scale-string", lambda: _call(scale="0.5"), TypeError, "scale"),
    ("split-every", lambda: _call(split_every=1), ValueError, "split_every must be an int >= 2"),
    ("block-size", lambda: _call(block_size=0), ValueError, "block_size"),
]


@pytest.mark.parametrize("label, call, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_when_the_graph_is_built(label, call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "label, d_out, message",
    [
        (
            "rows-chunked-differently",
            da.zeros((1, 2, 40, 4), chunks=(1, 2, 10, 4)),
            "chunked like q",
        ),
        ("wrong-shape", da.zeros((1, 2, 40, 5), chunks=(1, 2, 20, 5)), "must have shape"),
        ("numpy", np.zeros((1, 2, 40, 4)), "d_out must be a dask array"),
    ],
)
def test_bad_cotangent_is_refused(label, d_out, message):
    q, k, v, _ = _good()
    _, pullback = rd.vjp(q, k, v)
    with pytest.raises((TypeError, ValueError), match=message):
        pullback(d_out)


def test_sdpa_backward_checks_out_and_lse():
    q, k, v, do = _good()
    out, lse = rd.scaled_dot_product_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="lse must be chunked like q's rows along axis -1"):
        rd.sdpa_backward(q, k, v, out, lse.rechunk({-1: 10}), do)
    with pytest.raises(TypeError, match="vjp returns the LSE always"):
        rd.vjp(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match="unknown option 'mask'"):
        rd.vjp(q, k, v, mask=None)
    dq, dk, dv = rd.sdpa_backward(q, k, v, out, lse, do)  # the checked path is also correct
    want = _reference(
        *(x.compute() for x in (q, k, v, do)),
        is_causal=False,
        causal_alignment="upper_left",
        key_lengths=None,
    )
    for a, b in zip(dask.compute(dq, dk, dv, scheduler="sync"), want[2:], strict=True):
        assert _rel(a, b) <= RTOL64


def test_import_refattn_does_not_import_dask():
    code = (
        "import sys, refattn, refattn.cli; refattn.cli.build_parser(); print('dask' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    with rd.local_cluster(2, memory_limit="1GiB") as cluster, Client(cluster) as c:
        yield c


def _scheduler_task_count(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def test_cluster_result_is_bitwise_the_synchronous_one(client):
    """Worker processes, data moved between them, the same bits as one process: every
    reduction has a fixed order, tasks run serially (BLAS with one thread, as Dask's workers
    have it) on fresh copies of their inputs (chunks arrive at any byte offset)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    q, k, v, do = _inputs((1,), 4, 2, 200, 200, 16, 16, seed=5)
    options = dict(is_causal=True, causal_alignment="lower_right", key_lengths=[170])
    on_cluster = _distributed(q, k, v, do, (64, 64, 72), (50, 50, 100), scheduler=client, **options)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        synchronous = _distributed(q, k, v, do, (64, 64, 72), (50, 50, 100), **options)
    for a, b in zip(on_cluster, synchronous, strict=True):
        np.testing.assert_array_equal(a, b)
    want = _reference(q, k, v, do, **options)
    assert max(_rel(a, b) for a, b in zip(on_cluster, want, strict=True)) <= RTOL64


def test_bad_input_schedules_nothing(client):
    before = _scheduler_task_count(client)
    with pytest.raises(ValueError):
        _call(key_lengths=[99])
    assert _scheduler_task_count(client) == before


def test_a_killed_worker_changes_nothing(client):
    """SIGKILL one worker process while the graph runs: Dask re-runs its lost tasks on the
    survivor and the restarted worker, and the result is bitwise the undisturbed one."""
    n, rows = 3072, 256
    rng = da.random.default_rng(11)
    shape = (1, 2, n, 32)
    q, k, v, do = (rng.standard_normal(shape, chunks=(1, 2, rows, 32)) for _ in range(4))
    q, k, v, do = client.persist([q, k, v, do])
    (o, lse), pullback = rd.vjp(q, k, v, is_causal=True)
    graph = [o, lse, *pullback(do)]
    undisturbed = dask.compute(*graph, scheduler=client)

    futures = client.compute(graph)
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        held = client.has_what()
        busy = [w for w, keys in held.items() if any("pair_backward" in str(key) for key in keys)]
        victim = busy[0] if busy else None
        time.sleep(0.005)
    assert victim is not None, "no pair_backward result appeared in time"
    assert not all(f.done() for f in futures), "the run ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    disturbed = client.gather(futures)
    for a, b in zip(disturbed, undisturbed, strict=True):
        np.testing.assert_array_equal(a, b)
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()


def test_reference_cli_writes_the_gradients(tmp_path, capsys):
    from refattn.cli import main

    q, k, v, do = _inputs((1,), 2, 1, 300, 260, 8, 6, seed=2)
    for name, x in zip(("q", "k", "v", "do"), (q, k, v, do), strict=True):
        np.save(tmp_path / f"{name}.npy", x)
    files = [f"--{n}={tmp_path / (n + '.npy')}" for n in ("q", "k", "v", "do")]
    out = tmp_path / "out"
    rc = main(
        [
            "reference",
            *files,
            "--causal=lower_right",
            "--block=128",
            f"--out={out}",
            "--workers=2",
            "--memory-limit=1GiB",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "peak memory per worker" in printed
    want = _reference(q, k, v, do, is_causal=True, causal_alignment="lower_right", key_lengths=None)
    for name, b in zip(("out", "lse", "dq", "dk", "dv"), want, strict=True):
        assert _rel(np.load(out / f"{name}.npy"), b) <= RTOL64, name


def test_reference_cli_reports_bad_input(tmp_path, capsys):
    from refattn.cli import main

    np.save(tmp_path / "q.npy", np.zeros((1, 3, 10, 4)))
    np.save(tmp_path / "k.npy", np.zeros((1, 2, 10, 4)))
    args = [
        "reference",
        f"--q={tmp_path / 'q.npy'}",
        f"--k={tmp_path / 'k.npy'}",
        f"--v={tmp_path / 'k.npy'}",
        f"--out={tmp_path}",
    ]
    assert main(args) == 2
    assert "Hq a multiple of Hkv" in capsys.readouterr().err
    assert main([*args[:3], f"--v={tmp_path / 'missing.npy'}", args[4]]) == 2
    assert "missing.npy: no such file" in capsys.readouterr().err
