"""Waiting for a shared stage artifact across the processes of one run."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from filelock import FileLock, Timeout


@contextlib.contextmanager
def collective_lock(path: str | os.PathLike, *, main: bool, device: torch.device | str = "cpu",
                    poll_s: float = 5.0) -> Iterator[None]:
    """Hold the file lock `path` on the main process while every process waits for it, never in a barrier.

    The main process tries the lock for `poll_s` at a time and broadcasts whether it got it, so no collective
    waits longer than `poll_s` (a lock held for hours by another run would otherwise time the other ranks'
    barrier out: NCCL's default timeout is 10 minutes). All processes leave the wait together.
    """
    lock = FileLock(str(path)) if main else None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    while True:
        got = 0
        if lock is not None:
            try:
                lock.acquire(timeout=poll_s)
                got = 1
            except Timeout:
                pass
        if distributed:
            flag = torch.tensor([got], device=device)
            torch.distributed.broadcast(flag, 0)
            got = int(flag.item())
        if got:
            break
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
