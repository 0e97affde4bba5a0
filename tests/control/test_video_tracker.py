"""The control world and the trackers (report_to): the evaluation video reaches them; rebel eval needs none."""

from rebel.control.agent import Rebel


def test_the_final_evaluation_video_reaches_wandb(tmp_path, wandb_offline):
    agent = Rebel(
        "CartPole-v1", variant="trajectory", output_dir=str(tmp_path / "run"), video=True, eval_episodes=1,
        progress=False, plot=False, report_to=["wandb"],
    )  # fmt: skip
    agent.learn(200)
    [run] = wandb_offline.runs()
    [row] = [h for h in run["history"] if "eval_video/_type" in h]
    assert row["eval_video/_type"] == "video-file" and row["iteration"] == agent.trainer.iteration
    sent = (run["folder"] / "files" / row["eval_video/path"]).read_bytes()
    assert sent == (tmp_path / "run" / "videos" / "eval.gif").read_bytes()
    assert any("eval_return" in h for h in run["history"])


def test_rebel_eval_needs_no_tracker_package(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from rebel.cli import main

    run = tmp_path / "run"
    Rebel("CartPole-v1", variant="trajectory", output_dir=str(run), eval_episodes=1, progress=False, plot=False, report_to="none").learn(
        100
    )
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("report_to: []", "report_to:\n  - wandb"))  # trained where W&B was installed
    monkeypatch.setitem(sys.modules, "wandb", None)  # evaluated where it is not: rebel eval reports to no tracker
    assert main(["eval", str(run), "--episodes", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 1
