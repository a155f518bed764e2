"""Golden vectors: round trip, determinism, checksums, and rejection of corrupted files."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

import refattn
from refattn import vectors
from refattn.checks import all_cases
from refattn.vectors import GoldenVectorError

#: a few registered cases: softmax, log_softmax, and SDPA with tuple outputs and masks
LABELS = (
    "softmax[fully_masked_row]",
    "log_softmax[mask]",
    "scaled_dot_product_attention[gqa]",
    "scaled_dot_product_attention[fully_masked_row]",
    "scaled_dot_product_attention[weights_and_lse]",
)


def _cases():
    by_label = {c.label: c for c in all_cases()}
    missing = [label for label in LABELS if label not in by_label]
    assert not missing, f"check cases renamed: {missing}"
    return [by_label[label] for label in LABELS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("golden")
    manifest = vectors.export(directory, cases=_cases())
    return directory, manifest


def _copy(exported, tmp_path):
    directory, _ = exported
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def _sdpa_file(directory, dtype="float64"):
    return directory / f"scaled_dot_product_attention__gqa__{dtype}.npz"


def _rewrite(path, arrays):
    """Write ``arrays`` as an .npz (object arrays get pickled) and fix the manifest's sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["file"] == path.name:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- round trip


def test_export_writes_every_case_and_dtype_with_checksums(exported):
    directory, manifest = exported
    assert manifest["refattn_version"] == refattn.__version__
    assert len(manifest["files"]) == 2 * len(LABELS)
    for entry in manifest["files"]:
        data = (directory / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert zipfile.ZipFile(directory / entry["file"]).testzip() is None
    on_disk = json.loads((directory / "manifest.json").read_text())
    assert on_disk == manifest
    for key in ("mask", "causal_alignment", "dropout_mask", "fully_masked_rows", "cotangent"):
        assert key in manifest["semantics"]
    assert "is_causal" in manifest["ops"]["scaled_dot_product_attention"]["parameters"]


def test_round_trip_matches_refattn_recomputed_here(exported):
    """Loaded inputs, pushed through refattn.vjp here, give the stored outputs and gradients."""
    directory, manifest = exported
    ops = refattn.registered_ops()
    for entry in manifest["files"]:
        vec = vectors.load(directory / entry["file"], sha256=entry["sha256"])
        op = ops[vec.op]
        out, pullback = refattn.vjp(op, *vec.primals, **vec.options)
        grads = pullback(vec.cotangent)
        outs = out if isinstance(out, tuple) else (out,)
        stored = vec.output if isinstance(vec.output, tuple) else (vec.output,)
        for mine, theirs in zip((*outs, *grads), (*stored, *vec.grads), strict=True):
            assert np.asarray(mine).dtype == np.dtype(entry["dtype"])
            np.testing.assert_array_equal(np.asarray(mine), theirs)
        if vec.op == "scaled_dot_product_attention":  # the LSE of the same call
            lse = op(*vec.primals, **{**vec.options, "return_lse": True})[-1]
            np.testing.assert_array_equal(lse, vec.lse)
        else:
            assert vec.lse is None
        if vec.dtype == "float32":  # reference/*: float64 results for the same float32 inputs
            up = [x.astype(np.float64) for x in vec.primals]
            ref_out = op(*up, **vec.options)
            first = ref_out[0] if isinstance(ref_out, tuple) else ref_out
            ref_first = vec.reference["output"]
            ref_first = ref_first[0] if isinstance(ref_first, tuple) else ref_first
            assert ref_first.dtype == np.float64
            np.testing.assert_array_equal(first, ref_first)


def test_fully_masked_rows_are_stored_as_refattn_defines_them(exported):
    directory, _ = exported
    vec = vectors.load(directory / "scaled_dot_product_attention__fully_masked_row__float64.npz")
    mask = vec.options["mask"]
    dead = ~mask.any(axis=-1)
    assert dead.any()
    out, lse = vec.output
    assert np.all(out[dead] == 0) and np.all(np.isneginf(lse[dead]))
    assert np.all(np.isneginf(vec.lse[dead]))
    assert np.all(np.isfinite(vec.grads[0]))


def test_export_is_byte_for_byte_deterministic(exported, tmp_path):
    _, manifest = exported
    again = vectors.export(tmp_path, cases=_cases())
    assert [f["sha256"] for f in again["files"]] == [f["sha256"] for f in manifest["files"]]


def test_verify_passes_and_reports_every_file(exported):
    directory, manifest = exported
    report = vectors.verify(directory)
    assert report.ok
    assert len(report.files) == len(manifest["files"])
    assert all(worst <= 1.0 for _, worst in report.files)


def test_export_selects_ops_and_rejects_unknown_ones(tmp_path):
    manifest = vectors.export(tmp_path, ops=["softmax"], dtypes=["float64"], cases=_cases())
    assert {f["op"] for f in manifest["files"]} == {"softmax"}
    assert {f["dtype"] for f in manifest["files"]} == {"float64"}
    with pytest.raises(ValueError, match="no check cases for ops"):
        vectors.export(tmp_path, ops=["no_such_op"], cases=_cases())
    with pytest.raises(ValueError, match="dtypes must be"):
        vectors.export(tmp_path, dtypes=["float16"], cases=_cases())


# ----------------------------------------------------------------------------- corruption


def test_flipped_byte_is_rejected(exported, tmp_path):
    directory = _copy(exported, tmp_path)
    path = _sdpa_file(directory)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:  # the last byte of input/q's float data
        info = zf.getinfo("input/q.npy")
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size - 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(GoldenVectorError, match="sha256 checksum mismatch") as info:
        vectors.verify(directory)
    assert path.name in str(info.value)
    # without the manifest's checksum the zip's own CRC (or the .npy header) still catches it
    with pytest.raises(GoldenVectorError, match=path.name):
        vectors.load(path)


def test_missing_key_is_rejected(exported, tmp_path):
    directory = _copy(exported, tmp_path)
    path = _sdpa_file(directory)
    arrays = _arrays(path)
    del arrays["grad/k"]
    _rewrite(path, arrays)
    with pytest.raises(GoldenVectorError, match=r"missing key 'grad/k' \(listed in meta\)"):
        vectors.verify(directory)


def test_pickled_object_is_rejected(exported, tmp_path):
    directory = _copy(exported, tmp_path)
    path = _sdpa_file(directory)
    arrays = _arrays(path)
    arrays["input/q"] = np.array([{"payload": 1}], dtype=object)
    _rewrite(path, arrays)
    with pytest.raises(GoldenVectorError, match="'input/q' holds a pickled Python object"):
        vectors.verify(directory)
    # a whole file that is a pickle is refused too, and nothing is unpickled
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(GoldenVectorError, match=r"pickle|not a valid"):
        vectors.load(path)


def test_wrong_dtype_is_rejected(exported, tmp_path):
    directory = _copy(exported, tmp_path)
    path = _sdpa_file(directory)
    arrays = _arrays(path)
    arrays["input/q"] = arrays["input/q"].astype(np.float32)
    _rewrite(path, arrays)
    with pytest.raises(GoldenVectorError, match="'input/q' has dtype float32, expected float64"):
        vectors.verify(directory)


def test_tampered_value_with_valid_checksum_fails_recomputation(exported, tmp_path):
    directory = _copy(exported, tmp_path)
    path = _sdpa_file(directory, "float32")
    arrays = _arrays(path)
    arrays["grad/v"] = arrays["grad/v"].copy()
    arrays["grad/v"].flat[0] += np.float32(1e-3)
    _rewrite(path, arrays)
    with pytest.raises(GoldenVectorError, match="grad 2 differs from refattn"):
        vectors.verify(directory)


def test_unlisted_file_and_bad_manifest_are_rejected(exported, tmp_path):
    directory = _copy(exported, tmp_path)
    (directory / "extra.npz").write_bytes(_sdpa_file(directory).read_bytes())
    with pytest.raises(GoldenVectorError, match=r"extra\.npz: not listed"):
        vectors.verify(directory)
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(GoldenVectorError, match="not valid JSON"):
        vectors.verify(directory)
    assert issubclass(GoldenVectorError, ValueError)


# ----------------------------------------------------------------------------- CLI hooks


def test_cli_hooks_export_and_verify(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    vectors.add_arguments(parser)
    args = parser.parse_args(["export", str(tmp_path), "--ops", "softmax", "--dtypes", "float32"])
    assert vectors.run(args) == 0
    files = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert files and all(name.startswith("softmax__") for name in files)
    assert vectors.run(parser.parse_args(["verify", str(tmp_path)])) == 0
    path = tmp_path / files[0]
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    assert vectors.run(parser.parse_args(["verify", str(tmp_path)])) == 1
    assert "sha256 checksum mismatch" in capsys.readouterr().out
