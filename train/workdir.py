"""The workdir of a run: one trainer at a time, and a layout checked before anything in it is
rewritten.

`lock(workdir)` takes an exclusive `flock` on WORKDIR/.lock that the operating system releases
when the process ends, however it ends (kill -9 included), so a lock is never stale; a second
trainer on the same workdir is refused in one line naming the holder's pid and host. In a
multi-process run, process 0 takes it and the others learn the verdict.

`check_layout` runs before the checkpoint manager is opened (Orbax deletes unfinished saves
then) and before metrics.jsonl or config.json are touched: checkpoints/ must be a readable,
writable directory, and the disk must have room for one more checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket

import jax
import numpy as np

LOCK_FILE = ".lock"
# Free space asked for beyond one checkpoint's size: the record, Orbax's metadata, slack.
_HEADROOM = 1.1


class WorkdirError(OSError):
  """The workdir cannot take this run (held by another trainer, wrong layout, no room)."""


class WorkdirLock:
  """An exclusive lock on a workdir, held until `release()` or the end of the process.

  Attributes:
    path: the lock file.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirError naming the trainer that holds it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirError(
          f"workdir {os.path.dirname(self.path)} is in use by another trainer ({holder}); wait "
          "for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    self._fd = fd

  def release(self) -> None:
    """Gives the lock back (the file stays; the next trainer takes it)."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {holder['pid']} on host {holder['host']}"
  except (ValueError, KeyError, OSError):
    return "pid unknown"


def directory_size(path: str) -> int:
  """Bytes of the files under `path`."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # a file removed while walking (an old checkpoint being deleted)
        pass
  return total


def state_bytes(abstract_state) -> int:
  """Bytes of a train state's arrays (from its abstract shapes: nothing is allocated)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract_state)))


def check_room(directory: str, needed: int) -> None:
  """WorkdirError when the filesystem of `directory` has not room for `needed` bytes."""
  free = shutil.disk_usage(directory).free
  if free < needed * _HEADROOM:
    raise WorkdirError(
        f"{directory} has {free / 2**20:.1f} MiB free, but a checkpoint of this run takes about "
        f"{needed / 2**20:.1f} MiB; free some space or use another --workdir")


def check_layout(workdir: str, checkpoint_bytes: int) -> None:
  """WorkdirError naming what is wrong with WORKDIR/checkpoints, or with the room for one more
  checkpoint (the latest checkpoint's size, else `checkpoint_bytes`)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.lexists(checkpoints):
    if not os.path.isdir(checkpoints):
      raise WorkdirError(f"{checkpoints} is not a directory; move it away (the run keeps its "
                         "checkpoints there)")
    if not os.access(checkpoints, os.R_OK | os.W_OK | os.X_OK):
      raise WorkdirError(f"{checkpoints} is not readable and writable by this user")
    steps = [n for n in os.listdir(checkpoints) if n.isdigit()]
    if steps:
      latest = os.path.join(checkpoints, max(steps, key=int))
      checkpoint_bytes = max(checkpoint_bytes, directory_size(latest))
  check_room(workdir, checkpoint_bytes)
