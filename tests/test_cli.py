"""The command line: the demo writes its report; every --algo trains on real processes and
prints its final loss, under distlab's launcher and under torchrun (two agents standing for
two nodes)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from distlab.__main__ import ALGORITHMS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--steps", "5", "--lr", "0.05"]
TASK = {"ddp": ["--task", "linear"], "ps": ["--task", "linear"], "local_sgd": []}


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_demo_writes_an_html_report(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--steps", "15"]) == 0
    html = out.read_text()
    assert "synchronous (BSP, staleness 0)" in html and "asynchronous" in html
    assert html.count("plotly") > 10 and "Measured staleness" in html


def test_every_algorithm_of_the_command_line_is_tested_here():
    assert sorted(ALGORITHMS) == ["ddp", "local_sgd", "ps"]


@pytest.mark.parametrize("algo", ["ddp", "ps", "local_sgd"])
def test_algorithm_trains_under_distlabs_launcher_and_prints_its_final_loss(algo, capsys):
    assert main(["train", "--algo", algo, "--nproc", "3", *FLAGS, *TASK[algo]]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["algo"] == algo and summary["world_size"] == 3
    assert isinstance(summary["loss"], float) and summary["loss"] == summary["loss"]  # not NaN


def test_bad_flags_are_refused_before_any_process(capsys):
    with pytest.raises(ValueError, match="needs at least 2 processes"):
        main(["train", "--algo", "ps", "--nproc", "1", *FLAGS])
    with pytest.raises(ValueError, match="lr=-1.0"):
        main(["train", "--algo", "ddp", "--nproc", "2", "--lr", "-1"])
    with pytest.raises(ValueError, match="--task='linear' is not supported"):
        main(["train", "--algo", "local_sgd", "--nproc", "2", "--task", "linear"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("algo", ["ddp", "ps", "local_sgd"])
def test_algorithm_trains_under_torchrun_with_two_agents_standing_for_two_nodes(algo):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=cli-{algo}",
           "-m", "distlab", "train", "--algo", algo, *FLAGS, *TASK[algo]]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT) for _ in range(2)]
    outs = [a.communicate(timeout=180) for a in agents]
    for agent, (_, err) in zip(agents, outs):
        assert agent.returncode == 0, err[-3000:]
    printed = [last_json(out) for out, _ in outs if out.strip()]
    assert len(printed) == 1, "only rank 0 prints"
    summary = printed[0]
    assert summary["algo"] == algo and summary["world_size"] == 2
    assert summary["backend"] == "gloo" and isinstance(summary["loss"], float)
