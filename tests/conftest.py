"""How `make test` spreads the suite over two pytest-xdist workers (`-n 2` in pyproject.toml): whole
test files, so a module's fixtures (the demo run, cached training runs) are built once, and all of
tests/slurm/ on one worker, since its files share the session's Slurm cluster. The two longest
units (the demo and the Slurm tests) start first, so the workers finish together rather than one
running the demo alone at the end; the next longest files follow, longest first, and the short ones
fill in at the end (longest-processing-time order: a 150 s file last left one worker idle ~2 minutes)."""

from __future__ import annotations

import pytest

FIRST = ("tests/test_demo.py", "tests/slurm", "tests/train/test_bf16.py", "tests/train/test_train.py",
         "tests/data/test_build_e2e.py", "tests/train/test_albef_train.py", "tests/train/test_export.py")


def unit(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return "tests/slurm" if path.startswith("tests/slurm/") else path


def pytest_collection_modifyitems(items):
    order = {name: rank for rank, name in enumerate(FIRST)}
    items.sort(key=lambda item: order.get(unit(item.nodeid), len(FIRST)))  # stable: the rest as collected


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    config.option.loadscopereorder = False  # keep the order above (xdist would sort units by test count)
    return ByUnit(config, log)
