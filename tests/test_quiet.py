"""Expected noise from our dependencies never reaches a volunteer's terminal, and real warnings still do.

bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when imported on a CPU machine
without the optional ``kernels`` package; we never use 4-bit kernels, so photon_p2p drops exactly that line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, photon_p2p, bitsandbytes
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
"""


def test_bitsandbytes_kernel_notice_is_dropped_real_warnings_are_not():
    pytest.importorskip("bitsandbytes")
    ours = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert "gemm_4bit_forward" not in ours.stderr
    assert "a real bitsandbytes warning" in ours.stderr
