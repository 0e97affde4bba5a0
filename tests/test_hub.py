"""Model cards and pushes to the Hub (rebel.hub, ``rebel push``): the parts that need no
network. The upload itself is huggingface_hub's; only its two HfApi calls are replaced here,
to check their arguments."""

import json
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, ModelCard

from rebel.cli import main
from rebel.hub import CardInfo, check_push, hub_base_model, model_folder_of, push_folder, write_model_card
from rebel.runs import RunDir, command_line

INFO = CardInfo(
    title="REBEL agent for Hopper-v5",
    library_name="rebel-rl",
    task="reinforcement-learning",
    dataset="Hopper-v5",
    settings={"algorithm": "REBEL", "eta": 0.5, "variant": "mc"},
    reward="the environment's own",
    usage='agent = Rebel.load(".")',
    tags=("Hopper-v5",),
)


def run_folder(tmp_path, rows, commands=("rebel train control --env Hopper-v5",)):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "commands.txt").write_text("".join(c + "\n" for c in commands))
    (run / "config.yaml").write_text("adapter: control\n")
    return run


@pytest.fixture
def uploads(monkeypatch):
    """The HfApi calls a push makes, recorded instead of sent; a token in the environment."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        files = sorted(p.name for p in Path(folder).iterdir())
        calls.append(("upload_folder", kwargs, files, (Path(folder) / "README.md").read_text()))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def test_the_card_holds_the_metadata_settings_results_and_commands(tmp_path):
    run = run_folder(
        tmp_path,
        [{"iteration": 1, "reward_mean": 1.0}, {"iteration": 2, "reward_mean": 2.5, "eval_return": 812.25, "eval_return_std": 3.5}],
    )
    path = write_model_card(tmp_path / "model", INFO, run_dir=run)
    card = ModelCard.load(path)
    assert card.data.library_name == "rebel-rl" and card.data.tags == ["rebel-rl", "reinforcement-learning", "Hopper-v5"]
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_name, result.metric_type, result.metric_value) == (
        "reinforcement-learning", "Hopper-v5", "mean_reward", "812.25 +/- 3.50"
    )  # fmt: skip
    meta = yaml.safe_load(path.read_text().split("---")[1])
    assert meta["model-index"][0]["name"] == "REBEL agent for Hopper-v5" and "base_model" not in meta
    assert "| algorithm | REBEL |\n| eta | 0.5 |\n| variant | mc |" in card.text
    assert "| reward_mean | 2.5 |" in card.text and "| eval_return | 812.25 |" in card.text
    assert "## Reproduce\n\n```bash\nrebel train control --env Hopper-v5\n```" in card.text
    # results given explicitly (a best model's evaluation) replace the last row; no run: no results, no commands
    results = {"eval_return": 900.0, "eval_length": 1000.0, "eval/reward_mean": 0.5}
    card = ModelCard.load(write_model_card(tmp_path / "best", INFO, run_dir=run, results=results))
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("mean_reward", 900.0), ("eval/reward_mean", 0.5)]
    assert "| eval_length | 1000 |" in card.text and "| reward_mean |" not in card.text
    card = ModelCard.load(write_model_card(tmp_path / "bare", INFO))
    assert card.data.eval_results is None and "## Results" not in card.text and "## Reproduce" not in card.text


def test_a_run_with_a_baseline_loss_is_not_called_rebel(tmp_path):
    from rebel.hub import card_settings
    from rebel.trainer import TrainerConfig

    settings = card_settings(TrainerConfig(loss="rloo", eta=2.0), ())
    assert list(settings)[:3] == ["algorithm", "loss", "eta"] and settings["algorithm"] == "rloo (baseline loss)"
    card = ModelCard.load(write_model_card(tmp_path, CardInfo(**{**INFO.__dict__, "settings": settings})))
    assert "with the rloo (baseline loss), not REBEL's." in card.text and "| algorithm | rloo (baseline loss) |" in card.text


def test_base_model_metadata_names_only_hub_ids(tmp_path):
    assert hub_base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model(str(tmp_path)) is None and hub_base_model("gpt2") is None and hub_base_model(None) is None
    assert hub_base_model("a/b/c") is None


def test_push_creates_the_repo_and_uploads_the_folder(tmp_path, uploads):
    write_model_card(tmp_path / "model", INFO)
    url = push_folder(tmp_path / "model", "me/hopper-rebel", private=True)
    assert url == "https://huggingface.co/me/hopper-rebel/commit/abc"
    create, upload = uploads
    assert create == ("create_repo", "me/hopper-rebel", {"private": True, "exist_ok": True, "repo_type": "model"}, "hf_test_token")
    assert upload[:3] == (
        "upload_folder",
        {
            "repo_id": "me/hopper-rebel",
            "folder_path": str(tmp_path / "model"),
            "repo_type": "model",
            "commit_message": "Upload a REBEL model (rebel-rl)",
        },
        ["README.md"],
    )


@pytest.mark.parametrize(
    ("repo_id", "message"),
    [
        ("me/bad name", "repo id 'me/bad name' is not valid; expected 'name' or 'org/name'"),
        ("a/b/c", "repo id 'a/b/c' is not valid; expected 'name' or 'org/name'"),
    ],
)
def test_a_malformed_repo_id_is_refused_before_any_upload(tmp_path, uploads, repo_id, message):
    write_model_card(tmp_path / "model", INFO)
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as error:
        push_folder(tmp_path / "model", repo_id)
    assert "\n" not in str(error.value) and uploads == []


def test_a_missing_token_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with pytest.raises(ValueError, match=r"^no Hugging Face token: pass token=\.\.\., set HF_TOKEN, or log in with `hf auth login`$"):
        check_push("me/model", None)
    assert check_push("me/model", "hf_given") == "hf_given"


def test_rebel_push_finds_a_runs_model_and_says_what_is_wrong_in_one_line(tmp_path, uploads, capsys):
    run = run_folder(tmp_path, [{"iteration": 1, "reward_mean": 1.0}])
    write_model_card(run / "model", INFO, run_dir=run)
    assert model_folder_of(run) == run / "model" and model_folder_of(run / "model") == run / "model"
    assert main(["push", str(run), "--repo-id", "me/hopper", "--private", "--token", "hf_cli"]) == 0
    assert capsys.readouterr().out.strip() == f"pushed {run / 'model'} to me/hopper: https://huggingface.co/me/hopper/commit/abc"
    assert uploads[0][2]["private"] is True and uploads[0][3] == "hf_cli" and uploads[1][1]["folder_path"] == str(run / "model")
    uploads.clear()
    for argv, error in [
        (["push", str(run), "--repo-id", "bad id"], "rebel push: error: repo id 'bad id' is not valid; expected 'name' or 'org/name'"),
        (
            ["push", str(tmp_path / "none"), "--repo-id", "me/x"],
            f"rebel push: error: {tmp_path / 'none'} does not exist; expected a run folder or a saved model folder",
        ),
        (["push", str(tmp_path), "--repo-id", "me/x"], f"rebel push: error: {tmp_path} holds no saved model with a model card"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(error) and err.count("\n") == 1, err
    assert uploads == []


def test_each_start_of_a_run_records_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/rebel", "train", "tabular", "--output-dir", "my runs/a"])
    assert command_line() == "rebel train tabular --output-dir 'my runs/a'"
    run = RunDir(tmp_path)
    run.record_command()
    monkeypatch.setattr(sys, "argv", ["/venv/lib/pytest/__main__.py", "-q"])
    assert command_line() == "python -m pytest -q"
    monkeypatch.setattr(sys, "argv", ["train.py", "--resume"])
    run.record_command()
    assert run.read_commands() == ["rebel train tabular --output-dir 'my runs/a'", "python train.py --resume"]
    assert RunDir(tmp_path / "none").read_commands() == []


def test_a_tabular_run_and_its_resume_record_two_commands_and_equal_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rebel", "train", "tabular"])
    for name, steps in (("straight", [["--iterations", "4"]]), ("split", [["--iterations", "2"], ["--iterations", "4"]])):
        for k, extra in enumerate(steps):
            start = ["--resume", str(tmp_path / name)] if k else ["--output-dir", str(tmp_path / name)]
            assert main(["train", "tabular", *start, *extra, "--no-progress", "--no-plot", "--report-to", "none"]) == 0
    assert len(RunDir(tmp_path / "straight").read_commands()) == 1 and len(RunDir(tmp_path / "split").read_commands()) == 2
    assert sorted(p.name for p in (tmp_path / "split").glob("*.jsonl")) == ["metrics.jsonl"]  # the logs a resume compares


def test_without_huggingface_hub_the_card_is_left_out_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # an install without it
    with pytest.warns(UserWarning, match="no model card in .*: huggingface_hub is not installed"):
        assert write_model_card(tmp_path / "model", INFO) is None
    assert not (tmp_path / "model" / "README.md").exists()
    with pytest.raises(ValueError, match=r"^pushing to the Hub needs huggingface_hub: pip install 'rebel-rl\[control\]'"):
        check_push("me/model", "hf_x")
