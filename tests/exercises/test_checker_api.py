"""The checker skeleton every assignment stands on: Verdict, launch_student, forbid."""
import pytest

from distlab.exercises import ForbiddenCall, Verdict, forbid, launch_student


def _add_one(student_fn):
    import torch
    t = torch.ones(3)
    with forbid("torch.distributed.all_reduce", why="write it from isend and irecv"):
        student_fn(t)
    return t.tolist()


def _check(student_fn, timeout=30):
    return launch_student("my_fn", student_fn, _add_one, 2, student_fn, timeout=timeout,
                          hang_hint="every recv needs its send", points=4)


def test_a_failing_verdict_is_falsy_and_report_returns_its_points(capsys):
    v = Verdict(False, "rank 1, chunk 0 is wrong", 2.0, 4.0)
    assert not v
    assert v.report() == 2.0
    assert "NOT YET (2/4 points): rank 1, chunk 0 is wrong" in capsys.readouterr().out


def test_and_keeps_the_lower_fraction_and_both_messages():
    both = Verdict(True, "visible", 8, 8) & Verdict(False, "hidden", 4, 8)
    assert (both.ok, both.points, both.max_points) == (False, 4, 8)
    assert both.message == "visible\nhidden"
    assert (Verdict(True, "a", 8, 8) & Verdict(True, "b", 8, 8)).points == 8


def test_a_verdict_refuses_more_points_than_its_maximum():
    with pytest.raises(ValueError, match="points"):
        Verdict(True, "x", 5, 4)


def test_a_rank_that_raises_not_implemented_is_reported_as_not_implemented_yet():
    def unfinished_helper(t):
        raise NotImplementedError()

    def student(t):
        unfinished_helper(t)
    results, verdict = _check(student)
    assert results is None and verdict.points == 0 and verdict.max_points == 4
    assert "my_fn is not implemented yet" in verdict.message


def _never_launched(student_fn):
    raise AssertionError("the released stub needs no process")


def test_the_released_stub_is_not_implemented_yet_without_starting_a_process():
    def my_fn(t):
        """What the student will write."""
        # YOUR CODE HERE
        raise NotImplementedError()
    _, verdict = launch_student("my_fn", my_fn, _never_launched, 2, my_fn, points=4)
    assert verdict.message.startswith("my_fn is not implemented yet")


def test_a_crashing_rank_is_named_with_its_last_output(capfd):
    def crash(t):
        import sys
        import torch.distributed as dist
        print("about to divide", file=sys.stderr)
        if dist.get_rank() == 1:
            raise ValueError("boom")
    _, verdict = _check(crash)
    assert "rank 1 failed: raised ValueError: boom" in verdict.message
    assert "about to divide" in verdict.message
    assert capfd.readouterr().err == "", "worker output must never reach the cell's stderr"


def test_a_deadlock_is_reported_with_the_hang_hint():
    def deadlock(t):
        import torch.distributed as dist
        dist.recv(t, 1 - dist.get_rank())
    _, verdict = _check(deadlock, timeout=3)
    assert "did not finish in 3 s: every recv needs its send" in verdict.message


def test_a_rank_left_waiting_by_a_finished_peer_is_named():
    def one_sided(t):
        import torch.distributed as dist
        if dist.get_rank() == 1:
            dist.recv(t, 0)              # rank 0 never sends, and returns
    _, verdict = _check(one_sided)
    assert verdict.message.startswith("rank 1 was still waiting for a message when its peer "
                                      "had finished or died: every recv needs its send")


def test_forbid_catches_the_call_through_an_alias_even_when_the_student_catches_it():
    from torch.distributed import all_reduce as ar

    def sneaky(t):
        try:
            ar(t)
        except Exception:
            pass
    _, verdict = _check(sneaky)
    assert verdict.message == ("torch.distributed.all_reduce is off limits in this "
                               "assignment: write it from isend and irecv")


def test_forbid_lets_other_calls_through_and_restores_on_exit():
    import torch
    with pytest.raises(ForbiddenCall, match="torch.add is off limits in this assignment: no"):
        with forbid("torch.add", why="no"):
            assert torch.mul(torch.ones(1), 2).item() == 2
            torch.add(torch.ones(1), 1)
    assert torch.add(torch.ones(1), 1).item() == 2


def test_forbid_refuses_a_name_that_is_no_function():
    with pytest.raises(ValueError, match="names no function"):
        with forbid("torch.distributed.no_such_thing", why="x"):
            pass


def test_a_correct_student_function_returns_the_results():
    def add_one(t):
        t += 1
    results, verdict = _check(add_one)
    assert verdict is None and results == [[2.0] * 3] * 2


def test_the_time_limit_does_not_count_the_process_servers_start():
    # In a fresh interpreter the first launch starts distlab's forkserver, which imports
    # torch (seconds on a loaded machine): that must not eat the student's time limit.
    import subprocess
    import sys
    code = (
        "from distlab.exercises import launch_student\n"
        "def worker(fn):\n"
        "    return fn()\n"
        "results, verdict = launch_student('f', int, worker, 2, int, timeout=3)\n"
        "print(verdict or results)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "[0, 0]", done.stdout + done.stderr
