"""One run per run directory: an advisory lock file, ``<run.dir>/run.lock``.

Rank 0 holds an exclusive ``fcntl.flock`` on it for the life of the run; the file says who holds it
(host, PID, start time, SLURM job id) and its modification time is a heartbeat, renewed every
``HEARTBEAT_S`` by a daemon thread.  A second launch into a locked ``run.dir`` is refused with one
line naming the holder (``RunDirLocked``, a user error: exit code 2, before the data, the
checkpoints or ``metrics.jsonl`` are touched).

A lock whose holder is gone is taken over with a warning: ``flock`` is free (the kernel releases it
when the holder dies, however it died), or the holder ran on this host and its PID no longer exists
(an orphaned child process can keep the lock file open).  A requeued SLURM job (the same
``SLURM_JOB_ID``) waits up to ``run.lock_wait_s`` for its predecessor to let go.

Filesystems where ``flock`` is not shared between nodes (NFS without a lock manager, Lustre mounted
``localflock``) or not supported at all: the heartbeat is the fallback.  A launch that gets the
``flock`` but finds the file naming another host whose heartbeat is younger than ``LEASE_S`` is
refused as well; where ``flock`` fails outright the run warns and relies on the heartbeat alone.
Two launches started on different nodes within the same second can still both pass there: that
case is not protected (docs/checkpoints.md).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, Optional

from engram_train.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
LEASE_S = 4 * HEARTBEAT_S     # a heartbeat older than this belongs to a holder that is gone
_POLL_S = 1.0


class RunDirLocked(UserError, RuntimeError):
    """Another live run holds ``run.dir``."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def _describe(holder: Dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "a run starting this moment, which has not written its name yet"
    text = f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
    if holder.get("slurm_job_id"):
        text += f", SLURM job {holder['slurm_job_id']}"
    return text


class RunLock:
    def __init__(self, run_dir: str, wait_s: float = 180.0):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.wait_s = wait_s
        self.fd: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    # -- reading the holder ------------------------------------------------------------------------
    def _holder(self) -> Dict[str, Any]:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            holder["age_s"] = time.time() - os.stat(self.path).st_mtime
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _same_host(self, holder) -> bool:
        return holder.get("host") == self.me["host"]

    def _gone(self, holder) -> bool:
        """The holder ran on this host and no longer exists."""
        pid = holder.get("pid")
        return self._same_host(holder) and isinstance(pid, int) and not _pid_alive(pid)

    def _predecessor(self, holder) -> bool:
        """An earlier run of this SLURM job (a requeue keeps the job id)."""
        return bool(self.me["slurm_job_id"]) and holder.get("slurm_job_id") == self.me["slurm_job_id"]

    def _refuse(self, holder, why: str) -> RunDirLocked:
        return RunDirLocked(f"run.dir={os.path.dirname(self.path)} is in use by another run ({_describe(holder)}; "
                            f"{why}); wait for it to finish, stop it, or choose another run.dir "
                            f"(the lock is {self.path})")

    # -- acquiring ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                flocked = None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                flocked = False
                log.warning("%s: flock is not supported on this filesystem (%s); only the heartbeat in the "
                            "lock file protects this run directory", self.path, e)
            holder = self._holder()
            why = None
            if flocked is None:
                os.close(fd)
                if self._gone(holder):
                    # An orphan keeps the old file open: a new file (inode) carries the lock from here.
                    log.warning("%s: taking over the lock of %s, which no longer runs", self.path, _describe(holder))
                    os.unlink(self.path)
                    continue
                why = "it holds the lock"
            elif holder and not self._same_host(holder) and holder.get("age_s", LEASE_S) < LEASE_S:
                # flock may not reach that host from here; its heartbeat says it is alive.
                os.close(fd)
                why = f"its heartbeat in the lock file is {holder['age_s']:.0f} s old"
            if why is None:
                if holder:
                    log.warning("%s: taking over the lock left by %s, which no longer holds it", self.path,
                                _describe(holder))
                self.fd = fd
                break
            if not (self._predecessor(holder) and time.monotonic() < deadline):
                raise self._refuse(holder, why)
            time.sleep(_POLL_S)   # a requeued job: its predecessor is still shutting down
        self._write()
        atexit.register(self.release)   # also when the run ends in an error: the next launch finds it free
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(self.me) + "\n").encode(), 0)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:   # a full or failing disk must not stop training; the flock still holds
                pass

    def release(self) -> None:
        """Let go (the next launch then finds an empty, unlocked file)."""
        if self.fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
