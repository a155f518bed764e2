"""DLPack interop: torch/JAX arrays into refattn without copies, results back out."""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.interop.dlpack import as_array, from_dlpack, is_dlpack_producer, to_framework


def test_torch_tensor_is_viewed_not_copied():
    torch = pytest.importorskip("torch")
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    view = from_dlpack(t)
    assert isinstance(view, np.ndarray) and view.dtype == np.float64
    assert np.shares_memory(view, t.numpy())
    t[0, 0, 0] = 123.0  # writes through in both directions
    assert view[0, 0, 0] == 123.0
    view[1, 2, 3] = -7.0
    assert t[1, 2, 3].item() == -7.0


def test_tensor_requiring_grad_and_strided_tensor_are_views():
    torch = pytest.importorskip("torch")
    leaf = torch.randn(4, 5, dtype=torch.float32, requires_grad=True)
    view = from_dlpack(leaf)
    assert np.shares_memory(view, leaf.detach().numpy())
    transposed = torch.arange(12.0, dtype=torch.float64).reshape(3, 4).t()
    strided = from_dlpack(transposed)
    assert np.shares_memory(strided, transposed.numpy())
    np.testing.assert_array_equal(strided, transposed.numpy())


def test_bfloat16_tensor_is_viewed_through_ml_dtypes():
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    t = torch.randn(3, 4).to(torch.bfloat16)
    view = from_dlpack(t)
    assert view.dtype.name == "bfloat16"
    np.testing.assert_array_equal(view.astype(np.float32), t.float().numpy())
    t[0, 0] = 2.5
    assert float(view[0, 0]) == 2.5  # same memory
    back = to_framework(view, "torch")
    assert back.dtype == torch.bfloat16 and back.data_ptr() == t.data_ptr()


def test_refattn_on_torch_views_matches_torch_and_hands_back_without_copy():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=g) for _ in range(3))
    out = refattn.scaled_dot_product_attention(
        from_dlpack(q), from_dlpack(k), from_dlpack(v), is_causal=True
    )
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-14)
    out_t = to_framework(out, "torch")
    assert isinstance(out_t, torch.Tensor) and out_t.data_ptr() == out.ctypes.data


def test_jax_arrays_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    view = from_dlpack(x)
    assert isinstance(view, np.ndarray)
    np.testing.assert_array_equal(view, np.arange(12.0, dtype=np.float32).reshape(3, 4))
    back = to_framework(view, "jax")
    np.testing.assert_array_equal(np.asarray(back), view)


def test_as_array_passes_arrays_through_and_converts_the_rest():
    x = np.ones((2, 2))
    assert as_array(x) is x
    listed = as_array([[1.0, 2.0]])
    assert isinstance(listed, np.ndarray) and listed.shape == (1, 2)
    array_api_strict = pytest.importorskip("array_api_strict")
    s = array_api_strict.asarray([1.0, 2.0])
    assert as_array(s) is s
    assert is_dlpack_producer(x) and not is_dlpack_producer([1.0])


def test_bad_arguments():
    with pytest.raises(TypeError, match="implementing DLPack"):
        from_dlpack([1.0, 2.0])
    with pytest.raises(ValueError, match="framework must be one of"):
        to_framework(np.ones(2), "tensorflow")
