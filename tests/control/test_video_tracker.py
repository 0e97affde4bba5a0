"""The control world's evaluation video reaches the trackers (report_to)."""

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
