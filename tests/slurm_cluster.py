"""A single-node SLURM cluster in a temp dir for tests: munged, slurmctld and slurmd as root, in the foreground.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives under the given directory and both daemons
listen on free ports, so nothing of the machine's own SLURM or munge (if any) is used or touched. Commands reach
this cluster through ``SLURM_CONF`` in :meth:`SlurmCluster.env`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")

CONF = """\
ClusterName=qlibext
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=60
MinJobAge=300
NodeName=qx1 NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=qx1 Default=YES MaxTime=INFINITE State=UP
"""


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root (CI runs as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM binaries missing ({', '.join(missing)}): apt-get install slurm-wlm munge (.ci/run does)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd under ``root``; :meth:`stop` cancels every job and ends the three daemons."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        m = self.root / "munge"
        self._daemon(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={m}/munge.sock",
                      f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"])
        self._wait_for(lambda: (m / "munge.sock").exists(), timeout, "munged's socket")
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(CONF.format(host=host, root=self.root, ctld_port=_free_port(), d_port=_free_port(),
                                         cpus=os.cpu_count() or 1))
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._daemon(["slurmd", "-D", "-N", "qx1", "-f", str(self.conf)])
        self._wait_for(lambda: self.sinfo() == "idle", timeout, "the node idle in sinfo")

    def _daemon(self, argv: list[str]) -> None:
        log = open(self.root / f"{argv[0]}.out", "wb")  # noqa: SIM115 - the daemon keeps it
        self.procs.append(subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def _wait_for(self, ok, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not ok():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: no {what} after {timeout}s (exited: {dead}):\n{self.logs()}")
            time.sleep(0.3)

    def sinfo(self) -> str:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True,
                              timeout=30)
        return done.stdout.strip()

    def queued(self, job_id: str) -> list[str]:
        """``jobid_task state`` lines of ``job_id`` still in the queue."""
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], env=self.env(), capture_output=True,
                              text=True, timeout=30)
        return done.stdout.split("\n") if done.stdout.strip() else []

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env(), capture_output=True, timeout=30)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
