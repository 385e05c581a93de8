"""``python -m bench.faults``: run the fault-injection suite and keep its report in ``bench/results/faults.md``.

The report is written by ``tests/test_faults.py`` from what each fault test observed (exit codes, task statuses,
warning and error lines); nothing in it is typed by hand. The suite runs the tiny issue164 workflow on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "bench" / "results" / "faults.md"


def main() -> int:
    started = time.time()
    env = {**os.environ, "EPS_FAULT_REPORT": str(REPORT)}
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py",
                            *sys.argv[1:]], cwd=REPO, env=env)
    if REPORT.exists():
        with open(REPORT, "a") as fh:
            fh.write(f"Suite wall time: {time.time() - started:.0f} s (including the one complete tiny run it "
                     f"breaks copies of), pytest exit code {code}.\n")
        print(f"report: {REPORT.relative_to(REPO)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
