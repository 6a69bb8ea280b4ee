"""The logging setup every command uses: a native crash prints where each thread was."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CRASH = """
from pipeline.core.log import setup_logging
import ctypes

def read_address_zero():
    ctypes.string_at(0)  # SIGSEGV, as a native library's bug would raise

setup_logging()
read_address_zero()
"""


def test_native_crash_prints_the_python_stack():
    proc = subprocess.run([sys.executable, "-c", CRASH], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "in read_address_zero" in proc.stderr
