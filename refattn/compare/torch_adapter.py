"""torch: ``F.scaled_dot_product_attention`` on every SDPA backend of the device, and
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` against refattn's layers (their
parameters and gradients read through :mod:`refattn.interop.torch`)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np  # the comparison harness works on host copies; refattn ops run on NumPy

from .. import _tree
from ..testing import round_to_dtype, run_in_dtype
from ..testing.conformance import TORCH_BACKENDS, Kernel, judge, quiet, torch_sdpa_kernel
from .cases import DTYPES, LAYER_DTYPES, attention_cases
from .references import (
    MASKED_ROWS_DETAIL,
    ROW_BEHAVIOURS,
    behaviour_status,
    classify_masked_rows,
    layer_baseline,
    parameter_scales,
    tree_quantities,
)
from .report import CompareReport, Probe, Row, Unavailable
from .rows import attention_probes, attention_rows, probe_dtype

# ----------------------------------------------------------------------------- torch


def torch_dtype(torch: Any, dtype: str) -> Any:
    return getattr(torch, dtype)


def torch_to_numpy(t: Any) -> np.ndarray:
    """A host NumPy array in the tensor's own dtype (bfloat16 through ml_dtypes)."""
    from ..interop.dlpack import from_dlpack

    return np.asarray(from_dlpack(t.detach().cpu().contiguous(), copy=True))


def torch_mha_probes(torch: Any) -> list[Probe]:
    """nn.MultiheadAttention: the meaning of boolean masks, and fully masked rows."""
    name = "torch nn.MultiheadAttention"
    torch.manual_seed(0)
    e, h, n = 8, 2, 5
    mha = torch.nn.MultiheadAttention(e, h, batch_first=True, dtype=torch.float64)
    mha.train()
    x = torch.randn(1, n, e, dtype=torch.float64)
    rng = np.random.default_rng(1)
    m = rng.random((n, n)) > 0.5
    m[:, 0], m[:, 1] = True, False  # every row has both values
    mask = torch.from_numpy(m)
    with quiet():
        _, w = mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    w = w.detach().numpy()[0]  # (h, n, n)
    if (w[:, m] == 0).all() and (w[:, ~m] > 0).all():
        meaning = "True = ignore"
    elif (w[:, ~m] == 0).all() and (w[:, m] > 0).all():
        meaning = "True = attend"
    else:
        meaning = "other"
    probes = [
        Probe(
            name,
            "boolean attn_mask meaning",
            "True = attend",
            meaning,
            behaviour_status(meaning, "True = attend", ("True = attend", "True = ignore")),
            "convert torch masks with refattn.from_torch_mha_masks"
            if meaning == "True = ignore"
            else "",
        )
    ]
    dead = torch.zeros(n, n, dtype=torch.bool)
    dead[2] = True  # ignore every key of query 2
    with torch.no_grad():  # a nonzero out bias, so that "attention output 0" is not output 0
        mha.out_proj.bias.copy_(torch.randn(e, dtype=torch.float64))
        w_v = mha.in_proj_weight[2 * e :].numpy()
        b_v = mha.in_proj_bias[2 * e :].numpy()
        uniform = (x.numpy()[0] @ w_v.T + b_v).mean(axis=0)  # all-keys average, every head
        w_o, b_o = mha.out_proj.weight.numpy(), mha.out_proj.bias.numpy()
    for need_weights in (False, True):
        with quiet():
            out, _ = mha(x, x, x, attn_mask=dead, need_weights=need_weights)
        row = out.detach().numpy()[0, 2]
        # undo the output projection: the heads' attention output for that row
        heads = np.linalg.solve(w_o, row - b_o) if np.isfinite(row).all() else row
        observed = classify_masked_rows(heads[None], uniform[None], "float64")
        if observed == "other" and np.abs(heads).max() < 1e-12:
            observed = "zero"
        probes.append(
            Probe(
                name,
                f"fully masked rows (need_weights={need_weights})",
                "zero",
                observed,
                behaviour_status(observed, "zero", ROW_BEHAVIOURS),
                MASKED_ROWS_DETAIL.get(observed, "unrecognized output"),
            )
        )
    return probes


def torch_backends(device: str) -> tuple[list[Kernel], list[str]]:
    """The SDPA backends that run at least one dtype on ``device`` (as conformance kernels in
    every dtype), and notes on the others."""
    available, notes = [], []
    for name in TORCH_BACKENDS:
        kernel = torch_sdpa_kernel(name, device=device, dtypes=DTYPES)
        if probe_dtype(kernel) is None:
            notes.append(f"torch SDPA backend {name!r} is not available on {device}")
        else:
            available.append(kernel)
    return available, notes


# ----------------------------------------------------------------------------- torch layers


def _layer_params(module: Any, kind: str, grads: bool = False) -> dict[str, Any]:
    """refattn's parameter tree of a torch layer (or of its gradients), as float64 NumPy, read
    by :func:`refattn.interop.torch.params_from_torch` (gradients through a state dict of the
    parameters' ``.grad``)."""
    from ..interop.torch import params_from_torch

    source = {n: p.grad for n, p in module.named_parameters()} if grads else module
    return params_from_torch(source, kind=kind, dtype="float64")


def _round_module(torch: Any, module: Any, dtype: str, device: str) -> Any:
    """Round a float64 module's parameters to ``dtype`` in place, then move it to ``dtype``."""
    tdtype = torch_dtype(torch, dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(tdtype).to(torch.float64))
    return module.to(device=device, dtype=tdtype)


@dataclass(frozen=True)
class _LayerCase:
    name: str
    kind: str  # "mha" or "encoder"
    batch: int = 2
    n_q: int = 7
    n_k: int = 7
    d_model: int = 16
    n_heads: int = 4
    kdim: int | None = None
    vdim: int | None = None
    attn_mask: str | None = None  # "bool" (torch: True = ignore) | "float"
    key_padding: bool = False
    norm_first: bool = False
    activation: str = "relu"
    quick: bool = False

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


LAYER_CASES = (
    _LayerCase("mha_self_bool_mask", "mha", attn_mask="bool", quick=True),
    _LayerCase("mha_key_padding", "mha", key_padding=True),
    _LayerCase("mha_float_mask", "mha", attn_mask="float"),
    _LayerCase("mha_cross_kdim12_vdim10", "mha", n_q=5, n_k=9, kdim=12, vdim=10),
    _LayerCase("encoder_post_ln_relu", "encoder", key_padding=True, quick=True),
    _LayerCase("encoder_pre_ln_gelu", "encoder", norm_first=True, activation="gelu"),
)


def _torch_layer_masks(case: _LayerCase, rng: np.random.Generator) -> tuple[Any, Any]:
    attn_mask = key_padding = None
    if case.attn_mask == "bool":
        attn_mask = rng.random((case.n_q, case.n_k)) < 0.3  # True = ignore (torch)
        attn_mask[np.arange(case.n_q), np.arange(case.n_q) % case.n_k] = False
    elif case.attn_mask == "float":
        attn_mask = rng.standard_normal((case.n_q, case.n_k))
    if case.key_padding:
        key_padding = np.zeros((case.batch, case.n_k), dtype=bool)
        key_padding[-1, -2:] = True  # the last two keys of the last batch are padding
    return attn_mask, key_padding


def _torch_layer_row(torch: Any, case: _LayerCase, dtype: str, device: str, op: Any) -> Row:
    import refattn

    rng = np.random.default_rng(case.seed)
    torch.manual_seed(case.seed)
    f64 = torch.float64
    tdtype = torch_dtype(torch, dtype)
    d, h = case.d_model, case.n_heads
    if case.kind == "mha":
        module = torch.nn.MultiheadAttention(
            d, h, batch_first=True, kdim=case.kdim, vdim=case.vdim, dtype=f64
        )
        shapes = [
            (case.batch, case.n_q, d),
            (case.batch, case.n_k, case.kdim or d),
            (case.batch, case.n_k, case.vdim or d),
        ]
        impl = "torch nn.MultiheadAttention"
    else:
        module = torch.nn.TransformerEncoderLayer(
            d,
            h,
            dim_feedforward=2 * d,
            dropout=0.0,
            activation=case.activation,
            batch_first=True,
            norm_first=case.norm_first,
            dtype=f64,
        )
        shapes = [(case.batch, case.n_q, d)]
        impl = "torch nn.TransformerEncoderLayer"
    module.train()  # dropout is 0; train mode keeps torch off its fused inference fast path
    _round_module(torch, module, dtype, device)
    xs = [
        np.asarray(round_to_dtype(rng.standard_normal(s), dtype), dtype=np.float64) for s in shapes
    ]
    attn_mask, key_padding = _torch_layer_masks(case, rng)
    if attn_mask is not None and attn_mask.dtype != bool:
        attn_mask = np.asarray(round_to_dtype(attn_mask, dtype), dtype=np.float64)
    ct = np.asarray(
        round_to_dtype(rng.standard_normal((case.batch, case.n_q, d)), dtype), dtype=np.float64
    )
    mask, bias = refattn.from_torch_mha_masks(attn_mask, key_padding)
    kind = "multi_head_attention" if case.kind == "mha" else "transformer_encoder_layer"
    params = _layer_params(module, kind)
    options: dict[str, Any] = {"n_heads": h, "mask": mask}
    if case.kind == "mha":
        options["bias"] = bias
    else:
        options.update(norm_first=case.norm_first, activation=case.activation)
    ref_out, ref_grads = run_in_dtype(op, params, *xs, dtype="float64", cotangent=ct, **options)
    base_out, base_grads = layer_baseline(op, params, xs, ct, options, dtype)
    leaves = [torch.from_numpy(x).to(device=device, dtype=tdtype).requires_grad_() for x in xs]
    t_mask = None if attn_mask is None else torch.from_numpy(attn_mask).to(device)
    if t_mask is not None and t_mask.is_floating_point():
        t_mask = t_mask.to(tdtype)
    t_kpm = None if key_padding is None else torch.from_numpy(key_padding).to(device)
    with quiet():
        if case.kind == "mha":
            out, _ = module(*leaves, attn_mask=t_mask, key_padding_mask=t_kpm, need_weights=False)
        else:
            out = module(leaves[0], src_mask=t_mask, src_key_padding_mask=t_kpm)
        out.backward(torch.from_numpy(ct).to(device=device, dtype=tdtype))
    cand_grads = (
        _layer_params(module, kind, grads=True),
        *(torch_to_numpy(x.grad) for x in leaves),
    )
    names = ("dparams", "dquery", "dkey", "dvalue") if case.kind == "mha" else ("dparams", "dx")
    candidates = {"out": torch_to_numpy(out)}
    references = {"out": ref_out}
    baselines = {"out": base_out}
    for name, c, r, b in zip(names, cand_grads, ref_grads, base_grads, strict=True):
        candidates.update(tree_quantities(name, _tree.map_leaves(lambda x: x.astype(dtype), c)))
        references.update(tree_quantities(name, r))
        baselines.update(tree_quantities(name, b))
    row = Row(case.name, dtype, kernel=impl)
    return judge(row, candidates, references, baselines, scales=parameter_scales(references))


def _torch_layer_rows(
    report: CompareReport, torch: Any, device: str, quick: bool, dtypes: tuple[str, ...]
) -> None:
    from ..layers import multi_head_attention, transformer_encoder_layer

    for kind, op in (("mha", multi_head_attention), ("encoder", transformer_encoder_layer)):
        for case in LAYER_CASES:
            if case.kind != kind or (quick and not case.quick):
                continue
            for dtype in (d for d in LAYER_DTYPES if d in dtypes):
                report.rows.append(_torch_layer_row(torch, case, dtype, device, op))


def compare_torch(report: CompareReport, device: str, quick: bool, dtypes: tuple[str, ...]) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch reports no CUDA device (torch.cuda.is_available() is False)")
    report.notes.append(f"torch {torch.__version__}")
    kernels, notes = torch_backends(device)
    report.notes.extend(notes)
    kernels, behaviours = attention_probes(report, kernels)
    report.probes.extend(torch_mha_probes(torch))
    if quick:  # the quick grid: the default dispatch and the math backend only
        kernels = [k for k in kernels if k.name in (_name("default"), _name("math"))] or kernels[:1]
    attention_rows(report, kernels, attention_cases(quick), dtypes, behaviours)
    _torch_layer_rows(report, torch, device, quick, dtypes)


def _name(backend: str) -> str:
    return f"torch F.sdpa[{backend}]"
