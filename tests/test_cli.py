"""The command line: the headless demo writes its report; train runs an algorithm."""
import json

from distlab.__main__ import main


def test_demo_writes_an_html_report(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--steps", "15"]) == 0
    html = out.read_text()
    assert "synchronous (BSP, staleness 0)" in html and "asynchronous" in html
    assert html.count("plotly") > 10 and "Measured staleness" in html


def test_train_runs_each_algorithm_on_real_processes(capsys):
    for algo in ("ddp", "ps"):
        assert main(["train", "--algo", algo, "--nproc", "3", "--steps", "5",
                     "--task", "linear", "--lr", "0.05"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["algo"] == algo and summary["world_size"] == 3
