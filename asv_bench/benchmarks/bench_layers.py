"""Layers: multi-head self-attention and one transformer encoder layer, refattn against torch.

Both implementations run in the same suite (``implementation`` parameter), so ratios
``time_*[refattn] / time_*[torch]`` come from one run at equal shape and dtype. torch runs its
modules in train mode with dropout 0 (its fused inference fast path is off; the backward needs
the training graph anyway), with inputs that require grad. refattn's self-attention gradient
includes the sum ``dq + dk + dv`` (in place, into ``dq``, as a user would write it), the work
torch's autograd does when one tensor is passed three times.

Shapes: B=4, n=512, d_model=512, 8 heads (head_dim 64); the encoder layer adds d_ff=2048.
"""

from __future__ import annotations

from .common import randn, torch_or_skip

B, N, D_MODEL, N_HEADS, D_FF = 4, 512, 512, 8, 2048


class MultiHeadAttention:
    """Self-attention ``MHA(x, x, x)``: forward, and forward + backward (all gradients)."""

    params = (["refattn", "torch"], ["float32", "float64"])
    param_names = ["implementation", "dtype"]
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, implementation, dtype):
        x = randn((B, N, D_MODEL), dtype)
        dy = randn((B, N, D_MODEL), dtype, offset=1)
        if implementation == "refattn":
            import refattn
            from refattn.layers import init_multi_head_attention, multi_head_attention

            params = init_multi_head_attention(D_MODEL, N_HEADS, seed=0, dtype=dtype)

            def forward():
                return multi_head_attention(params, x, x, x, n_heads=N_HEADS)

            def forward_backward():
                _, pullback = refattn.vjp(multi_head_attention, params, x, x, x, n_heads=N_HEADS)
                dparams, dq, dk, dv = pullback(dy)
                dq += dk  # the input gradient of self-attention, summed in place
                dq += dv
                return dparams, dq

        else:
            torch = torch_or_skip()
            module = torch.nn.MultiheadAttention(
                D_MODEL, N_HEADS, dropout=0.0, batch_first=True, dtype=getattr(torch, dtype)
            ).train()
            tx = torch.from_numpy(x).requires_grad_(True)
            tdy = torch.from_numpy(dy)

            def forward():
                with torch.no_grad():
                    return module(tx, tx, tx, need_weights=False)[0]

            def forward_backward():
                module.zero_grad(set_to_none=True)
                tx.grad = None
                module(tx, tx, tx, need_weights=False)[0].backward(tdy)

        self.forward, self.forward_backward = forward, forward_backward
        self.forward_backward()  # warm up (thread pools, allocator)

    def time_forward(self, implementation, dtype):
        self.forward()

    def time_forward_backward(self, implementation, dtype):
        self.forward_backward()


class TransformerEncoderLayer:
    """One post-LN encoder layer (ReLU), forward + backward (all gradients)."""

    params = (["refattn", "torch"], ["float32", "float64"])
    param_names = ["implementation", "dtype"]
    number = 1
    repeat = (3, 7, 60.0)
    timeout = 600

    def setup(self, implementation, dtype):
        x = randn((B, N, D_MODEL), dtype, offset=2)
        dy = randn((B, N, D_MODEL), dtype, offset=3)
        if implementation == "refattn":
            import refattn
            from refattn.layers import init_transformer_encoder_layer, transformer_encoder_layer

            params = init_transformer_encoder_layer(
                D_MODEL, N_HEADS, dim_feedforward=D_FF, seed=0, dtype=dtype
            )

            def forward_backward():
                _, pullback = refattn.vjp(transformer_encoder_layer, params, x, n_heads=N_HEADS)
                return pullback(dy)

        else:
            torch = torch_or_skip()
            module = torch.nn.TransformerEncoderLayer(
                D_MODEL,
                N_HEADS,
                D_FF,
                dropout=0.0,
                batch_first=True,
                dtype=getattr(torch, dtype),
            ).train()
            tx = torch.from_numpy(x).requires_grad_(True)
            tdy = torch.from_numpy(dy)

            def forward_backward():
                module.zero_grad(set_to_none=True)
                tx.grad = None
                module(tx).backward(tdy)

        self.forward_backward = forward_backward
        self.forward_backward()

    def time_forward_backward(self, implementation, dtype):
        self.forward_backward()
