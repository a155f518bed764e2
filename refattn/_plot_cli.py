"""``refattn plot``: PNG figures of attention, written to a folder.

* ``refattn plot demo --out DIR``: seed 002's ``visualize_attention_patterns``: the mechanisms
  side by side on one synthetic input (seeded), one head each, with their mean entropy.
* ``refattn plot weights FILE.npz --out DIR``: a user's weights, the array ``weights`` of the
  file, ``(L, H, n, n)`` (or ``(H, n, n)``, one layer) of one input, with optional ``tokens``
  (a string array): the layers × heads grid, the entropy by layer and the rollout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    demo = sub.add_parser("demo", help="the mechanisms side by side on a synthetic input")
    demo.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    demo.add_argument("--n", type=int, default=12, help="sequence length (default 12)")
    demo.add_argument("--seed", type=int, default=0)
    weights = sub.add_parser("weights", help="grid, entropy and rollout of weights in an .npz")
    weights.add_argument("file", type=Path, help=".npz with 'weights' (L, H, n, n), 'tokens'")
    weights.add_argument("--out", type=Path, required=True, help="folder for the PNGs")


def _mechanisms(n: int, seed: int) -> dict[str, np.ndarray]:
    """One head's weights per mechanism on the same seeded ``(n, 16)`` Q, K, V."""
    import refattn

    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((n, 16)) for _ in range(3))
    options = {
        "softmax": {},
        "causal": {"is_causal": True},
        "window ±2": {"window": 2},
        "softcap 1": {"softcap": 1.0},
        "sparsemax": {"normalizer": "sparsemax"},
        "1.5-entmax": {"normalizer": "entmax"},
    }
    return {
        name: refattn.scaled_dot_product_attention(q, k, v, return_weights=True, **o)[1]
        for name, o in options.items()
    }


def _demo(args: argparse.Namespace) -> list[Path]:
    from .interpret import attention_entropy
    from .plot import mechanisms

    if args.n < 2:
        raise ValueError(f"--n must be at least 2, got {args.n}")
    weights = _mechanisms(args.n, args.seed)
    titles = {
        name: f"{name}  (H = {float(np.mean(attention_entropy(w))):.2f})"
        for name, w in weights.items()
    }
    path = args.out / "mechanisms.png"
    mechanisms({titles[name]: w for name, w in weights.items()}).savefig(path, dpi=100)
    return [path]


def _weights(args: argparse.Namespace) -> list[Path]:
    from .interpret import attention_rollout, entropy_by_layer
    from .plot import entropy_plot, head_grid, rollout_map

    if not args.file.is_file():
        raise ValueError(f"{args.file}: no such file")
    with np.load(args.file, allow_pickle=False) as data:
        if "weights" not in data:
            raise ValueError(f"{args.file} has no array 'weights' (it has {sorted(data.files)})")
        w = np.asarray(data["weights"], dtype=np.float64)
        tokens = [str(t) for t in data["tokens"]] if "tokens" in data else None
    if w.ndim == 3:
        w = w[None]
    if w.ndim != 4:
        raise ValueError(f"'weights' must be (L, H, n, n) or (H, n, n), got shape {w.shape}")
    per_head, per_layer = entropy_by_layer(w)  # checks the weights (row-stochastic, finite)
    written = {
        "grid.png": head_grid(w),
        "entropy.png": entropy_plot(per_head, per_layer),
    }
    if w.shape[-1] == w.shape[-2]:
        written["rollout.png"] = rollout_map(attention_rollout(w), tokens=tokens)
    for name, fig in written.items():
        fig.savefig(args.out / name, dpi=100)
    return [args.out / name for name in written]


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("refattn plot needs matplotlib: pip install refattn[plot]", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = _demo(args) if args.what == "demo" else _weights(args)
    except ValueError as exc:
        print(f"refattn plot {args.what}: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
