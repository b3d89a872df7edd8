"""The Markdown reports of ``bcd evaluate`` and ``bcd cv``, and how intervals are written."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from .metrics import group_sort_key

if TYPE_CHECKING:
    from .results import EvaluationResult

# (section, key, label) of the rows of the report's headline table, in order.
HEADLINE = [
    ("image", "accuracy", "Accuracy"),
    ("image", "balanced_accuracy", "Balanced accuracy"),
    ("image", "sensitivity", "Sensitivity (malignant recall)"),
    ("image", "specificity", "Specificity (benign recall)"),
    ("image", "precision", "Precision (PPV)"),
    ("image", "f1", "F1"),
    ("image", "roc_auc", "ROC AUC"),
    ("image", "pr_auc", "PR AUC (average precision)"),
    ("patient", "recognition_rate", "Patient recognition rate (Spanhol et al.)"),
    ("patient", "accuracy", "Patient-level accuracy (mean p per patient)"),
    ("patient", "balanced_accuracy", "Patient-level balanced accuracy"),
    ("patient", "roc_auc", "Patient-level ROC AUC"),
    ("calibration", "ece", "Expected calibration error (10 bins)"),
    ("calibration", "brier", "Brier score"),
]



def format_ci(pair, digits: int = 3, sep: str = " - ") -> str:
    """``low - high`` of a confidence interval, or ``n/a`` when it is missing or undefined."""
    if not pair or pair[0] is None or pair[1] is None or not all(
            math.isfinite(float(v)) for v in pair):
        return "n/a"
    return f"{pair[0]:.{digits}f}{sep}{pair[1]:.{digits}f}"


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(ci: dict, section: str, key: str) -> str:
    return format_ci(ci.get(section, {}).get(key))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _threshold_line(info: dict) -> str:
    value = info.get("value")
    if info.get("chosen_on") == "val":
        how = ("Youden's J" if info.get("method") == "youden" else
               f"target sensitivity {info.get('target_sensitivity')}")
        if info.get("source") != "chosen on val now":
            where = "by an earlier evaluation; read from the checkpoint"
        elif info.get("stored_in"):
            where = f"by this evaluation; stored in `{info['stored_in']}`"
        else:
            where = "by this evaluation; not stored in the checkpoint"
        return (f"{_f(value, 4)}, chosen on the val subset ({info.get('val_images')} images) "
                f"by {how} (val sensitivity {_f(info.get('val_sensitivity'))}, specificity "
                f"{_f(info.get('val_specificity'))}) {where}")
    return f"{_f(value, 4)} ({info.get('source')})"


def evaluation_report_md(r: EvaluationResult) -> str:
    """``report.md`` of one evaluation: headline table with intervals, breakdowns, plots."""
    lines = (_leakage_lines(r) + _header_lines(r) + _caveat_lines(r) + _results_lines(r)
             + _image_lines(r) + _patient_lines(r) + _calibration_lines(r)
             + _breakdown_lines(r) + _split_lines(r) + _config_lines(r))
    return "\n".join(lines)


def _leakage_lines(r: EvaluationResult) -> list[str]:
    """The leakage warning that opens the report, when the evaluated images leaked."""
    if not r.leakage:
        return []
    return ["**LEAKAGE: " + " ".join(r.leakage) + " These numbers are NOT a "
            "held-out estimate." + (" (--allow-leakage was given.)"
                                    if r.allow_leakage else "") + "**", ""]


def _header_lines(r: EvaluationResult) -> list[str]:
    """The title and what was evaluated how: protocol, threshold, TTA, data, checkpoint."""
    c = r.counts
    who = f"{c['images']} images" + (f", {c['patients']} patients" if c["patients"] else "")
    return [f"# Evaluation: `{r.checkpoint.path}` on the {r.subset} subset ({who})",
            "",
            f"- **Protocol:** {r.protocol}",
            f"- **Threshold:** {_threshold_line(r.threshold)}",
            "- **Test-time augmentation:** " + ("the 8 flips/rotations averaged per image"
                                                if r.tta else "none"),
            f"- **Data:** `{r.data}`; split: {r.split}"
            + ("" if r.same_split_as_training is None else
               " (the split the checkpoint was trained with)" if r.same_split_as_training
               else " (NOT the split the checkpoint was trained with)"),
            f"- **Checkpoint:** {r.checkpoint.arch}, epoch {r.checkpoint.epoch}"
            f" (best epoch {r.checkpoint.best_epoch}), bcd {r.bcd_version}, "
            f"{r.created}", ""]


def _caveat_lines(r: EvaluationResult) -> list[str]:
    """The caveats (in bold) and notes, when there are any."""
    if not (r.caveats or r.notes):
        return []
    return ["## Caveats", ""] + [f"- **{s}**" for s in r.caveats] + [
        f"- {s}" for s in r.notes] + [""]


def _results_lines(r: EvaluationResult) -> list[str]:
    """The headline table (:data:`HEADLINE`) with its intervals and how they were made."""
    b = r.bootstrap
    if b["n"]:
        ci_note = (f"95% intervals: percentile bootstrap over {b['units']} "
                   f"{b['unit']}s ({b['n']} resamples, seed {b['seed']})"
                   + (", resampling whole patients." if b["unit"] == "patient" else
                      ": images, since the data has no patient ids (too narrow if images "
                      "share patients)."))
    else:
        ci_note = "No bootstrap was run (--bootstrap 0): no intervals."
    headline = ["## Results", "", ci_note, ""]
    rows = []
    for section, key, label in HEADLINE:
        values = getattr(r, section)
        if key in values:
            rows.append([label, values[key], _ci(r.ci, section, key)])
    ci_label = f"{1 - b['alpha']:.0%} CI" if b["n"] else "CI"
    headline.append(_table(["Metric", "Value", ci_label], rows))
    return headline + [""]


def _image_lines(r: EvaluationResult) -> list[str]:
    """The image-level confusion matrix and the ROC and precision-recall plots."""
    (tn, fp), (fn, tp) = r.image["confusion_matrix"]
    return ["## Image level", "",
            _table(["", "predicted benign", "predicted malignant"],
                   [["true benign", tn, fp], ["true malignant", fn, tp]]), "",
            "![Confusion matrix](confusion.png)", "", "![ROC curve](roc.png)", "",
            "![Precision-recall curve](pr.png)", ""]


def _patient_lines(r: EvaluationResult) -> list[str]:
    """The patient-level result, or why there is none (no patient ids)."""
    lines = ["## Patient level", ""]
    if "note" in r.patient:
        return lines + ["There are no patient ids in this data, so there is no patient-level "
                        "result (the recognition rate and the per-patient decision need them).",
                        ""]
    p = r.patient
    (ptn, pfp), (pfn, ptp) = p["confusion_matrix"]
    return lines + [f"{p['patients']} patients ({p['malignant_patients']} malignant). The "
                    "recognition rate is Spanhol et al.'s: per patient, the share of its images "
                    "classified correctly, averaged over patients. The patient-level decision "
                    "calls a patient malignant when the mean P(malignant) of its images reaches "
                    "the threshold.", "",
                    _table(["", "predicted benign", "predicted malignant"],
                           [["benign patients", ptn, pfp], ["malignant patients", pfn, ptp]]),
                    ""]


def _calibration_lines(r: EvaluationResult) -> list[str]:
    """Expected calibration error, Brier score and the reliability diagram."""
    cal = r.calibration
    return ["## Calibration", "",
            f"Expected calibration error {_f(cal['ece'])} ({cal['bins']} equal-width bins), "
            f"Brier score {_f(cal['brier'])}.", "", "![Reliability diagram](reliability.png)",
            ""]


def _breakdown_lines(r: EvaluationResult) -> list[str]:
    """The tables by magnification and by subtype, each when there is one."""
    lines = []
    if r.by_magnification:
        lines += ["## By magnification", "", _breakdown(r.by_magnification, "Magnification"),
                  "", "![Metrics by magnification](per_magnification.png)", ""]
    if r.by_subtype:
        lines += ["## By subtype", "", "Each subtype is one class, so accuracy there is the "
                  "share of its images put in that class; AUC needs both classes.", "",
                  _breakdown(r.by_subtype, "Subtype", ci=False), ""]
    return lines


def _split_lines(r: EvaluationResult) -> list[str]:
    """Where the split came from and the size of each of its subsets."""
    return ["## Split", "", f"From {r.split}.", "",
            _table(["Subset", "Images", "Patients", "Benign images", "Malignant images",
                    "Malignant patients"],
                   [[s["subset"] + (" (evaluated)" if s["subset"] == r.subset else ""),
                     s["images"], s["patients"], s["benign_images"], s["malignant_images"],
                     s["malignant_patients"]] for s in r.split_counts]), ""]


def _config_lines(r: EvaluationResult) -> list[str]:
    """The run's config and the files written beside the report."""
    return ["## Run config", "", "```yaml", yaml.safe_dump(r.config, sort_keys=False)
            .rstrip(), "```", "", "## Files", "",
            "`metrics.json` (every number above, with intervals), `predictions.csv` (one row "
            "per image: path, patient, magnification, label, probability, prediction)"
            + "".join(f", `{f}`" for f in r.files if f.endswith(".png")) + ".", ""]


def _breakdown(groups: dict[str, dict], name: str, *, ci: bool = True) -> str:
    rows = []
    for g, m in groups.items():
        img, pat = m["image"], m["patient"]
        gci = m.get("ci", {}) if ci else {}
        acc = _f(img["accuracy"]) + (f" ({_ci(gci, 'image', 'accuracy')})" if gci else "")
        rr = pat.get("recognition_rate")
        rr_s = _f(rr) + (f" ({_ci(gci, 'patient', 'recognition_rate')})"
                         if gci and rr is not None else "")
        rows.append([g, img["images"], pat.get("patients"), acc, img["balanced_accuracy"],
                     img["sensitivity"], img["specificity"], img["roc_auc"],
                     rr_s if rr is not None else None])
    return _table([name, "Images", "Patients", "Accuracy" + (" (95% CI)" if ci else ""),
                   "Balanced acc.", "Sensitivity", "Specificity", "ROC AUC",
                   "Patient recognition rate"], rows)


def _mean_std(summary: pd.DataFrame, scope: str, metric: str) -> str:
    row = summary[(summary["scope"] == scope) & (summary["metric"] == metric)]
    if row.empty or not math.isfinite(row["mean"].iloc[0]):
        return "n/a"
    std = row["std"].iloc[0]
    return f"{row['mean'].iloc[0]:.3f} +- {std:.3f}" if math.isfinite(std) else (
        f"{row['mean'].iloc[0]:.3f}")


POOLED = (("image_roc_auc", "Image ROC AUC"), ("image_accuracy", "Image accuracy"),
          ("patient_roc_auc", "Patient ROC AUC"), ("patient_accuracy", "Patient accuracy"))


def value_ci(entry: dict | None) -> str:
    """``0.912 (0.850-0.960)`` from ``{"value", "ci"}``; ``n/a`` when undefined."""
    if not entry or entry["value"] is None or not math.isfinite(entry["value"]):
        return "n/a"
    ci = entry.get("ci")
    if ci and all(c is not None and math.isfinite(c) for c in ci):
        return f"{entry['value']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
    return f"{entry['value']:.3f}"


def cv_report_md(js: dict, summary: pd.DataFrame, cfg) -> str:
    """``report.md`` of ``bcd cv``: per fold, mean +- std overall and by magnification."""
    k = js["folds"]
    lines = [f"# Patient-disjoint {k}-fold cross-validation", "",
             f"Patients were dealt into {k} class-stratified folds (seed {js['seed']}); for fold "
             "k, fold k is test, fold k+1 validation (best epoch and threshold) and the rest "
             "train, so no patient is ever in two subsets. Numbers are mean +- standard "
             f"deviation (ddof=1) over the {k} test folds; each fold's own report, with "
             "bootstrap intervals, is in `fold-K/report.md`.", "",
             "## Per fold", "",
             _table(["Fold", "Test images", "Test patients", "Best epoch", "Threshold",
                     "Accuracy", "ROC AUC", "Patient recognition rate"],
                    [[f"[{f['fold']}](fold-{f['fold']}/report.md)", f["test_images"],
                      f["test_patients"], f["best_epoch"], f["threshold"], f["accuracy"],
                      f["roc_auc"], f["recognition_rate"]] for f in js["per_fold"]]), "",
             "## Overall (mean +- std over folds)", "",
             _table(["Metric", "Mean +- std"],
                    [[label, _mean_std(summary, "all", f"{s}.{key}")]
                     for s, key, label in HEADLINE
                     if not summary[(summary["scope"] == "all")
                                    & (summary["metric"] == f"{s}.{key}")].empty]), ""]
    if js.get("pooled"):
        pooled_rows = [[label, value_ci(js["pooled"].get(key))] for key, label in POOLED]
        by_mag = js.get("pooled_by_magnification", {})
        lines += ["## Out-of-fold, pooled (patient-bootstrap 95% CI)", "",
                  f"Every image's prediction comes from the fold that held its patient out "
                  f"({int(js['pooled']['images']['value'])} images, "
                  f"{int(js['pooled']['patients']['value'])} patients), decided at that fold's "
                  "threshold; a patient is called malignant when its mean P(malignant) reaches "
                  "the threshold. Rows: `oof_predictions.csv`.", "",
                  _table(["Metric", "Value (95% CI)"], pooled_rows), ""]
        if by_mag:
            lines += [_table(["Magnification", "Images", "Patients"]
                             + [label for _, label in POOLED],
                             [[m, int(v["images"]["value"]), int(v["patients"]["value"])]
                              + [value_ci(v.get(key)) for key, _ in POOLED]
                              for m, v in by_mag.items()]), ""]
    mags = sorted(js["by_magnification"], key=group_sort_key)
    if mags:
        cols = [("image.accuracy", "Image accuracy"),
                ("patient.recognition_rate", "Patient recognition rate"),
                ("image.balanced_accuracy", "Balanced accuracy"),
                ("image.roc_auc", "ROC AUC")]
        n_folds = {m: js["by_magnification"][m]["image.accuracy"]["folds"] for m in mags}
        lines += ["## By magnification (as Spanhol et al. 2016 report)", "",
                  "Folds: how many test folds hold images at that magnification.", "",
                  _table(["Magnification", "Folds"] + [c[1] for c in cols],
                         [[m, n_folds[m]] + [_mean_std(summary, m, c[0]) for c in cols]
                          for m in mags]), ""]
    lines += ["Every metric, per scope: `cv_summary.csv` / `cv_summary.json`; every fold's "
              "value: `cv_folds.csv`.", "", "## Training settings", "", "```yaml",
              yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
