"""The demo's torch side, run by `adaptd demo` as a subprocess (`python -m worker.demo_model ...`):
train the source CNN on the demo's source split, and re-score downloaded weights locally.

    python -m worker.demo_model train OUT.safetensors
    python -m worker.demo_model score MODEL.safetensors EVAL.npz      # prints the accuracy
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from app.demo_data import ARCH_KWARGS, PREPROCESS, make_demo_split
from worker.adaptation.data import Preprocess
from worker.adaptation.models import build_model
from worker.adaptation.models.export import save_safetensors
from worker.adaptation.training import train_classifier


def train(path: Path) -> Path:
    split = make_demo_split(seed=0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.manual_seed(0)  # the initial weights too: the demo prints the same numbers every run
    model = build_model("digit_cnn", 10, **ARCH_KWARGS)
    train_classifier(model, split["x_source"], split["y_source"], Preprocess(**PREPROCESS), epochs=8,
                     augment_shift=1, seed=0)
    save_safetensors(model, path)
    return path


def score(path: Path, eval_npz: Path) -> float:
    """Load the weights into the architecture and score them in eval() mode."""
    from safetensors.torch import load_file

    with np.load(eval_npz) as a:
        x, y = a["x"], a["y"]
    model = build_model("digit_cnn", 10, **ARCH_KWARGS)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    with torch.no_grad():
        logits = model(Preprocess(**PREPROCESS)(torch.from_numpy(x[..., None]), torch.device("cpu")))
    return float((logits.argmax(1).numpy() == y).mean())


def main(argv: list[str]) -> int:
    if argv[:1] == ["train"] and len(argv) == 2:
        train(Path(argv[1]))
    elif argv[:1] == ["score"] and len(argv) == 3:
        print(score(Path(argv[1]), Path(argv[2])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
