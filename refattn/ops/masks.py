"""Boolean attention masks (True = attend) and converters from other conventions.

refattn's masks follow ``torch.nn.functional.scaled_dot_product_attention`` and
``jax.nn.dot_product_attention``: **True means the query may attend to the key**. PyTorch's
``nn.MultiheadAttention`` uses the opposite convention (True = ignore); convert its masks with
:func:`from_torch_mha_masks`.
"""

from __future__ import annotations

from typing import Any

from .._backend import all_true, default_namespace, namespace

__all__ = ["CAUSAL_ALIGNMENTS", "causal_mask", "from_torch_mha_masks", "padding_mask"]

Array = Any
CAUSAL_ALIGNMENTS = ("upper_left", "lower_right")


def check_alignment(alignment: str) -> None:
    """ValueError unless ``alignment`` is one of :data:`CAUSAL_ALIGNMENTS`."""
    if alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(
            f"refattn: causal_alignment must be 'upper_left' or 'lower_right', got {alignment!r}"
        )


def causal_keep(xp: Any, n_q: int, n_k: int, alignment: str, device: Any = None) -> Array:
    """The ``(n_q, n_k)`` causal keep-mask on ``xp`` (see :func:`causal_mask`)."""
    offset = 0 if alignment == "upper_left" else n_k - n_q
    rows = xp.arange(n_q, device=device)
    cols = xp.arange(n_k, device=device)
    return cols[None, :] <= rows[:, None] + offset


def causal_mask(
    n_q: int,
    n_k: int,
    alignment: str = "upper_left",
    *,
    xp: Any = None,
    device: Any = None,
) -> Array:
    """Boolean causal mask of shape ``(n_q, n_k)``, True = attend.

    ``alignment="upper_left"`` (PyTorch's and JAX's default): query ``i`` attends key ``j`` iff
    ``j <= i``. ``"lower_right"`` (FlashAttention's): iff ``j <= i + (n_k - n_q)``, so that the
    last query sits at the last key, as when new queries are appended to a cache. With
    ``lower_right`` and ``n_q > n_k`` the first ``n_q - n_k`` rows attend nothing.

    ``xp`` is the array namespace to build on (NumPy by default); ``device`` its device.
    """
    check_alignment(alignment)
    for name, n in (("n_q", n_q), ("n_k", n_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"refattn.causal_mask: {name} must be a non-negative int, got {n!r}")
    xp = default_namespace() if xp is None else xp
    return causal_keep(xp, n_q, n_k, alignment, device)


def padding_mask(lengths: Array, n: int) -> Array:
    """Key-padding mask ``(batch, n)``: True where position ``< lengths[b]``.

    A length outside ``[0, n]`` is an error, not clipped: it means the lengths and ``n`` describe
    different batches.

    To use it as an attention mask over ``(batch, heads, n_q, n_k)``, add the two broadcast
    axes: ``mask = padding_mask(lengths, n_k)[:, None, None, :]``.
    """
    xp = namespace(lengths)
    if lengths.ndim != 1 or not xp.isdtype(lengths.dtype, "integral"):
        raise ValueError(
            "refattn.padding_mask: lengths must be a 1-D integer array, got "
            f"shape {tuple(lengths.shape)} {lengths.dtype}"
        )
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"refattn.padding_mask: n must be a non-negative int, got {n!r}")
    if not all_true(xp, (lengths >= 0) & (lengths <= n)):
        raise ValueError(
            f"refattn.padding_mask: lengths must lie in [0, n] = [0, {n}], got min "
            f"{int(xp.min(lengths))}, max {int(xp.max(lengths))}"
        )
    positions = xp.arange(n, device=getattr(lengths, "device", None))
    return positions[None, :] < lengths[:, None]


def from_torch_mha_masks(
    attn_mask: Array | None = None,
    key_padding_mask: Array | None = None,
    *,
    n_heads: int | None = None,
) -> tuple[Array | None, Array | None]:
    """Convert ``nn.MultiheadAttention``-style masks to refattn's ``(mask, bias)``.

    PyTorch's MHA masks mean **True = ignore** when boolean, and are *added* to the scores when
    floating. refattn's ``mask`` means True = attend and ``bias`` is additive, both broadcast to
    ``(batch, heads, n_q, n_k)``.

    Parameters
    ----------
    attn_mask : array, optional
        ``(n_q, n_k)``, or ``(batch * n_heads, n_q, n_k)`` (then ``n_heads`` is required).
    key_padding_mask : array, optional
        ``(batch, n_k)``, True (or a float added to the scores) per padded key.
    n_heads : int, optional
        Needed to split a 3-D ``attn_mask``.

    Returns
    -------
    (mask, bias) : boolean keep-mask and additive bias, either None when absent.
    """
    masks: list[Array] = []
    biases: list[Array] = []
    if attn_mask is not None:
        xp = namespace(attn_mask)
        if attn_mask.ndim == 3:
            if n_heads is None or attn_mask.shape[0] % n_heads:
                raise ValueError(
                    "refattn.from_torch_mha_masks: a 3-D attn_mask of shape "
                    f"{tuple(attn_mask.shape)} needs n_heads dividing its first axis, "
                    f"got n_heads={n_heads!r}"
                )
            shape = (attn_mask.shape[0] // n_heads, n_heads, *attn_mask.shape[1:])
            attn_mask = xp.reshape(attn_mask, shape)
        elif attn_mask.ndim != 2:
            raise ValueError(
                "refattn.from_torch_mha_masks: attn_mask must be 2-D (n_q, n_k) or 3-D "
                f"(batch*n_heads, n_q, n_k), got shape {tuple(attn_mask.shape)}"
            )
        _split(xp, attn_mask, masks, biases)
    if key_padding_mask is not None:
        xp = namespace(key_padding_mask)
        if key_padding_mask.ndim != 2:
            raise ValueError(
                "refattn.from_torch_mha_masks: key_padding_mask must be 2-D (batch, n_k), got "
                f"shape {tuple(key_padding_mask.shape)}"
            )
        _split(xp, key_padding_mask[:, None, None, :], masks, biases)
    mask = None
    for m in masks:
        mask = m if mask is None else namespace(m).logical_and(mask, m)
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    return mask, bias


def _split(xp: Any, torch_mask: Array, masks: list[Array], biases: list[Array]) -> None:
    if torch_mask.dtype == xp.bool:
        masks.append(xp.logical_not(torch_mask))
    elif xp.isdtype(torch_mask.dtype, "real floating"):
        biases.append(torch_mask)
    else:
        raise TypeError(
            "refattn.from_torch_mha_masks: masks must be boolean or floating, "
            f"got {torch_mask.dtype}"
        )
