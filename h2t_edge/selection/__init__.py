"""Selection: group-lasso ranking, top-F heads and the CV grid around them, in torch.

Split by role, as skglm splits penalties, solvers and estimators:

- `grid`: the CV protocol's data (`SearchGrid`, `LinearHead`, `FitResult`), input checks, folds, and
  the choice rules (`choose_best`, `choose_cheapest`);
- `kernels`: batched trainers (many heads per GEMM);
- `screening`: strong-rule screening of large pools and the select-then-retrain run;
- `estimators`: the methods (`fit_linear`, `fit_regularized`, `fit_head2toe[_variants]`);
- `path`: the default HEAD2TOE solver, on group-lasso paths (`fit_head2toe_path`);
- `taps`: what the columns' taps cost a deployed graph (`TapPlan`) and rankings within a tap budget;
- `names`: the method names (LINEAR, HEAD2TOE, ...), defined once;
- `methods`: the method registry (`METHODS`) that fit, train and eval share.
"""

import importlib

# The public names, by the module that defines them. They are imported on first use (PEP 562), so
# `h2t_edge.selection.names` and the CLI's --help do not pay for importing torch.
_EXPORTS = {
    "estimators": ("HEAD2TOE_KEEP", "fit_head2toe", "fit_head2toe_variants", "fit_linear", "fit_regularized"),
    "grid": ("PENALTIES", "PRECISIONS", "FitResult", "LinearHead", "SearchGrid", "choose_best", "choose_cheapest",
             "cpu_training_mode", "native_bf16", "predict_logits", "stratified_folds"),
    "path": ("PathSettings", "fit_head2toe_path"),
    "taps": ("TapPlan",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
