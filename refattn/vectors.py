"""Golden vectors: portable ``.npz`` files of refattn's inputs, outputs and gradients.

``export(dir)`` writes one ``.npz`` per (check case, dtype) from :func:`refattn.checks.all_cases`,
so every op that registers check cases gets golden vectors with no change here, plus a
``manifest.json`` with refattn's version, the semantics of every option, and a sha256 checksum
per file. ``verify(dir)`` checks the checksums, the structure of every file, and recomputes
everything with the installed refattn. The format is specified in ``docs/vectors.md``; in short:

* each ``.npz`` is an uncompressed zip (``ZIP_STORED``) of ``.npy`` files, written with fixed
  timestamps so that exporting twice gives identical bytes;
* array keys: ``input/<primal>[/<leaf>...]``, ``option/<name>[/...]``, ``output[/<i>]``,
  ``cotangent[/<i>]``, ``grad/<primal>[/...]``, ``lse``, and in float32 files the float64
  ``reference/...`` results for the same (rounded) inputs;
* ``meta`` is a uint8 array holding UTF-8 JSON: op, case, dtype, seed, and the *structure* of
  primals, options, outputs and gradients, in which ``{"$array": "<key>"}`` points to an array.

Loading never unpickles (``allow_pickle=False`` always). A bad checksum, a missing or unexpected
key, a wrong dtype, a pickled object or a corrupt archive raises :class:`GoldenVectorError`
(a ``ValueError``) naming the file and the problem.

Command line (wired into ``refattn`` by :func:`add_arguments` / :func:`run`)::

    refattn vectors export DIR [--ops OP ...] [--dtypes float64 float32]
    refattn vectors verify DIR
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import math
import re
import sys
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np  # golden vectors are host files: .npz I/O is NumPy's format

from ._backend import to_host
from ._op import Op, registered_ops, vjp
from ._version import __version__

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "GoldenVector",
    "GoldenVectorError",
    "VerifyReport",
    "add_arguments",
    "export",
    "load",
    "read_manifest",
    "run",
    "sha256_of",
    "verify",
]

FORMAT = "refattn-golden-vectors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float64", "float32")
#: verify's tolerance: |recomputed - stored| <= rtol * (|stored| + max|stored|), per array
VERIFY_RTOL = {"float64": 1e-11, "float32": 2e-5}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: identical bytes on every export

#: What every option means, recorded in the manifest so that readers in other languages know.
SEMANTICS: dict[str, str] = {
    "mask": (
        "boolean, True = keep: for attention, query i may attend key j (the meaning of "
        "torch.nn.functional.scaled_dot_product_attention and jax.nn.dot_product_attention; "
        "torch.nn.MultiheadAttention's boolean masks mean the opposite). Broadcast to the scores "
        "(..., Hq, n_q, n_k), or to x for softmax/log_softmax."
    ),
    "bias": "floating, added to the scaled scores before masking; broadcast like mask.",
    "is_causal": (
        "bool; also masks keys after the query, aligned by causal_alignment (AND-ed with mask)."
    ),
    "causal_alignment": (
        "'upper_left' (torch and JAX is_causal): query i attends key j iff j <= i. "
        "'lower_right' (FlashAttention, KV caches): iff j <= i + n_k - n_q; with n_q > n_k the "
        "first n_q - n_k rows attend nothing (fully masked)."
    ),
    "scale": "float; the scores are scale * Q K^T; null means 1/sqrt(d_k).",
    "dropout_mask": (
        "boolean or floating, True/1 = keep, applied to the attention weights after the softmax; "
        "kept weights are multiplied by 1/(1 - dropout_p). refattn draws no random numbers: the "
        "mask is an input. return_weights gives the weights before dropout."
    ),
    "dropout_p": "float in [0, 1): the dropout probability used for the 1/(1 - p) scaling.",
    "return_weights": "bool; the op also returns the attention weights P (before dropout).",
    "return_lse": (
        "bool; the op also returns the per-row logsumexp of the scaled, biased, masked scores."
    ),
    "fully_masked_rows": (
        "a query row (or softmax slice) with no kept entry gives output 0, weights 0, "
        "log_softmax -inf, lse -inf, and gradient 0, with no NaN anywhere."
    ),
    "gqa": (
        "q (..., Hq, n_q, d_k), k (..., Hkv, n_k, d_k), v (..., Hkv, n_k, d_v): query head h uses "
        "kv head h // (Hq // Hkv)."
    ),
    "axis": "int; the softmax axis.",
    "cotangent": (
        "drawn from a standard normal (numpy.random.default_rng(seed + 1)) in the file's dtype, "
        "one per output, set to 0 where the output is not finite; grad/* is the vector-Jacobian "
        "product of the outputs with it (all outputs differentiated)."
    ),
    "lse": (
        "for ops with a return_lse option: the per-row logsumexp of the same call (an extra "
        "forward with return_lse=True), stored under 'lse'."
    ),
    "reference": (
        "float32 files also hold reference/*: refattn's float64 results for the same float32 "
        "inputs and cotangent (exactly representable in float64), i.e. the answer a float32 "
        "kernel should approach; output/* and grad/* are refattn's own float32 results, an "
        "honest float32 implementation to measure the FlashAttention tolerance rule against."
    ),
}


class GoldenVectorError(ValueError):
    """A golden-vector file or directory is corrupt, incomplete, or disagrees with refattn."""


# ----------------------------------------------------------------------------- encoding


class _Unencodable(TypeError):
    """An option value that has no JSON/array encoding (the case is skipped, with the reason)."""


def _encode(value: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON for ``value``, moving arrays into ``arrays`` under ``key`` (see docs/vectors.md)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic) and not isinstance(value, np.ndarray):
        value = value.item()
        if isinstance(value, (bool, str)):
            return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _Unencodable(f"{key} is an object array")
        arrays[key] = np.ascontiguousarray(value)
        return {"$array": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) and "/" not in k for k in value):
            raise _Unencodable(f"{key} has dict keys that are not strings without '/'")
        return {"$dict": {k: _encode(v, f"{key}/{k}", arrays) for k, v in value.items()}}
    if isinstance(value, (tuple, list)):
        tag = "$tuple" if isinstance(value, tuple) else "$list"
        return {tag: [_encode(v, f"{key}/{i}", arrays) for i, v in enumerate(value)]}
    raise _Unencodable(f"{key} is a {type(value).__module__}.{type(value).__name__}")


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        raise GoldenVectorError(f"meta: bare JSON list {node!r}; lists are encoded as $list")
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise GoldenVectorError(f"meta: malformed value {node!r}")
    ((tag, body),) = node.items()
    if tag == "$array":
        return arrays[body]
    if tag == "$float":
        return float(body)
    if tag == "$dict":
        return {k: _decode(v, arrays) for k, v in body.items()}
    if tag in ("$tuple", "$list"):
        items = [_decode(v, arrays) for v in body]
        return tuple(items) if tag == "$tuple" else items
    raise GoldenVectorError(f"meta: unknown tag {tag!r}")


def _array_keys(node: Any) -> list[str]:
    """Every ``$array`` key referenced by an encoded value."""
    if isinstance(node, dict):
        if set(node) == {"$array"}:
            return [node["$array"]]
        return [key for sub in node.values() for key in _array_keys(sub)]
    if isinstance(node, list):
        return [key for sub in node for key in _array_keys(sub)]
    return []


# ----------------------------------------------------------------------------- computing a case


def _is_float_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)


def _cast(tree: Any, dtype: str) -> Any:
    """Floating arrays of a tree (dicts, tuples, lists) cast to ``dtype``; everything else kept."""
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast(v, dtype) for v in tree)
    if _is_float_array(tree):
        return tree.astype(dtype)
    return tree


def _host(x: Any) -> Any:
    """refattn results as host NumPy arrays (trees kept)."""
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_host(v) for v in x)
    if x is None:
        return None
    return to_host(x)


def _has_lse(op: Op) -> bool:
    try:
        return "return_lse" in inspect.signature(op.forward).parameters
    except (TypeError, ValueError):
        return False


def _cotangent(out: Any, seed: int, dtype: str) -> Any:
    rng = np.random.default_rng(seed + 1)

    def one(o: np.ndarray) -> np.ndarray:
        c = rng.standard_normal(o.shape)
        return np.where(np.isfinite(o), c, 0.0).astype(dtype)

    if isinstance(out, tuple):
        return tuple(one(o) for o in out)
    return one(out)


@dataclass
class _Result:
    out: Any
    cotangent: Any
    grads: tuple[Any, ...]
    lse: Any


def _compute(op: Op, primals: tuple[Any, ...], options: dict[str, Any], cotangent: Any) -> _Result:
    """Output, gradients and LSE of one call; ``cotangent`` may be a function of the output."""
    out, pullback = vjp(op, *primals, **options)
    out = _host(out)
    if callable(cotangent):
        cotangent = cotangent(out)
    grads = _host(pullback(cotangent))
    lse = None
    if _has_lse(op):
        if options.get("return_lse"):
            lse = out[-1]
        else:
            lse = _host(op(*primals, **{**options, "return_lse": True})[-1])
    return _Result(out, cotangent, tuple(grads), lse)


def _case_seed(label: str) -> int:
    """A seed that depends only on the case label (stable across machines and versions)."""
    return zlib.crc32(label.encode("utf-8"))


def _primal_names(op: Op, n: int) -> list[str]:
    names = list(op.primal_names)[:n]  # an op's optional primals may be left out
    if len(names) != n or len(set(names)) != n:
        names = [f"arg{i}" for i in range(n)]
    return names


def _file_name(op_name: str, case_name: str, dtype: str) -> str:
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", s)

    return f"{clean(op_name)}__{clean(case_name)}__{dtype}.npz"


def _build_file(case: Any, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and meta of one (case, dtype) file."""
    seed = _case_seed(case.label)
    primals, options = case.make(np.random.default_rng(seed))
    primals = tuple(primals)
    p = tuple(_cast(x, dtype) for x in primals)
    o = {k: _cast(v, dtype) for k, v in options.items()}
    result = _compute(case.op, p, o, lambda out: _cotangent(out, seed, dtype))
    names = _primal_names(case.op, len(p))
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "refattn_version": __version__,
        "op": case.op.name,
        "case": case.name,
        "label": case.label,
        "dtype": dtype,
        "seed": seed,
        "primals": [
            {"name": n, "value": _encode(x, f"input/{n}", arrays)}
            for n, x in zip(names, p, strict=True)
        ],
        "options": {k: _encode(v, f"option/{k}", arrays) for k, v in o.items()},
        "output": _encode(result.out, "output", arrays),
        "cotangent": _encode(result.cotangent, "cotangent", arrays),
        "grads": [
            {"name": n, "value": _encode(g, f"grad/{n}", arrays)}
            for n, g in zip(names, result.grads, strict=True)
        ],
        "lse": None if result.lse is None else _encode(result.lse, "lse", arrays),
        "reference": None,
    }
    if dtype != "float64":
        p64 = tuple(_cast(x, "float64") for x in p)
        o64 = {k: _cast(v, "float64") for k, v in o.items()}
        ref = _compute(case.op, p64, o64, _cast(result.cotangent, "float64"))
        meta["reference"] = {
            "dtype": "float64",
            "output": _encode(ref.out, "reference/output", arrays),
            "grads": [
                {"name": n, "value": _encode(g, f"reference/grad/{n}", arrays)}
                for n, g in zip(names, ref.grads, strict=True)
            ],
            "lse": None if ref.lse is None else _encode(ref.lse, "reference/lse", arrays),
        }
    return arrays, meta


def _write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """An uncompressed .npz with fixed timestamps; ``meta`` first, as uint8 UTF-8 JSON."""
    members = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    members.update(arrays)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in members.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buffer.getvalue())


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- export


def _op_docs(op: Op) -> dict[str, Any]:
    """Summary, signature and per-parameter text from the op's numpydoc docstring."""
    doc = inspect.getdoc(op.forward) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    try:
        signature = f"{op.name}{inspect.signature(op.forward)}"
    except (TypeError, ValueError):
        signature = op.name
    lines: dict[str, list[str]] = {}
    section = re.search(r"Parameters\n-+\n(.*?)(?:\n\S[^\n]*\n-+\n|\Z)", doc, re.S)
    if section:
        current: list[str] | None = None
        for line in section.group(1).splitlines():
            head = re.match(r"^([A-Za-z_][\w, ]*?) :(.*)$", line)
            if head:  # "name : type" or "a, b : type" starts an entry shared by the names
                current = [head.group(2).strip()]
                for name in head.group(1).split(","):
                    lines[name.strip()] = current
            elif current is not None and line.strip():
                current.append(line.strip())
    params = {name: " ".join(text) for name, text in lines.items()}
    return {"summary": summary, "signature": signature, "parameters": params}


def _select_cases(ops: Sequence[str] | None, cases: Iterable[Any] | None) -> list[Any]:
    if cases is None:
        from .checks import all_cases

        cases = all_cases()
    cases = list(cases)
    if ops:
        known = sorted({c.op.name for c in cases})
        unknown = sorted(set(ops) - set(known))
        if unknown:
            raise ValueError(
                f"refattn.vectors.export: no check cases for ops {unknown}; ops with cases: "
                f"{', '.join(known)}"
            )
        cases = [c for c in cases if c.op.name in set(ops)]
    return cases


def export(
    directory: str | Path,
    ops: Sequence[str] | None = None,
    dtypes: Sequence[str] = DTYPES,
    *,
    cases: Iterable[Any] | None = None,
) -> dict[str, Any]:
    """Write golden vectors for every check case (or those of ``ops``) into ``directory``.

    Parameters
    ----------
    directory : path
        Created if missing. Existing files with the same names are overwritten; the manifest is
        rewritten to list exactly this export.
    ops : op names, optional
        Only cases of these ops (``None``: every case in :func:`refattn.checks.all_cases`).
    dtypes : subset of ("float64", "float32")
        One file per case and dtype.
    cases : iterable of :class:`refattn.checks.Case`, optional
        Export these instead of the registry (for tests and for user-defined ops).

    Returns
    -------
    The manifest (also written to ``directory/manifest.json``). Cases whose options cannot be
    encoded (a value that is neither an array nor a JSON scalar, string, list or dict) are listed
    under ``"skipped"`` with the reason.
    """
    dtypes = tuple(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(
            f"refattn.vectors.export: dtypes must be a non-empty subset of {DTYPES}, got "
            f"{list(dtypes)}"
        )
    selected = _select_cases(ops, cases)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    op_docs: dict[str, Any] = {}
    for case in selected:
        for dtype in dtypes:
            try:
                arrays, meta = _build_file(case, dtype)
            except _Unencodable as exc:
                skipped.append({"label": case.label, "dtype": dtype, "reason": str(exc)})
                continue
            name = _file_name(case.op.name, case.name, dtype)
            path = root / name
            _write_npz(path, arrays, meta)
            files.append(
                {
                    "file": name,
                    "op": case.op.name,
                    "case": case.name,
                    "label": case.label,
                    "dtype": dtype,
                    "sha256": sha256_of(path),
                    "bytes": path.stat().st_size,
                }
            )
            op_docs.setdefault(case.op.name, _op_docs(case.op))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "refattn_version": __version__,
        "numpy_version": np.__version__,
        "generator": "refattn.vectors.export",
        "dtypes": list(dtypes),
        "semantics": SEMANTICS,
        "ops": op_docs,
        "files": files,
        "skipped": skipped,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ----------------------------------------------------------------------------- load


@dataclass
class GoldenVector:
    """One loaded file: everything needed to redo the call and compare.

    ``primals`` and ``grads`` follow the op's positional inputs (trees of arrays for layers);
    ``output`` and ``cotangent`` are an array or a tuple; ``reference`` (float32 files) holds the
    float64 ``output``, ``grads`` and ``lse`` for the same inputs.
    """

    path: Path
    meta: dict[str, Any]
    primals: tuple[Any, ...]
    options: dict[str, Any]
    output: Any
    cotangent: Any
    grads: tuple[Any, ...]
    lse: Any
    reference: dict[str, Any] | None
    arrays: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def op(self) -> str:
        return str(self.meta["op"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])


_META_KEYS = (
    "format",
    "format_version",
    "op",
    "case",
    "dtype",
    "seed",
    "primals",
    "options",
    "output",
    "cotangent",
    "grads",
    "lse",
    "reference",
)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, with ``allow_pickle=False``, every failure a GoldenVectorError."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise GoldenVectorError(f"{path}: file not found") from None
    except ValueError as exc:
        if "pickle" in str(exc):
            raise GoldenVectorError(
                f"{path}: contains pickled data; golden vectors never hold pickles and refattn "
                "never unpickles (allow_pickle=False)"
            ) from None
        raise GoldenVectorError(f"{path}: not a valid .npz archive ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise GoldenVectorError(f"{path}: not a valid .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise GoldenVectorError(f"{path}: expected an .npz archive, got a single .npy array")
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise GoldenVectorError(
                        f"{path}: key {key!r} holds a pickled Python object (dtype object); "
                        "golden vectors never hold pickles and refattn never unpickles "
                        "(allow_pickle=False)"
                    ) from None
                raise GoldenVectorError(f"{path}: key {key!r} is corrupt ({exc})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise GoldenVectorError(
                    f"{path}: key {key!r} is corrupt ({type(exc).__name__}: {exc})"
                ) from None
    return arrays


def _read_meta(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if "meta" not in arrays:
        raise GoldenVectorError(f"{path}: missing key 'meta' (the JSON description)")
    raw = arrays["meta"]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise GoldenVectorError(
            f"{path}: key 'meta' must be a 1-D uint8 array of UTF-8 JSON, got {raw.dtype} "
            f"with shape {raw.shape}"
        )
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenVectorError(f"{path}: key 'meta' is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GoldenVectorError(f"{path}: meta does not describe a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GoldenVectorError(
            f"{path}: format_version {meta.get('format_version')!r}; this refattn reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise GoldenVectorError(f"{path}: meta lacks the fields {missing}")
    if meta["dtype"] not in DTYPES:
        raise GoldenVectorError(f"{path}: meta dtype {meta['dtype']!r} is not one of {DTYPES}")
    return meta


def _check_structure(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Every referenced key is present, no other key is, and floating arrays have the dtype."""
    referenced: list[str] = []
    for entry in meta["primals"] + meta["grads"]:
        referenced += _array_keys(entry["value"])
    for part in ("options", "output", "cotangent", "lse"):
        referenced += _array_keys(meta[part])
    if meta["reference"] is not None:
        ref = meta["reference"]
        referenced += _array_keys(ref["output"]) + _array_keys(ref["lse"])
        for entry in ref["grads"]:
            referenced += _array_keys(entry["value"])
    missing = [k for k in referenced if k not in arrays]
    if missing:
        raise GoldenVectorError(
            f"{path}: missing key{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(k) for k in missing)} (listed in meta); keys present: "
            f"{', '.join(sorted(arrays))}"
        )
    extra = sorted(set(arrays) - set(referenced) - {"meta"})
    if extra:
        raise GoldenVectorError(f"{path}: unexpected keys {extra} (not listed in meta)")
    dtype = np.dtype(meta["dtype"])
    for key in referenced:
        arr = arrays[key]
        if arr.dtype.byteorder == ">":
            raise GoldenVectorError(f"{path}: key {key!r} is big-endian; the format is little")
        if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
            want = np.dtype("float64") if key.startswith("reference/") else dtype
            if arr.dtype != want:
                raise GoldenVectorError(
                    f"{path}: key {key!r} has dtype {arr.dtype}, expected {want} "
                    f"(the file's dtype is {meta['dtype']})"
                )
        elif not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer)):
            raise GoldenVectorError(
                f"{path}: key {key!r} has unsupported dtype {arr.dtype} (floating, bool or "
                "integer expected)"
            )


def load(path: str | Path, *, sha256: str | None = None) -> GoldenVector:
    """Load and validate one golden-vector file (never unpickles).

    ``sha256``, when given, must match the file's checksum (``verify`` passes the manifest's).
    Raises :class:`GoldenVectorError` for a bad checksum, a corrupt archive, pickled data, a
    missing or unexpected key, or a floating array whose dtype is not the file's.
    """
    path = Path(path)
    if sha256 is not None:
        if not path.is_file():
            raise GoldenVectorError(f"{path}: file not found")
        actual = sha256_of(path)
        if actual != sha256:
            raise GoldenVectorError(
                f"{path}: sha256 checksum mismatch: the manifest says {sha256}, the file has "
                f"{actual}; the file was modified or corrupted"
            )
    arrays = _read_arrays(path)
    meta = _read_meta(path, arrays)
    try:
        _check_structure(path, arrays, meta)
        ref = meta["reference"]
        return GoldenVector(
            path=path,
            meta=meta,
            primals=tuple(_decode(e["value"], arrays) for e in meta["primals"]),
            options={k: _decode(v, arrays) for k, v in meta["options"].items()},
            output=_decode(meta["output"], arrays),
            cotangent=_decode(meta["cotangent"], arrays),
            grads=tuple(_decode(e["value"], arrays) for e in meta["grads"]),
            lse=_decode(meta["lse"], arrays),
            reference=None
            if ref is None
            else {
                "output": _decode(ref["output"], arrays),
                "grads": tuple(_decode(e["value"], arrays) for e in ref["grads"]),
                "lse": _decode(ref["lse"], arrays),
            },
            arrays=arrays,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise GoldenVectorError(f"{path}: malformed meta ({type(exc).__name__}: {exc})") from None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a golden-vector directory (validated)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GoldenVectorError(f"{path}: no manifest (run `refattn vectors export`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenVectorError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GoldenVectorError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenVectorError(
            f"{path}: format_version {manifest.get('format_version')!r}; this refattn reads "
            f"version {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and {"file", "sha256", "op", "dtype"} <= set(f) for f in files
    ):
        raise GoldenVectorError(f"{path}: 'files' must list {{file, sha256, op, dtype}} entries")
    return manifest


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What :func:`verify` checked: per file, the worst error relative to the tolerance."""

    directory: Path
    refattn_version: str
    files: list[tuple[str, float]]  #: (file, worst |diff| / allowed), <= 1 passes
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _leaves(tree: Any) -> list[Any]:
    from . import _tree

    return [leaf for leaf in _tree.leaves(tree) if leaf is not None]


def _ratio(actual: np.ndarray, stored: np.ndarray, rtol: float) -> float:
    """max over entries of |actual - stored| / (rtol * (|stored| + max|stored|)); inf if the
    non-finite entries differ."""
    actual = np.asarray(actual)
    if actual.shape != stored.shape:
        return math.inf
    if actual.dtype == np.bool_ or np.issubdtype(actual.dtype, np.integer):
        return 0.0 if np.array_equal(actual, stored) else math.inf
    a, s = actual.astype(np.float64), stored.astype(np.float64)
    finite = np.isfinite(s)
    if not np.array_equal(np.isfinite(a), finite):
        return math.inf
    if not np.array_equal(a[~finite], s[~finite], equal_nan=True):
        return math.inf
    if not finite.any():
        return 0.0
    scale = float(np.abs(s[finite]).max())
    allowed = rtol * (np.abs(s[finite]) + scale)
    err = np.abs(a[finite] - s[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
    return float(ratios.max())


def _recheck(vector: GoldenVector, ops: dict[str, Op]) -> tuple[float, list[str]]:
    """Recompute a loaded file with this refattn: (worst ratio, problems)."""
    op = ops.get(vector.op)
    if op is None:
        return math.inf, [f"{vector.path.name}: op {vector.op!r} is not registered in this refattn"]
    rtol = VERIFY_RTOL[vector.dtype]
    result = _compute(op, vector.primals, vector.options, vector.cotangent)
    pairs = [("output", result.out, vector.output), ("lse", result.lse, vector.lse)]
    grads = zip(result.grads, vector.grads, strict=True)
    pairs += [(f"grad {i}", g, s) for i, (g, s) in enumerate(grads)]
    if vector.reference is not None:
        p64 = tuple(_cast(x, "float64") for x in vector.primals)
        o64 = {k: _cast(v, "float64") for k, v in vector.options.items()}
        ref = _compute(op, p64, o64, _cast(vector.cotangent, "float64"))
        pairs += [
            ("reference output", ref.out, vector.reference["output"]),
            ("reference lse", ref.lse, vector.reference["lse"]),
        ]
        pairs += [
            (f"reference grad {i}", g, s)
            for i, (g, s) in enumerate(zip(ref.grads, vector.reference["grads"], strict=True))
        ]
    worst = 0.0
    problems = []
    for what, mine, stored in pairs:
        mine_leaves, stored_leaves = _leaves(mine), _leaves(stored)
        if len(mine_leaves) != len(stored_leaves):
            problems.append(f"{vector.path.name}: {what} has a different structure than refattn's")
            continue
        for m, s in zip(mine_leaves, stored_leaves, strict=True):
            tol = VERIFY_RTOL["float64"] if what.startswith("reference") else rtol
            r = _ratio(m, s, tol)
            worst = max(worst, r)
            if not r <= 1.0:
                problems.append(
                    f"{vector.path.name}: {what} differs from refattn {__version__} "
                    f"(worst |diff| is {r:.3g}× the tolerance rtol={tol:g})"
                )
    return worst, problems


def verify(directory: str | Path, *, raise_on_error: bool = True) -> VerifyReport:
    """Check every file of a golden-vector directory: checksum, structure, and recomputation.

    Each file listed in the manifest must exist with its sha256, load cleanly (see :func:`load`)
    and match refattn's recomputation from the file's own inputs and cotangent within
    ``|recomputed - stored| <= rtol (|stored| + max|stored|)``, ``rtol`` 1e-11 for float64 and
    2e-5 for float32 (float32 results may differ in the last bits between BLAS builds and
    thread counts). ``.npz`` files in the directory that the manifest does not list are problems
    too.

    Raises :class:`GoldenVectorError` listing every problem (unless ``raise_on_error=False``);
    returns a :class:`VerifyReport`.
    """
    from .checks import all_cases

    root = Path(directory)
    manifest = read_manifest(root)
    all_cases()  # import every check module, so that every op is registered
    ops = registered_ops()
    report = VerifyReport(root, str(manifest.get("refattn_version")), [], [])
    listed = {entry["file"] for entry in manifest["files"]}
    for extra in sorted(p.name for p in root.glob("*.npz") if p.name not in listed):
        report.problems.append(f"{extra}: not listed in {MANIFEST}")
    for entry in manifest["files"]:
        path = root / entry["file"]
        try:
            vector = load(path, sha256=entry["sha256"])
        except GoldenVectorError as exc:
            report.problems.append(str(exc))
            continue
        if vector.op != entry["op"] or vector.dtype != entry["dtype"]:
            report.problems.append(
                f"{entry['file']}: the manifest says {entry['op']}/{entry['dtype']}, the file "
                f"says {vector.op}/{vector.dtype}"
            )
            continue
        worst, problems = _recheck(vector, ops)
        report.files.append((entry["file"], worst))
        report.problems.extend(problems)
    if report.problems and raise_on_error:
        raise GoldenVectorError(
            f"{root}: {len(report.problems)} problem(s):\n  " + "\n  ".join(report.problems)
        )
    return report


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``export`` and ``verify`` subcommands to the ``refattn vectors`` parser."""
    sub = parser.add_subparsers(dest="vectors_command", required=True, metavar="{export,verify}")
    exp = sub.add_parser("export", help="write golden vectors for every check case")
    exp.add_argument("directory", help="output directory (created if missing)")
    exp.add_argument("--ops", nargs="+", default=None, metavar="OP", help="only these ops")
    exp.add_argument(
        "--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="file dtypes"
    )
    ver = sub.add_parser("verify", help="re-check golden vectors against this refattn")
    ver.add_argument("directory", help="a directory written by `refattn vectors export`")


def run(args: argparse.Namespace) -> int:
    """Run ``refattn vectors export|verify``; the exit status (0 ok, 1 problems, 2 usage)."""
    if args.vectors_command == "export":
        try:
            manifest = export(args.directory, ops=args.ops, dtypes=args.dtypes)
        except ValueError as exc:
            print(f"refattn vectors export: {exc}", file=sys.stderr)
            return 2
        for item in manifest["skipped"]:
            print(f"skipped {item['label']} {item['dtype']}: {item['reason']}")
        print(
            f"wrote {len(manifest['files'])} files and {MANIFEST} to {args.directory} "
            f"(refattn {__version__}, {len(manifest['skipped'])} skipped)"
        )
        return 0
    try:
        report = verify(args.directory, raise_on_error=False)
    except GoldenVectorError as exc:
        print(f"refattn vectors verify: {exc}", file=sys.stderr)
        return 1
    for name, worst in report.files:
        status = "ok" if worst <= 1.0 else "FAIL"
        print(f"{status:4}  {name}  (worst {worst:.2g}× tolerance)")
    for problem in report.problems:
        print(f"problem: {problem}")
    print(
        f"{len(report.files)} files checked against refattn {__version__} (exported by "
        f"{report.refattn_version}): {len(report.problems)} problem(s)"
    )
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refattn.vectors export|verify DIR``."""
    parser = argparse.ArgumentParser(prog="refattn vectors", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
