"""The authors' inference routing rule, for batch row 0, as one torch module without randomness.

Their rule (``StructureVectorQuantizer.get_cosine_sim_min_encoding_indices`` in
``pdm/models/vq/quantizer.py``, with ``HyperStructure`` heads and the samplers of
``pdm/utils/estimation_utils.py``), for a prompt embedding ``e`` (mean-pooled MPNet, not
normalised, ``pdm/utils/data_utils.py:get_mpnet_embeddings``):

1. ``z = [head_1(e), ..., head_G(e), head_depth(e)]`` (one linear head per width group).
2. Width group ``g``: ``y = sigmoid((z_g + n_g + base) / T)`` with Gumbel noise
   ``n = -log(-log(u + 1e-20) + 1e-20)``, ``u = torch.rand((B, w_g), generator seeded 0)``;
   with ``non_zero_width`` a group whose entries are all ``< 0.5`` gets 0.5 added to its first.
3. Depth: ``s = softmax(z_depth)``, reversed cumulative sum ``x = flip(cumsum(s))``, logit
   ``log(x + 1e-6) - log1p(-(x - 1e-6))``, ``y = sigmoid((x + n + base) / T)`` with the noise
   drawn the same way (shape (B, depth)); then ``y`` is scattered: ``out[depth_order[i]] = y[i]``.
4. ``width_depth_normalize``: every entry binarised (``>= 0.5``), except the width entries of a
   depth-gated module, which become the *soft* product ``y_width * y_depth``; every entry then
   scaled by ``sqrt(1 / group width)`` (depth entries by 1).
5. L2-normalise, cosine against the codes ``embedding_gs`` put through step 4 and normalised,
   argmax (first on ties).

The noise depends on the batch row in their code (row r gets the r-th draws); here every prompt
is row 0, so its expert never depends on what it is batched with. The noise is computed once
(exactly as their sampler does) and stored as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import AuthorsLayout
from .reader import ReleaseRouter

__all__ = ["ReleaseRouterHead", "gumbel_row0", "mean_pool"]


def gumbel_row0(width: int) -> Tensor:
    """Row 0 of the authors' fixed-seed Gumbel noise for a group of `width` entries."""
    eps = 1e-20
    u = torch.rand((1, width), generator=torch.Generator().manual_seed(0))
    return (-torch.log(-torch.log(u + eps) + eps)).reshape(-1)


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token embeddings over the attention mask (no normalisation), as the authors'
    ``get_mpnet_embeddings``."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class ReleaseRouterHead(nn.Module):
    """``sentence_embedding (B, E) -> scores (B, K)``: the authors' rule with row-0 noise.

    All buffers are float32 constants; the forward has no data-dependent control flow, so it
    traces to one ONNX graph (ops: Gemm, Add, Div, Sigmoid, GreaterOrEqual, Where, MatMul,
    Softmax, CumSum, Log, ReduceL2) that onnxruntime runs without torch.
    """

    def __init__(self, router: ReleaseRouter, layout: AuthorsLayout):
        super().__init__()
        nw, nd = layout.num_width, layout.num_depth
        self.num_width, self.num_depth = nw, nd
        self.temperature, self.base = float(router.temperature), float(router.base)
        self.non_zero_width = bool(router.non_zero_width)
        self.register_buffer("weight", router.head_weight.float().clone())
        self.register_buffer("bias", router.head_bias.float().clone())
        self.register_buffer("width_noise", torch.cat([gumbel_row0(w) for w in layout.width_groups]))
        self.register_buffer("depth_noise", gumbel_row0(nd) if nd else torch.zeros(0))
        groups = len(layout.width_groups)
        member = torch.zeros(nw, groups)
        member[torch.arange(nw), layout.group_of_width] = 1.0
        first = torch.zeros(groups, nw)
        first[torch.arange(groups), layout.group_first] = 1.0
        self.register_buffer("group_member", member)  # (Nw, G): sums a group's hard entries
        self.register_buffer("group_first", first)  # (G, Nw): the first entry of each group
        # Scatter by depth_order: sampled entry i lands at position order[i].
        scatter = torch.zeros(nd, nd)
        if nd:
            scatter[torch.arange(nd), torch.tensor(router.depth_order)] = 1.0
        self.register_buffer("depth_scatter", scatter)
        depth_of = layout.depth_of_width
        spread = torch.zeros(max(nd, 1), nw)
        gated = depth_of >= 0
        spread[depth_of[gated], torch.nonzero(gated).flatten()] = 1.0
        self.register_buffer("depth_spread", spread[:nd])  # (Nd, Nw): a module's depth onto its widths
        self.register_buffer("depth_gated", gated.reshape(1, -1))
        sizes = torch.tensor(layout.width_groups + [1] * nd)
        # Their template: 1 / (group width) per entry in float32, then its square root.
        template = 1.0 / torch.repeat_interleave(sizes, sizes).to(torch.float32)
        self.register_buffer("scale", torch.sqrt(template))
        self.register_buffer("codes", self._normalized(self.width_depth_normalize(router.embedding_gs.float())))

    def sample(self, embeddings: Tensor) -> Tensor:
        """Steps 1-3: the (B, D) relaxed arch vector in the authors' order (depth scattered)."""
        z = embeddings @ self.weight.T + self.bias
        zw, zd = z[:, : self.num_width], z[:, self.num_width:]
        y = torch.sigmoid((zw + self.width_noise + self.base) / self.temperature)
        if self.non_zero_width:
            kept = (y >= 0.5).to(y.dtype) @ self.group_member  # (B, G)
            y = y + 0.5 * ((kept == 0).to(y.dtype) @ self.group_first)
        if self.num_depth:
            x = torch.flip(torch.cumsum(torch.softmax(zd, dim=1), dim=1), dims=[1])
            eps = 1e-6
            # log1p(v) as log(1 + v): v = -(x - eps) lies in [-1, 0), where 1 + v is exact
            # for v <= -0.5 and within one rounding otherwise (ONNX has no Log1p).
            x = torch.log(x + eps) - torch.log(1 + (-(x - eps)))
            d = torch.sigmoid((x + self.depth_noise + self.base) / self.temperature) @ self.depth_scatter
            y = torch.cat([y, d], dim=1)
        return y

    def width_depth_normalize(self, y: Tensor) -> Tensor:
        """Step 4 on (B, D) relaxed vectors."""
        hard = (y >= 0.5).to(y.dtype)
        if self.num_depth:
            yw, yd = y[:, : self.num_width], y[:, self.num_width:]
            product = yw * (yd @ self.depth_spread)
            width = torch.where(self.depth_gated, product, hard[:, : self.num_width])
            hard = torch.cat([width, hard[:, self.num_width:]], dim=1)
        return hard * self.scale

    @staticmethod
    def _normalized(v: Tensor) -> Tensor:
        return v / v.norm(dim=-1, keepdim=True)

    def forward(self, sentence_embedding: Tensor) -> Tensor:
        u = self._normalized(self.width_depth_normalize(self.sample(sentence_embedding)))
        return u @ self.codes.T

    def route(self, sentence_embedding: Tensor) -> Tensor:
        """(B,) the chosen code of every row."""
        return torch.argmax(self.forward(sentence_embedding), dim=-1)
