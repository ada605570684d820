"""SIGTERM and Ctrl-C, honoured from the first instruction of a run to the last.

From `install()` on (`python -m train` calls it before its heavy imports):
  * SIGTERM (a preemption notice) and a first Ctrl-C (SIGINT) set `requested()`. The loop then
    saves the step it is at and exits 0; before the first step there is nothing to save, and
    the set-up stops at its next check (`exit_if_requested`) with exit status 0, leaving any
    checkpoint it restored untouched. Further SIGTERMs change nothing: the save in progress
    finishes.
  * a second Ctrl-C stops at once: KeyboardInterrupt in a library caller; `python -m train`
    (`install(exit_at_once=True)`) prints one line and exits 130 from the handler itself, so no
    library frame it interrupts (e.g. Orbax waiting on its save thread) logs a traceback.

Standard library only, so installing it costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class StopRequested(Exception):
  """A stop signal arrived before the first step: the run ends with exit status 0."""


_state = {"requested": "", "interrupts": 0, "exit_at_once": False}
SECOND_CTRL_C = "interrupted: a second Ctrl-C stops at once; the last complete checkpoint is kept"



def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _state["requested"] = _state["requested"] or "SIGTERM"


def _on_sigint(signum, frame) -> None:
  del signum, frame
  _state["interrupts"] += 1
  if _state["interrupts"] > 1:
    if _state["exit_at_once"]:
      sys.stdout.flush()
      print(SECOND_CTRL_C, file=sys.stderr, flush=True)
      os._exit(130)
    raise KeyboardInterrupt
  _state["requested"] = _state["requested"] or "Ctrl-C"


def install(exit_at_once: bool | None = None) -> None:
  """Routes SIGTERM and SIGINT to this module (main thread only; elsewhere a no-op);
  `exit_at_once`: a second Ctrl-C ends the process (default: as set before, else False)."""
  if exit_at_once is not None:
    _state["exit_at_once"] = exit_at_once
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def handled():
  """`install()` for the duration of a block, then the previous handlers again (a library
  caller, e.g. a notebook, keeps its own Ctrl-C afterwards). Where `install()` already ran
  (`python -m train`), signals received since are kept, and the handlers are installed again:
  `jax.distributed.initialize` puts its own SIGTERM handler in place beneath Python's."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if signal.getsignal(signal.SIGTERM) is _on_sigterm:
    install()
    yield
    return
  previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  reset()
  install()
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def requested() -> str:
  """'SIGTERM' or 'Ctrl-C' once a stop was asked for, else ''."""
  return _state["requested"]


def exit_if_requested(where: str) -> None:
  """Raises StopRequested when a stop arrived during the set-up (`where`: what was being done)."""
  if _state["requested"]:
    raise StopRequested(f"{_state['requested']} {where}: no step was trained, nothing to save; "
                        "exiting")


def reset() -> None:
  """Forgets earlier signals (a new run in the same process)."""
  _state["requested"], _state["interrupts"] = "", 0
