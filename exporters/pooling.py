"""Head2Toe's per-layer aggregation: strided average pooling to about T features, then unit norm.

`plan_tap_pool` is the single place where the pool size of a tap is decided. The torch reference
(`TapPool`), the exported backbone and the compiled task graph all use it, so the three cannot drift.

The rule follows the paper (Section 3.3) and the official code:
- conv map C x H x W: global average when C >= T; otherwise n = floor(sqrt(T // C)) pooled cells per
  side and a non-overlapping window of H // n x W // n (floor mode, so edge remainders are dropped,
  like TensorFlow's VALID pooling);
- tokens N x D: global average when D >= T; otherwise windows of floor(N / (T / D)) tokens;
- vectors are kept as they are.
Class token (ViT, paper Appendix G, Table 7), for token taps: 'pool' pools it with the other tokens
(Head2Toe's default); 'only' keeps just the class token, unpooled (D features); 'separate' keeps it
unpooled and pools the remaining (patch) tokens by the rule above, CLS features first.
One deliberate difference: where the official code falls back to a *global* pool because the layer
is smaller than T (window 0), we keep the layer unpooled (window 1), which keeps more information.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

TAP_KINDS = ("conv", "tokens", "vector")
CLS_TOKEN_POLICIES = ("pool", "only", "separate")

# Zero-aware normalisation: an all-zero vector stays zero instead of becoming NaN.
NORM_EPS = 1e-12


@dataclass(frozen=True)
class TapPool:
    """How one tap is pooled. `window` is (kh, kw) for conv maps, (k,) for tokens, () for vectors;
    `global_pool` means the mean over all positions; `features` is the flattened size per image;
    `cls_token` is how token 0 of a token tap is treated (see the module docstring); with
    'separate', window and global_pool apply to the tokens after it."""

    kind: str
    shape: tuple[int, ...]
    window: tuple[int, ...]
    global_pool: bool
    features: int
    cls_token: str = "pool"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TapPool":
        return cls(
            kind=d["kind"],
            shape=tuple(d["shape"]),
            window=tuple(d["window"]),
            global_pool=bool(d["global_pool"]),
            features=int(d["features"]),
            cls_token=d.get("cls_token", "pool"),
        )


def plan_tap_pool(kind: str, shape: tuple[int, ...], target_size: int, cls_token: str = "pool") -> TapPool:
    """Choose the pooling of one tap so that it yields about `target_size` features.

    shape: per-image shape, (C, H, W) for 'conv', (N, D) for 'tokens', (D,) for 'vector';
    cls_token: 'pool', 'only' or 'separate', for token taps whose token 0 is a class token.
    """
    if target_size < 1:
        raise ValueError(f"target size must be >= 1, got {target_size}")
    if cls_token not in CLS_TOKEN_POLICIES:
        raise ValueError(f"unknown class-token policy {cls_token!r}; expected one of {CLS_TOKEN_POLICIES}")
    if kind == "tokens" and cls_token != "pool":
        n, d = shape
        if cls_token == "only":
            return TapPool(kind, tuple(shape), (), False, d, cls_token)
        if n < 2:
            raise ValueError(f"a token tap of shape {tuple(shape)} has no tokens beside the class token")
        rest = plan_tap_pool(kind, (n - 1, d), target_size)
        return TapPool(kind, tuple(shape), rest.window, rest.global_pool, d + rest.features, cls_token)
    if kind == "conv":
        c, h, w = shape
        if c >= target_size:
            return TapPool(kind, tuple(shape), (h, w), True, c)
        cells_per_side = max(1, math.isqrt(target_size // c))
        kh, kw = max(1, h // cells_per_side), max(1, w // cells_per_side)
        return TapPool(kind, tuple(shape), (kh, kw), False, c * (h // kh) * (w // kw))
    if kind == "tokens":
        n, d = shape
        if d >= target_size:
            return TapPool(kind, tuple(shape), (n,), True, d)
        k = max(1, int(n / (target_size / d)))
        return TapPool(kind, tuple(shape), (k,), False, d * (n // k))
    if kind == "vector":
        (d,) = shape
        return TapPool(kind, tuple(shape), (), False, d)
    raise ValueError(f"unknown tap kind {kind!r}; expected one of {TAP_KINDS}")


class PoolNormalize(nn.Module):
    """Pool one tap as planned, flatten and unit-normalise: [B, *shape] -> float32[B, features].

    Conv maps flatten in (C, h', w') order and tokens in (window, D) order, after the class token's
    D features where it is kept apart; the feature indices that selection stores refer to this order.
    normalize=False returns the pooled features unnormalised, for graphs that scale only the few
    features a head reads by the layer's inverse norm (`tap_norm`).
    """

    def __init__(self, plan: TapPool, normalize: bool = True):
        super().__init__()
        self.plan = plan
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan.kind == "conv":
            # A global pool too is a window (over the whole map), not a mean over axes: it exports as
            # AveragePool, which ONNX Runtime runs in its blocked (NCHWc) conv layout, where a mean
            # over axes first reorders the whole map back to NCHW.
            if plan.window != (1, 1):
                x = nn.functional.avg_pool2d(x, plan.window, plan.window)
        elif plan.kind == "tokens":
            if plan.cls_token == "only":
                x = x[:, 0]
            elif plan.cls_token == "separate":
                x = torch.cat([x[:, 0], _pool_tokens(x[:, 1:], plan).flatten(1)], dim=1)
            else:
                x = _pool_tokens(x, plan)
        x = x.flatten(1)
        return x / tap_norm(x) if self.normalize else x


def tap_norm(features: torch.Tensor) -> torch.Tensor:
    """The zero-aware L2 norm that `PoolNormalize` divides by: float32[B, f] -> float32[B, 1]."""
    return torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(NORM_EPS)


def _pool_tokens(x: torch.Tensor, plan: TapPool) -> torch.Tensor:
    """[B, N, D] -> [B, D] (global) or [B, N // k, D] (windows of k tokens)."""
    if plan.global_pool:
        return x.mean(dim=1)
    if plan.window == (1,):
        return x
    # [B, N, D] -> [B, D, N] for 1-D pooling over tokens, then back.
    return nn.functional.avg_pool1d(x.transpose(1, 2), plan.window, plan.window).transpose(1, 2)
