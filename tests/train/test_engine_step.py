"""One optimizer step of every objective through the real DeepSpeed engine (ZeRO 1, 2, 3; fp32) on
2 gloo ranks equals the reference step (``tests/train/dist_engine_step.py``: one process on the
global batch for CLIP, SimCLR and MoCo; the by-hand rank mean of plain autograd gradients for ALBEF,
whose ITC contrasts each rank's own batch by design). The same launch also saves a checkpoint with
one slow rank and logs one metrics record with one rank holding more memory. One torchrun launch."""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory, torchrun) -> dict:
    out = tmp_path_factory.mktemp("engine") / "engine.json"
    proc = torchrun(["tests/train/dist_engine_step.py", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_deepspeed_step_equals_the_reference_step(result):
    steps = {case: r for case, r in result.items() if "/zero" in case}
    stages = {"clip": (1, 2, 3), "simclr": (1, 2, 3), "moco_v2": (1, 2), "albef": (1, 2)}  # ZeRO-3: no EMA copies
    expected = {f"{name}/zero{stage}" for name, of in stages.items() for stage in of}
    assert set(steps) == expected
    for case, r in steps.items():
        assert r["update_err"] <= 1e-5 * r["update_max"], (case, r)  # relative to the largest update
        assert r["loss_err"] <= 1e-5, (case, r)
        assert r["moved"] >= 0.9 * r["params"], (case, r)  # the step moved (nearly) every parameter


def test_latest_is_written_only_after_every_rank_finished_its_part(result):
    times = result["checkpoint"]  # rank 1 wrote its trainer state 3 s after the others
    assert times["latest"] >= times["last_rank_state"], times


def test_logged_memory_is_the_maximum_over_ranks(result):
    logged, ranks = result["mem_rss"]["logged"], result["mem_rss"]["ranks"]
    assert ranks[1] > ranks[0] + 0.2, ranks  # rank 1 holds 256 MiB more than the largest other rank held
    assert logged == pytest.approx(max(ranks), abs=0.02), (logged, ranks)
