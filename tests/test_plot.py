"""refattn.plot: the Figures' artists hold the data (image arrays equal the weights, labels,
colorbars, axes counts), and the PNGs are written."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from refattn import plot
from refattn.interpret import attention_rollout, entropy_by_layer


def _weights(rng, shape):
    e = np.exp(rng.standard_normal(shape))
    return e / e.sum(-1, keepdims=True)


def test_heatmap_image_is_the_weights(tmp_path):
    rng = np.random.default_rng(0)
    w = _weights(rng, (4, 4))
    tokens = ["[CLS]", "a", "cat", "[SEP]"]
    fig = plot.heatmap(w, tokens=tokens, title="head 0")
    ax, cbar = fig.axes
    np.testing.assert_array_equal(ax.images[0].get_array(), w)
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    assert ax.get_title() == "head 0" and cbar.get_ylabel() == "weight"
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_head_grid_has_one_image_per_layer_and_head():
    rng = np.random.default_rng(1)
    w = _weights(rng, (3, 2, 5, 5))
    fig = plot.head_grid(w)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 6 and len(fig.axes) == 7  # six heads, and the colorbar
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), w[1, 1])
    assert {ax.images[0].get_clim() for ax in fig.axes[:6]} == {(0.0, w.max())}


def test_entropy_and_rollout_plots_draw_their_data():
    rng = np.random.default_rng(2)
    w = _weights(rng, (3, 2, 5, 5))
    per_head, per_layer = entropy_by_layer(w)
    fig = plot.entropy_plot(per_head, per_layer)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3  # two heads and the mean
    np.testing.assert_array_equal(lines[-1].get_ydata(), per_layer)
    np.testing.assert_array_equal(lines[0].get_ydata(), per_head[:, 0])
    r = attention_rollout(w)
    fig = plot.rollout_map(r, tokens=list("abcde"))
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), r)
    assert fig.axes[0].get_xlabel() == "input token"


def test_plot_bad_input():
    with pytest.raises(ValueError, match="2-d"):
        plot.heatmap(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        plot.heatmap(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="3 labels for 2 keys"):
        plot.heatmap(np.eye(2), tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(L, H\)"):
        plot.entropy_plot(np.zeros(3))


def test_mechanisms_figure_holds_each_mechanism():
    import refattn
    from refattn._plot_cli import _mechanisms

    weights = _mechanisms(8, seed=0)
    fig = plot.mechanisms(weights)
    drawn = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in drawn] == list(weights)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((8, 16)) for _ in range(3))
    causal = refattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)[1]
    np.testing.assert_array_equal(drawn[1].images[0].get_array(), causal)
    assert np.all(np.triu(drawn[1].images[0].get_array(), 1) == 0)


def test_cli_plot_demo_and_weights(tmp_path, capsys):
    from refattn.cli import main

    assert main(["plot", "demo", "--out", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "mechanisms.png").stat().st_size > 10_000
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "w.npz", weights=_weights(rng, (2, 3, 4, 4)), tokens=np.array(list("abcd")))
    assert main(["plot", "weights", str(tmp_path / "w.npz"), "--out", str(tmp_path / "w")]) == 0
    for name in ("grid.png", "entropy.png", "rollout.png"):
        assert (tmp_path / "w" / name).stat().st_size > 5_000


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"w": np.eye(3)}, "no array 'weights'"),
        ({"weights": np.full((1, 2, 2), 0.7)}, "row-stochastic"),
        ({"weights": np.full((2, 2), 0.5)}, "(L, H, n, n)"),
    ],
)
def test_cli_plot_bad_input(tmp_path, capsys, arrays, words):
    from refattn.cli import main

    np.savez(tmp_path / "w.npz", **arrays)
    assert main(["plot", "weights", str(tmp_path / "w.npz"), "--out", str(tmp_path)]) == 2
    assert words in capsys.readouterr().err
    assert main(["plot", "weights", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 2


def test_cli_plot_encoder_state_dict_matches_torch(tmp_path):
    """A torch nn.TransformerEncoder's state_dict: the weights drawn are torch's own."""
    torch = pytest.importorskip("torch")
    from refattn._plot_cli import _encoder_layers
    from refattn.cli import main
    from refattn.interpret import encoder_attention_gradients

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    torch.save(model.state_dict(), tmp_path / "enc.pt")
    x = np.random.default_rng(4).standard_normal((5, 8))
    np.save(tmp_path / "x.npy", x)
    argv = ["plot", "encoder", str(tmp_path / "enc.pt"), "--x", str(tmp_path / "x.npy")]
    assert main([*argv, "--n-heads", "2", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "grid.png").stat().st_size > 5_000
    layers = _encoder_layers(torch.load(tmp_path / "enc.pt", weights_only=True))
    res = encoder_attention_gradients(layers, x, np.zeros_like(x), n_heads=2)
    h = torch.tensor(x)[None]
    for i, mod in enumerate(model.layers):
        _, a = mod.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
        np.testing.assert_allclose(res.weights[i], a[0].detach().numpy(), rtol=1e-12, atol=1e-15)
        h = mod(h)
    np.testing.assert_allclose(res.output, h[0].detach().numpy(), rtol=1e-12, atol=1e-13)
