r"""RoPE frequencies as today's models scale them: transformers' ``rope_type`` rules.

:func:`rope_frequencies` returns the inverse frequencies ``θ_i`` of the ``d_rot / 2`` rotated
pairs and the factor the cos and sin are multiplied by, in float64, for the rules of
transformers' ``ROPE_INIT_FUNCTIONS`` (each given by the same ``rope_parameters`` keys):

* ``"default"``: :math:`\theta_i = b^{-2i/d}` with ``b = rope_theta`` (:func:`refattn.rope`'s
  ``base``).
* ``"linear"`` (position interpolation, kaiokendev): :math:`\theta_i / s`, ``s = factor``:
  the same as positions divided by ``s``.
* ``"dynamic"`` (dynamic NTK, bloc97/emozilla): the base grows with the sequence,
  :math:`b' = b\,(s L / L_0 - (s - 1))^{d/(d-2)}` with ``L = max(seq_len, L_0)``,
  ``L_0 = max_position_embeddings``; unchanged up to ``L_0``.
* ``"yarn"`` (Peng et al. 2023): per pair, a ramp between interpolation (:math:`\theta_i/s`)
  for the low frequencies and extrapolation (:math:`\theta_i`) for the high ones, the ramp
  running over the pairs whose wavelength makes between ``beta_fast`` (32) and
  ``beta_slow`` (1) turns in ``original_max_position_embeddings``; cos and sin are scaled by
  ``attention_factor``, by default :math:`0.1 \ln s + 1` (or the ``mscale`` /
  ``mscale_all_dim`` ratio of DeepSeek's variant).
* ``"llama3"``: wavelengths :math:`\lambda_i = 2\pi/\theta_i` longer than
  :math:`L_0 / \mathrm{low\_freq\_factor}` are interpolated (:math:`\theta_i / s`), shorter
  than :math:`L_0 / \mathrm{high\_freq\_factor}` kept, and the ones between blended with
  :math:`\mu = (L_0/\lambda_i - \mathrm{low}) / (\mathrm{high} - \mathrm{low})`:
  :math:`(1 - \mu)\,\theta_i / s + \mu\,\theta_i`.

``partial_rotary_factor`` (GPT-NeoX, Phi, GLM) rotates the first ``int(d * factor)`` channels
only; the frequencies are those of that width (transformers' rule), and :func:`refattn.rope`'s
``rotary_dim`` passes the other channels through. The formulas are transformers' (read in its
``modeling_rope_utils``, re-derived here in float64; transformers computes them in float32).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ROPE_TYPES", "rope_frequencies"]

#: the rules :func:`rope_frequencies` knows, with the keys each needs besides ``rope_type``
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_OPTIONAL = {
    "dynamic": ("seq_len",),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
    head_dim: int,
    *,
    base: float = 10000.0,
    scaling: dict[str, Any] | None = None,
    partial_rotary_factor: float = 1.0,
) -> tuple[list[float], float]:
    """``(inv_freq, attention_factor)``: the ``d_rot / 2`` inverse frequencies (host floats,
    float64) and the cos/sin multiplier of ``scaling`` (module docstring), for a head of
    ``head_dim`` channels of which ``d_rot = int(head_dim * partial_rotary_factor)`` rotate.

    ``scaling`` is transformers' ``rope_parameters`` without ``rope_theta`` (that is ``base``):
    ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}``, say.
    None is ``"default"``.
    """
    op = "rope_frequencies"
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
        raise ValueError(f"refattn.{op}: head_dim must be an int >= 2, got {head_dim!r}")
    if not 0.0 < float(partial_rotary_factor) <= 1.0:
        raise ValueError(
            f"refattn.{op}: partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}"
        )
    dim = int(head_dim * partial_rotary_factor)
    if dim < 2 or dim % 2:
        raise ValueError(
            f"refattn.{op}: head_dim * partial_rotary_factor must give an even rotary width "
            f">= 2, got {dim}"
        )
    params = dict(scaling or {})
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"refattn.{op}: rope_type must be one of {sorted(ROPE_TYPES)}, got {kind!r}"
        )
    missing = [key for key in ROPE_TYPES[kind] if key not in params]
    extra = sorted(set(params) - set(ROPE_TYPES[kind]) - set(_OPTIONAL.get(kind, ())))
    if missing or extra:
        raise ValueError(
            f"refattn.{op}: rope_type {kind!r} takes {list(ROPE_TYPES[kind])} (optional: "
            f"{list(_OPTIONAL.get(kind, ()))}); missing {missing}, unexpected {extra}"
        )
    factor = float(params.get("factor", 1.0))
    if kind != "default" and not factor > 0:
        raise ValueError(f"refattn.{op}: factor must be > 0, got {params['factor']!r}")
    base = float(base)
    if kind == "dynamic":
        max_pos = int(params["max_position_embeddings"])
        seq_len = max(int(params.get("seq_len", max_pos)), max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    theta = [base ** (-i / dim) for i in range(0, dim, 2)]
    if kind in ("default", "dynamic"):
        return theta, 1.0
    if kind == "linear":
        return [t / factor for t in theta], 1.0
    if kind == "llama3":
        return _llama3(theta, factor, params), 1.0
    return _yarn(theta, dim, base, factor, params)


def _llama3(theta: list[float], factor: float, params: dict[str, Any]) -> list[float]:
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    out = []
    for t in theta:
        wavelen = 2 * math.pi / t
        if wavelen > context / low:  # long waves: interpolated
            out.append(t / factor)
        elif wavelen < context / high:  # short waves: kept
            out.append(t)
        else:
            mu = (context / wavelen - low) / (high - low)
            out.append((1 - mu) * t / factor + mu * t)
    return out


def _yarn(
    theta: list[float], dim: int, base: float, factor: float, params: dict[str, Any]
) -> tuple[list[float], float]:
    context = float(params["original_max_position_embeddings"])
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    fast = params.get("beta_fast") or 32
    slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the pair index that turns `rotations` times
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # transformers' guard against a zero-width ramp
    out = []
    for i, t in enumerate(theta):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        extrapolate = 1.0 - ramp  # 1 for high frequencies (small i)
        out.append(t / factor * (1 - extrapolate) + t * extrapolate)
    return out, float(attention)
