"""A real Slurm cluster of emulated nodes on 127.0.0.1, started and stopped by a test.

Debian's Slurm (22.05) runs several ``slurmd`` on one machine when each node has its own
port and is started as ``slurmd -N <name>``. This module installs the packages when they
are missing (the tests run as root on a fresh machine), writes a private munge key and a
minimal ``slurm.conf`` into a temporary directory, starts a private ``munged``,
``slurmctld`` and one ``slurmd`` per node in the foreground as child processes, and stops
exactly those processes by PID. Client commands find the cluster through ``SLURM_CONF``,
which the jobs inherit, so nothing under /etc is touched besides the package install.

Each node advertises placeholder GPUs (``gres.conf`` entries pointing at /dev/null) so
that ``--gpus-per-node`` requests are accepted and a script's GPU logic sees the variables
a GPU cluster would set; there is no CUDA behind them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt, ...)."""


def ensure_installed() -> None:
    """Install Debian's Slurm and munge packages if any daemon or client is missing."""
    if all(shutil.which(name) for name in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and this is not a root Debian machine to install it on")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True, timeout=300)
        subprocess.run(install, env=env, capture_output=True, check=True, timeout=600)


def _free_ports(count: int) -> list[int]:
    """``count`` consecutive free TCP ports (slurm.conf gives node ports as a range)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + count < 65536 and all(_port_free(p) for p in range(start, start + count)):
            return list(range(start, start + count))
    raise SlurmUnavailable("no free range of ports for the Slurm daemons")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclasses.dataclass
class Job:
    job_id: int
    returncode: int  # the job's exit code (sbatch --wait), or -1 when the job was never run
    output: str  # the job's stdout and stderr

    def check(self) -> "Job":
        assert self.returncode == 0, f"job {self.job_id} failed with exit code {self.returncode}:\n{self.output[-6000:]}"
        return self


class SlurmCluster:
    """``nodes`` emulated nodes named n1..nN, each with ``cpus`` CPUs and ``gpus`` placeholder GPUs."""

    def __init__(self, nodes: int = 2, cpus: int = 4, gpus: int = 2):
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.cpus, self.gpus = cpus, gpus
        self.root = Path(tempfile.mkdtemp(prefix="vlpipe-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and, through sbatch's --export=ALL, for jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            _wait_until(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld to answer")
            for name in self.names:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
            _wait_until(self._all_idle, timeout, f"nodes {self.names} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons this cluster started (newest first), then any
        process still carrying this cluster's SLURM_CONF (job steps the daemons left behind)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run("scancel", "--partition=debug")
            try:
                _wait_until(lambda: not self._run("squeue", "-h").stdout.strip(), 30, "cancelled jobs to end")
            except TimeoutError:
                pass  # their processes are ended below
        for name, proc in reversed(list(self._procs.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()
        for pid in self._leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def _leftover_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
        return pids

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        log = open(self.root / f"{name}.out", "wb")
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        time.sleep(0.1)
        if self._procs[name].poll() is not None:
            raise SlurmUnavailable(f"{name} exited at start:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_munge(self) -> None:
        """A private munged with its own key and socket, so no system daemon is needed or touched."""
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o755)  # munged requires clients to be able to traverse it
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.root.chmod(0o755)  # munged (user munge) must reach its directory
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"], user="munge")
        _wait_until(self.munge_socket.exists, 15, "munged's socket")

    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.names))
        devices = self.root / "dev"
        devices.mkdir()
        for i in range(self.gpus):
            (devices / f"nvidia{i}").symlink_to("/dev/null")
        nodelist = f"n[1-{len(self.names)}]"
        gpu_files = f"{devices}/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{devices}/nvidia0"
        (self.root / "gres.conf").write_text(f"NodeName={nodelist} Name=gpu File={gpu_files}\n" if self.gpus else "")
        state = self.root / "state"
        state.mkdir()
        self.conf.write_text(_SLURM_CONF.format(
            root=self.root, state=state, munge=self.munge_socket, ctld_port=ctld_port,
            nodelist=nodelist, node_ports=f"{node_ports[0]}-{node_ports[-1]}", cpus=self.cpus,
            gres=f"Gres=gpu:{self.gpus}" if self.gpus else "",
            # Jobs derive ports from their id: start at a random id so that two clusters in a row
            # (or side by side) do not hand the same port to their first jobs.
            first_job_id=random.randrange(1000, 1_000_000),
        ))

    def _all_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(name) == "idle" for name in self.names)

    def _run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)

    # ------------------------------------------------------------------ jobs

    def sbatch(self, script: str | Path, *args: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None,
               cwd: str | Path | None = None, timeout: float = 300) -> Job:
        """``sbatch --wait`` SCRIPT ARGS: blocks until the job ends; the Job holds its exit code and output."""
        out = Path(tempfile.mkstemp(dir=self.root, prefix="job-", suffix=".out")[1])
        argv = ["sbatch", "--wait", "--parsable", f"--output={out}", *options, str(script), *args]
        try:
            proc = subprocess.run(argv, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as err:
            self._run("scancel", str(int((err.stdout or b"0").split()[0])))
            raise TimeoutError(f"{script} ran past {timeout:.0f}s; its output so far:\n{out.read_text(errors='replace')[-6000:]}") from None
        match = re.match(r"(\d+)", proc.stdout)
        if not match:
            raise RuntimeError(f"sbatch refused {script}: {proc.stderr.strip()}")
        return Job(int(match.group(1)), proc.returncode, out.read_text(errors="replace") + proc.stderr)

    def wait_job(self, job_id: int, timeout: float = 300) -> str:
        """Wait for a job submitted elsewhere (e.g. by another job) to end; returns its final state."""

        def final_state():
            shown = self._run("scontrol", "show", "job", str(job_id))
            if shown.returncode != 0:  # already purged (MinJobAge): its end is in the completion log
                return self.completed_states(job_id).get(str(job_id))
            state = re.search(r"JobState=(\S+)", shown.stdout).group(1)
            return state if state in TERMINAL_STATES else None

        return _wait_until(final_state, timeout, f"job {job_id} to end", interval=0.5)

    def completed_states(self, job_id: int) -> dict[str, str]:
        """Final state of each ended job of ``job_id`` from Slurm's job completion log (jobcomp/filetxt;
        there is no accounting database for sacct): {"12": "COMPLETED"}, or per array task {"12_0": ...}."""
        path = self.root / "jobcomp.txt"
        states = {}
        for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))  # an array task: its own JobId, plus ArrayJobId and ArrayTaskId
            task = fields.get("ArrayTaskId", "")
            if fields.get("ArrayJobId") == str(job_id) and task.isdigit() and int(task) < 2**31:
                states[f"{job_id}_{task}"] = fields["JobState"]
            elif fields.get("JobId") == str(job_id):  # a plain job, or an array that never started (one record)
                states[str(job_id)] = fields["JobState"]
        return states

    def dependency(self, job_id: int) -> str:
        """The job's dependency as Slurm holds it (``scontrol show job``), e.g. ``afterok:12_*(unfulfilled)``."""
        shown = self._run("scontrol", "show", "job", str(job_id))
        match = re.search(r"\bDependency=(\S+)", shown.stdout)
        assert shown.returncode == 0 and match, f"job {job_id}: {shown.stdout}{shown.stderr}"
        return match.group(1)


# Minimal, and only what a one-machine cluster needs: no accounting, no cgroups, fast
# scheduling (batch_sched_delay=0), fast purge of finished jobs so `sbatch --wait` polls every
# 2 s (MinJobAge=5), dependent jobs cancelled when their dependency fails, impossible
# requests refused at submit time, and nodes allowed more CPUs than the machine has.
_SLURM_CONF = """\
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}
StateSaveLocation={state}
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=kill_invalid_depend,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
MinJobAge=5
FirstJobId={first_job_id}
EnforcePartLimits=ALL
NodeName={nodelist} NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_ports} CPUs={cpus} {gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
