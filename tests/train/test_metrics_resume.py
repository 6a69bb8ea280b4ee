"""A resumed run continues its records: metrics.jsonl and TensorBoard drop the steps after the
checkpoint, wandb continues the same run (its id is kept in the run directory)."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.config import LogConfig
from train.metrics import Metrics


def _run(run_dir, steps, loss_scale, resume_at=None, **log):
    metrics = Metrics(LogConfig(**log), str(run_dir), 1, 0, 1, torch.device("cpu"), {"lr": 1.0})
    if resume_at is not None:
        metrics.resume(resume_at, None)
    for step in steps:
        metrics.update({"loss": torch.tensor(loss_scale * step)}, 8, 0.0)
        metrics.log(step, 0, 1e-3, {})
    metrics.close()
    return metrics


def test_resume_drops_the_records_after_the_checkpoint_in_jsonl_and_tensorboard(tmp_path):
    _run(tmp_path, range(1, 7), 1.0)  # the job that died after step 6; its checkpoint is step 4
    _run(tmp_path, range(5, 9), 10.0, resume_at=4)
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)]
    assert [(r["step"], r["loss"]) for r in jsonl] == expected
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == expected


def test_wandb_run_id_is_kept_in_the_run_dir_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no server here: offline runs keep their id all the same
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = _run(tmp_path, range(1, 3), 1.0, tensorboard=False, wandb_project="vlpipe-test")
    run_id = (tmp_path / "wandb_id").read_text()
    second = _run(tmp_path, range(3, 5), 1.0, resume_at=2, tensorboard=False, wandb_project="vlpipe-test")
    assert first.writers[-1].run.id == second.writers[-1].run.id == run_id
