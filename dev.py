"""The two README commands: `python3 dev.py demo` and `python3 dev.py test`.

Each creates the project's virtual environment in `.venv/` when it is missing or when
`pyproject.toml` changed since it was built, then runs the job inside it. Only a Python
interpreter (3.10+) is needed on the machine.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VLM_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)
    if rc != 0:
        sys.exit(rc)


def ensure_env() -> None:
    """Create or refresh `.venv` so it matches pyproject.toml (stamp = its sha256)."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = VENV / ".vlm-ablate-installed"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run([PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run([PY, "-m", "pip", "install", "--quiet", "-e", ".[test]"])
    stamp.write_text(digest)


def ensure_test_packages() -> None:
    """Debian packages some tests need, installed when missing and possible (root + apt-get): Chromium (the report
    test renders report.html headless) and slurm-wlm + munge (the SLURM tests start a one-node cluster)."""
    wanted = {"chromium": shutil.which("chromium") or shutil.which("chromium-browser"),
              "slurm-wlm": shutil.which("sbatch") and Path("/usr/sbin/slurmctld").exists() and Path("/usr/sbin/slurmd").exists(),
              "munge": Path("/usr/sbin/munged").exists()}
    missing = [pkg for pkg, present in wanted.items() if not present]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if not apt or os.geteuid() != 0:
        print(f"warning: {', '.join(missing)} not installed and cannot be installed here (needs root + apt-get); "
              "the report's browser test and the SLURM tests will be skipped", flush=True)
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run([apt, "-qq", "update"], env=env)
    _run([apt, "-qq", "install", "-y", "--no-install-recommends", *missing], env=env)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in {"demo", "test", "env"}:
        sys.exit("usage: python3 dev.py demo [--quick] | test [pytest args] | env")
    ensure_env()
    job, rest = argv[0], argv[1:]
    if job == "test":
        ensure_test_packages()
        _run([PY, "-m", "pytest", "-n", "2", "--dist", "loadfile", *rest])
    elif job == "demo":
        _run([BIN / "vlm", "demo", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
