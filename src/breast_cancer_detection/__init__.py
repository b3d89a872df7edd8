"""Benign vs malignant breast histopathology (BreakHis), split by patient.

``import breast_cancer_detection as bcd`` gives the functions the notebook, the CLI and the
web app share; submodules load on first use so that importing the package stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> submodule that defines it; loaded lazily (PEP 562) to keep torch out of
# `import breast_cancer_detection` and `bcd --help`.
_EXPORTS = {
    "CLASSES": "data.breakhis",
    "DatasetError": "data.breakhis",
    "build_index": "data.breakhis",
    "read_index": "data.breakhis",
    "write_index": "data.breakhis",
    "summarize_index": "data.breakhis",
    "check_breakhis_complete": "data.breakhis",
    "parse_breakhis_name": "data.breakhis",
    "verify_images": "data.breakhis",
    "download_breakhis": "data.download",
    "DownloadError": "data.download",
    "make_split": "data.splits",
    "make_folds": "data.splits",
    "fold_split": "data.splits",
    "load_split": "data.splits",
    "write_split": "data.splits",
    "check_split": "data.splits",
    "summarize_split": "data.splits",
    "LeakageError": "data.splits",
    "find_leakage": "data.splits",
    "UserError": "errors",
    "TrainConfig": "config",
    "load_preset": "config",
    "list_presets": "config",
    "create_model": "models",
    "list_models": "models",
    "fit": "engine",
    "resume": "engine",
    "TrainResult": "engine",
    "Checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "resolve_device": "checkpoint",
    "Predictor": "inference",
    "Prediction": "inference",
    "predictions_frame": "inference",
    "summarize_patients": "inference",
    "collect_images": "inference",
    "fetch_checkpoint": "hub",
    "TrainedModel": "pretrained",
    "TrainedModelError": "pretrained",
    "list_trained": "pretrained",
    "trained_model": "pretrained",
    "resolve_trained": "pretrained",
    "SAMPLE_PATCHES": "pretrained",
    "CheckpointError": "checkpoint",
    "GradCAM": "explain",
    "explain": "explain",
    "overlay": "explain",
    "export_onnx": "export",
    "read_onnx_metadata": "export",
    "plot_prediction": "plots",
    "plot_explanation": "plots",
    "plot_history": "plots",
    "plot_sample_grid": "plots",
    "evaluate_checkpoint": "evaluation",
    "Evaluation": "results",
    "EvaluationResult": "results",
    "run_cv": "cv",
    "CVResult": "cv",
    "image_metrics": "metrics",
    "patient_metrics": "metrics",
    "patient_recognition_rate": "metrics",
    "evaluate_predictions": "metrics",
    "choose_threshold": "metrics",
    "bootstrap_ci": "metrics",
    "bootstrap_metrics": "metrics",
    "expected_calibration_error": "metrics",
    "brier_score": "metrics",
    "analyse_slide": "slides",
    "analyse_slides": "slides",
    "demo_slide": "slides",
    "write_slide": "slides",
    "SlideError": "slides",
    "plot_slide_heatmap": "plots",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        short = _EXPORTS[name].rpartition(".")[2]
        if _EXPORTS.get(short) == _EXPORTS[name]:
            # Importing submodule `explain` binds the module as this package's attribute
            # `explain`, hiding the exported function of that name: put the function back.
            globals()[short] = getattr(module, short)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
