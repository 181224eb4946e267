"""The C reference: libgearman's client (through ctypes) and the `gearman` tool as the worker.

Client: libgearman8's own loops do all the work (``gearman_client_add_task`` ×N then
``gearman_client_run_tasks`` for a batch, ``gearman_client_do`` per sequential job);
ctypes releases the GIL for each call, so Python only starts and times them.

Worker: ``gearman -w -f FUNC`` with no command writes each job's input to its stdout (here
/dev/null) and completes it with an empty result, in C, without starting a process per job;
that is the C no-op worker for W1-W3 and W5. It is single-threaded, so "N threads" are N
processes.
For W4, ``gearman -w -f FUNC -- true`` runs `true` per job, which is exactly that workload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import time

from .common import (BenchError, Env, Skip, System, Workers, payloads, spawn, wait_gearman_drained,
                     wait_gearman_workers, which)

TASK = "bench.echo"
SHELL = "bench.shell.c"
LIB = "libgearman.so.8"
SUCCESS = 0


def load_lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(LIB)
    c_size_p = ctypes.POINTER(ctypes.c_size_t)
    c_int_p = ctypes.POINTER(ctypes.c_int)
    lib.gearman_client_create.restype = ctypes.c_void_p
    lib.gearman_client_create.argtypes = [ctypes.c_void_p]
    lib.gearman_client_add_server.restype = ctypes.c_int
    lib.gearman_client_add_server.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint16]
    lib.gearman_client_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.gearman_client_do.restype = ctypes.c_void_p
    lib.gearman_client_do.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_size_t, c_size_p, c_int_p]
    for fn in (lib.gearman_client_add_task, lib.gearman_client_add_task_background):
        fn.restype = ctypes.c_void_p
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                       ctypes.c_char_p, ctypes.c_size_t, c_int_p]
    lib.gearman_client_run_tasks.restype = ctypes.c_int
    lib.gearman_client_run_tasks.argtypes = [ctypes.c_void_p]
    lib.gearman_task_return.restype = ctypes.c_int
    lib.gearman_task_return.argtypes = [ctypes.c_void_p]
    lib.gearman_task_data_size.restype = ctypes.c_size_t
    lib.gearman_task_data_size.argtypes = [ctypes.c_void_p]
    lib.gearman_client_task_free_all.argtypes = [ctypes.c_void_p]
    lib.gearman_client_free.argtypes = [ctypes.c_void_p]
    lib.gearman_client_error.restype = ctypes.c_char_p
    lib.gearman_client_error.argtypes = [ctypes.c_void_p]
    return lib


class CClient:
    """One libgearman client connected to one server."""

    def __init__(self, host: str, port: int, timeout_ms: int = 60000):
        self.lib = load_lib()
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.client = self.lib.gearman_client_create(None)
        if not self.client:
            raise BenchError("gearman_client_create failed")
        if self.lib.gearman_client_add_server(self.client, host.encode(), port) != SUCCESS:
            raise BenchError(f"gearman_client_add_server: {self.error()}")
        self.lib.gearman_client_set_timeout(self.client, timeout_ms)

    def error(self) -> str:
        e = self.lib.gearman_client_error(self.client)
        return e.decode(errors="replace") if e else "unknown error"

    def do(self, function: bytes, data: bytes) -> bytes:
        size = ctypes.c_size_t(0)
        ret = ctypes.c_int(-1)
        ptr = self.lib.gearman_client_do(self.client, function, None, data, len(data),
                                         ctypes.byref(size), ctypes.byref(ret))
        if ret.value != SUCCESS:
            raise BenchError(f"gearman_client_do returned {ret.value}: {self.error()}")
        try:
            return ctypes.string_at(ptr, size.value) if ptr else b""
        finally:
            if ptr:
                self.libc.free(ptr)

    def run_batch(self, function: bytes, data: list[bytes], background: bool = False) -> None:
        add = self.lib.gearman_client_add_task_background if background else self.lib.gearman_client_add_task
        ret = ctypes.c_int(-1)
        tasks = []
        try:
            for d in data:  # libgearman copies the workload into its packet
                t = add(self.client, None, None, function, None, d, len(d), ctypes.byref(ret))
                if not t or ret.value != SUCCESS:
                    raise BenchError(f"gearman_client_add_task returned {ret.value}: {self.error()}")
                tasks.append(t)
            rc = self.lib.gearman_client_run_tasks(self.client)
            if rc != SUCCESS:
                raise BenchError(f"gearman_client_run_tasks returned {rc}: {self.error()}")
            bad = [t for t in tasks if self.lib.gearman_task_return(t) != SUCCESS]
            if bad:
                raise BenchError(f"{len(bad)} of {len(tasks)} C tasks failed "
                                 f"(first: {self.lib.gearman_task_return(bad[0])})")
        finally:
            self.lib.gearman_client_task_free_all(self.client)

    def close(self) -> None:
        if self.client:
            self.lib.gearman_client_free(self.client)
            self.client = None


class CReference(System):
    key = "c"
    label = "C (libgearman client, gearman -w)"
    note = ("client: libgearman8 through ctypes; worker: `gearman -w` without a command (prints the input, "
            "returns an empty result; N threads = N processes); "
            "W4: `gearman -w -- true`")

    def __init__(self):
        self._client: CClient | None = None

    def check(self, env: Env) -> None:
        if which("gearman") is None:
            raise Skip("the `gearman` tool is not installed (apt-get install gearman-tools)")
        try:
            load_lib()
        except OSError as e:
            raise Skip(f"{LIB} cannot be loaded: {e}") from None

    def version(self) -> str:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libgearman8"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            out = ""
        return f"libgearman8 {out or '?'}"

    def client(self, env: Env) -> CClient:
        if self._client is None:
            self._client = CClient(env.host, env.port)
        return self._client

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        fn = SHELL if purpose == "shell" else TASK
        cmd = [which("gearman"), "-w", "-h", env.host, "-p", str(env.port), "-f", fn]
        if purpose == "shell":
            cmd += ["--", "true"]
        workers = Workers()
        try:
            for i in range(processes * threads):
                workers.procs.append(spawn(f"c-{purpose}-{processes}x{threads}-{i}", cmd, env.run_dir))
            wait_gearman_workers(env, fn, processes * threads, workers)
        except BaseException:
            workers.stop()
            raise
        return workers

    def batch(self, env: Env, n: int, timeout: float) -> None:
        self.client(env).run_batch(TASK.encode(), [p.encode() for p in payloads(n)])

    def sequential(self, env: Env, n: int, timeout: float) -> list[float]:
        client = self.client(env)
        out = []
        deadline = time.monotonic() + timeout
        fn = TASK.encode()
        for p in payloads(n):
            data = p.encode()
            t0 = time.perf_counter()
            r = client.do(fn, data)
            out.append(time.perf_counter() - t0)
            if r not in (b"", data):
                raise BenchError(f"C sequential job returned {r!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"sequential run over {timeout:g}s")
        return out

    def background(self, env: Env, n: int, timeout: float) -> None:
        self.client(env).run_batch(TASK.encode(), [p.encode() for p in payloads(n, "bg")], background=True)

    def drained(self, env: Env, timeout: float) -> float:
        return wait_gearman_drained(env, TASK, timeout)

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        self.client(env).run_batch(SHELL.encode(), [b"x"] * n)  # libgearman refuses an empty workload

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
