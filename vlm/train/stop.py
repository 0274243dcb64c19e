"""Stopping `vlm train` early with a checkpoint: the hook SLURM's warning signal (time limits) and preemption use.

A stop is requested by the signal SIGUSR2 (what SLURM sends `--signal=USR2@N` seconds before a job's time limit,
or `kill -USR2 PID`) or by the file named in the environment variable `VLM_STOP_FILE` coming into existence
(the grid's SLURM job creates it: the file also reaches a trainer that has not installed its signal handler yet).
A trainer run by the grid (`VLM_STOP_FILE` set) also takes SIGTERM as a request: SLURM sends it to every process
of a job it preempts, requeues (`scontrol requeue`) or cancels, KillWait (or the partition's GraceTime) seconds
before SIGKILL, so the trainer saves a checkpoint at its next step boundary if it reaches one in time. Elsewhere
SIGTERM keeps its default action (a `vlm train` in eval or start-up must still end on `kill`).
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
    """Ask the running training to stop at its next step boundary (also the handler of `handled_signals()`)."""
    global _requested
    _requested = True


def clear() -> None:
    """Forget an earlier request (for a second training in the same process)."""
    global _requested
    _requested = False


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM in a trainer the grid runs: request a stop. SLURM sends SIGTERM to the DataLoader's worker processes
    too, and they die of it; PyTorch's SIGCHLD handler would then raise in the trainer wherever it is (even while it
    saves the checkpoint), so it is dropped: a stopping trainer fetches no more batches (a fetch under way still
    fails, and the run resumes from its last periodic checkpoint)."""
    request_stop()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def handled_signals() -> tuple[signal.Signals, ...]:
    """The signals that request a stop in this process: SIGUSR2, and SIGTERM when the grid runs it."""
    return (STOP_SIGNAL, signal.SIGTERM) if os.environ.get(STOP_FILE_ENV) else (STOP_SIGNAL,)


def install_handler() -> None:
    """Make `handled_signals()` request a stop instead of killing the process (only possible on the main thread)."""
    if threading.current_thread() is threading.main_thread():
        for sig in handled_signals():
            signal.signal(sig, _terminated if sig == signal.SIGTERM else request_stop)


def requested() -> bool:
    """True when this process was asked to stop (signal or stop file)."""
    path = os.environ.get(STOP_FILE_ENV)
    return _requested or bool(path and Path(path).exists())


def ignore_signal() -> None:
    """Ignore `handled_signals()` from now on (a process that is exiting: Python's exit restores the default action,
    death)."""
    if threading.current_thread() is threading.main_thread():
        for sig in handled_signals():
            signal.signal(sig, signal.SIG_IGN)
