"""A real single-node SLURM cluster on this machine, for the tests of sweep.launcher=slurm: Debian's
munge, slurmctld and slurmd (22.05), started as root without systemd, on loopback, with four fake
GPUs (device nodes made with mknod, handed out through gres.conf: each task gets its own
CUDA_VISIBLE_DEVICES). Accounting is off, as on many clusters: nothing may depend on sacct.

    python tests/slurm_cluster.py start <folder>   # then: export SLURM_CONF=<folder>/slurm.conf
    python tests/slurm_cluster.py stop <folder>

`.ci/run` installs the packages when apt can (see there); the tests skip with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def _path(program: str) -> str:
    """A program's path: root's PATH may lack /usr/sbin, where the daemons are."""
    return shutil.which(program) or f"/usr/sbin/{program}"


def missing() -> str | None:
    """Why no cluster can start here, or None."""
    absent = [d for d in (*DAEMONS, "sbatch", "squeue", "scancel", "scontrol")
              if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing; .ci/run installs it with apt)"
    if os.geteuid() != 0:
        return "the test SLURM cluster starts its daemons as root"
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, folder: Path, cpus: int = 4, gpus: int = 4):
        self.folder, self.cpus, self.gpus = Path(folder), cpus, gpus
        self.conf = self.folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):  # /dev/null's numbers: a file that exists for gres
            node = f / f"fakegpu{i}"
            if not node.exists():
                os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
        ctld, slurmd = _free_port(), _free_port()
        self.conf.write_text(f"""ClusterName=mnistsweep
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
KillWait=30
InactiveLimit=0
MinJobAge=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        (f / "gres.conf").write_text(
            f"NodeName=localhost Name=gpu File={f}/fakegpu[0-{self.gpus - 1}]\n")
        (f / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # running already
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run([_path("mungekey"), "--create"], check=True)
            shutil.chown(key, "munge", "munge")
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _path("munged")], check=True)
        deadline = time.time() + 10
        while subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode:
            if time.time() > deadline:
                raise RuntimeError("munged did not start")
            time.sleep(0.2)

    def start(self) -> None:
        self.write_config()
        self.start_munge()
        subprocess.run([_path("slurmctld"), "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run([_path("slurmd"), "-f", str(self.conf), "-N", "localhost"], env=self.env,
                       check=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True,
                                 text=True)
            if out.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        log = (self.folder / "log" / "slurmctld.log")
        raise RuntimeError(f"the SLURM node never became idle: {out.stdout} {out.stderr}\n"
                           f"{log.read_text()[-2000:] if log.exists() else ''}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    cluster = SlurmCluster(folder)
    if action == "start":
        if missing():
            sys.exit(missing())
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
