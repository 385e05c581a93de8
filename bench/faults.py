"""``python -m bench.faults``: run the fault-injection suite and keep its report in ``bench/results/faults.md``.

The report is written by ``tests/test_faults.py`` from what each fault test observed (exit codes, task statuses,
warning and error lines); nothing in it is typed by hand. The suite runs the tiny issue164 workflow on the CPU. Below
the table this adds how long the suite took, the CPU time it used and the machine's load while it ran: on a shared
machine the wall time says more about the neighbours than about the suite.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "results" / "faults.md"
# The suite's one complete tiny run is made inside its first test, so that test's limit (pytest.ini: 900 s) must
# cover it; on a loaded machine it does not. A bench run asks for more; extra arguments still override it.
TIMEOUT_S = 3600


def main() -> int:
    started, load_before = time.time(), os.getloadavg()[0]
    env = {**os.environ, "EPS_FAULT_REPORT": str(REPORT)}
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py",
                            "--timeout", str(TIMEOUT_S), *sys.argv[1:]], cwd=REPO, env=env)
    wall, load_after = time.time() - started, os.getloadavg()[0]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    if REPORT.exists():
        with open(REPORT, "a") as fh:
            fh.write(f"Suite wall time: {wall:.0f} s (including the one complete tiny run it breaks copies of), "
                     f"CPU time {used.ru_utime + used.ru_stime:.0f} s, pytest exit code {code}. The machine has "
                     f"{os.cpu_count()} cores; its 1-minute load average was {load_before:.1f} at the start and "
                     f"{load_after:.1f} at the end.\n")
        print(f"report: {REPORT.relative_to(REPO)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
