"""The command line: the demo writes its report; every --algo trains on real processes and
prints its final metrics as one JSON line under distlab's launcher; the knobs reach the
config (the printed loss is the single-process reference's); bad flags fail before any
process. Under torchrun (two agents standing for two nodes, two ranks each: about 20-50 s of
process start-up per algorithm on 2 cores) run the algorithms whose multi-node run differs:
data parallel (DDP), model parallel across the nodes (the pipeline's sends between stages,
the mesh's process subgroups), the parameter server (a server that receives from any rank,
on a gloo subgroup) and elastic training (one checkpoint folder both nodes reach). The
others issue the same collectives on the world group as DDP and ZeRO's tests do."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from distlab.__main__ import ALGORITHMS, _loss_of, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
TINY = {   # the flags that make each algorithm's run tiny, besides --steps
    "ddp": [], "zero": [], "fsdp": [], "ps": [], "local_sgd": [],
    "fedavg": ["--local-steps", "2"], "elastic": ["--checkpoint-every", "2"], "tp": [],
    "mesh": ["--tp", "2"], "pipeline": [],
}


def train(capsys, algo, *flags, nproc=4) -> dict:
    assert main(["train", "--algo", algo, "--nproc", str(nproc), "--steps", str(STEPS),
                 *TINY[algo], *flags]) == 0
    return last_json(capsys.readouterr().out)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_demo_writes_an_html_report(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--steps", "6"]) == 0
    html = out.read_text()
    assert "synchronous (BSP, staleness 0)" in html and "asynchronous" in html
    assert html.count("plotly") > 10 and "Measured staleness" in html


def test_every_algorithm_of_the_command_line_is_tested_here():
    assert sorted(ALGORITHMS) == sorted(TINY)


@pytest.mark.parametrize("algo", sorted(TINY))
def test_algorithm_trains_under_distlabs_launcher_and_prints_its_final_loss(algo, capsys,
                                                                            tmp_path):
    summary = train(capsys, algo, "--checkpoint-dir", str(tmp_path)) if algo == "elastic" \
        else train(capsys, algo)
    assert summary["algo"] == algo and summary["world_size"] == 4
    assert isinstance(summary["loss"], float) and summary["loss"] == summary["loss"]  # not NaN


def test_ddp_variants_print_the_same_loss(capsys):
    losses = {v: train(capsys, "ddp", "--variant", v)["loss"]
              for v in ("naive", "flat", "overlap", "bucketed")}
    for variant, loss in losses.items():
        torch.testing.assert_close(loss, losses["naive"], msg=variant)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_prints_the_loss_of_the_single_process_run(stage, capsys):
    from distlab.course import lab04_sharding as zero
    summary = train(capsys, "zero", "--stage", str(stage), "--optimizer", "sgd")
    config = zero.ZeroConfig(stage=stage, optimizer="sgd", world_size=4,
                             workload=replace(zero.ZeroConfig().workload, num_steps=STEPS))
    torch.testing.assert_close(summary["loss"], _loss_of(config.workload,
                                                         zero.reference(config)))
    assert summary["memory"]["params"] > 0 and summary["bytes_per_step"] > 0


def test_each_zero_stage_shards_what_the_stage_before_kept_whole(capsys):
    memory = [train(capsys, "zero", "--stage", str(s))["memory"] for s in (0, 1, 2)]
    memory.append(train(capsys, "fsdp")["memory"])          # stage 3
    assert memory[1]["optimizer_state"] < memory[0]["optimizer_state"]
    assert memory[2]["grads"] < memory[1]["grads"]
    assert memory[3]["params"] < memory[2]["params"]


@pytest.mark.parametrize("algo, flags", [("tp", []), ("mesh", ["--tp", "2"]),
                                         ("pipeline", ["--schedule", "gpipe"]),
                                         ("pipeline", ["--microbatches", "2"])])
def test_model_parallel_prints_the_loss_of_the_unsplit_model(algo, flags, capsys):
    from distlab.problems.workloads import Workload, train_reference
    summary = train(capsys, algo, *flags)
    torch.testing.assert_close(summary["loss"],
                               train_reference(Workload(num_steps=STEPS))[-1])


def test_pipeline_schedule_and_microbatches_reach_the_config(capsys):
    summary = train(capsys, "pipeline", "--schedule", "gpipe", "--microbatches", "2")
    assert summary["schedule"] == "gpipe" and summary["num_microbatches"] == 2


def test_ps_staleness_zero_with_two_server_shards_runs_every_update(capsys):
    summary = train(capsys, "ps", "--staleness", "0", "--num-servers", "2")
    assert summary["role"] == "server" and summary["version"] == STEPS
    assert summary["lost"] == {}


def test_elastic_resumes_from_its_checkpoint_dir(capsys, tmp_path):
    first = train(capsys, "elastic", "--checkpoint-dir", str(tmp_path), nproc=2)
    again = train(capsys, "elastic", "--checkpoint-dir", str(tmp_path), nproc=2)
    assert first["start_step"] == 0 and again["start_step"] == STEPS
    assert again["loss"] == first["loss"]


@pytest.mark.parametrize("flags, message", [
    (["--algo", "ps", "--nproc", "1"], "num_workers=0"),
    (["--algo", "ddp", "--lr", "-1"], "lr=-1.0"),
    (["--algo", "local_sgd", "--task", "linear"], "model='linear'"),
    (["--algo", "zero", "--stage", "5"], "stage=5"),
    (["--algo", "pipeline", "--schedule", "zigzag"], "schedule='zigzag'"),
    (["--algo", "mesh", "--tp", "3"], "--tp 3 does not divide the 4 ranks"),
    (["--algo", "ddp", "--period", "3", "--stage", "1"],
     "--algo ddp does not take --period, --stage"),
])
def test_bad_flag_is_refused_before_any_process_starts(flags, message, capsys, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started")
    monkeypatch.setattr("distlab.launcher.launch", no_launch)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--nproc", "4", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN = ["ddp", "elastic", "mesh", "pipeline", "ps"]
"""The algorithms tested under torchrun (see above)."""


@pytest.mark.parametrize("algo", TORCHRUN)
def test_algorithm_trains_under_torchrun_with_two_agents_standing_for_two_nodes(algo,
                                                                              tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=cli-{algo}",
           "-m", "distlab", "train", "--algo", algo, "--steps", str(STEPS), *TINY[algo]]
    if algo == "elastic":
        cmd += ["--checkpoint-dir", str(tmp_path)]   # one folder both "nodes" reach
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT) for _ in range(2)]
    outs = [a.communicate(timeout=180) for a in agents]
    for agent, (_, err) in zip(agents, outs):
        assert agent.returncode == 0, err[-3000:]
    printed = [last_json(out) for out, _ in outs if out.strip()]
    assert len(printed) == 1, "only rank 0 prints"
    summary = printed[0]
    assert summary["algo"] == algo and summary["world_size"] == 4
    assert summary["backend"] == "gloo" and isinstance(summary["loss"], float)
