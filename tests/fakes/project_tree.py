"""A throwaway project tree (``shared`` and ``jobs`` packages) whose code fingerprint is read in a fresh process.

The fingerprint is computed from files on disk and cached per process, so every reading runs in its own subprocess
with only the tree on its path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_tree(root: Path, files: dict[str, str]) -> None:
    """``shared/contract/fingerprint.py`` copied from the project, empty package markers, and ``files`` (path -> text)."""
    for package in ("shared", "shared/contract", "jobs"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    shutil.copy(ROOT / "shared" / "contract" / "fingerprint.py", root / "shared" / "contract")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def fingerprint_in(root: Path, module: str = "jobs.stage") -> str:
    code = f"from shared.contract.fingerprint import code_fingerprint; print(code_fingerprint({module!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)},
                          capture_output=True, text=True, check=True).stdout.strip()
