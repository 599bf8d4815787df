"""distlab.launch: real processes, results in rank order, and every failure path."""
import functools
import glob
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.launcher import MAX_WORLD_SIZE


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_gone(run: distlab.Run) -> bool:
    return not any(_alive(p.pid) for p in run._procs)


def rank_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return (dist.get_rank(), dist.get_world_size(), t.item())


def test_results_in_rank_order_with_package_function():
    assert distlab.launch(rank_sum, 3) == [(r, 3, 6.0) for r in range(3)]


def test_closure_and_lambda_travel_by_value():
    offset = 10

    def add(x, scale=1):
        return (dist.get_rank() + offset + x) * scale

    assert distlab.launch(add, 2, 5, scale=2) == [30, 32]
    assert distlab.launch(lambda: dist.get_world_size(), 2) == [2, 2]


def test_world_size_one_and_threads():
    assert distlab.launch(lambda: torch.get_num_threads(), 1) == [1]
    assert distlab.launch(lambda: torch.get_num_threads(), 1, num_threads=2) == [2]


def test_ranks_are_pinned_round_robin_only_when_they_outnumber_the_cores():
    from distlab.worker import pinned_core
    assert [pinned_core(r, 4, 1, [2, 3]) for r in range(4)] == [2, 3, 2, 3]
    assert [pinned_core(r, 2, 1, [2, 3]) for r in range(2)] == [None, None]
    assert pinned_core(0, 4, 2, [2, 3]) is None          # several torch threads: not one core


def affinity():
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) > 3, reason="needs more ranks than cores")
def test_a_launch_with_more_ranks_than_cores_pins_each_rank_to_one_core():
    cores = sorted(os.sched_getaffinity(0))
    p = len(cores) + 1
    assert distlab.launch(affinity, p) == [[cores[r % len(cores)]] for r in range(p)]
    assert distlab.launch(affinity, len(cores)) == [cores] * len(cores)
    assert distlab.launch(affinity, p, num_threads=2) == [cores] * p


def test_output_is_forwarded_prefixed_by_rank(capfd):
    seen = []
    distlab.launch(lambda: print("hello from", dist.get_rank()), 2,
                   on_output=lambda rank, stream, text: seen.append((rank, stream, text)))
    assert {(r, s) for r, s, _ in seen} == {(0, "stdout"), (1, "stdout")}
    assert any("hello from 1" in t for r, _, t in seen if r == 1)

    def both():
        print("to out")
        print("to err", file=sys.stderr)
        os.write(2, b"raw fd write\n")   # C-level output is forwarded too
    distlab.launch(both, 1)
    out, err = capfd.readouterr()
    assert "[rank 0] to out" in out
    assert "[rank 0] to err" in err and "[rank 0] raw fd write" in err


def test_twenty_launches_back_to_back_never_collide():
    for _ in range(20):
        assert distlab.launch(rank_sum, 2) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_concurrent_launches_do_not_collide():
    runs = [distlab.start(rank_sum, 2) for _ in range(3)]
    assert [r.result() for r in runs] == [[(0, 2, 3.0), (1, 2, 3.0)]] * 3


def raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("bad shard")
    dist.barrier()


def test_worker_exception_names_rank_and_carries_traceback():
    t0 = time.monotonic()
    run = distlab.start(raise_on_rank_one, 3)
    with pytest.raises(distlab.WorkerError) as info:
        run.result()
    assert time.monotonic() - t0 < 10
    err = info.value
    assert isinstance(err, RuntimeError) and err.rank == 1
    assert "ValueError: bad shard" in str(err) and "raise_on_rank_one" in err.worker_traceback
    assert _all_gone(run)
    assert distlab.launch(rank_sum, 2)[0] == (0, 2, 3.0)   # the next launch works


def test_os_exit_is_reported():
    def quit_early():
        if dist.get_rank() == 0:
            os._exit(7)
        return 1
    run = distlab.start(quit_early, 2)
    with pytest.raises(distlab.WorkerError, match="exited with code 7") as info:
        run.result()
    assert info.value.rank == 0 and _all_gone(run)


def test_sigkill_is_reported_and_peers_are_ended():
    def killed():
        if dist.get_rank() == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()      # the others would wait for rank 2 forever
    t0 = time.monotonic()
    run = distlab.start(killed, 3, timeout=60)
    with pytest.raises(distlab.WorkerError, match="SIGKILL") as info:
        run.result()
    assert info.value.rank == 2 and time.monotonic() - t0 < 10 and _all_gone(run)


def test_hang_past_timeout_is_ended():
    def hang():
        if dist.get_rank() == 1:
            time.sleep(600)
        return "ok"
    t0 = time.monotonic()
    run = distlab.start(hang, 2, timeout=2)
    with pytest.raises(distlab.WorkerError, match="timed out after 2 s") as info:
        run.result()
    assert info.value.rank == 1 and time.monotonic() - t0 < 8 and _all_gone(run)


def test_keyboard_interrupt_ends_every_worker():
    run = distlab.start(lambda: time.sleep(600), 2, timeout=None)
    main = threading.get_ident()
    threading.Timer(1.0, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run.result()
    assert run.done and _all_gone(run)
    assert distlab.launch(rank_sum, 2)[1] == (1, 2, 3.0)


def test_start_returns_at_once_and_can_be_stopped():
    def slow():
        for step in range(1000):
            distlab.report(step=step, loss=1.0 / (step + 1))
            time.sleep(0.01)
    t0 = time.monotonic()
    run = distlab.start(slow, 2, timeout=None)
    assert time.monotonic() - t0 < 2 and not run.done
    deadline = time.monotonic() + 20
    while len(run.records()) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(run.records()) >= 10          # metrics arrive while the run goes on
    run.stop()
    assert run.done and _all_gone(run)
    with pytest.raises(distlab.WorkerError, match="^stopped by the user$"):
        run.result()
    df = run.metrics()
    assert list(df.columns[:4]) == ["run", "rank", "step", "time"] and "loss" in df


@pytest.mark.parametrize("bad, error, match", [
    (dict(world_size=0), ValueError, "world_size=0"),
    (dict(world_size=MAX_WORLD_SIZE + 1), ValueError, "out of range"),
    (dict(world_size=2.0), TypeError, "world_size must be an int"),
    (dict(backend="mpi"), ValueError, "backend='mpi'"),
    (dict(timeout=-1), ValueError, "timeout"),
    (dict(num_threads=0), ValueError, "num_threads"),
])
def test_bad_arguments_fail_before_any_process(bad, error, match):
    args = dict(world_size=2) | bad
    before = _descendants()
    with pytest.raises(error, match=match):
        distlab.launch(rank_sum, args.pop("world_size"), **args)
    assert _descendants() <= before


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_non_callable_and_nccl_without_gpus():
    with pytest.raises(TypeError, match="fn must be callable"):
        distlab.launch("not a function", 2)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="one GPU per rank"):
            distlab.launch(rank_sum, 2, backend="nccl")


def test_unpicklable_argument_is_a_clear_error():
    import threading as th
    with pytest.raises(TypeError, match="cannot send fn"):
        distlab.launch(lambda lock: None, 2, th.Lock())


def test_rendezvous_listens_on_loopback_only():
    def sockets():
        # gloo's listening sockets: tcp entries in state 0A (LISTEN) owned by this process
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                inodes.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:   # the fd of listdir itself is gone already
                pass
        listen = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and f"socket:[{cols[9]}]" in inodes:
                    listen.append(cols[1].split(":")[0])
        return listen
    for addrs in distlab.launch(sockets, 2):
        assert addrs, "expected gloo to listen"
        assert all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), addrs


TORCHRUN_SCRIPT = textwrap.dedent("""
    import distlab, torch, torch.distributed as dist
    from test_launcher import rank_sum
    distlab.init_from_env()
    print(f"RESULT {rank_sum()}", flush=True)
    dist.destroy_process_group()
""")


def test_same_function_runs_under_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(script)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RESULT (0, 2, 3.0)" in out.stdout and "RESULT (1, 2, 3.0)" in out.stdout


def test_expendable_rank_may_die_and_the_run_goes_on():
    def work():
        if dist.get_rank() == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.5)
        return dist.get_rank()
    run = distlab.start(work, 3, expendable_ranks=(2,))
    assert run.result() == [0, 1, None]
    assert run.lost == {2: "was killed by SIGKILL"}
    with pytest.raises(ValueError, match="expendable_ranks"):
        distlab.launch(work, 2, expendable_ranks=(0, 1))
    with pytest.raises(ValueError, match="expendable_ranks"):
        distlab.launch(work, 2, expendable_ranks=(5,))


KILLED_KERNEL = textwrap.dedent("""
    import time
    import distlab

    def busy():
        distlab.report(step=0, loss=0.0)
        while True:                      # a worker that would run forever (timeout=None)
            sum(range(1000))

    run = distlab.start(busy, 4, timeout=None)
    while len(run.metrics()) < 4:        # every worker is up and running
        time.sleep(0.05)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_kernel_killed_hard_leaves_no_process_behind():
    # kill -9 of the launching process (the OOM killer, a crashed or force-restarted
    # kernel): the forkserver and every worker must end within seconds, whatever the timeout.
    kernel = subprocess.Popen([sys.executable, "-c", KILLED_KERNEL], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert kernel.stdout.readline().strip() == "ready"
        descendants = psutil.Process(kernel.pid).children(recursive=True)
        assert len(descendants) >= 5, descendants    # the forkserver and 4 workers
    finally:
        kernel.kill()
        kernel.wait()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"still running 5 s after the kernel was killed: {alive}"


FRESH_SESSION = textwrap.dedent("""
    import sys, types
    if sys.argv[1] == "notebook":
        sys.modules["ipykernel"] = types.ModuleType("ipykernel")   # what a kernel has loaded
    import multiprocessing.forkserver as forkserver
    import distlab
    started = forkserver._forkserver._forkserver_pid is not None
    assert distlab.launch(lambda: 1, 2) == [1, 1]
    print(started, "torch" in sys.modules)
""")



@functools.lru_cache(maxsize=None)
def fresh_session(session: str) -> tuple[str, str]:
    """``(forkserver started at import, torch imported by the launching process)``."""
    out = subprocess.run([sys.executable, "-c", FRESH_SESSION, session], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    started, torch_imported = out.stdout.split()
    return started, torch_imported


@pytest.mark.parametrize("session, starts_at_import", [("notebook", "True"), ("script", "False")])
def test_import_starts_the_forkserver_only_in_a_notebook(session, starts_at_import):
    assert fresh_session(session)[0] == starts_at_import


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")),
                    reason="with a GPU the launcher asks torch how many there are")
def test_a_launch_does_not_import_torch_in_the_launching_process():
    assert fresh_session("script")[1] == "False"
