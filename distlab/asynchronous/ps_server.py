"""One shard of the parameter server, written as the events it answers.

A server shard holds the slice ``x[lo:hi]`` of the flat parameter vector and an
``torch.optim.SGD`` over it. It never waits for a worker; it waits for *events*:

* :meth:`ParameterServer.on_push` - a gradient arrives, tagged with the version it was
  computed on. The server measures its staleness ``tau = version_now - version_read``,
  reports it with the learning rate it will use, and applies it (:meth:`~ParameterServer.apply`; under BSP
  it keeps it until the round is complete, :meth:`~ParameterServer.apply_round`);
* :meth:`~ParameterServer.release_waiting` - after every event, each worker that pushed and is waiting may
  start its next clock if the SSP rule lets it (Ho et al. 2013, section 3): it is then sent
  fresh parameters (:meth:`~ParameterServer.reply`);
* :meth:`~ParameterServer.on_silence` - nothing arrived for a while: a busy worker silent for
  ``worker_timeout`` seconds is declared lost (a heartbeat timeout, Li et al. 2014,
  section 4.3) and the others carry on without it;
* :meth:`~ParameterServer.on_loss` - a worker's push carries the loss of the parameters it pulled; shard 0
  reports it once per version and stops the run on divergence or at the target.

Communication: each push costs the shard ``alpha + (hi - lo) beta`` in, each reply the same
out. At the end the shards send their slices to shard 0 (``S - 1`` messages of ``P/S``
floats), which reports the loss of the final parameters and sends it back.
"""
from __future__ import annotations

import math
import queue
import threading
import time

import torch
from torch.nn.utils import parameters_to_vector

from distlab import comm
from distlab.asynchronous.ps_config import (BYE, FINAL_TAG, GO, PUSH_HEAD, STOP,
                                            ParameterServerConfig, may_proceed, shard_bounds)
from distlab.metrics import report
from distlab.problems import convex


class ParameterServer:
    """Server shard ``shard`` of a run: its state, and one method per event."""

    def __init__(self, config: ParameterServerConfig, shard: int, group=None):
        self.config, self.shard, self.group = config, shard, group
        self.model, self.workload = config.workload.build_model(), config.workload.loaded()
        flat = parameters_to_vector(self.model.parameters()).detach()
        self.lo, self.hi = shard_bounds(len(flat), config.num_servers)[shard]
        self.x = flat[self.lo:self.hi].clone()                      # (hi - lo,)
        self.optimizer = self.workload.optimizer([self.x])
        self.rule = config.wait_rule or may_proceed
        W = config.num_workers
        self.version = 0                       # updates applied so far
        self.clocks = [0] * W                  # gradients pushed by each worker
        self.last_heard = [time.monotonic()] * W
        self.busy: set[int] = set()            # computing: a push is expected from them
        self.waiting: set[int] = set()         # pushed; held back by the wait rule
        self.finished: set[int] = set()        # told to stop, or said goodbye
        self.lost: dict[int, str] = {}         # declared dead: why
        self.round: dict[int, torch.Tensor] = {}   # BSP: this round's gradients, by worker
        self.reason: str | None = None         # why the run is stopping, once it is
        self.first_loss: float | None = None
        self.loss_version = -1                 # the last version whose loss was reported
        self.pending, self.log = [], []        # sends in flight; the instrumented events

    def serve(self) -> dict:
        """Answer events until every worker has finished or is lost; return the summary."""
        t0 = time.monotonic()
        for w in range(self.config.num_workers):
            self.reply(w, go=True)
        inbox, go_on = queue.Queue(), queue.Queue()
        threading.Thread(target=_receive, daemon=True,
                         args=(PUSH_HEAD + self.hi - self.lo, self.group, inbox, go_on)).start()
        while len(self.finished) + len(self.lost) < self.config.num_workers:
            try:
                msg = inbox.get(timeout=0.05)
            except queue.Empty:
                self.on_silence()
                continue
            self.on_push(msg)
            go_on.put(bool(self.busy))      # another push can only come from a busy worker
        return self.finish(time.monotonic() - t0)

    # -- the events ---------------------------------------------------------------------

    def on_push(self, msg: torch.Tensor) -> None:
        """A push ``[worker, clock, version_read, loss] + gradient slice`` has arrived."""
        w, clock, v_read, loss = int(msg[0]), int(msg[1]), int(msg[2]), float(msg[3])
        g = msg[PUSH_HEAD:]
        self.busy.discard(w)
        if clock == BYE:                               # another shard told it to stop
            self.finished.add(w)
            return
        if w in self.lost or self.reason is not None:  # too late: the run has moved on
            self.reply(w, go=False)
            return
        self.clocks[w] = clock + 1
        tau = self.version - v_read                    # the measured staleness
        lr = self.workload.lr / max(tau, 1) if self.config.staleness_aware else self.workload.lr
        self.log.append(("push", w, clock, v_read, tau))
        if self.shard == 0:
            self.on_loss(v_read, loss)
        if not bool(torch.isfinite(g).all()):
            self.stop(f"diverged at update {self.version}: worker {w} pushed a non-finite "
                      f"gradient")
        if self.reason is not None:
            self.reply(w, go=False)
            return
        if self.shard == 0:
            report(step=self.version, worker=w, staleness=tau, lr=lr)
        if self.config.staleness == 0:                 # BSP: one update per round, the mean
            self.round[w] = g
            if set(self.round) >= set(self.live()):
                self.apply_round()
        else:
            self.apply(g, lr)
        self.waiting.add(w)                            # until the wait rule lets it go on
        self.release_waiting()

    def on_loss(self, version: int, loss: float) -> None:
        """Report the loss of ``version`` once; stop on divergence or at the target."""
        if version <= self.loss_version:
            return
        self.loss_version = version
        report(step=version, loss=loss)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        if not math.isfinite(loss) or loss > self.config.divergence_factor * self.first_loss:
            self.stop(f"diverged at update {version}: loss {loss:.3g} (first loss "
                      f"{self.first_loss:.3g}); try a smaller lr, staleness_aware=True or clip")
        elif self.config.target_loss is not None and loss <= self.config.target_loss:
            self.stop(f"reached target loss {self.config.target_loss:g} at update {version}")

    def on_silence(self) -> None:
        """No push for a while: declare silent busy workers lost; detect a deadlock."""
        now = time.monotonic()
        for w in sorted(self.busy):
            silent = now - self.last_heard[w]
            if silent <= self.config.worker_timeout:
                continue
            self.busy.discard(w)
            self.lost[w] = f"silent for {silent:.1f} s at clock {self.clocks[w]}"
            if self.shard == 0:
                print(f"parameter server: worker {w} (rank {self.config.num_servers + w}) "
                      f"lost, {self.lost[w]}; carrying on with {len(self.live())} workers",
                      flush=True)
            if not self.live():
                self.stop("every worker was lost")
            elif self.round and set(self.round) >= set(self.live()):
                self.apply_round()                     # the round waited only for the dead
            self.release_waiting()
        if not self.busy and self.waiting and self.reason is None:
            raise RuntimeError(f"deadlock: the wait rule lets no worker proceed (clocks "
                               f"{self.clocks}, staleness={self.config.staleness}); "
                               f"check may_proceed")

    def release_waiting(self) -> None:
        """Let every waiting worker go on that the wait rule allows (or stop them all)."""
        for w in sorted(self.waiting):
            if self.reason is not None:
                self.waiting.discard(w)
                self.reply(w, go=False)
            elif self.rule(self.clocks[w], [self.clocks[v] for v in self.live()],
                           self.config.staleness):
                self.waiting.discard(w)
                self.reply(w, go=True)

    def reply(self, w: int, go: bool) -> None:
        """Send worker ``w`` ``[GO or STOP, version]`` and this shard's parameters."""
        msg = torch.cat([torch.tensor([GO if go else STOP, self.version]), self.x.detach()])
        try:
            self.pending.append(comm.isend(msg, self.config.num_servers + w, group=self.group))
        except RuntimeError:       # its connection is closed: it died; silence will tell
            pass
        if not go:
            self.finished.add(w)
            return
        self.busy.add(w)
        self.last_heard[w] = time.monotonic()
        self.log.append(("read", w, self.clocks[w], self.version,
                         self.clocks[w] - min(self.clocks[v] for v in self.live())))

    def apply(self, g: torch.Tensor, lr: float) -> None:
        """One SGD step on this shard with the gradient slice ``g`` and step size ``lr``."""
        self.optimizer.param_groups[0]["lr"] = lr
        self.x.grad = g
        self.optimizer.step()
        self.version += 1
        if self.version >= self.workload.num_steps:
            self.stop(f"finished {self.workload.num_steps} updates")

    def apply_round(self) -> None:
        """BSP: apply the mean of the round's gradients, summed in worker order.

        Whatever the arrival order, so that BSP equals synchronous SGD bit for bit.
        """
        mean = torch.stack([self.round[w] for w in sorted(self.round)]).mean(0)
        self.round.clear()
        self.apply(mean, self.workload.lr)

    def stop(self, why: str) -> None:
        """Stop the run (the first reason wins): every worker is told at its next reply."""
        self.reason = self.reason or why
        self.release_waiting()

    def live(self) -> list[int]:
        """The workers not declared lost."""
        return [w for w in range(self.config.num_workers) if w not in self.lost]

    # -- the end ------------------------------------------------------------------------

    def finish(self, elapsed: float) -> dict:
        """Deliver the last replies, report the final loss, and summarize this shard."""
        for p in self.pending:
            try:
                p.wait()
            except RuntimeError:   # a dead worker: nothing to deliver to
                pass
        loss = self.final_loss()
        diverged = self.reason if self.reason and "diverged" in self.reason else None
        if diverged and self.shard == 0:
            print(f"parameter server: {diverged}", flush=True)   # one line, not a flood
        return {"role": "server", "shard": self.shard, "params": self.x.detach(),
                "version": self.version, "clocks": self.clocks, "lost": self.lost,
                "stopped": self.reason, "log": self.log, "diverged": diverged, "loss": loss,
                "updates_per_s": self.version / elapsed, "elapsed": elapsed}

    def final_loss(self) -> float:
        """The loss of the final parameters on the eval examples, the same on every shard.

        Shard 0 gathers the other slices (tag ``FINAL_TAG``, apart from the pushes), reports
        the loss at step ``version`` if no worker measured that version, and sends it back.
        """
        S, verdict = self.config.num_servers, torch.zeros(1)
        if self.shard != 0:
            comm.send(self.x.detach(), 0, group=self.group, tag=FINAL_TAG)
            comm.recv(verdict, 0, group=self.group, tag=FINAL_TAG)
            return float(verdict)
        bounds = shard_bounds(len(parameters_to_vector(self.model.parameters())), S)
        slices = [self.x.detach()] + [torch.empty(hi - lo) for lo, hi in bounds[1:]]
        for j in range(1, S):
            comm.recv(slices[j], j, group=self.group, tag=FINAL_TAG)
        n, ds = self.config.eval_size, self.workload.dataset
        verdict[0] = convex.loss_at(self.model, self.workload.loss, ds.X[:n], ds.y[:n],
                                    torch.cat(slices))
        for j in range(1, S):
            comm.send(verdict, j, group=self.group, tag=FINAL_TAG)
        if self.version > self.loss_version:
            report(step=self.version, loss=float(verdict))
        return float(verdict)


def _receive(buf_size: int, group, inbox: queue.Queue, go_on: queue.Queue) -> None:
    """Receive pushes from any worker, one at a time, into ``inbox``.

    A blocking ``wait()`` has no usable timeout on gloo (a timed-out receive cannot be
    resumed), so it runs here, and the server loop waits on ``inbox`` with a timeout: that
    is how a silent worker is noticed. The loop answers on ``go_on`` whether another
    message is expected, so no receive is left posted at the end.
    """
    while True:
        buf = torch.empty(buf_size)
        comm.irecv(buf, group=group).wait()   # any source: whoever pushes first
        inbox.put(buf)
        if not go_on.get():
            return
