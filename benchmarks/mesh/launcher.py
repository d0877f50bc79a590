"""Start the mesh (or the SilverTorch stand-in) as subprocesses on free loopback ports, wait until
every process answers ``GET /healthz`` with the same artifact version, stop them cleanly.

    with Mesh(artifact_dir, MeshSettings.like_server()) as mesh:
        mesh.url  # http://127.0.0.1:PORT of the orchestrator: POST /v1/retrieve

Each child binds port 0 itself and reports it (``READY <port>`` on stdout), so two launchers never
race for a port. ``stop()`` sends SIGTERM to each child it started, waits, then SIGKILLs the ones
still alive; the context manager always stops, also when start-up fails half-way.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from .client import get
from .settings import MeshSettings

__all__ = ["ServiceProcess", "Mesh", "StandIn", "SilverTorchServer", "MeshStartError"]

ROOT = Path(__file__).resolve().parents[2]


class MeshStartError(RuntimeError):
    """A service did not come up (its exit status and the tail of its stderr are in the message)."""


class ServiceProcess:
    """One ``run_service`` child."""

    def __init__(self, role: str, artifact: str | Path, settings: MeshSettings,
                 upstream: dict[str, int] | None = None, timeout_s: float = 180.0) -> None:
        self.role = role
        cmd = [sys.executable, "-m", "benchmarks.mesh.run_service", "--role", role,
               "--artifact", str(artifact), *settings.to_args()]
        if upstream:
            cmd += ["--upstream", ",".join(f"{k}={v}" for k, v in upstream.items())]
        env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "PYTHONUNBUFFERED": "1"}
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mesh-{role}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._err, env=env)
        self.timeout_s = timeout_s
        self.port = 0

    def ready(self) -> int:
        """Block until the child printed its port (``MeshStartError`` if it died or timed out)."""
        if not self.port:
            self.port = self._wait_ready(self.timeout_s)
        return self.port

    def _fail(self, why: str) -> MeshStartError:
        self.stop()
        tail = self.stderr_path.read_text(errors="replace")[-2000:] if self.stderr_path.exists() else ""
        return MeshStartError(f"mesh service '{self.role}' {why}\n{tail}")

    def _wait_ready(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        buf = b""
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise self._fail(f"exited with status {self.proc.wait()} before it was ready")
                buf += chunk
                for line in buf.split(b"\n"):
                    if line.startswith(b"READY "):
                        return int(line.split()[1])
            elif self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode} before it was ready")
        raise self._fail(f"was not ready within {timeout_s:.0f} s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout_s: float = 60.0) -> str:
        """Poll ``/healthz`` until 200; returns its body (``<role> <version>``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode}")
            try:
                status, body = get(self.url + "/healthz")
                if status == 200:
                    return body.decode()
            except OSError:
                pass
            time.sleep(0.05)
        raise self._fail(f"did not answer /healthz within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()
        self.stderr_path.unlink(missing_ok=True)


class _Group:
    """Processes started together and stopped together (reverse order)."""

    def __init__(self) -> None:
        self.procs: list[ServiceProcess] = []

    @property
    def roles(self) -> dict[str, int]:
        """Role -> pid of every process of the group (CPU accounting of the benchmark)."""
        return {p.role: p.proc.pid for p in self.procs}

    @property
    def pids(self) -> list[int]:
        return list(self.roles.values())

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Mesh(_Group):
    """user_tower + ann + scoring, then the orchestrator in front of them (see module doc)."""

    def __init__(self, artifact: str | Path, settings: MeshSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or MeshSettings.like_server()
        self.settings.validate()
        try:
            for role in ("user_tower", "ann", "scoring"):  # start together, load in parallel
                self.procs.append(ServiceProcess(role, artifact, self.settings))
            ports = {p.role: p.ready() for p in self.procs}
            self.procs.append(ServiceProcess("orchestrator", artifact, self.settings, upstream=ports))
            self.procs[-1].ready()
            versions = {p.role: p.wait_healthy().split()[-1] for p in self.procs}
            if len(set(versions.values())) != 1:
                raise MeshStartError(f"services loaded different artifact versions: {versions}")
            self.version = versions["orchestrator"]
        except BaseException:
            self.stop()
            raise
        self.port = self.procs[-1].port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def service(self, role: str) -> ServiceProcess:
        return next(p for p in self.procs if p.role == role)


class StandIn(_Group):
    """The in-process SilverTorch stand-in (:mod:`.standin`) as one child process."""

    def __init__(self, artifact: str | Path, settings: MeshSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or MeshSettings.like_server()
        try:
            self.procs.append(ServiceProcess("standin", artifact, self.settings))
            self.procs[0].ready()
            self.version = self.procs[0].wait_healthy().split()[-1]
        except BaseException:
            self.stop()
            raise
        self.port = self.procs[0].port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SilverTorchServer(_Group):
    """The real ``silvertorch serve`` (``python -m launch.cli serve ARTIFACT --port 0``) with the
    mesh's batching / thread / max_k settings, its state in a temporary directory."""

    def __init__(self, artifact: str | Path, settings: MeshSettings | None = None,
                 timeout_s: float = 240.0) -> None:
        import tempfile

        super().__init__()
        self.settings = settings or MeshSettings.like_server()
        self.tmp = tempfile.TemporaryDirectory(prefix="mesh-bench-serve-")
        port_file = Path(self.tmp.name) / "port"
        s = self.settings
        cmd = [sys.executable, "-m", "launch.cli", "serve", str(artifact), "--port", "0",
               "--port-file", str(port_file), "--state-dir", str(Path(self.tmp.name) / "state"),
               "--set", f"max_batch_size={s.max_batch_size}", "--set", f"max_wait_ms={s.max_wait_ms}",
               "--set", f"threads={s.threads}", "--set", f"max_k={s.max_k}"]
        self._err = open(Path(self.tmp.name) / "stderr.log", "wb")
        env = {**os.environ, "OMP_NUM_THREADS": str(s.threads)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._err, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            while not (port_file.exists() and port_file.read_text().strip()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise MeshStartError("silvertorch serve did not start: " + self._tail())
                time.sleep(0.1)
            self.port = int(port_file.read_text().strip())
            while True:
                try:
                    if get(self.url + "/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise MeshStartError("silvertorch serve is not healthy: " + self._tail())
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _tail(self) -> str:
        self._err.flush()
        return (Path(self.tmp.name) / "stderr.log").read_text(errors="replace")[-2000:]

    @property
    def roles(self) -> dict[str, int]:
        return {"server": self.proc.pid}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        self.tmp.cleanup()
