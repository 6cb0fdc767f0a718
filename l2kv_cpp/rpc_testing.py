"""rpc-servers on this machine and a byte-counting relay to them, for tests and benchmarks.

    with LocalServers(2) as endpoints:                 # two l2kv-rpc-server processes on free 127.0.0.1 ports
        ...

    with TrafficCounter("127.0.0.1:50052") as relay:   # the client uses relay.endpoint in --rpc
        before = relay.snapshot()
        ...                                            # an eviction
        sent, received = relay.since(before)           # bytes client -> server, server -> client

For benchmarks and tests: eviction must not move K/V through the client, and the only way to see that from
outside ggml is to count. Both legs use TCP_NODELAY like ggml's own sockets (Nagle's algorithm on the relay
would add ~40 ms to every small RPC command).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .rpc import server_program


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class TrafficCounter:
    """Listens on 127.0.0.1 (a free port) and relays every connection to `upstream` ("host:port")."""

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self._lock = threading.Lock()
        self._sent = 0  # client -> server
        self._received = 0  # server -> client
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [_nodelay(client), _nodelay(server)]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                # counted before it is passed on: once the other side has the bytes, a snapshot includes them
                # (counted after, a loaded machine let a call's last bytes land in the next call's window)
                with self._lock:
                    if to_server:
                        self._sent += len(data)
                    else:
                        self._received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side gone: end both, as a direct connection would
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self._sent, self._received

    def since(self, before: tuple[int, int]) -> tuple[int, int]:
        sent, received = self.snapshot()
        return sent - before[0], received - before[1]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> TrafficCounter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServers:
    """n rpc-servers (l2kv-rpc-server) on 127.0.0.1, each on a free port, stopped (killed if need be) on exit."""

    def __init__(
        self,
        n: int,
        threads: int = 1,
        log_dir: Path | None = None,
        start_timeout: float = 20.0,
        omp_wait_policy: str = "passive",
    ):
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []
        self.logs: list[Path] = []
        program = server_program()
        # the servers share this machine's cores with the client and each other: OpenMP threads that spin
        # after each graph (its default) would take the cores the next stage needs (SmolLM2 split over two
        # local servers: `python scripts/bench_rpc.py --server-wait active` against the default, on 2 cores)
        env = {**os.environ, "OMP_WAIT_POLICY": omp_wait_policy}
        try:
            for i in range(n):
                port = _free_port()
                log = (log_dir / f"rpc-server-{i}.log") if log_dir else None
                out = log.open("wb") if log else subprocess.DEVNULL
                proc = subprocess.Popen(
                    [str(program), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                if log:
                    out.close()
                    self.logs.append(log)
                self.procs.append(proc)
                self.endpoints.append(f"127.0.0.1:{port}")
            for ep, proc in zip(self.endpoints, self.procs, strict=True):
                self._wait_listening(ep, proc, start_timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _wait_listening(endpoint: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
        host, _, port = endpoint.rpartition(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the rpc-server for {endpoint} exited with status {proc.returncode}")
            try:
                with socket.create_connection((host, int(port)), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the rpc-server for {endpoint} did not listen within {timeout:.0f} s")

    def kill(self, i: int) -> None:
        """Kill server i at once (SIGKILL), as a crash or a power cut would."""
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> list[str]:
        return self.endpoints

    def __exit__(self, *exc: Any) -> None:
        self.stop()
