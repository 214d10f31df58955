"""Run a function over many items in worker processes that may crash without taking the run down.

decord (unmaintained since 2021) can segfault on some corrupt files. `isolated_map` gives each worker
one item at a time over its own pipe, so when a worker dies the parent knows exactly which file killed
it, records that file as failed ("decoder crashed: killed by SIGSEGV"), starts a fresh worker and goes
on. A per-item timeout catches decoders that hang: it counts from the item's start or from the last
`progress` the item reported, so a long file that keeps moving is never cut off.

What native code writes to the process's stderr (FFmpeg's log lines inside decord) would otherwise
reach the user's terminal before, and apart from, the failure it explains. Each worker points file
descriptor 2 at a log file of its own (Python's `sys.stderr`, and so the log records, still go to the
terminal); the file is emptied before each item, and a failed item's `Outcome.log` holds what the
decoder said about it, even when it crashed.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

# Where `progress` goes: the worker's pipe (set in `_worker`), or the parent's callback with workers=0.
_progress_sink: Callable[[int, int], None] | None = None


def progress(done: int, total: int) -> None:
    """Called by the mapped function while it works on one long item: `done` of `total` units so
    far. The parent hears of it (`isolated_map`'s `on_progress`) and restarts the item's timeout.
    Does nothing outside `isolated_map`."""
    if _progress_sink is not None:
        _progress_sink(done, total)


@dataclass
class Outcome:
    index: int  # position of the item in the input
    item: Any
    ok: bool
    value: Any = None  # fn(item) when ok
    error: str = ""  # why it failed when not ok
    exception: BaseException | None = None
    crashed: bool = False  # the worker died or hung on this item (it was replaced)
    log: str = ""  # what native code wrote to stderr during the item (failed items, workers only)


def _describe(e: BaseException) -> str:
    return str(e) if str(e) else type(e).__name__


def _capture_native_stderr(log_path: str) -> int:
    """Point fd 2 at `log_path`; keep Python's sys.stderr on the original stream. Returns the fd."""
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log_path, os.O_WRONLY | os.O_TRUNC)
    os.dup2(fd, 2)
    return fd


def _bound_heap() -> None:
    """glibc's malloc raises its mmap threshold to the largest block freed so far, so the decoders'
    repeated 5–20 MB frame buffers end up in the heap, fragmented and never returned, and each decoder
    thread gets its own arena: a worker decoding a 10-minute clip held 1.1 GB where 0.9 GB is live.
    A fixed 4 MB threshold (big buffers mapped and unmapped) and two arenas keep it at the live size,
    at no measured cost in decoding time. Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _worker(fn: Callable, conn, initializer: Callable | None, initargs: tuple,
            log_path: str | None = None) -> None:
    _bound_heap()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    faulthandler.disable()  # a crash is reported by the parent, naming the file; no C traceback spam
    log_fd = _capture_native_stderr(log_path) if log_path else None
    if initializer is not None:
        initializer(*initargs)
    global _progress_sink
    while True:
        task = conn.recv()
        if task is None:
            return
        index, item = task
        _progress_sink = lambda done, total, index=index: conn.send(("progress", index, done, total))  # noqa: E731
        if log_fd is not None:  # this item's log only
            os.ftruncate(2, 0)
            os.lseek(2, 0, os.SEEK_SET)
        try:
            conn.send((index, True, fn(item), None))
        except Exception as e:  # noqa: BLE001 - any failure of one item is reported, not fatal
            log.debug("item %d failed:\n%s", index, traceback.format_exc())
            try:
                conn.send((index, False, None, e))
            except Exception:  # noqa: BLE001 - unpicklable exception: send its text
                conn.send((index, False, None, RuntimeError(_describe(e))))


class _Slot:
    def __init__(self, ctx, fn, initializer, initargs):
        self.conn, child = ctx.Pipe()
        fd, self.log_path = tempfile.mkstemp(prefix="vqmae-worker-", suffix=".log")
        os.close(fd)
        self.proc = ctx.Process(target=_worker, args=(fn, child, initializer, initargs, self.log_path),
                                daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple[int, Any] | None = None
        self.since = 0.0  # when the current item started or last reported progress
        self.progressed = False
        self.limit: float | None = None  # the current item's timeout

    def give(self, index: int, item: Any, limit: float | None = None) -> None:
        self.task = (index, item)
        self.since, self.progressed = time.monotonic(), False
        self.limit = limit
        self.conn.send((index, item))

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def log(self) -> str:
        """What the worker's native code wrote to stderr during its current item (last 4 kB)."""
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-4096:].decode("utf-8", errors="replace")


def _crash_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker crashed: killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker crashed: killed by signal {-exitcode}"
    return f"worker exited unexpectedly (exit code {exitcode})"


def isolated_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1, *,
                 timeout: float | Callable[[Any], float | None] | None = None,
                 initializer: Callable | None = None, initargs: tuple = (),
                 on_progress: Callable[[Any, int, int], None] | None = None,
                 context: str = "spawn") -> Iterator[Outcome]:
    """Yield an `Outcome` per item, in completion order, computing `fn(item)` in `workers` processes.

    `fn` must be importable by the workers (a module-level function). `workers=0` runs in this
    process: no crash isolation, but easy to debug. Exceptions raised by `fn` become failed
    outcomes carrying the exception; a worker that dies or exceeds `timeout` seconds on an item fails
    that item only and is replaced. `timeout` may be a function of the item (None: no limit); it
    restarts whenever the item reports `progress`, which reaches `on_progress(item, done, total)`.
    """
    todo = deque(enumerate(items))
    limit_of = timeout if callable(timeout) else (lambda item: timeout)  # noqa: E731
    if workers <= 0:
        global _progress_sink
        if initializer is not None:
            initializer(*initargs)
        for index, item in todo:
            _progress_sink = (lambda d, t, item=item: on_progress(item, d, t)) if on_progress else None
            try:
                yield Outcome(index, item, True, fn(item))
            except Exception as e:  # noqa: BLE001
                yield Outcome(index, item, False, error=_describe(e), exception=e)
            finally:
                _progress_sink = None
        return

    ctx = mp.get_context(context)
    slots = [_Slot(ctx, fn, initializer, initargs) for _ in range(min(workers, max(len(todo), 1)))]
    try:
        for slot in slots:
            if todo:
                slot.give(*_with_limit(todo.popleft(), limit_of))
        while any(s.task is not None for s in slots):
            busy = [s for s in slots if s.task is not None]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy],
                         timeout=_time_left(busy))
            for i, slot in enumerate(slots):
                if slot.task is None:
                    continue
                outcome = _collect(slot, ready, on_progress)
                if outcome is None:
                    continue
                yield outcome
                if outcome.crashed:
                    slot.stop(kill=True)
                    slot = slots[i] = _Slot(ctx, fn, initializer, initargs)
                if todo:
                    slot.give(*_with_limit(todo.popleft(), limit_of))
    finally:
        for slot in slots:
            slot.stop(kill=slot.task is not None)


def _with_limit(task: tuple[int, Any], limit_of: Callable[[Any], float | None]) -> tuple[int, Any, float | None]:
    index, item = task
    return index, item, limit_of(item)


def _time_left(busy: list[_Slot]) -> float | None:
    limited = [s for s in busy if s.limit is not None]
    if not limited:
        return None
    now = time.monotonic()
    return max(0.0, min(s.since + s.limit - now for s in limited))


def _collect(slot: _Slot, ready: list, on_progress: Callable | None = None) -> Outcome | None:
    """The slot's finished outcome, or None while it is still working (progress reports are passed
    on and restart the item's clock)."""
    index, item = slot.task
    # poll() rather than `in ready`: `ready` may be stale after the caller spent time on an
    # earlier outcome, and a finished result must never be mistaken for a timeout.
    while slot.conn.poll():
        try:
            msg = slot.conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "progress":
            if msg[1] == index:
                slot.since, slot.progressed = time.monotonic(), True
                if on_progress is not None:
                    on_progress(item, msg[2], msg[3])
            continue
        got, ok, value, exc = msg
        if got == index:
            slot.task = None
            if ok:
                return Outcome(index, item, True, value)
            return Outcome(index, item, False, error=_describe(exc), exception=exc, log=slot.log())
    if slot.proc.sentinel in ready or not slot.proc.is_alive():
        slot.proc.join(timeout=1)
        slot.task = None
        return Outcome(index, item, False, error=_crash_reason(slot.proc.exitcode), crashed=True,
                       log=slot.log())
    if slot.limit is not None and time.monotonic() - slot.since > slot.limit:
        slot.task = None
        why = f": no progress for {slot.limit:g} s" if slot.progressed else f" after {slot.limit:g} s"
        return Outcome(index, item, False, error=f"timed out{why}", crashed=True, log=slot.log())
    return None
