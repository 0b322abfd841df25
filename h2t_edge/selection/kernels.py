"""Batched trainers: many linear heads (CV folds x lambdas x lrs) trained in one GEMM per step.

See `h2t_edge.selection.estimators` for the protocol they serve and the layout of the weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.optim.adam import adam as _adam

from h2t_edge.core.errors import FitError
from h2t_edge.core.progress import Progress
from h2t_edge.selection.grid import PENALTIES, batch_schedule, cosine_lr, cpu_training_mode

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_NORM_EPS = 1e-12  # group-lasso subgradient W_i/||W_i||: avoids 0/0 for rows still at zero
_PROGRESS_EVERY = 25  # steps between progress callbacks
_GATHER_BUDGET_BYTES = 1 << 30  # per chunk of retrained models: [models, n, k_max] float32


def _lr_groups(lrs: Sequence[float]) -> list[tuple[float, np.ndarray]]:
    """Model indices per distinct lr (the fused Adam kernel takes one scalar lr per call)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    return [(float(lr), np.flatnonzero(lrs == lr)) for lr in dict.fromkeys(lrs.tolist())]


class _Adam:
    """Adam over a list of tensors with one lr, using torch's fused CPU kernel in place."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = [torch.zeros((), dtype=torch.float32) for _ in params]

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        _adam(self.params, grads, self.exp_avg, self.exp_avg_sq, [], self.step_count,
              foreach=False, fused=True, capturable=False, differentiable=False,
              grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
              beta1=_ADAM_BETAS[0], beta2=_ADAM_BETAS[1], lr=lr, weight_decay=0.0,
              eps=_ADAM_EPS, maximize=False)


class Matmul:
    """`op(a, b)` into the float32 `out` with a and b in a's dtype (float32 or bfloat16).

    float32: op writes `out` directly. bfloat16: b is cast into a reused buffer, op writes a
    bfloat16 result (accumulated in fp32 by oneDNN) that is then copied into `out`. Buffers are
    kept per call site, so a training loop allocates nothing per step."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._buffers: dict = {}

    def _buffer(self, key, shape) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = torch.empty(shape, dtype=self.dtype)
        return buf

    def __call__(self, op, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, key) -> torch.Tensor:
        if self.dtype == torch.float32:
            return op(a, b, out=out)
        low_b = b if b.dtype == self.dtype else self._buffer((key, "b"), b.shape).copy_(b)
        low_out = self._buffer((key, "out"), out.shape)
        op(a, low_b, out=low_out)
        return out.copy_(low_out)


def _ce_grad_(logits: torch.Tensor, onehot: torch.Tensor, row_weight: torch.Tensor) -> None:
    """In place: logits[..., C] -> d(weighted mean CE)/d logits = (softmax - onehot) * weight."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=-1, keepdim=True)).sub_(onehot).mul_(row_weight)


def _row_weights(train_mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float32[b, M]: 1/(own rows in batch) for a model's training rows in the batch, else 0."""
    w = train_mask.index_select(1, idx).t()  # [b, M]
    return w / w.sum(0).clamp_(min=1.0)


def _add_penalty_grad_(grad: torch.Tensor, weight: torch.Tensor, penalty: str | None,
                       coef: torch.Tensor) -> None:
    """grad, weight: [..., C]; coef: float32, broadcastable to weight's shape with 1 for C (one
    coefficient per model) -> grad += d penalty / d weight."""
    if penalty is None:
        return
    if penalty == "l21":
        scale = torch.linalg.vector_norm(weight, dim=-1, keepdim=True).add_(_NORM_EPS)
        grad.addcmul_(weight, torch.div(coef, scale, out=scale))
    elif penalty == "l2":
        grad.addcmul_(weight, 2.0 * coef)
    elif penalty == "l1":
        grad.addcmul_(torch.sign(weight), coef)
    else:
        raise FitError(f"penalty {penalty!r} is unknown; use one of {PENALTIES}")


def train_wide_group(x, onehot, mask, lr, coef, penalty, batches, progress, stage, done, total,
                      col_mask=None):
    """One lr group of models sharing the columns of x. Returns weight [D, M, C], bias [M, C].

    col_mask: float32[D, M] or None; a model's weight rows where it is 0 get no gradient, so they
    stay exactly 0 (Adam's moments stay 0 and the l21 subgradient of a zero row is 0).
    """
    dim, n_models, n_classes = x.shape[1], mask.shape[0], onehot.shape[1]
    weight = torch.zeros(dim, n_models, n_classes)
    bias = torch.zeros(n_models, n_classes)
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    adam = _Adam([weight, bias])
    xb = torch.empty(batches.shape[1], dim, dtype=x.dtype)  # x's dtype is the GEMM precision
    matmul = Matmul(x.dtype)
    logits = torch.empty(batches.shape[1], n_models * n_classes)
    steps = batches.shape[0]
    for step in range(steps):
        idx = batches[step]
        torch.index_select(x, 0, idx, out=xb)
        if x.dtype == torch.float32:
            torch.addmm(bias.view(1, -1), xb, weight.view(dim, -1), out=logits)
        else:
            matmul(torch.mm, xb, weight.view(dim, -1), logits, "fwd").add_(bias.view(1, -1))
        g = logits.view(-1, n_models, n_classes)
        _ce_grad_(g, onehot[idx].unsqueeze(1), _row_weights(mask, idx).unsqueeze(2))
        matmul(torch.mm, xb.t(), logits, grad_w.view(dim, -1), "bwd")
        torch.sum(g, dim=0, out=grad_b)
        if col_mask is not None:
            grad_w.mul_(col_mask.unsqueeze(2))
        _add_penalty_grad_(grad_w, weight, penalty, coef.view(1, -1, 1))
        adam.step([grad_w, grad_b], cosine_lr(lr, step, steps))
        if progress is not None and ((step + 1) % _PROGRESS_EVERY == 0 or step + 1 == steps):
            progress(stage, done + step + 1, total)
    return weight, bias


def train_screened_group(x, onehot, mask, lr, coef, penalty, batches, progress, stage, done, total,
                          col_mask):
    """`train_wide_group` with a col_mask, computed on each model's candidates only.

    Models with the same candidates (the lambdas of one CV fold) form a subset; every subset must
    have the same number of models and of candidates K (as `screen_candidates` makes them), else None is
    returned. Each subset's columns are gathered once into [G, n, K], and the GEMMs, the penalty
    and Adam run on [G, K, models per subset, C] rather than on the whole pool [P, M, C]: the same
    math (a masked-out row stays exactly 0 there), with K / P of the weight traffic.
    Returns weight [P, M, C] (zero outside each model's candidates), bias [M, C]; or None.
    """
    subsets, subset_of = torch.unique(col_mask.t() != 0, dim=0, return_inverse=True)  # [G, P], [M]
    per_subset, sizes = torch.bincount(subset_of), subsets.sum(1)
    if per_subset.unique().numel() != 1 or sizes.unique().numel() != 1:
        return None
    n_sub, per, width = subsets.shape[0], int(per_subset[0]), int(sizes[0])
    n, n_models, n_classes = x.shape[0], mask.shape[0], onehot.shape[1]
    order = torch.argsort(subset_of, stable=True)  # model order[g * per + i] is subset g's i-th
    candidates = torch.stack([row.nonzero().squeeze(1) for row in subsets])  # [G, K], sorted
    xs = torch.stack([x.index_select(1, c) for c in candidates])  # [G, n, K], x's dtype
    weight = torch.zeros(n_sub, width, per * n_classes)
    bias = torch.zeros(n_sub, 1, per * n_classes)
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    adam = _Adam([weight, bias])
    matmul = Matmul(x.dtype)
    mask, coef = mask[order], coef[order].view(n_sub, 1, per, 1)
    b = batches.shape[1]
    xg = torch.empty(n_sub, b, width, dtype=x.dtype)
    logits = torch.empty(n_sub, b, per * n_classes)
    offset = (torch.arange(n_sub) * n).unsqueeze(1)
    steps = batches.shape[0]
    for step in range(steps):
        idx = batches[step]
        torch.index_select(xs.view(-1, width), 0, (offset + idx).view(-1), out=xg.view(-1, width))
        matmul(torch.bmm, xg, weight, logits, "fwd").add_(bias)
        g = logits.view(n_sub, b, per, n_classes)
        row_weight = _row_weights(mask, idx).view(b, n_sub, per).transpose(0, 1).unsqueeze(3)
        _ce_grad_(g, onehot[idx].view(1, b, 1, n_classes), row_weight)
        matmul(torch.bmm, xg.transpose(1, 2), logits, grad_w, "bwd")
        torch.sum(logits, dim=1, keepdim=True, out=grad_b)
        _add_penalty_grad_(grad_w.view(n_sub, width, per, n_classes),
                           weight.view(n_sub, width, per, n_classes), penalty, coef)
        adam.step([grad_w, grad_b], cosine_lr(lr, step, steps))
        if progress is not None and ((step + 1) % _PROGRESS_EVERY == 0 or step + 1 == steps):
            progress(stage, done + step + 1, total)
    full = torch.zeros(x.shape[1], n_models, n_classes)
    for g in range(n_sub):
        models = order[g * per:(g + 1) * per]
        full[candidates[g].unsqueeze(1), models.unsqueeze(0)] = weight[g].view(width, per, n_classes)
    full_bias = torch.empty(n_models, n_classes)
    full_bias[order] = bias.view(n_models, n_classes)
    return full, full_bias


def wide_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[n, D] x [D, M, C] -> [n, M, C], the GEMM in x's dtype (as the heads were trained)."""
    if x.dtype == torch.float32:
        out = torch.addmm(bias.view(1, -1), x, weight.view(x.shape[1], -1))
    else:
        out = torch.mm(x, weight.view(x.shape[1], -1).to(x.dtype)).float().add_(bias.view(1, -1))
    return out.view(x.shape[0], *bias.shape)


@cpu_training_mode()
def train_heads(features, labels, n_classes: int, train_mask, lrs: Sequence[float], steps: int,
                *, penalty: str | None = None, coefs: Sequence[float] | None = None,
                batch_size: int = 128, seed: int = 0, progress: Progress | None = None,
                stage: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Train M linear heads at once on the batches `batch_schedule(n, batch_size, steps, seed)`.

    features: float32[n, D]; labels: int64[n]; train_mask: bool[M, n] (rows each model trains
    on: its loss is the mean CE over its own rows of the batch); lrs, coefs: float[M]; penalty:
    None | 'l21' | 'l2' | 'l1'. Batching does not change the math: each model ends exactly as it
    would alone with the same seed.
    Returns weight float32[M, D, C], bias float32[M, C].
    """
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    mask = torch.as_tensor(np.asarray(train_mask), dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(y, n_classes).float()
    weight = torch.empty(mask.shape[0], x.shape[1], n_classes)
    bias = torch.empty(mask.shape[0], n_classes)
    for models, w, b in run_wide(x, onehot, mask, lrs, coefs, penalty, steps, batch_size, seed,
                                  progress, stage):
        weight[models], bias[models] = w.permute(1, 0, 2), b
    return weight, bias


def top_columns(weight: torch.Tensor, k: int,
                 col_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [D, M, C] -> relevance [M, D], columns int64[M, k] by decreasing relevance.

    Ties go to the lower column index (stable sort), so the selection is deterministic. Columns
    outside col_mask [D, M] rank after every allowed one.
    """
    scores = torch.linalg.vector_norm(weight, dim=2).t().contiguous()
    ranked = scores if col_mask is None else scores.masked_fill(col_mask.t() == 0, -1.0)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    return scores, order[:, :k].contiguous()


def train_nested_group(x, onehot, mask, lr, columns, ks, batches, progress, stage, done, total,
                        dtype=torch.float32, shared: int = 0):
    """Unregularized heads on nested column prefixes, one lr; the GEMMs in `dtype`.

    columns: int64[M, k_max] ranked columns per model; head f of model m uses columns[m, :ks[f]].
    shared: the first `shared` columns are the same for every model (HEAD2TOE+LINEAR's kept
    columns; shared <= ks[0]): they are gathered once and enter every model through one GEMM.
    Returns per f: weight [M, ks[f], C], bias [M, C]; and the logits of every head on every row,
    float32[M, n, F, C].
    """
    n_models = columns.shape[0]
    n_classes = onehot.shape[1]
    n_heads = len(ks)
    if shared and (shared > ks[0] or not bool((columns[:, :shared] == columns[:1, :shared]).all())):
        raise FitError(f"internal: the first {shared} columns are not common to every model and head")
    # Column block j (edges[j]:edges[j+1]) feeds the heads whose prefix covers it, first[j]..F-1, so
    # its weights for all of them sit side by side: one GEMM per block instead of one per head,
    # with the same FLOPs but wider, more efficient GEMMs where a block feeds many heads. Adam is
    # elementwise, so regrouping the parameters does not change the optimisation.
    edges = sorted({0, *ks, *([shared] if shared else [])})
    widths = [edges[j + 1] - edges[j] for j in range(len(edges) - 1)]
    first = [next(f for f, k in enumerate(ks) if k >= edges[j + 1]) for j in range(len(widths))]
    fed = [n_heads - f for f in first]
    common = 1 if shared else 0  # blocks [0, common) are shared by every model
    # The shared block: features [n, K] and weights [K, M * fed * C] (one mm for all models).
    # Per-model blocks: features [M, n, dk] and weights [M, dk, fed * C] (bmm). Separate contiguous
    # blocks, not slices of one [M, n, k_max]: bf16 bmm on strided slices is up to 10x slower.
    gathered, blocks = [], []
    for j, w in enumerate(widths):
        cols = columns[:, edges[j]:edges[j + 1]]
        if j < common:
            gathered.append(x.index_select(1, cols[0]).to(dtype))
            blocks.append(torch.zeros(w, n_models * fed[j] * n_classes))
            continue
        block = torch.empty(n_models, x.shape[0], w, dtype=dtype)
        for m in range(n_models):
            if dtype == x.dtype:
                torch.index_select(x, 1, cols[m], out=block[m])
            else:
                block[m].copy_(x.index_select(1, cols[m]))
        gathered.append(block)
        blocks.append(torch.zeros(n_models, w, fed[j] * n_classes))
    bias = torch.zeros(n_models, n_heads, n_classes)
    grads = [torch.empty_like(p) for p in blocks + [bias]]
    adam = _Adam(blocks + [bias])
    matmul = Matmul(dtype)

    def buffers(rows: int):
        return (torch.empty(n_models, rows, n_heads, n_classes),
                [torch.empty(rows, n_models * fed[j] * n_classes) if j < common else
                 torch.empty(n_models, rows, fed[j] * n_classes) for j in range(len(widths))])

    def forward(xs: list[torch.Tensor], logits: torch.Tensor, partial: list[torch.Tensor]) -> None:
        rows = logits.shape[1]
        logits.copy_(bias.unsqueeze(1).expand_as(logits))
        for j in range(len(widths)):
            if j < common:  # [rows, M * fed * C] -> [M, rows, fed, C]
                out = matmul(torch.mm, xs[j], blocks[j], partial[j], ("fwd", j, rows))
                logits[:, :, first[j]:].add_(out.view(rows, n_models, fed[j], n_classes).transpose(0, 1))
            else:
                out = matmul(torch.bmm, xs[j], blocks[j], partial[j], ("fwd", j, rows))
                logits[:, :, first[j]:].add_(out.view(n_models, rows, fed[j], n_classes))

    b = batches.shape[1]
    xg = [torch.empty(b, w, dtype=dtype) if j < common else torch.empty(n_models, b, w, dtype=dtype)
          for j, w in enumerate(widths)]
    logits, partial = buffers(b)
    # A step's rows of every model in one 2-D row gather per block: [M * n, dk] -> [M * b, dk]
    # (3x faster in bf16 than index_select on dim 1 of [M, n, dk]).
    model_offset = (torch.arange(n_models) * x.shape[0]).unsqueeze(1)
    steps = batches.shape[0]
    for step in range(steps):
        idx = batches[step]
        rows = (model_offset + idx).view(-1)
        for j, w in enumerate(widths):
            if j < common:
                torch.index_select(gathered[j], 0, idx, out=xg[j])
            else:
                torch.index_select(gathered[j].view(-1, w), 0, rows, out=xg[j].view(-1, w))
        forward(xg, logits, partial)
        _ce_grad_(logits, onehot[idx].unsqueeze(1), _row_weights(mask, idx).t().view(n_models, b, 1, 1))
        for j in range(len(widths)):
            if j < common:
                upstream = logits[:, :, first[j]:].transpose(0, 1).reshape(b, -1)  # [b, M * fed * C]
                matmul(torch.mm, xg[j].t(), upstream, grads[j], ("bwd", j))
            else:
                matmul(torch.bmm, xg[j].transpose(1, 2), logits[:, :, first[j]:].reshape(n_models, b, -1),
                       grads[j], ("bwd", j))
        torch.sum(logits, dim=1, out=grads[-1])
        adam.step(grads, cosine_lr(lr, step, steps))
        if progress is not None and ((step + 1) % _PROGRESS_EVERY == 0 or step + 1 == steps):
            progress(stage, done + step + 1, total)
    del xg
    all_logits, all_partial = buffers(x.shape[0])
    forward(gathered, all_logits, all_partial)

    def head_slice(j: int, f: int) -> torch.Tensor:  # block j's weights of head f: [M, dk, C]
        if j < common:
            return blocks[j].view(widths[j], n_models, fed[j], n_classes)[:, :, f - first[j]].transpose(0, 1)
        return blocks[j][:, :, (f - first[j]) * n_classes:(f - first[j] + 1) * n_classes]

    weights = [torch.cat([head_slice(j, f) for j in range(len(widths)) if first[j] <= f], dim=1)
               for f in range(n_heads)]
    biases = [bias[:, f].contiguous() for f in range(n_heads)]
    return weights, biases, all_logits


def nested_chunks(models: np.ndarray, n: int, k_max: int) -> list[np.ndarray]:
    per_model = max(1, n * k_max * 4)
    size = max(1, _GATHER_BUDGET_BYTES // per_model)
    return [models[i:i + size] for i in range(0, len(models), size)]


def nested_val_accuracy(logits, labels, val_mask) -> torch.Tensor:
    """float64[M, F]: accuracy of every nested head on its model's validation rows.

    logits: float32[M, n, F, C] of train_nested_group; val_mask: [M, n]."""
    correct = (logits.argmax(-1) == labels.view(1, -1, 1)).double()  # [M, n, F]
    return masked_mean(correct.transpose(1, 2), val_mask.unsqueeze(1))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.double()
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)



def run_wide(x, onehot, mask, lrs, coefs, penalty, steps, batch_size, seed, progress, stage,
              col_mask=None, dtype=torch.float32):
    """Yields (models, weight [D, Mg, C], bias [Mg, C]) per lr group; coefs may hold None.

    col_mask: float32[D, M] or None, the columns each model may use (see train_wide_group);
    dtype: the GEMM precision (x is cast to it once).
    """
    x = x.to(dtype)
    batches = batch_schedule(x.shape[0], batch_size, steps, seed)
    coefs = torch.tensor([0.0 if c is None else float(c) for c in
                          (coefs if coefs is not None else [None] * len(lrs))])
    groups = _lr_groups(lrs)
    for i, (lr, models) in enumerate(groups):
        args = (x, onehot, mask[models], lr, coefs[models], penalty, batches, progress, stage, i * steps,
                len(groups) * steps)
        group_mask = None if col_mask is None else col_mask[:, models].contiguous()
        result = None if group_mask is None else train_screened_group(*args, group_mask)
        if result is None:  # no mask, or uneven candidate subsets: the masked pool
            result = train_wide_group(*args, group_mask)
        yield models, *result
