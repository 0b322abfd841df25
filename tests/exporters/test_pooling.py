import numpy as np
import pytest
import torch

from exporters.pooling import PoolNormalize, TapPool, plan_tap_pool


@pytest.mark.parametrize(
    "kind, shape, target, window, global_pool, features",
    [
        # The paper's example layer (20x20x128, T=512): 2x2 cells of 10x10, 512 features.
        ("conv", (128, 20, 20), 512, (10, 10), False, 512),
        ("conv", (1280, 7, 7), 512, (7, 7), True, 1280),  # C >= T: global pool
        ("conv", (32, 112, 112), 512, (28, 28), False, 512),
        ("conv", (16, 3, 3), 8192, (1, 1), False, 144),  # smaller than T: kept whole
        ("tokens", (197, 768), 512, (197,), True, 768),
        ("tokens", (196, 768), 15360, (9,), False, 768 * 21),
        ("vector", (1000,), 512, (), False, 1000),
    ],
)
def test_pool_plan(kind, shape, target, window, global_pool, features):
    plan = plan_tap_pool(kind, shape, target)
    assert (plan.window, plan.global_pool, plan.features) == (window, global_pool, features)


def _numpy_reference(x: np.ndarray, plan) -> np.ndarray:
    """Straightforward loops: average each window, flatten, unit-normalise per image."""
    b = x.shape[0]
    if plan.kind == "tokens" and plan.cls_token == "only":
        y = x[:, 0]
    elif plan.kind == "tokens" and plan.cls_token == "separate":
        # The class token unpooled, then the other tokens pooled as their own (N - 1, D) tap.
        n, d = plan.shape
        rest = TapPool("tokens", (n - 1, d), plan.window, plan.global_pool, 0)
        y = np.concatenate([x[:, 0], _pooled(x[:, 1:], rest).reshape(b, -1)], axis=1)
    else:
        y = _pooled(x, plan)
    y = y.reshape(b, -1)
    norm = np.linalg.norm(y, axis=1, keepdims=True)
    return np.where(norm > 0, y / np.maximum(norm, 1e-12), 0.0)


def _pooled(x: np.ndarray, plan) -> np.ndarray:
    b = x.shape[0]
    if plan.kind == "conv":
        if plan.global_pool:
            y = x.mean(axis=(2, 3))
        else:
            kh, kw = plan.window
            c, h, w = plan.shape
            oh, ow = h // kh, w // kw
            y = np.zeros((b, c, oh, ow))
            for i in range(oh):
                for j in range(ow):
                    y[:, :, i, j] = x[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(2, 3))
    elif plan.kind == "tokens":
        if plan.global_pool:
            y = x.mean(axis=1)
        else:
            (k,) = plan.window
            n, d = plan.shape
            y = np.stack([x[:, i * k:(i + 1) * k].mean(axis=1) for i in range(n // k)], axis=1)
    else:
        y = x
    return y


@pytest.mark.parametrize(
    "kind, shape, target, cls_token",
    [("conv", (8, 13, 11), 64, "pool"), ("conv", (8, 5, 5), 8, "pool"), ("conv", (4, 6, 6), 4096, "pool"),
     ("tokens", (17, 6), 24, "pool"), ("tokens", (10, 4), 2, "pool"), ("vector", (9,), 512, "pool"),
     ("tokens", (17, 6), 24, "only"), ("tokens", (17, 6), 24, "separate"), ("tokens", (10, 4), 2, "separate"),
     ("tokens", (5, 4), 64, "separate"), ("conv", (8, 5, 5), 8, "only")],
)
def test_pool_normalize_matches_numpy(kind, shape, target, cls_token):
    plan = plan_tap_pool(kind, shape, target, cls_token)
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    got = PoolNormalize(plan)(torch.from_numpy(x)).numpy()
    assert got.shape == (3, plan.features)
    np.testing.assert_allclose(got, _numpy_reference(x.astype(np.float64), plan), atol=1e-6)


@pytest.mark.parametrize(
    "shape, target, cls_token, window, global_pool, features",
    [
        ((197, 768), 512, "only", (), False, 768),  # the class token alone, unpooled
        ((197, 768), 512, "separate", (196,), True, 768 + 768),  # CLS + global mean of the 196 patches
        ((197, 768), 15360, "separate", (9,), False, 768 + 768 * 21),  # CLS + 21 windows of 9 patches
        ((5, 4), 64, "separate", (1,), False, 4 + 16),  # smaller than T: patches kept whole
    ],
)
def test_class_token_plans(shape, target, cls_token, window, global_pool, features):
    plan = plan_tap_pool("tokens", shape, target, cls_token)
    assert (plan.window, plan.global_pool, plan.features, plan.cls_token) == (window, global_pool, features, cls_token)
    assert TapPool.from_dict(plan.to_dict()) == plan


def test_unknown_class_token_policy():
    with pytest.raises(ValueError, match="class-token policy"):
        plan_tap_pool("tokens", (5, 4), 8, "first")


def test_zero_features_stay_zero():
    plan = plan_tap_pool("conv", (4, 8, 8), 16)
    out = PoolNormalize(plan)(torch.zeros(2, 4, 8, 8))
    assert torch.isfinite(out).all() and out.abs().max() == 0
