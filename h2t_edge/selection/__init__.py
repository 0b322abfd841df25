"""Selection: group-lasso ranking, top-F heads and the CV grid around them, in torch.

Split by role, as skglm splits penalties, solvers and estimators:

- `grid`: the CV protocol's data (`SearchGrid`, `LinearHead`, `FitResult`), input checks, folds;
- `kernels`: batched trainers (many heads per GEMM);
- `screening`: strong-rule screening of large pools and the select-then-retrain run;
- `estimators`: the methods (`fit_linear`, `fit_regularized`, `fit_head2toe[_variants]`);
- `path`: an opt-in, faster HEAD2TOE engine on group-lasso paths (`fit_head2toe_path`);
- `names`: the method names (LINEAR, HEAD2TOE, ...), defined once;
- `methods`: the method registry (`METHODS`) that fit, train and eval share.
"""

from h2t_edge.selection.estimators import (
    HEAD2TOE_KEEP,
    fit_head2toe,
    fit_head2toe_variants,
    fit_linear,
    fit_regularized,
)
from h2t_edge.selection.grid import (
    PENALTIES,
    PRECISIONS,
    FitResult,
    LinearHead,
    SearchGrid,
    choose_best,
    cpu_training_mode,
    native_bf16,
    predict_logits,
    stratified_folds,
)
from h2t_edge.selection.path import PathSettings, fit_head2toe_path

__all__ = [
    "HEAD2TOE_KEEP", "PENALTIES", "PRECISIONS", "FitResult", "LinearHead", "PathSettings", "SearchGrid", "choose_best",
    "cpu_training_mode", "fit_head2toe", "fit_head2toe_path", "fit_head2toe_variants", "fit_linear", "fit_regularized",
    "native_bf16", "predict_logits", "stratified_folds",
]
