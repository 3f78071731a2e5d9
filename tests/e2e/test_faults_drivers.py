"""The analysis drivers own their children, with a real launch: SIGTERM to ``analysis.compare``
while its torchrun job hangs stops the job's whole process group (torchrun and its rank), waits
for it, and ends the driver with one line and exit 143. (Ctrl-C and SIGTERM with a stand-in child
and grandchild: tests/unit/test_faults_analysis.py::test_compare_stops_its_children_on_a_signal.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.support import ROOT, TINY, clean_env, error_lines

pytestmark = pytest.mark.faults

_DRIVER = """
import sys
from analysis import compare
tiny = sys.argv[3:]
compare.torchrun_command = lambda run, out: [
    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
    "-m", "lss_megatron.train", *tiny, "--fault", "hang:0:1", "--out", str(out),
]
sys.exit(compare.main(["--preset", "smoke", "--out", sys.argv[1], "--no-progress"]))
"""


def _processes_under(path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(path) in " ".join(
                p.info["cmdline"] or []
            ):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_compare_stops_the_running_torchrun_job(tmp_path):
    out = tmp_path / "cmp"
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(out), "unused", *TINY],
        cwd=ROOT,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 200
    hung = False
    while not hung:
        assert time.monotonic() < deadline and driver.poll() is None, "the rank never hung"
        time.sleep(0.5)
        hung = any("injected hang" in p.read_text() for p in out.glob("runs/*/stderr.log"))
    assert len(_processes_under(out / "runs")) >= 2, "torchrun and its rank run"
    driver.send_signal(signal.SIGTERM)
    err = driver.communicate(timeout=60)[1]
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert len(error_lines(err)) == 1 and "stopped by SIGTERM" in err and "Traceback" not in err
    time.sleep(1)
    assert _processes_under(out / "runs") == [], "a process of the job was left running"
