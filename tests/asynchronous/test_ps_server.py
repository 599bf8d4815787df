"""The server shard's events, driven one by one in this process (no workers, no network)."""
import pytest
import torch

from dataclasses import replace

from distlab.asynchronous import ps_server
from distlab.asynchronous.ps_config import BYE, GO, ParameterServerConfig
from distlab.problems.convex import WORKLOAD


class _Sent:
    def wait(self):
        pass


@pytest.fixture
def replies(monkeypatch):
    """Capture the server's replies: ``[(worker rank, go?, version)]``."""
    sent = []

    def isend(msg, dst, group=None):
        sent.append((dst, float(msg[0]) == GO, int(msg[1])))
        return _Sent()

    monkeypatch.setattr(ps_server.comm, "isend", isend)
    return sent


def _server(lr=WORKLOAD.lr, num_steps=WORKLOAD.num_steps, **kwargs):
    config = ParameterServerConfig(replace(WORKLOAD, lr=lr, num_steps=num_steps), **kwargs)
    server = ps_server.ParameterServer(config, shard=0)
    for w in range(server.config.num_workers):   # what serve() does first
        server.reply(w, go=True)
    return server


def _push(server, worker, clock, version_read, g=None, loss=1.0):
    g = torch.ones(len(server.x)) if g is None else g
    server.on_push(torch.cat([torch.tensor([worker, clock, version_read, loss]), g]))


def test_bsp_applies_the_mean_only_when_every_worker_has_pushed(replies):
    server = _server(num_workers=2, staleness=0, lr=0.5)
    x0 = server.x.clone()
    _push(server, 0, 0, 0, g=torch.full_like(x0, 1.0))
    assert server.version == 0 and server.waiting == {0} and len(replies) == 2
    _push(server, 1, 0, 0, g=torch.full_like(x0, 3.0))
    assert server.version == 1
    torch.testing.assert_close(server.x, x0 - 0.5 * 2.0)            # the mean, 2.0
    assert replies[2:] == [(1, True, 1), (2, True, 1)]              # both go on, version 1


def test_ssp_holds_a_worker_that_is_s_plus_one_clocks_ahead(replies):
    server = _server(num_workers=2, staleness=1)
    _push(server, 0, 0, 0)
    assert replies[-1] == (1, True, 1)            # clock 1 vs slowest 0: within s=1
    _push(server, 0, 1, 1)
    assert server.waiting == {0} and len(replies) == 3   # clock 2 vs 0: must wait
    _push(server, 1, 0, 0)
    assert {r[0] for r in replies[3:]} == {1, 2}  # the slowest moved: both released


def test_the_staleness_aware_step_is_lr_over_tau(replies):
    server = _server(num_workers=2, staleness=None, lr=0.3, staleness_aware=True)
    for clock in range(3):
        _push(server, 0, clock, clock, g=torch.zeros(len(server.x)))
    x = server.x.clone()
    _push(server, 1, 0, 0, g=torch.ones(len(x)))          # read at 0, lands at 3: tau = 3
    torch.testing.assert_close(server.x, x - 0.3 / 3)
    assert [e for e in server.log if e[0] == "push"][-1] == ("push", 1, 0, 0, 3)


def test_the_last_update_stops_every_worker(replies):
    server = _server(num_workers=2, staleness=None, num_steps=2)
    _push(server, 0, 0, 0)
    _push(server, 1, 0, 0)
    assert server.reason == "finished 2 updates"
    assert [go for _, go, _ in replies[-2:]] == [True, False]   # worker 0 went on before
    _push(server, 0, 1, 1)                                      # its push comes too late
    assert replies[-1] == (1, False, 2) and server.version == 2
    assert server.finished == {0, 1}


def test_a_goodbye_finishes_a_worker_without_an_update(replies):
    server = _server(num_workers=2, staleness=None)
    _push(server, 1, BYE, 0)
    assert server.finished == {1} and server.version == 0 and len(replies) == 2


def test_a_silent_worker_is_lost_and_the_bsp_round_goes_on_without_it(replies, capsys):
    server = _server(num_workers=2, staleness=0, worker_timeout=1.0)
    _push(server, 0, 0, 0)
    server.last_heard[1] -= 5                      # worker 1 silent for 5 s
    server.on_silence()
    assert list(server.lost) == [1] and server.version == 1
    assert replies[-1] == (1, True, 1)             # worker 0 goes on alone
    assert "worker 1 (rank 2) lost" in capsys.readouterr().out


def test_a_non_finite_gradient_stops_the_run(replies):
    server = _server(num_workers=1, staleness=None)
    _push(server, 0, 0, 0, g=torch.full((len(server.x),), float("nan")))
    assert server.version == 0 and "non-finite gradient" in server.reason
    assert replies[-1] == (1, False, 0)
