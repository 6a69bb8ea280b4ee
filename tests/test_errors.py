"""A user's mistake ends in one or two lines naming the key or file, and exit status 2; no traceback."""

import subprocess
import sys

import pytest

COMMANDS = {
    "train": ["train.main", "--config", "configs/clip/tiny.yaml", "run.no_such_key=1"],
    "build_shards": ["pipeline.build_shards", "--output", "{tmp}/out", "no_such_section.key=1"],
    "download": ["pipeline.download", "--input", "{tmp}/missing.parquet", "--output", "{tmp}/out"],
    "results_table": ["pipeline.evaluation.results_table", "{tmp}"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_user_error_is_one_short_message_and_exit_status_2(name, tmp_path):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[name]]
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: ") and len([l for l in lines if not l.startswith(" ")]) <= 3, lines
