"""Stopping `vlm train` early with a checkpoint: the hook SLURM's warning signal (time limits) uses.

A stop is requested by the signal SIGUSR2 (what SLURM sends `--signal=USR2@N` seconds before a job's time limit,
or `kill -USR2 PID`) or by the file named in the environment variable `VLM_STOP_FILE` coming into existence
(the grid's SLURM job creates it: the file also reaches a trainer that has not installed its signal handler yet).
The step loop (`vlm.train.steps.train_stage`) checks after every optimizer step, all processes of a distributed
run together; on a request it saves a checkpoint and raises `Stopped`, and `vlm train` exits with
`STOPPED_EXIT_CODE`. Running the same command again resumes from that checkpoint, bitwise as from any other.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_SIGNAL = signal.SIGUSR2
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request with a checkpoint; run again to resume
STOP_FILE_ENV = "VLM_STOP_FILE"

_requested = False


class Stopped(Exception):
    """Training stopped at a step boundary on request, after saving a checkpoint (not an error)."""


def request_stop(signum: int | None = None, frame: object = None) -> None:
    """Ask the running training to stop at its next step boundary (also the SIGUSR2 handler)."""
    global _requested
    _requested = True


def clear() -> None:
    """Forget an earlier request (for a second training in the same process)."""
    global _requested
    _requested = False


def install_handler() -> None:
    """Make SIGUSR2 request a stop instead of killing the process (only possible on the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, request_stop)


def requested() -> bool:
    """True when this process was asked to stop (signal or stop file)."""
    path = os.environ.get(STOP_FILE_ENV)
    return _requested or bool(path and Path(path).exists())


def ignore_signal() -> None:
    """Ignore SIGUSR2 from now on (a process that is exiting: Python's exit restores the default action, death)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, signal.SIG_IGN)
