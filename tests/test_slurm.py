"""The Slurm batch script of docs/slurm: valid bash, its #SBATCH lines where sbatch reads
them, one torchrun agent per node meeting on the job's first node, and its torchrun line
training on this machine as a one-node job (srun and scontrol stubbed)."""
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docs", "slurm", "train.sbatch")


def logical_lines() -> list[str]:
    """The script's lines, a backslash-continued line joined into one."""
    with open(SCRIPT) as f:
        return f.read().replace("\\\n", " ").splitlines()


def srun_line() -> list[str]:
    lines = [line for line in logical_lines() if line.lstrip().startswith("srun ")]
    assert len(lines) == 1, "one srun line"
    return shlex.split(lines[0])


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_sbatch_lines_come_before_the_first_command_and_ask_one_task_per_node():
    lines = logical_lines()
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.startswith("#"))
    sbatch = {i: line for i, line in enumerate(lines) if line.startswith("#SBATCH")}
    assert max(sbatch) < first_command, "sbatch stops reading #SBATCH at the first command"
    options = dict(re.match(r"#SBATCH --([\w-]+)=(\S+)", line).groups()
                   for line in sbatch.values())
    assert int(options["nodes"]) >= 2 and options["ntasks-per-node"] == "1"
    assert {"time", "job-name", "output"} <= set(options)


def test_master_addr_is_the_first_node_of_the_job():
    assignments = [line for line in logical_lines() if line.startswith("MASTER_ADDR=")]
    assert assignments == [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)']


def test_srun_starts_one_torchrun_per_node_with_a_c10d_rendezvous_on_the_first_node():
    words = srun_line()
    torchrun = words.index("torchrun")
    assert words[0] == "srun" and "--ntasks-per-node=1" in words[:torchrun]
    flags = dict(w.split("=", 1) for w in words[torchrun + 1:] if w.startswith("--"))
    assert flags["--nnodes"] == "$SLURM_JOB_NUM_NODES"
    assert flags["--nproc-per-node"] == "$NPROC_PER_NODE"
    assert flags["--rdzv-backend"] == "c10d"
    assert flags["--rdzv-endpoint"] == "$MASTER_ADDR:$MASTER_PORT"
    assert flags["--rdzv-id"] == "$SLURM_JOB_ID"
    assert words[-4:] == ["-m", "distlab", "train", "$@"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub(folder, name: str, body: str) -> None:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_script_trains_as_a_one_node_job_on_this_machine(tmp_path):
    bin_dir = str(tmp_path)
    stub(bin_dir, "scontrol", 'echo localhost')                      # show hostnames
    stub(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nexec "$@"')  # this node
    env = dict(os.environ, SLURM_JOB_NODELIST="node[1]", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_ID="4242", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
               GLOO_SOCKET_IFNAME="lo",
               PATH=os.pathsep.join([bin_dir, os.path.dirname(sys.executable),
                                     os.environ["PATH"]]))
    done = subprocess.run(["bash", SCRIPT, "--algo", "ddp", "--steps", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["algo"] == "ddp" and summary["world_size"] == 2
    assert summary["backend"] == "gloo" and isinstance(summary["loss"], float)
