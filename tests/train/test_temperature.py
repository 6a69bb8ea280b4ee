"""The temperature bound holds for the optimizer's own copy under ZeRO 1, 2 and 3, and can come back.

Before the clamp reached the fp32 master, the master passed log(100) (the model's copy was
clamped, then overwritten from the master at the next step), forward's clamp gave it no gradient,
and it stayed above the bound when the loss turned around.
"""

import json

import pytest

pytestmark = pytest.mark.slow
STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """One launch drives every stage in turn (process start and imports paid once)."""
    out = tmp_path_factory.mktemp("clamp")
    proc = torchrun(["tests/train/dist_clamp.py", str(out), ",".join(map(str, STAGES))], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_temperature_stays_at_its_bound_in_the_master_copy_and_comes_back(stage, runs):
    run = json.loads((runs / f"clamp{stage}.json").read_text())
    bound, up = run["bound"], run["up"]
    assert max(run["master"]) <= bound + 1e-6 and max(run["seen"]) <= bound + 1e-6, run
    assert run["master"][up - 1] == pytest.approx(bound), run  # it reached the bound and stayed there
    assert run["master"][-1] < bound - 1.0 and run["seen"][-1] < bound - 0.5, run  # and came back down
