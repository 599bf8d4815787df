"""distlab.report and the tidy tables of metrics."""
import distlab
from distlab.metrics import to_frame, to_long


def test_records_arrive_tidy_and_in_one_vocabulary():
    def work():
        for step in range(3):
            distlab.report(step=step, loss=1.0 / (step + 1), bytes_sent=10 * step)
        return True

    batches = []
    run = distlab.start(work, 2, on_metrics=batches.append)
    assert run.result() == [True, True]
    df = run.metrics()
    assert list(df.columns) == ["run", "rank", "step", "time", "loss", "bytes_sent"]
    assert len(df) == 6 and set(df["rank"]) == {0, 1} and (df["time"] >= 0).all()
    assert sum(len(b) for b in batches) == 6
    long = to_long(df)
    assert set(long["metric"]) == {"loss", "bytes_sent"} and len(long) == 12


def test_report_outside_a_launch_is_kept_locally():
    from distlab.metrics import local_records
    rec = distlab.report(step=5, loss=0.5)
    assert rec["rank"] == 0 and rec in local_records()
    assert to_frame([]).columns.tolist() == ["rank", "step", "time"]
