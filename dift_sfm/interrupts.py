"""SIGTERM ends a command the way Ctrl-C does, whatever library is loaded, and is never lost.

``install()`` (the CLI calls it) makes SIGINT and SIGTERM raise ``Interrupted`` (a
KeyboardInterrupt) in the main thread, so finished work is kept and the command ends with one
line and exit code 130. Two things stand in the way, and are handled here:

- Libraries replace the SIGTERM handler: importing pycolmap installs glog's failure handler
  (native stack dump, exit 143), ``ray.init`` installs ``sys.exit(15)`` and, for a local
  cluster, its own shutdown handler. ``install`` puts ours back right after pycolmap is
  imported (an import hook), and ``reinstall`` does after ``ray.init`` (dift_sfm.distributed).
- Python cannot propagate an exception raised by a signal handler that runs inside a weakref
  callback, a ``__del__`` or a garbage-collector callback: it prints "Exception ignored in
  ..." and goes on. Such an interrupt reaches ``sys.unraisablehook`` instead, which has a
  helper thread signal the main thread again (``_thread.interrupt_main``) until the handler
  raised outside such a place.
"""

from __future__ import annotations

import _thread
import importlib.abc
import importlib.machinery
import signal
import sys
import threading
from types import FrameType, ModuleType
from typing import Any

#: modules whose import replaces the SIGTERM handler (the handler is put back after them)
HANDLER_THIEVES = ("pycolmap",)

_installed = False
_reinstall_pending = False
_previous_unraisablehook = sys.unraisablehook
_landed = threading.Event()  # the last interrupt was raised where it propagates
_redeliver_lock = threading.RLock()  # re-entrant: the handler may run inside its holder
_redeliverer: threading.Thread | None = None


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT received: stop like Ctrl-C (finished work is kept)."""


def _in_unraisablehook(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code is _unraisablehook.__code__:
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _reinstall_pending
    if _reinstall_pending:  # a request of reinstall() from another thread, not a signal
        _reinstall_pending = False
        signal.signal(signal.SIGTERM, _handler)
        return
    if _in_unraisablehook(frame):  # raising here would be lost: signal again, later
        _redeliver_later()
        return
    _landed.set()
    raise Interrupted(signal.Signals(signum).name)


def _redeliver_later() -> None:
    """Have a helper thread signal the main thread until the handler raised where the
    interrupt propagates (one helper at a time)."""
    global _redeliverer
    with _redeliver_lock:
        _landed.clear()
        if _redeliverer is None:
            _redeliverer = threading.Thread(target=_redeliver, name="dift-sfm-redeliver",
                                            daemon=True)
            _redeliverer.start()


def _redeliver() -> None:
    global _redeliverer
    while True:
        with _redeliver_lock:
            if _landed.is_set():
                _redeliverer = None
                return
        _thread.interrupt_main(signal.SIGTERM)
        _landed.wait(0.05)


def _unraisablehook(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _installed:
        # raised where Python swallows exceptions (weakref callback, __del__, gc callback):
        # deliver it again once the main thread is out of there
        _redeliver_later()
        return
    _previous_unraisablehook(unraisable)


def reinstall() -> None:
    """Put our SIGTERM handler back (after a library replaced it). From a thread other than
    the main one, the main thread does it at its next check for signals."""
    global _reinstall_pending
    if not _installed:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
    else:
        _reinstall_pending = True
        _thread.interrupt_main(signal.SIGTERM)


class _ReinstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of HANDLER_THIEVES with the usual path finder, and calls
    ``reinstall`` once each has been executed."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname not in HANDLER_THIEVES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_reinstall(module: ModuleType) -> None:
            try:
                exec_module(module)
            finally:
                reinstall()

        spec.loader.exec_module = exec_then_reinstall  # type: ignore[method-assign]
        return spec


def install() -> None:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread (call it from there), now
    and after a library replaced the handler; swallowed interrupts are delivered again."""
    global _installed
    _installed = True
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored (&)
        signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    sys.unraisablehook = _unraisablehook
    if not any(isinstance(f, _ReinstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ReinstallAfterImport())
