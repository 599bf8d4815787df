"""Lab 05's glue: the pipeline summary reads the bubble and the exposed communication off the
timeline, the communication figure says its bytes are model bytes, and the lab's pipeline
panel reaches the microbatch counts its homework asks for."""
import json
import re
from pathlib import Path

import pytest

from distlab.course import lab05_model_parallel as lab
from distlab.model_parallel import pipeline
from distlab.problems.workloads import Workload

LAB = Path(__file__).resolve().parents[2] / "labs" / "05_model_parallel.ipynb"


def event(rank, kind, start, end):
    return dict(rank=rank, step=0, kind=kind, microbatch=0, start=start, end=end)


def two_stage_run():
    """Two ranks over 0..4: rank 0 computes 0-1, sends 1-2, idles 2-4; rank 1 idles 0-1,
    receives 1-2, computes 2-4."""
    config = pipeline.PipelineConfig(Workload("mlp", hidden=8, num_steps=1), num_stages=2,
                                     num_microbatches=1)
    events = [[event(0, "forward", 0, 1), event(0, "send", 1, 2), event(0, "idle", 2, 4)],
              [event(1, "idle", 0, 1), event(1, "recv", 1, 2), event(1, "backward", 2, 4)]]
    return [{"config": config, "rank": r, "events": events[r], "peak_activations": 1,
             "peak_activation_bytes": 64} for r in range(2)]


def test_pipeline_summary_reads_bubble_and_exposed_communication_off_the_timeline():
    summary = lab.pipeline_summary([two_stage_run()])
    assert list(summary["rank"]) == [0, 1]
    assert summary["measured_bubble"].tolist() == pytest.approx([5 / 8, 5 / 8])
    assert summary["exposed_communication"].tolist() == pytest.approx([2 / 8, 2 / 8])
    assert summary["ideal_bubble"].tolist() == pytest.approx([0.5, 0.5])   # (p-1)/(m+p-1)


def test_communication_figure_labels_the_collectives_bytes_as_model_bytes():
    runs = {"TP · mlp": {"losses": [1.0, 0.5],
                         "by_op": {"all_reduce": {"calls": 2, "bytes_sent": 400}}}}
    fig = lab.comm_volume_figure(runs)
    assert "model bytes" in fig.layout.title.text and "model bytes" in fig.layout.yaxis.title.text
    assert list(fig.data[0].y) == [200]                       # per step


def test_the_pipeline_panel_reaches_the_microbatches_the_homework_needs():
    """The homework: the fewest microbatches m that bring 4 stages' bubble (p-1)/(m+p-1)
    under 10%, m = 28; the panel's slider and its workload's batch must allow it."""
    m = next(m for m in range(1, 100) if pipeline.bubble_fraction(4, m) < 0.1)
    assert m == 28
    cells = ["".join(c["source"]) for c in json.loads(LAB.read_text())["cells"]]
    panel = next(s for s in cells if "pp_panel = RunPanel(" in s)
    slider = re.search(r'"num_microbatches": W\.IntSlider\((.*?)\)', panel).group(1)
    assert int(re.search(r"max=(\d+)", slider).group(1)) >= m, slider
    setup = next(s for s in cells if "PIPELINE = Workload(" in s)
    batch = int(re.search(r"PIPELINE = Workload\(.*?batch_size=(\d+)", setup, re.S).group(1))
    workload = Workload("transformer", hidden=32, num_heads=4, depth=2, block_size=32,
                        batch_size=batch, num_steps=1)
    pipeline.PipelineConfig(workload, num_stages=4, num_microbatches=m)   # accepted
