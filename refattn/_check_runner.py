"""Run check cases: gradcheck, and agreement with torch / JAX autodiff when installed.

Used by ``refattn check`` and by the test suite. Framework references run on the CPU in float64
(JAX's ``jax_enable_x64`` is switched on when JAX is first used here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np  # the check runner works on host copies; refattn ops run on `xp`

from . import _tree
from ._backend import to_host
from ._op import vjp
from .checks import Case, to_backend
from .gradcheck import GradcheckError, gradcheck

__all__ = ["CaseResult", "compare_with_framework", "run_case"]

FRAMEWORKS = ("torch", "jax")


@dataclass
class CaseResult:
    """The outcome of one case: ``status`` per check ("ok", "skipped: ...", "FAIL: ...")."""

    label: str
    status: dict[str, str] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not any(s.startswith("FAIL") for s in self.status.values())


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


def _relative_error(actual: np.ndarray, desired: np.ndarray) -> float:
    """``max|a - d| / max|d|`` over finite entries; inf where the non-finite entries differ."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    if actual.shape != desired.shape:
        return float("inf")
    finite = np.isfinite(desired)
    if not np.array_equal(finite, np.isfinite(actual)) or not np.array_equal(
        actual[~finite], desired[~finite]
    ):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.max(np.abs(desired[finite]))), 1e-300)
    return float(np.max(np.abs(actual[finite] - desired[finite]))) / scale


def _cotangents(outputs: tuple[np.ndarray, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Seeded cotangents, zero where the output is not finite (no derivative there)."""
    return [np.where(np.isfinite(o), rng.standard_normal(o.shape), 0.0) for o in outputs]


def compare_with_framework(case: Case, framework: str, *, seed: int = 0) -> tuple[str, float]:
    """Compare refattn's float64 outputs and gradients with ``framework``'s autodiff.

    Returns ``(status, worst relative error)``.
    """
    ref = case.torch_ref if framework == "torch" else case.jax_ref
    if ref is None:
        return "skipped: no reference", 0.0
    try:
        runner = _torch_vjp if framework == "torch" else _jax_vjp
        lib = _import(framework)
    except ImportError:
        return f"skipped: {framework} not installed", 0.0
    primals, options = case.make(np.random.default_rng(seed))
    xp = _numpy_namespace()
    out, pullback = vjp(case.op, *to_backend(xp, primals), **to_backend(xp, options))
    outs = tuple(to_host(o) for o in _as_tuple(out))
    cts = _cotangents(outs, np.random.default_rng(seed + 1))
    ct = tuple(cts) if isinstance(out, tuple) else cts[0]
    grads = pullback(to_backend(xp, ct))
    f_outs, f_grads = runner(lib, ref, primals, options, cts)
    worst = 0.0
    for name, mine, theirs in (
        *((f"output {i}", o, f) for i, (o, f) in enumerate(zip(outs, f_outs, strict=True))),
        *(
            (f"grad {i}", to_host(g), f)
            for i, (g, f) in enumerate(zip(_tree.leaves(grads), _tree.leaves(f_grads), strict=True))
        ),
    ):
        err = _relative_error(mine, theirs)
        worst = max(worst, err)
        if not err <= case.tolerance:
            return f"FAIL: {name} differs from {framework} by {err:.3g} relative", err
    return "ok", worst


def _import(framework: str) -> Any:
    if framework == "torch":
        import torch

        return torch
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def _numpy_namespace() -> Any:
    from ._backend import default_namespace

    return default_namespace()


def _torch_vjp(torch, ref: Callable[..., Any], primals, options, cts):
    def to_torch(x: Any, grad: bool) -> Any:
        if isinstance(x, np.ndarray):
            t = torch.from_numpy(np.array(x))
            return t.requires_grad_(True) if grad and t.is_floating_point() else t
        return x

    t_primals = _tree.map_leaves(lambda x: to_torch(x, True), primals)
    t_options = {k: to_torch(v, False) for k, v in options.items()}
    outs = _as_tuple(ref(torch, t_primals, t_options))
    leaves = _tree.leaves(t_primals)
    grad_outputs = [torch.from_numpy(c) for c in cts]
    pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if o.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True
    )
    grads = [
        torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves, strict=True)
    ]
    host_outs = tuple(o.detach().numpy() for o in outs)
    return host_outs, _tree.replace_leaves(primals, [g.numpy() for g in grads])


def _jax_vjp(jax, ref: Callable[..., Any], primals, options, cts):
    import jax.numpy as jnp

    leaves = [jnp.asarray(x) for x in _tree.leaves(primals)]
    j_options = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}

    def fn(*new_leaves):
        return ref(jnp, _tree.replace_leaves(primals, list(new_leaves)), j_options)

    outs, pullback = jax.vjp(fn, *leaves)
    ct = tuple(jnp.asarray(c) for c in cts) if isinstance(outs, tuple) else jnp.asarray(cts[0])
    grads = pullback(ct)
    host_outs = tuple(np.asarray(o) for o in _as_tuple(outs))
    return host_outs, _tree.replace_leaves(primals, [np.asarray(g) for g in grads])


def run_case(
    case: Case,
    *,
    xp: Any = None,
    frameworks: tuple[str, ...] = FRAMEWORKS,
    seed: int = 0,
) -> CaseResult:
    """Gradcheck ``case`` on backend ``xp`` (NumPy by default) and compare with ``frameworks``."""
    start = time.perf_counter()
    result = CaseResult(case.label)
    xp = _numpy_namespace() if xp is None else xp
    primals, options = case.make(np.random.default_rng(seed))
    try:
        gradcheck(case.op, *to_backend(xp, primals), fast=case.fast, **to_backend(xp, options))
        result.status["gradcheck"] = "ok"
    except GradcheckError as exc:
        result.status["gradcheck"] = f"FAIL: {exc}"
    for framework in frameworks:
        status, err = compare_with_framework(case, framework, seed=seed)
        result.status[framework] = status
        result.errors[framework] = err
    result.seconds = time.perf_counter() - start
    return result
