"""The five steps as one API, in flow order: export -> extract -> fit -> compile -> predict.

A short facade over `h2t_edge.steps` (and the torch-free runtime for predict). Each step takes
plain paths and options, writes its artifact atomically and returns a small report; the CLI
(`h2t_edge.cli`) only parses arguments and prints these reports.

    from h2t_edge import pipeline
    pipeline.export_step("efficientnet_lite0", "backbone.onnx", target_size=512)  # the default backbone
    pipeline.extract_features("backbone.onnx", "train/", "feats/train")
    pipeline.fit_step("feats/train", "task/")
    pipeline.compile_step("task/head2toe", "task.onnx")
    pipeline.Predictor.load("task.onnx").predict_paths(["cat.jpg"])
"""

from h2t_edge.steps.compile import CompileReport, compile_any, compile_step, compile_tasks_step, weights_source
from h2t_edge.steps.export import ExportReport, export_step
from h2t_edge.steps.extract import FeatureCache, extract_features
from h2t_edge.steps.fit import FitReport, accuracy, check_same_backbone, fit_step
from runtime.predictor import Predictor

__all__ = [
    "export_step", "ExportReport",
    "extract_features", "FeatureCache",
    "fit_step", "FitReport", "accuracy", "check_same_backbone",
    "compile_step", "compile_tasks_step", "compile_any", "CompileReport", "weights_source",
    "Predictor",
]
