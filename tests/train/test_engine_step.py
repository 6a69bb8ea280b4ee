"""One optimizer step of every objective through the real DeepSpeed engine (ZeRO 1, 2, 3; fp32) on
2 gloo ranks equals the reference step (``tests/train/dist_engine_step.py``: one process on the
global batch for CLIP, SimCLR and MoCo; the by-hand rank mean of plain autograd gradients for ALBEF,
whose ITC contrasts each rank's own batch by design). One torchrun launch covers every case."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_deepspeed_step_equals_the_reference_step(tmp_path, torchrun):
    out = tmp_path / "engine.json"
    proc = torchrun(["tests/train/dist_engine_step.py", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    expected = {f"{name}/zero{stage}" for name, stages in
                (("clip", (1, 2, 3)), ("simclr", (1, 2, 3)), ("moco_v2", (1, 2)), ("albef", (1, 2))) for stage in stages}
    assert set(result) == expected
    for case, r in result.items():
        assert r["update_err"] <= 1e-5 * r["update_max"], (case, r)  # relative to the largest update
        assert r["loss_err"] <= 1e-5, (case, r)
        assert r["moved"] >= 0.9 * r["params"], (case, r)  # the step moved (nearly) every parameter
