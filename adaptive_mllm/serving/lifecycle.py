"""Who stops whom: the server's processes under Ctrl+C, SIGTERM, and an HTTP process that dies.

LitServe runs the HTTP server (uvicorn, forked), a ``multiprocessing`` Manager holding the queues (forked) and the
model's worker (spawned), all in the main process's process group. Ctrl+C in a terminal, and ``kill -- -PGID`` or
systemd's default ``KillMode=control-group``, signal every one of them at once: the worker died mid-batch and the
Manager with it, so the requests in flight hung until uvicorn's 30 s graceful timeout and then got no answer. Here
only the main process acts on such a signal: the Manager and the HTTP process, once uvicorn has shut down, ignore
it while the main process lives (:func:`interrupt`), and the worker ignores SIGINT and
SIGTERM while an HTTP process it answers for still runs (:class:`ServerProcesses`). The main process then shuts
down as LitServe does on Ctrl+C: uvicorn stops accepting, answers what is in flight, exits, and the worker is
stopped after it. LitServe watches its workers but not its HTTP process: :class:`DeadlineServer` stops the server
(exit status 1) when that process exits on its own, which left the port open and every request hanging.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any

import litserve as ls

log = logging.getLogger(__name__)

HTTP_SLOTS = 16  # the most HTTP processes whose pids are shared (serve runs one)
WATCH_SECONDS = 0.5  # how often the main process checks that its HTTP processes run


def interrupt(main_pid: int, signum: int, frame: Any) -> None:
    """SIGTERM's and SIGINT's handler. In the main process, Ctrl+C's orderly shutdown (LitServe's, on
    KeyboardInterrupt). The processes forked from it inherit the handler: there (the Manager; the HTTP process once
    uvicorn has shut down, when it raises the signal again, which printed a KeyboardInterrupt traceback) the signal
    is left to the main process while it lives (a group SIGTERM killed the Manager under the requests in flight),
    and is the default death once it is gone."""
    if os.getpid() == main_pid:
        raise KeyboardInterrupt(f"signal {signum}")
    if os.getppid() == main_pid:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class ServerProcesses:
    """The pids of LitServe's HTTP processes, shared with the worker (spawned with the API, which carries this).

    The worker calls :meth:`guard_worker`: while the main process lives and one of these runs (it may hold
    requests in flight, waiting for this worker's answers), SIGINT and SIGTERM are the main process's to act on
    and the worker ignores them; LitServe terminates the worker after the HTTP process has finished, and before
    the HTTP process starts (loading the model) or once the main process is gone, the signals stop the worker as
    by default."""

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self._http = multiprocessing.get_context("spawn").Array("i", HTTP_SLOTS, lock=False)  # 0: an unused slot

    def record_http(self, pids: list[int]) -> None:
        for slot, pid in enumerate(pids[:HTTP_SLOTS]):
            self._http[slot] = pid

    def http_running(self) -> bool:
        return any(pid and _running(pid) for pid in self._http)

    def guard_worker(self) -> None:
        """In the worker's main thread: SIGINT and SIGTERM left to the main process while it serves."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._worker_signal)

    def _worker_signal(self, signum: int, frame: Any) -> None:
        if os.getppid() == self.main_pid and self.http_running():
            name = signal.Signals(signum).name
            log.warning("worker: %s left to the main process, which stops the worker after the requests in flight", name)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _running(pid: int) -> bool:
    """A process that has not exited (a zombie, exited but not yet reaped, has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: alive as far as can be told


class DeadlineServer(ls.LitServer):
    """LitServer that shares its HTTP processes' pids with the worker and stops when one of them, or the worker,
    exits on its own.

    ``unexpected_exit`` says which exited and how (None: none did); ``serve`` exits with status 1 then."""

    def __init__(self, *args: Any, processes: ServerProcesses, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processes = processes
        self.unexpected_exit: str | None = None
        self.http_workers: dict[int, Any] = {}
        self._stopping = threading.Event()
        # LitServe's own worker watch polls through the queue Manager and is never stopped: after an orderly shutdown
        # it raced the Manager's (a "Monitoring worker crashed" traceback, or a second shutdown); _watch_http,
        # stopped before the shutdown starts, watches the worker too
        self._monitor_workers = False

    def _start_server(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
        workers = super()._start_server(*args, **kwargs)
        self.http_workers = workers
        self.processes.record_http([worker.pid for worker in workers.values() if isinstance(worker, BaseProcess)])
        threading.Thread(target=self._watch_http, args=(workers,), name="http-watch", daemon=True).start()
        return workers

    def _perform_graceful_shutdown(self, *args: Any, **kwargs: Any) -> None:
        self._stopping.set()  # from here on the HTTP processes exit because they are told to
        super()._perform_graceful_shutdown(*args, **kwargs)

    def _watch_http(self, workers: dict[int, Any]) -> None:
        while not self._stopping.wait(WATCH_SECONDS):
            http = [worker for worker in workers.values() if not worker.is_alive()]
            model = [worker for worker in getattr(self, "inference_workers", []) if not worker.is_alive()]
            if not (http or model) or self._stopping.is_set():
                continue
            gone = (http or model)[0]
            code = getattr(gone, "exitcode", None)
            kind = "HTTP server" if http else "inference worker"
            self.unexpected_exit = f"the {kind} process {gone.name} exited (exit code {code}) while serving"
            log.error("%s; shutting down", self.unexpected_exit)
            try:
                self._shutdown_event.set()  # what the main process waits on: LitServe's own shutdown follows
            except Exception:  # noqa: BLE001 - the Manager is gone too: the main process's SIGTERM shutdown instead
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def kill_now(self) -> None:
        """A second Ctrl+C (or SIGTERM) during the orderly shutdown, or one while the model loads: stop every
        process at once (the worker ignores the signals while an HTTP process runs)."""
        for process in [*getattr(self, "inference_workers", []), *self.http_workers.values()]:
            if isinstance(process, BaseProcess) and process.is_alive():
                process.kill()
