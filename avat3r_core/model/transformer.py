"""Transformer: dense self-attention over all views' tokens, expression cross-attention.

* :class:`Block` — pre-norm ``x + SA(LN(x))``, ``x + MLP(LN(x))`` (GELU, ratio 4) over all
  ``V·(H/p)·(W/p)`` tokens of a sample jointly (views are concatenated along the sequence).
* :class:`CrossAttention` — pre-norm ``x + CA(LN(x), LN(e))``: every image token queries the
  S expression tokens ``e``. No MLP of its own: the next SA block's MLP follows it (our choice).
* :class:`ExpressionEncoder` — MLP ``z_exp → S × D`` (Linear, GELU, Linear) plus a learned
  per-token embedding, so the S tokens differ even for ``z_exp = 0``.
* Placement (the paper gives only "8 SA blocks and 8 CA layers"): one CA layer after each of the
  *last* ``cross_attn_layers`` SA blocks; with 8 + 8 that is one after every block. The blocks up
  to and including the first one followed by a CA layer never see the expression, so their output
  is the animation cache (:meth:`Transformer.encode`), and :meth:`Transformer.decode` runs the
  rest.
* Heads = D / head_dim (64); attention is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avat3r_core.model.config import Avat3rConfig
from avat3r_core.tracking import expression_code as ec

__all__ = ["SelfAttention", "CrossAttention", "Mlp", "Block", "ExpressionEncoder", "Transformer"]


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, h, N, d)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(*(_split_heads(t, self.heads) for t in (q, k, v)))
        return self.out(_merge_heads(o))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm dense self-attention + MLP."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Pre-norm residual cross-attention of image tokens (queries) to expression tokens."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = _split_heads(self.q(self.norm_q(x)), self.heads)
        k, v = self.kv(self.norm_kv(context)).chunk(2, dim=-1)
        o = F.scaled_dot_product_attention(q, _split_heads(k, self.heads), _split_heads(v, self.heads))
        return x + self.out(_merge_heads(o))


class ExpressionEncoder(nn.Module):
    """``z_exp`` (B, D_exp) → S expression tokens (B, S, D).

    The code first becomes ``(z − shift) · gain`` (non-persistent buffers from the config's
    ``expr_normalization``; identity for ``"none"`` or a code that is not the 135-d layout), so
    checkpoints hold the same tensors either way."""

    def __init__(self, expr_dim: int, hidden: int, dim: int, num_tokens: int, normalization: str = "none",
                 rotation_gain: float = 10.0, *, frame: str):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.fc1 = nn.Linear(expr_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_tokens * dim)
        self.token_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        shift, gain = torch.zeros(expr_dim), torch.ones(expr_dim)
        if normalization == "layout" and expr_dim == ec.DIM:
            for part in (ec.EYE_LEFT, ec.EYE_RIGHT, ec.NECK, ec.JAW, ec.HEAD_ROT):
                shift[part] = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # 6D of the identity rotation
                gain[part] = rotation_gain
            gain[ec.HEAD_TRANS] = rotation_gain  # metres: 0.1 m ~ 1
            if frame == "head":
                gain[ec.HEAD_POSE] = 0.0
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("gain", gain, persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        z = (z - self.shift.to(z.dtype)) * self.gain.to(z.dtype)
        e = self.fc2(F.gelu(self.fc1(z))).view(z.shape[0], self.num_tokens, self.dim)
        return e + self.token_embed


class Transformer(nn.Module):
    def __init__(self, config: Avat3rConfig):
        super().__init__()
        self.config = c = config
        eps = 1e-6
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_hidden, eps) for _ in range(c.depth))
        self.cross = nn.ModuleList(CrossAttention(c.dim, c.num_heads, eps) for _ in range(c.cross_attn_layers))
        self.expression = ExpressionEncoder(c.expr_dim, c.expr_hidden, c.dim, c.num_expr_tokens, c.expr_normalization,
                                            c.expr_rotation_gain, frame=c.frame)
        self.norm = nn.LayerNorm(c.dim, eps=eps)
        # block index → cross-attention layer that follows it
        self._cross_of = {i: k for k, i in enumerate(c.cross_after)}

    def encode(self, tokens: Tensor) -> Tensor:
        """Run the SA blocks that precede the first cross-attention layer (expression-free)."""
        for block in self.blocks[: self.config.encoder_blocks]:
            tokens = block(tokens)
        return tokens

    def decode(self, cached: Tensor, z_exp: Tensor) -> Tensor:
        """From the cache: first CA layer, then the remaining (SA, CA) pairs, final LayerNorm."""
        c = self.config
        expr = self.expression(z_exp.to(cached.dtype))
        x = cached
        start = c.encoder_blocks
        if c.cross_attn_layers:
            x = self.cross[self._cross_of[start - 1]](x, expr)
        for i in range(start, c.depth):
            x = self.blocks[i](x)
            if i in self._cross_of:
                x = self.cross[self._cross_of[i]](x, expr)
        return self.norm(x)

    def forward(self, tokens: Tensor, z_exp: Tensor) -> Tensor:
        return self.decode(self.encode(tokens), z_exp)
