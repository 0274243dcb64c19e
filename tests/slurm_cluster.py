"""A real SLURM cluster of two nodes on this one machine for tests: Debian's `slurm-wlm` with `munge`, configured in
a temporary dir.

`start_cluster(folder)` writes a key for munged and a slurm.conf, starts munged, slurmctld and one slurmd per node
(`slurmd -N <node>`: Debian builds SLURM with multiple-slurmd support), all as root, all state, sockets, logs and
pid files inside `folder`, on free ports so nothing on the machine is touched; waits until `sinfo` reports every
node idle and returns a `Cluster`; `Cluster.stop()` stops every daemon it started. Client commands (sbatch, squeue,
scontrol, sacct) find the cluster through `SLURM_CONF`.

Nodes: the machine's hostname and `localhost` (both name this machine, so a multi-node job's rendezvous at its
first host works), each with half the machine's CPUs and memory, reached at 127.0.0.1 on ports of their own.
Partitions (both nodes):
  debug   the default; no time limit
  short   MaxTime=1 minute, for time-limit tests (a job's `--signal=USR2@N` arrives up to 60 s before the limit,
          slurmctld checks limits every 30 s)
`JobRequeue=1` lets jobs requeue themselves (`scontrol requeue`, which submitit's checkpointing calls), and
`AuthInfo=...,cred_expire=10` shortens the wait before a requeued job may start again from SLURM's default 120 s to
about 10 s; `SchedulerParameters=sched_interval=5`: the scheduler looks at pending jobs (a requeued one waiting for
its begin time) every 5 s, not SLURM's default 60 s. `KillWait=30` (SLURM's default): SIGKILL follows SIGTERM
(scancel, `scontrol requeue`, preemption, the hard time limit) after 30 s.

`available()` says why a cluster cannot be started here (None when it can); `ensure_installed()` installs the
packages with apt-get when running as root (dev.py calls it before the tests in CI).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")


def _missing() -> list[str]:
    return [c for c in (*DAEMONS, *CLIENTS) if not (shutil.which(c) or Path("/usr/sbin", c).exists())]


def ensure_installed(echo=print) -> bool:
    """Install slurm-wlm and munge with apt-get when missing and possible (root + apt); True when present."""
    if not _missing():
        return True
    apt = shutil.which("apt-get")
    if not apt or os.geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    echo(f"+ apt-get install {' '.join(PACKAGES)}")
    if subprocess.call([apt, "-qq", "update"], env=env) != 0:
        return False
    if subprocess.call([apt, "-qq", "install", "-y", "--no-install-recommends", *PACKAGES], env=env) != 0:
        return False
    return not _missing()


def available() -> str | None:
    """None when a test cluster can be started here, else the reason it cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a test SLURM cluster needs root (munged, slurmctld and slurmd run as root); CI runs as root"
    missing = _missing()
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing); `python3 dev.py test` installs Debian's "
                "slurm-wlm and munge when run as root with apt-get")
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_line() -> str:
    """This machine's hardware as slurmd sees it (`slurmd -C`), e.g. `NodeName=vm CPUs=2 ... RealMemory=24105`."""
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


@dataclass
class Cluster:
    folder: Path
    conf: Path
    nodes: list[str]
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> str:
        """A SLURM client command against this cluster; returns stdout."""
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def node_state(self) -> str:
        """The states of the nodes: `idle`, `mixed`, `allocated`, `down`, ..., comma-separated when they differ."""
        states = set(self.run("sinfo", "-h", "-N", "-o", "%T", check=False).split())
        return ",".join(sorted(states))

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld", *(f"slurmd.{n}" for n in self.nodes), "munged"):
            path = self.folder / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name}.log (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop the slurmds, slurmctld and munged (in that order, waiting until each has exited), then
        end what is left of the jobs (slurmstepd outlives slurmd by design): every process whose environment
        names this cluster's SLURM_CONF."""
        if self.pids.get("slurmctld"):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.time() + 20
                while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).split():
                    time.sleep(0.5)
        for name in reversed(list(self.pids)):  # started munged, slurmctld, then each slurmd
            pid = self.pids.pop(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in _processes_with_env("SLURM_CONF", str(self.conf)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _processes_with_env(name: str, value: str) -> list[int]:
    """Processes (other than this one) whose environment has name=value."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _read_pid(path: Path, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"no pid file {path} after {timeout:.0f} s")


def write_config(folder: Path) -> tuple[Path, list[str], dict[str, str]]:
    """munge key, slurm.conf (its node names) and the client environment for a cluster living in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(exist_ok=True)
    os.chmod(folder / "munge", 0o755)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    node_line = _node_line()
    host = node_line.split()[0].split("=", 1)[1]
    fields = {kv.split("=", 1)[0]: kv.split("=", 1)[1] for kv in node_line.split()}
    nodes = [host, "localhost"]
    if host == "localhost":
        raise RuntimeError("the test cluster names its nodes after the hostname and localhost; the hostname is localhost")
    ctld_port, *ports = _free_ports(1 + len(nodes))
    cpus, mem = max(1, int(fields["CPUs"]) // len(nodes)), int(fields["RealMemory"]) * 9 // 10 // len(nodes)
    node_lines = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                           f"RealMemory={mem} State=UNKNOWN" for n, port in zip(nodes, ports))
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=vlmtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / 'munge' / 'munge.socket'},cred_expire=10
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool' / '%n'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.%n.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=5
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={','.join(nodes)} MaxTime=1 State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    return conf, nodes, env


def start_cluster(folder: Path, timeout: float = 60.0) -> Cluster:
    """Start munged, slurmctld and a slurmd per node for a cluster in `folder`; wait until every node is idle."""
    conf, nodes, env = write_config(Path(folder))
    folder = Path(folder)
    cluster = Cluster(folder=folder, conf=conf, nodes=nodes, env=env)
    try:
        m = folder / "munge"
        subprocess.run([_exe("munged"), "--force", f"--key-file={m / 'munge.key'}", f"--socket={m / 'munge.socket'}",
                        f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                        f"--log-file={folder / 'munged.log'}"], env=env, check=True, capture_output=True)
        cluster.pids["munged"] = _read_pid(m / "munged.pid", 10)
        subprocess.run([_exe("slurmctld"), "-f", str(conf), "-i"], env=env, check=True, capture_output=True)
        cluster.pids["slurmctld"] = _read_pid(folder / "slurmctld.pid", 20)
        for node in nodes:
            (folder / "spool" / node).mkdir(exist_ok=True)
            subprocess.run([_exe("slurmd"), "-f", str(conf), "-N", node], env=env, check=True, capture_output=True)
            cluster.pids[f"slurmd.{node}"] = _read_pid(folder / f"slurmd.{node}.pid", 20)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cluster.node_state() == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"nodes {nodes} not idle after {timeout:.0f} s (sinfo: {cluster.node_state()!r})\n{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise
