"""``refattn reference``: float64 ground truth for a user's own attention inputs, on Dask.

Reads ``q``, ``k``, ``v`` (and the output cotangent ``do``) from ``.npy`` files, computes the
output, the LSE and (with ``--do``) the gradients with :mod:`refattn.distributed`, and writes
them as ``.npy`` files into ``--out``. Inputs are read and outputs written by the workers
themselves, block by block, through memory maps: the paths must be visible to every worker
(a local disk for a ``LocalCluster``, a shared filesystem for a real cluster), and no process
holds a whole array. Dask is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = ["NpyTarget", "add_arguments", "npy_array", "run"]

NAMES = ("q", "k", "v", "do")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``refattn reference``."""
    for name, what in zip(NAMES, ("queries", "keys", "values"), strict=False):
        parser.add_argument(f"--{name}", required=True, help=f"{what}: (..., H, n, d) .npy file")
    parser.add_argument("--do", help="cotangent of the output (..., Hq, n_q, d_v): also gradients")
    parser.add_argument(
        "--causal",
        choices=["upper_left", "lower_right"],
        help="causal mask with this alignment (default: none)",
    )
    parser.add_argument("--scale", type=float, help="score scale (default 1/sqrt(d_k))")
    parser.add_argument(
        "--key-lengths", type=int, nargs="+", help="valid keys per batch element (padding)"
    )
    parser.add_argument("--out", required=True, help="directory for out.npy, lse.npy, dq.npy, ...")
    parser.add_argument(
        "--block", type=int, default=8192, help="rows per query/key block, one task per pair"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running Dask scheduler")
    where.add_argument(
        "--workers", type=int, default=2, help="local worker processes to start (default 2)"
    )
    parser.add_argument("--memory-limit", default="2GiB", help="per local worker (default 2GiB)")


def npy_array(path: str, block: int) -> Any:
    """A dask array of the ``.npy`` file at ``path``, chunks of ``block`` rows on axis -2,
    each read by its task from a memory map (nothing is read here but the header)."""
    import dask
    import dask.array as da

    header = np.load(path, mmap_mode="r")
    shape, dtype = tuple(header.shape), header.dtype
    del header
    if len(shape) < 3:
        raise ValueError(f"refattn reference: {path} must be (..., H, n, d), got shape {shape}")
    n = shape[-2]
    read = dask.delayed(_read_rows, pure=True)
    parts = [
        da.from_delayed(
            read(path, s, min(s + block, n)),
            (*shape[:-2], min(block, n - s), shape[-1]),
            dtype=dtype,
        )
        for s in range(0, n, block)
    ] or [da.from_delayed(read(path, 0, 0), (*shape[:-2], 0, shape[-1]), dtype=dtype)]
    return da.concatenate(parts, axis=-2)


def _read_rows(path: str, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(np.load(path, mmap_mode="r")[..., start:stop, :])


class NpyTarget:
    """A ``dask.array.store`` target that writes into an existing ``.npy`` file on the worker.

    Pickles as its path only (a memory map would pickle as its whole contents)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape).flush()

    def __setitem__(self, index: Any, value: np.ndarray) -> None:
        target = np.load(self.path, mmap_mode="r+")
        target[index] = value
        target.flush()


def run(args: argparse.Namespace) -> int:
    try:
        import dask.array as da
        from distributed import Client, progress

        from .distributed import attention
        from .distributed.cluster import local_cluster, peak_memory
    except ImportError as exc:
        print(
            f"refattn reference needs Dask ({exc}); pip install 'refattn[distributed]'",
            file=sys.stderr,
        )
        return 2
    paths = {name: getattr(args, name) for name in NAMES if getattr(args, name)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            print(f"refattn reference: --{name} {path}: no such file", file=sys.stderr)
            return 2
    if args.block <= 0:
        print(f"refattn reference: --block must be > 0, got {args.block}", file=sys.stderr)
        return 2
    arrays = {name: npy_array(os.path.abspath(p), args.block) for name, p in paths.items()}
    options: dict[str, Any] = {
        "is_causal": args.causal is not None,
        "causal_alignment": args.causal or "upper_left",
        "scale": args.scale,
        "key_lengths": args.key_lengths,
    }
    try:
        (out, lse), pullback = attention.vjp(arrays["q"], arrays["k"], arrays["v"], **options)
        results = {"out": out, "lse": lse}
        if "do" in arrays:
            results.update(zip(("dq", "dk", "dv"), pullback(arrays["do"]), strict=True))
    except (TypeError, ValueError) as exc:
        print(f"refattn reference: {exc}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    targets = [
        NpyTarget(os.path.join(os.path.abspath(args.out), f"{name}.npy"), x.shape, x.dtype)
        for name, x in results.items()
    ]
    with contextlib.ExitStack() as stack:
        if args.scheduler:
            client = stack.enter_context(Client(args.scheduler))
        else:
            cluster = stack.enter_context(
                local_cluster(args.workers, memory_limit=args.memory_limit)
            )
            client = stack.enter_context(Client(cluster))
        workers = len(client.nthreads())
        print(f"refattn reference: {workers} workers; dashboard {client.dashboard_link}")
        start = time.perf_counter()
        stored = client.compute(
            da.store(list(results.values()), targets, lock=False, compute=False)
        )
        progress(stored)
        client.gather(stored)  # re-raises a task's error
        seconds = time.perf_counter() - start
        peaks = peak_memory(client)
    report = {
        "seconds": seconds,
        "peak_memory_per_worker": peaks,
        "outputs": sorted(results),
        "shape": {name: list(x.shape) for name, x in arrays.items()},
        "dtype": str(arrays["q"].dtype),
        "block": args.block,
        **{k: v for k, v in options.items()},
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    gib = ", ".join(f"{p / 2**30:.2f}" for p in peaks.values())
    print(f"\nwrote {', '.join(f'{n}.npy' for n in results)} to {args.out} in {seconds:.1f} s")
    print(f"peak memory per worker (GiB): {gib}")
    return 0
