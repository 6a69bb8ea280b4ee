"""Evaluation of ``--checkpoint open_clip:local-dir:FOLDER`` (an open_clip model folder, here our export
of a random-init CLIP) gives the metrics of evaluating the same weights as our own model."""

from __future__ import annotations

import torch

from pipeline import evaluate
from pipeline.evaluation import run
from train import export, tokenizers
from train.encoder import Encoder
from train.registry import MODELS
from train.transforms import TRANSFORMS


def test_open_clip_checkpoint_evaluates_as_the_same_weights_do(tmp_path):
    torch.manual_seed(0)
    cfg = MODELS.config("clip_tiny")()
    model = MODELS.build("clip_tiny", cfg).eval()
    export.to_open_clip(model, cfg, torch.tensor(2.5), tmp_path / "open_clip")
    preprocess = TRANSFORMS.build("eval", None, model.contract)
    ours = Encoder(model=model, preprocess=lambda image: preprocess(image)["image"],
                   tokenize=tokenizers.build(model.contract), name="ours")
    args = ["--config", "eval/fashion_mnist.yaml", "dataset.limit=200", "batch_size=50", "plots=false",
            "tasks=[{name: zeroshot_classification}]"]
    theirs_cfg, _ = evaluate.parse_args(["--checkpoint", f"open_clip:local-dir:{tmp_path / 'open_clip'}", *args,
                                         f"output={tmp_path / 'theirs'}"])
    ours_cfg, _ = evaluate.parse_args(["--checkpoint", "ours", *args, f"output={tmp_path / 'ours'}"])
    theirs, mine = run(theirs_cfg), run(ours_cfg, ours)
    assert [r["task"] for r in theirs] == ["zeroshot_classification"]
    for a, b in zip(theirs, mine, strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in a["metrics"].items():
            assert value == b["metrics"][key] or abs(value - b["metrics"][key]) < 1e-6, (a["task"], key)
