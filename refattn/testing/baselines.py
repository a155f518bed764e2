r"""Low-precision baselines computed with refattn itself: the plain implementation a kernel's
error is measured against.

The baseline helpers compute the plain implementation with refattn itself, so users do not have
to write one (:func:`lowp_attention_baseline`, :func:`lowp_attention_vjp_baseline`,
:func:`run_in_dtype`).

How the low-precision baseline is computed
------------------------------------------
:func:`lowp_attention_baseline` is the textbook materialized attention, evaluated the way a
framework evaluates it in ``dtype`` (FlashAttention's ``attention_ref(..., upcast=False)``):
every intermediate tensor is stored in ``dtype``, and each matrix product and the softmax are
computed in float32 and then rounded to ``dtype`` (which is what BLAS/tensor cores and PyTorch's
half-precision softmax do). With ``R(x)`` = round ``x`` to ``dtype`` (round to nearest even):

.. code-block:: text

    q, k, v, bias   <- R(inputs)                 (the baseline sees rounded inputs)
    qs = R(q * scale)
    S  = R(qs @ k^T)                             (float32 accumulation)
    S  = R(S + bias)                             (if bias)
    P  = R(softmax_f32(S, mask))                 (refattn.softmax in float32; fully masked rows 0)
    Pd = R(P * dropout_mask / (1 - p))           (if dropout)
    O  = R(Pd @ v)                               (float32 accumulation)
    lse = R(logsumexp_f32(S over kept keys))     (-inf on fully masked rows)

and the backward (:func:`lowp_attention_vjp_baseline`) is the chain rule of those same steps,
each product or reduction in float32 and rounded to ``dtype``:

.. code-block:: text

    dPd = R(dO @ v^T);  dP = R(dPd * dropout_mask / (1 - p))
    dS  = R(P * (dP - rowsum(P * dP)))           (softmax VJP in float32; two other textbook
                                                  forms via softmax_vjp=, see the function)
    dqs = R(dS @ k);    dq = R(dqs * scale)
    dk  = R(sum over the GQA group of dS^T @ qs);   dv = R(sum over the group of Pd^T @ dO)

For ``dtype="float32"`` every ``R`` is the identity: the baseline is a plain float32 materialized
implementation. float16 needs NumPy or CuPy arrays; bfloat16 needs NumPy and ``ml_dtypes``.
Options mean exactly what they mean for :func:`refattn.scaled_dot_product_attention` (the
baseline validates them with the same code).

Comparing with the reference: use the reference computed **from the same rounded inputs**
(:func:`run_in_dtype` with ``dtype="float64"`` after :func:`round_to_dtype`), so that input
rounding, which no kernel can undo, is not counted as kernel error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _tree
from .._backend import describe, namespace
from .._op import Op, vjp
from .dtypes import dtype_name, is_floating, lowp_dtype, round_to_dtype

Array = Any

#: the softmax-VJP forms of :func:`lowp_attention_vjp_baseline`
SOFTMAX_VJP_FORMS = ("factored", "expanded", "flash")


# ----------------------------------------------------------------------------- baselines


def run_in_dtype(
    op: Op,
    *primals: Any,
    dtype: str = "float64",
    cotangent: Any = None,
    **options: Any,
) -> tuple[Any, tuple[Any, ...] | None]:
    """Run a refattn op in ``dtype`` ("float64" or "float32"): ``(output, gradients or None)``.

    Every floating leaf of the primals, of array options (bias, float dropout masks) and of the
    cotangent is rounded to ``dtype`` first; boolean and integer arrays are left as they are.
    With ``dtype="float64"`` this is the reference; with ``"float32"`` it is a plain float32
    implementation of any refattn op (the baseline for layers and other ops). Gradients are
    ``refattn.vjp(op, ...)`` pulled back with ``cotangent`` (rounded likewise), or None.
    """
    name = dtype_name(dtype)
    if name not in ("float64", "float32"):
        raise ValueError(
            f"refattn.testing.run_in_dtype: refattn ops run in float64 or float32, got {dtype!r}; "
            "for float16/bfloat16 attention use lowp_attention_baseline"
        )

    def cast(x: Any) -> Any:
        return round_to_dtype(x, name) if is_floating(x) else x

    primals = tuple(_tree.map_leaves(cast, p) for p in primals)
    options = {k: _tree.map_leaves(cast, v) for k, v in options.items()}
    if cotangent is None:
        return op(*primals, **options), None
    out, pullback = vjp(op, *primals, **options)
    return out, pullback(_tree.map_leaves(lambda c: None if c is None else cast(c), cotangent))


_SDPA_OPTIONS = (
    "mask",
    "bias",
    "is_causal",
    "causal_alignment",
    "scale",
    "dropout_mask",
    "dropout_p",
)


def _storage(xp: Any, name: str) -> Any:
    """Where the baseline keeps its intermediates: float64 for float64, float32 otherwise."""
    return xp.float64 if name == "float64" else xp.float32


def _rounder(xp: Any, name: str) -> Any:
    """``R``: round an intermediate to ``name``'s precision, keeping it in :func:`_storage`."""
    low = lowp_dtype(xp, name)
    if name in ("float32", "float64"):
        return lambda x: x
    return lambda x: xp.astype(xp.astype(x, low), xp.float32)


@dataclass
class _LowpForward:
    """What the baseline's forward keeps for its backward (canonical layout, float32 storage)."""

    pb: Any
    qs: Array
    p: Array
    pd: Array
    out: Array
    weights: Array
    lse: Array


def _lowp_forward(
    q: Array, k: Array, v: Array, dtype: str, options: dict[str, Any]
) -> tuple[Any, _LowpForward]:
    from ..ops.sdpa import prepare
    from ..ops.sdpa.scores import full_keep
    from ..ops.softmax import masked_softmax_parts

    unknown = sorted(set(options) - set(_SDPA_OPTIONS) - {"return_weights", "return_lse"})
    if "implementation" in unknown:  # how refattn computes it does not change the plain baseline
        unknown.remove("implementation")
    if unknown:
        raise TypeError(
            f"refattn.testing.lowp_attention_baseline: unsupported options {unknown}; expected "
            f"scaled_dot_product_attention's: {', '.join(_SDPA_OPTIONS)}, return_weights, "
            "return_lse"
        )
    xp = namespace(q, k, v)
    name = dtype_name(dtype)
    low = lowp_dtype(xp, name)
    store = _storage(xp, name)

    r = _rounder(xp, name)

    def load(x: Array | None) -> Array | None:  # inputs: rounded to dtype, then stored
        if x is None or not is_floating(x):
            return x
        return xp.astype(xp.astype(x, low), store)

    sdpa = {key: options[key] for key in _SDPA_OPTIONS if key in options}
    for key in ("bias", "dropout_mask"):
        if sdpa.get(key) is not None:
            sdpa[key] = load(sdpa[key])
    pb = prepare(load(q), load(k), load(v), **sdpa, op="lowp_attention_baseline")
    k5 = pb.k[:, :, None, :, :]
    v5 = pb.v[:, :, None, :, :]
    qs = r(pb.q * pb.scale)
    s = r(qs @ xp.matrix_transpose(k5))
    if pb.bias is not None:
        s = r(s + pb.bias)
    keep = full_keep(pb)
    if keep is not None:
        keep = xp.broadcast_to(keep, tuple(s.shape))
    from ..ops.softmax import softmax

    p = r(softmax(s, axis=-1, mask=keep))
    pd = p if pb.drop is None else r(p * pb.drop)
    o = r(pd @ v5)
    _, total, shift = masked_softmax_parts(s, axis=-1, keep=keep, xp=xp)
    positive = total > 0
    lse = xp.where(positive, shift + xp.log(xp.where(positive, total, 1.0)), -float("inf"))
    lse = r(lse[..., 0])
    fwd = _LowpForward(pb=pb, qs=qs, p=p, pd=pd, out=o, weights=p, lse=lse)

    def user(x: Array, shape: tuple[int, ...]) -> Array:
        return xp.astype(xp.reshape(x, shape), low)

    out = user(o, pb.out_shape)
    extras = []
    if options.get("return_weights", False):
        extras.append(user(p, pb.weights_shape))
    if options.get("return_lse", False):
        extras.append(user(lse, pb.lse_shape))
    return ((out, *extras) if extras else out), fwd


def lowp_attention_baseline(
    q: Array, k: Array, v: Array, *, dtype: str = "bfloat16", **sdpa_options: Any
) -> Any:
    """The plain materialized attention ``softmax(scale QKᵀ + bias, mask) V`` computed in ``dtype``.

    See the module docstring for exactly which steps are rounded. ``q, k, v`` may be float64 or
    float32 (they are rounded to ``dtype`` first); options are those of
    :func:`refattn.scaled_dot_product_attention` (``mask, bias, is_causal, causal_alignment,
    scale, dropout_mask, dropout_p, return_weights, return_lse``), with the same meaning.

    Returns arrays in ``dtype`` with refattn's shapes: the output, or ``(out, weights?, lse?)``.
    """
    out, _ = _lowp_forward(q, k, v, dtype, sdpa_options)
    return out


def lowp_attention_vjp_baseline(
    q: Array,
    k: Array,
    v: Array,
    cotangent: Array,
    *,
    dtype: str = "bfloat16",
    softmax_vjp: str = "factored",
    **sdpa_options: Any,
) -> tuple[Array, tuple[Array, Array, Array]]:
    """The plain attention's output and gradients in ``dtype``: ``(out, (dq, dk, dv))``.

    The backward is the chain rule of :func:`lowp_attention_baseline`'s steps, each product or
    reduction computed in float32 and rounded to ``dtype`` (module docstring). ``cotangent``
    (the output's, shaped like the output) is rounded to ``dtype`` too. Extra outputs
    (``return_weights``/``return_lse``) are not differentiated here; pass them False.

    ``softmax_vjp`` picks one of three textbook forms of the softmax VJP, equal in exact
    arithmetic and rounded differently (``Delta = rowsum(P * dP)``):

    * ``"factored"`` (default; PyTorch's softmax backward): ``dS = P * (dP - Delta)``;
    * ``"expanded"`` (JAX's, the transpose of its softmax JVP): ``dS = P * dP - P * Delta``, two
      rounded products then their difference, which cancels on peaked rows;
    * ``"flash"`` (FlashAttention's): ``dS = P * (dP - rowsum(dO * O))``.

    On peaked rows (one weight near 1) their errors differ by several times, so a tolerance that
    must not depend on which plain form a framework happens to use takes the largest of the
    three baselines' errors (what ``refattn compare`` does).
    """
    if softmax_vjp not in SOFTMAX_VJP_FORMS:
        raise ValueError(
            "refattn.testing.lowp_attention_vjp_baseline: softmax_vjp must be one of "
            f"{SOFTMAX_VJP_FORMS}, got {softmax_vjp!r}"
        )
    if sdpa_options.get("return_weights") or sdpa_options.get("return_lse"):
        raise TypeError(
            "refattn.testing.lowp_attention_vjp_baseline: differentiates the output only; "
            "return_weights and return_lse must be False"
        )
    out, fwd = _lowp_forward(q, k, v, dtype, sdpa_options)
    pb = fwd.pb
    xp = pb.xp
    name = dtype_name(dtype)
    low = lowp_dtype(xp, name)
    r = _rounder(xp, name)
    if tuple(cotangent.shape) != tuple(pb.out_shape):
        raise ValueError(
            "refattn.testing.lowp_attention_vjp_baseline: cotangent must have the output's "
            f"shape {pb.out_shape}, got {describe(cotangent)}"
        )
    d_o = xp.astype(xp.astype(cotangent, low), _storage(xp, name))
    d_o = xp.reshape(d_o, tuple(fwd.out.shape))
    v5 = pb.v[:, :, None, :, :]
    k5 = pb.k[:, :, None, :, :]
    d_pd = r(d_o @ xp.matrix_transpose(v5))
    d_p = d_pd if pb.drop is None else r(d_pd * pb.drop)
    if softmax_vjp == "flash":  # Delta = rowsum(dO * O), O the stored (rounded) output
        row = xp.sum(d_o * fwd.out, axis=-1, keepdims=True)
    else:
        row = xp.sum(fwd.p * d_p, axis=-1, keepdims=True)
    if softmax_vjp == "expanded":  # two products, then their difference
        d_s = r(r(fwd.p * d_p) - r(fwd.p * row))
    else:
        d_s = r(fwd.p * (d_p - row))
    d_q = r(r(d_s @ k5) * pb.scale)
    d_k = r(xp.sum(xp.matrix_transpose(d_s) @ fwd.qs, axis=2))
    d_v = r(xp.sum(xp.matrix_transpose(fwd.pd) @ d_o, axis=2))
    grads = (
        xp.astype(xp.reshape(d_q, pb.q_shape), low),
        xp.astype(xp.reshape(d_k, pb.k_shape), low),
        xp.astype(xp.reshape(d_v, pb.v_shape), low),
    )
    return out, grads
