"""Predictions from a checkpoint: ``Predictor.from_checkpoint(path).predict(images)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data.breakhis import CLASSES
from .data.datasets import ImageTableDataset, collate_skip_bad
from .data.transforms import Preprocessing, build_eval_transform
from .engine import amp_dtype, evaluate, load_checkpoint, resolve_device
from .models import create_model


@dataclass
class Prediction:
    """One image's answer."""

    source: str
    probabilities: dict[str, float]
    label: str
    threshold: float
    error: str | None = None

    @property
    def p_malignant(self) -> float:
        return self.probabilities.get(CLASSES[1], float("nan"))


class Predictor:
    """A trained model with the preprocessing and decision threshold it was saved with."""

    def __init__(self, model: torch.nn.Module, pre: Preprocessing, *, threshold: float = 0.5,
                 classes: list[str] | None = None, device: str | torch.device = "auto",
                 checkpoint: dict[str, Any] | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.pre = pre
        self.threshold = float(threshold)
        self.classes = list(classes or CLASSES)
        self.checkpoint = checkpoint or {}
        self.transform = build_eval_transform(pre=pre)
        self.dtype = amp_dtype("auto", self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Predictor:
        """Loads a checkpoint written by ``bcd train`` (``weights_only=True``).

        The threshold is the one chosen on validation and stored by ``bcd evaluate``; a
        checkpoint that has none uses 0.5 and says so in ``threshold_source``.
        """
        ckpt = load_checkpoint(path)
        model = create_model(ckpt["arch"], num_classes=ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
        threshold = ckpt.get("threshold")
        pred = cls(model, Preprocessing.from_dict(ckpt["preprocessing"]),
                   threshold=0.5 if threshold is None else threshold,
                   classes=ckpt.get("classes"), device=device, checkpoint=ckpt)
        pred.threshold_source = "default 0.5 (none stored)" if threshold is None else (
            "chosen on validation")
        return pred

    def predict_table(self, root: str | Path, table: pd.DataFrame, *, batch_size: int = 32,
                      workers: int = 0, progress: bool = True) -> pd.DataFrame:
        """P(malignant) for every row of an index or split table, batched.

        Returns:
            The table with ``probability``, ``prediction`` (0/1 at the stored threshold) and
            ``error`` (empty, or why the image could not be read) columns added.
        """
        from tqdm.auto import tqdm

        table = table.reset_index(drop=True)
        if "target" not in table.columns:
            table = table.assign(target=0)
        ds = ImageTableDataset(root, table, self.transform)
        errors: dict[int, str] = {}
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                             collate_fn=collate_skip_bad)
        bar = tqdm(total=len(loader), desc="predict", unit="batch", disable=not progress)

        def batches():
            # Unreadable files come back inside the batches, also from worker processes.
            for b in loader:
                errors.update(dict(b["bad"]))
                yield b

        source = batches()
        out = evaluate(self.model, source, self.device, dtype=self.dtype, progress=bar)
        bar.close()
        prob = np.full(len(table), np.nan)
        prob[out["row"].astype(int)] = out["prob"]
        result = table.copy()
        result["probability"] = prob
        result["prediction"] = np.where(np.isnan(prob), -1, (prob >= self.threshold).astype(int))
        result["error"] = [errors.get(i, "") for i in range(len(table))]
        return result

    def predict(self, images, *, batch_size: int = 32) -> list[Prediction]:
        """Predicts paths, PIL images or arrays (one, or a list).

        A file that cannot be read gives a Prediction with ``error`` set and NaN probabilities;
        the others carry on.
        """
        from .data.datasets import ImageError, open_rgb

        items = images if isinstance(images, (list, tuple)) else [images]
        tensors, keep, results = [], [], []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, Path)) else f"<image {i}>"
            try:
                tensors.append(self.transform(open_rgb(item)))
                keep.append(i)
                results.append(Prediction(name, {}, "", self.threshold))
            except (ImageError, OSError) as e:
                results.append(Prediction(name, dict.fromkeys(self.classes, float("nan")),
                                          "error", self.threshold, error=str(e)))
        for start in range(0, len(tensors), batch_size):
            probs = self._probabilities(torch.stack(tensors[start:start + batch_size]))
            for j, p in zip(keep[start:start + batch_size], probs):
                r = results[j]
                r.probabilities = {c: float(v) for c, v in zip(self.classes, p)}
                r.label = self.classes[int(p[1] >= self.threshold)]
        return results

    @torch.no_grad()
    def _probabilities(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x).float()
        return torch.softmax(logits, 1).cpu().numpy()
