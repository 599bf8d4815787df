"""Reading a pipeline's timelines: the measured bubble, from events written by hand."""
import pytest
import torch

from distlab.model_parallel.timeline import (ActivationMeter, exposed_communication,
                                             measured_bubble)


def event(rank, step, kind, start, end):
    return dict(rank=rank, step=step, kind=kind, microbatch=0, start=start, end=end)


# Two ranks, two steps. Step 1: rank 0 computes 0-1 then idles; rank 1 idles, then computes
# 1-2. Half of the rank-time is compute: the bubble is 0.5.
RESULTS = [{"events": [event(0, 0, "forward", 0, 1), event(0, 1, "forward", 10, 11),
                       event(0, 1, "idle", 11, 12)]},
           {"events": [event(1, 0, "forward", 0, 1), event(1, 1, "idle", 10, 11),
                       event(1, 1, "backward", 11, 12)]}]


def test_measured_bubble_is_the_share_of_rank_time_not_computing():
    assert measured_bubble(RESULTS, step=0) == pytest.approx(0.0)
    assert measured_bubble(RESULTS, step=1) == pytest.approx(0.5)
    assert measured_bubble(RESULTS) == measured_bubble(RESULTS, step=1)   # -1: the last


def test_exposed_communication_is_the_share_of_rank_time_sending_and_receiving():
    # One step of 0..4 on two ranks: rank 0 computes 0-1, sends 1-2, idles 2-4; rank 1 idles
    # 0-1, receives 1-2, computes 2-4. Send and receive: 2 of the 8 rank-time units.
    results = [{"events": [event(0, 0, "forward", 0, 1), event(0, 0, "send", 1, 2),
                           event(0, 0, "idle", 2, 4)]},
               {"events": [event(1, 0, "idle", 0, 1), event(1, 0, "recv", 1, 2),
                           event(1, 0, "backward", 2, 4)]}]
    assert exposed_communication(results) == pytest.approx(2 / 8)
    assert measured_bubble(results) == pytest.approx(1 - 3 / 8)
    assert exposed_communication(RESULTS, step=1) == 0.0


def test_reading_a_step_the_run_did_not_record_is_refused():
    with pytest.raises(ValueError, match=r"step=2 is out of range; allowed an int in -2..1"):
        measured_bubble(RESULTS, step=2)
    with pytest.raises(ValueError, match=r"step=True is out of range"):
        measured_bubble(RESULTS, step=True)
    with pytest.raises(ValueError, match=r"step=-3 is out of range"):
        exposed_communication(RESULTS, step=-3)


def test_activation_meter_counts_saved_activations_not_parameters():
    layer = torch.nn.Linear(4, 3)
    meter = ActivationMeter(list(layer.parameters()))
    x = torch.randn(5, 4, requires_grad=True)
    with meter.forward(0):
        out = layer(x)             # saves x (5 x 4 floats) and the weight (a parameter)
    meter.forward_done()
    assert meter.peak_count == 1 and meter.peak_bytes == 5 * 4 * 4
    out.sum().backward()
    meter.backward_done(0)
    assert meter.live == {}
