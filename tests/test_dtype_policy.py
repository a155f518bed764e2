"""One dtype policy for every op: float32 and float64 in, the same dtype out; float16,
bfloat16, integers and bools rejected with a message that names the argument and says why."""

from __future__ import annotations

import numpy as np
import pytest

import refattn


def _calls(dtype):
    x = np.ones((2, 3, 4), dtype=dtype)
    params = refattn.init_multi_head_attention(4, 2)
    return {
        "softmax": lambda: refattn.softmax(x),
        "log_softmax": lambda: refattn.log_softmax(x),
        "scaled_dot_product_attention": lambda: refattn.scaled_dot_product_attention(x, x, x),
        "linear_attention": lambda: refattn.linear_attention(x, x, x),
        "sliding_window_attention": lambda: refattn.sliding_window_attention(x, x, x, window=1),
        "multi_head_attention": lambda: refattn.multi_head_attention(params, x, x, x, n_heads=2),
    }


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.bool_])
@pytest.mark.parametrize("op", list(_calls(np.float64)))
def test_other_dtypes_are_rejected_with_a_clear_message(op, dtype):
    with pytest.raises(TypeError, match=r"float32 or float64, got (float16|int64|bool)"):
        _calls(dtype)[op]()


def test_bfloat16_is_rejected_too():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.ones((2, 3, 4), dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="q must have a real floating dtype, float32 or float64"):
        refattn.scaled_dot_product_attention(x, x, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", list(_calls(np.float64)))
def test_float32_and_float64_are_kept(op, dtype):
    if op == "multi_head_attention" and dtype == np.float32:
        pytest.skip("the parameters are float64: mixing is a documented TypeError")
    assert _calls(dtype)[op]().dtype == dtype
