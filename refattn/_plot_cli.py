"""``refattn plot``: PNG figures of attention, written to a folder.

* ``refattn plot demo --out DIR``: seed 002's ``visualize_attention_patterns``: the mechanisms
  side by side on one synthetic input (seeded), one head each, with their mean entropy.
* ``refattn plot weights FILE.npz --out DIR``: a user's weights, the array ``weights`` of the
  file, ``(L, H, n, n)`` (or ``(H, n, n)``, one layer) of one input, with optional ``tokens``
  (a string array): the layers × heads grid, the entropy by layer and the rollout.
* ``refattn plot encoder STATE.pt --x x.npy --n-heads H --out DIR``: a torch
  ``nn.TransformerEncoder``'s (or one ``nn.TransformerEncoderLayer``'s) ``state_dict``, converted
  layer by layer with :func:`refattn.interop.torch.params_from_torch`, run on ``x`` (n, d_model)
  by refattn; the same three figures from its attention weights.
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
    enc = sub.add_parser("encoder", help="figures of a torch encoder's state_dict run on x")
    enc.add_argument("state", type=Path, help="torch.save'd state_dict (.pt)")
    enc.add_argument("--x", type=Path, required=True, help=".npy input (n, d_model)")
    enc.add_argument("--n-heads", type=int, required=True)
    enc.add_argument("--norm-first", action="store_true")
    enc.add_argument("--activation", default="relu", choices=("relu", "gelu"))
    enc.add_argument("--layer-norm-eps", type=float, default=1e-5)
    enc.add_argument("--out", type=Path, required=True, help="folder for the PNGs")


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


def _encoder_layers(state: dict) -> list[dict]:
    """Per-layer state dicts: ``layers.{i}.*`` (nn.TransformerEncoder) or one layer's names."""
    from .interop.torch import params_from_torch

    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    if not indices:
        return [params_from_torch(state, kind="transformer_encoder_layer", dtype="float64")]
    unknown = [k for k in state if not k.startswith("layers.") and not k.startswith("norm.")]
    if unknown:
        raise ValueError(f"unexpected state_dict names for nn.TransformerEncoder: {unknown[:3]}")
    return [
        params_from_torch(
            {
                k.removeprefix(f"layers.{i}."): v
                for k, v in state.items()
                if k.startswith(f"layers.{i}.")
            },
            kind="transformer_encoder_layer",
            dtype="float64",
        )
        for i in indices
    ]


def _encoder(args: argparse.Namespace) -> list[Path]:
    try:
        import torch
    except ImportError:
        raise ValueError("needs torch to read the state_dict: pip install refattn[torch]") from None
    from .interpret import encoder_attention_gradients

    for path in (args.state, args.x):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
    layers = _encoder_layers(torch.load(args.state, map_location="cpu", weights_only=True))
    x = np.asarray(np.load(args.x, allow_pickle=False), dtype=np.float64)
    res = encoder_attention_gradients(
        layers,
        x,
        np.zeros_like(x),
        n_heads=args.n_heads,
        norm_first=args.norm_first,
        activation=args.activation,
        layer_norm_eps=args.layer_norm_eps,
    )
    w = res.weights if res.weights.ndim == 4 else res.weights[:, 0]  # the first batch element
    return _write(w, None, args.out)


def _weights(args: argparse.Namespace) -> list[Path]:
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
    return _write(w, tokens, args.out)


def _write(w: np.ndarray, tokens: list[str] | None, out: Path) -> list[Path]:
    """grid.png, entropy.png and (self-attention) rollout.png of (L, H, n_q, n_k) weights."""
    from .interpret import attention_rollout, entropy_by_layer
    from .plot import entropy_plot, head_grid, rollout_map

    per_head, per_layer = entropy_by_layer(w)  # checks the weights (row-stochastic, finite)
    written = {
        "grid.png": head_grid(w),
        "entropy.png": entropy_plot(per_head, per_layer),
    }
    if w.shape[-1] == w.shape[-2]:
        written["rollout.png"] = rollout_map(attention_rollout(w), tokens=tokens)
    for name, fig in written.items():
        fig.savefig(out / name, dpi=100)
    return [out / name for name in written]


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("refattn plot needs matplotlib: pip install refattn[plot]", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = {"demo": _demo, "weights": _weights, "encoder": _encoder}[args.what](args)
    except ValueError as exc:
        print(f"refattn plot {args.what}: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
