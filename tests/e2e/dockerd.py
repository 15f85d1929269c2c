"""A private Docker engine for one test session: its own dockerd, data root, exec root and socket in a
temporary folder, stopped and removed afterwards (the machine's own engine, if any, is not touched)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from hivetrain.log import get_logger

logger = get_logger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class Dockerd:
    """``dockerd --data-root D/root --exec-root D/exec -H unix://D/docker.sock``; ``host`` is its DOCKER_HOST."""

    def __init__(self, binary: str = "dockerd"):
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"{binary} not found: apt-get install docker.io (.ci/run does it as root)")
        # short: containerd's sockets live under the exec root, and a unix socket path has 108 bytes at most
        self.dir = Path(tempfile.mkdtemp(prefix="hive-dockerd-", dir="/tmp"))
        self.host = f"unix://{self.dir}/docker.sock"
        self.log_path = self.dir / "dockerd.log"
        self.argv = [
            path,
            "--data-root",
            str(self.dir / "root"),
            "--exec-root",
            str(self.dir / "exec"),
            "-H",
            self.host,
            "--pidfile",
            str(self.dir / "dockerd.pid"),
        ]
        self.process: subprocess.Popen | None = None
        # dockerd makes the docker0 bridge and leaves it behind; removed at stop when it made it
        self.made_bridge = not Path("/sys/class/net/docker0").exists()

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        env = {**os.environ, "DOCKER_HOST": self.host}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if subprocess.run(["docker", "version"], env=env, capture_output=True, timeout=30).returncode == 0:
                logger.info(f"private dockerd up at {self.host} (pid {self.process.pid})")
                return
            time.sleep(1.0)
        raise RuntimeError(f"dockerd did not answer within {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _ours(self) -> list[int]:
        """Processes whose command line names this engine's folder (dockerd, its containerd, the shims)."""
        pids = []
        marker = str(self.dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def stop(self) -> list[int]:
        """SIGTERM dockerd (it stops its containers and containerd), SIGKILL what is left of it after
        STOP_TIMEOUT_S, unmount what it left mounted, remove the folder. Returns the pids that had to be killed."""
        killed: list[int] = []
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(f"dockerd ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; killing it")
        deadline = time.monotonic() + 10.0
        while (left := self._ours()) and time.monotonic() < deadline:  # containerd and shims end after dockerd
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.dir))
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.made_bridge and Path("/sys/class/net/docker0").exists():
            subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, timeout=30)
        return killed
