"""Feature-cached accumulation: with grad_accum = k, one optimizer step contrasts all b x k x world samples.

Its loss and its update equal those of one step at micro-batch b x k (1e-5), on 1 and on 2 ranks;
plain accumulation (each micro-batch contrasting only its own b x world samples, as before) does not.
"""

import json

import pytest

pytestmark = pytest.mark.slow
LAUNCHES = {1: ("clip",), 2: ("clip", "simclr")}  # world -> objectives, run in turn in one launch


@pytest.fixture(scope="module")
def results(tmp_path_factory, torchrun):
    out = tmp_path_factory.mktemp("accum")
    for world, names in LAUNCHES.items():
        proc = torchrun(["tests/train/dist_accum.py", str(out), ",".join(names)], nproc=world, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("name, world", [(name, world) for world, names in LAUNCHES.items() for name in names])
def test_cached_accumulation_equals_one_step_on_the_whole_batch(name, world, results):
    result = json.loads((results / f"accum_{name}_{world}.json").read_text())
    assert result["cached_loss"] == pytest.approx(result["whole_loss"], abs=1e-5), result
    assert result["cached_vs_whole"] < 1e-5 < result["update"], result
    assert result["plain_vs_whole"] > 1e-4 and abs(result["plain_loss"] - result["whole_loss"]) > 1e-3, result
