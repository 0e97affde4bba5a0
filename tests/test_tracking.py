"""report_to: TensorBoard, W&B (offline: its files on disk are read back), Trackio (locally)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rebel.cli import main
from rebel.runs import RunDir, read_config, read_metrics
from rebel.tracking import legacy_settings, resolve_report_to
from rebel.trainer import Trainer, TrainerConfig
from rebel_envs.tabular import TabularConfig, make_tabular

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TRACKIO = importlib.util.find_spec("trackio") is not None


def tabular_trainer(tmp_path, **overrides):
    options = {"output_dir": str(tmp_path / "run"), "learning_rate": 0.1, "progress": False, "plot": False, **overrides}
    config = TrainerConfig(**options)
    torch.manual_seed(config.seed)
    policy, sampler = make_tabular(TabularConfig(), seed=config.seed)
    return Trainer(policy, sampler, config)


def numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------ settings


def test_report_to_takes_trl_forms_and_refuses_unknown_names():
    assert resolve_report_to("none") == [] and resolve_report_to(["none"]) == [] and resolve_report_to(None) == []
    assert resolve_report_to("tensorboard") == ["tensorboard"]
    assert TrainerConfig().report_to == ["tensorboard"]
    with pytest.raises(ValueError, match=r"^report_to='comet' is not supported; expected one of tensorboard, wandb, trackio, none$"):
        TrainerConfig(report_to=["tensorboard", "comet"])
    with pytest.raises(ValueError, match="mixes 'none' with trackers"):
        TrainerConfig(report_to=["none", "tensorboard"])


def test_unknown_tracker_on_the_command_line_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "tabular", "--output-dir", str(out), "--report-to", "tensorboard", "comet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rebel train tabular: error: report_to='comet' is not supported; expected one of tensorboard, wandb, trackio, none"
    assert not out.exists()


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_a_missing_tracker_package_names_the_extra_before_anything_is_made(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    expected = f'report_to={name!r} needs the {name} package, which is not installed: pip install "rebel-rl[{name}]"'
    with pytest.raises(ValueError) as error:
        TrainerConfig(report_to=[name])
    assert str(error.value) == expected
    out = tmp_path / "new" / "run"
    assert main(["train", "tabular", "--output-dir", str(out), "--report-to", name]) == 2
    assert capsys.readouterr().err.strip() == f"rebel train tabular: error: {expected}"
    assert not (tmp_path / "new").exists()
    # uninstalled while the run starts: the same message from the import itself
    run = RunDir(tmp_path / "late")
    with pytest.raises(ValueError, match=r"rebel-rl\[" + name + r"\]"):
        run.open_trackers([name], {})


def test_a_folder_named_like_a_tracker_is_not_its_package(tmp_path, monkeypatch):
    (tmp_path / "wandb").mkdir()  # W&B writes ./wandb where no WANDB_DIR is set: a namespace package to Python
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [""])  # only the working directory, as where wandb is not installed
    for key in [k for k in sys.modules if k.split(".")[0] == "wandb"]:
        monkeypatch.delitem(sys.modules, key)  # put back after the test
    try:
        with pytest.raises(ValueError, match=r'needs the wandb package, which is not installed: pip install "rebel-rl\[wandb\]"'):
            resolve_report_to(["wandb"])
        with pytest.raises(ValueError, match=r'needs the wandb package, which is not installed: pip install "rebel-rl\[wandb\]"'):
            RunDir(tmp_path / "run").open_trackers(["wandb"], {})
    finally:
        sys.modules.pop("wandb", None)  # the folder, imported as a namespace package


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'rebel-rl[wandb]')")
def test_an_installed_tracker_passes_the_check():
    assert resolve_report_to(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    assert importlib.import_module("wandb").__name__ == "wandb"


def test_runs_saved_with_the_tensorboard_switch_still_resume(tmp_path):
    assert legacy_settings({"tensorboard": False, "eta": 2.0}) == {"report_to": [], "eta": 2.0}
    assert legacy_settings({"tensorboard": True}) == {"report_to": ["tensorboard"]}
    trainer = tabular_trainer(tmp_path, iterations=2, report_to="none")
    trainer.train()
    path = tmp_path / "run" / "config.yaml"
    path.write_text(path.read_text().replace("report_to: []", "tensorboard: false"))
    assert read_config(tmp_path / "run")["trainer"]["report_to"] == []
    assert main(["train", "tabular", "--resume", str(tmp_path / "run"), "--iterations", "3", "--no-progress", "--no-plot"]) == 0
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


# --------------------------------------------------------------- TensorBoard


def tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_scalar_and_a_resume_purges_what_followed_its_checkpoint(tmp_path):
    tabular_trainer(tmp_path, iterations=4, checkpoint_every=2, keep_checkpoints=2).train()
    redone = tabular_trainer(tmp_path, iterations=4, checkpoint_every=2)
    with pytest.warns(UserWarning, match="set aside as discarded-iter_000004"):
        redone.train(resume=tmp_path / "run" / "checkpoints" / "iter_000002")  # iterations 3 and 4 again
    _, scalars = tensorboard_scalars(tmp_path / "run")
    final = read_metrics(tmp_path / "run")
    assert set(scalars) == set(numbers(final[0])) - {"iteration"}
    for key, points in scalars.items():  # each iteration once: the events past the checkpoint were purged
        assert [step for step, _ in points] == [1, 2, 3, 4], key
        assert [v for _, v in points] == pytest.approx([r[key] for r in final], rel=1e-6), key


def test_tensorboard_table_is_the_markdown_it_was(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open_trackers(["tensorboard"], {})
    run.log_table("completions", ["prompt", "completion", "reward"], [["a|b", "c\nd", 0.123456], ["e", "f", 1.0]], 3)
    run.log_text("dialogs", "**user**: hi", 3)
    run.close()
    events, _ = tensorboard_scalars(tmp_path / "run")
    [event] = events.Tensors("completions/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 3
    assert text == "| prompt | completion | reward |\n| --- | --- | --- |\n| a\\|b | c<br>d | 0.1235 |\n| e | f | 1 |"
    assert events.Tensors("dialogs/text_summary")[0].tensor_proto.string_val[0].decode() == "**user**: hi"


# ---------------------------------------------------------------------- W&B


def test_wandb_offline_run_holds_the_scalars_and_config_and_a_resume_continues_it(tmp_path, wandb_offline):
    tabular_trainer(tmp_path, iterations=2, report_to=["wandb"]).train()
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    resumed = tabular_trainer(tmp_path, iterations=3, report_to=["wandb"])
    resumed.train(resume=True)
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == ids
    rows = read_metrics(tmp_path / "run")
    first, second = sorted(wandb_offline.runs(), key=lambda run: run["history"][0]["iteration"])
    assert first["id"] == second["id"] == ids["wandb"]["id"]  # one run: `wandb sync` appends the second part to it
    assert first["name"] == second["name"] == "run" and first["project"] == ids["wandb"]["project"] == "rebel"
    assert first["config"] == read_config(tmp_path / "run") | {"trainer": first["config"]["trainer"]}
    assert first["config"]["trainer"] == {**read_config(tmp_path / "run")["trainer"], "iterations": 2}
    assert second["config"]["trainer"]["iterations"] == 3
    logged = [{k: v for k, v in h.items() if not k.startswith("_")} for h in first["history"] + second["history"]]
    assert logged == [numbers(r) for r in rows]
    assert first["exit_code"] == second["exit_code"] == 0


def test_a_run_that_fails_is_marked_failed_in_wandb_and_only_the_main_process_reports(tmp_path, wandb_offline):
    def fail(trainer, metrics):
        if trainer.iteration == 2:
            raise RuntimeError("a callback failed")

    trainer = tabular_trainer(tmp_path, iterations=3, report_to=["wandb"])
    trainer.callbacks.append(fail)
    with pytest.raises(RuntimeError, match="a callback failed"):
        trainer.train()
    [run] = wandb_offline.runs()
    assert run["exit_code"] == 1 and [h["iteration"] for h in run["history"]] == [1]
    other = RunDir(tmp_path / "rank1", is_main=False)  # a process other than the main one: no tracker run, nothing written
    other.open_trackers(["wandb", "tensorboard"], {})
    other.log_metrics({"iteration": 1, "loss": 1.0})
    assert other.trackers == [] and not (tmp_path / "rank1").exists() and len(wandb_offline.runs()) == 1


def test_wandb_gets_tables_captioned_images_and_videos(tmp_path, wandb_offline):
    from PIL import Image

    run = RunDir(tmp_path / "run")
    run.open_trackers(["wandb"], {"trainer": {"eta": 1.0}})
    run.log_table("completions", ["prompt", "completion", "reward"], [["2 1", "1 2", 1.0]], 1)
    run.log_image("samples", np.zeros((8, 8, 3), np.uint8), 1, caption="a red square: 0.5, 0.25")
    run.log_text("dialogs", "**user**: 3 1 2  \n**assistant**: 1 2 3", 1)
    frames = [Image.fromarray(np.full((8, 8, 3), k * 40, np.uint8)) for k in range(3)]
    frames[0].save(tmp_path / "eval.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    run.log_video("eval_video", tmp_path / "eval.gif", 1)
    run.close()
    [logged] = wandb_offline.runs()
    folder, history = logged["folder"], logged["history"]
    media = {k: v for h in history for k, v in h.items() if "/" in k}  # W&B's media: nested keys, flattened here
    assert media["completions/_type"] == "table-file" and media["completions/ncols"] == 3 and media["completions/nrows"] == 1
    assert json.loads((folder / "files" / media["completions/path"]).read_text())["data"] == [["2 1", "1 2", 1.0]]
    assert json.loads((folder / "files" / media["dialogs/path"]).read_text())["data"] == [["**user**: 3 1 2  \n**assistant**: 1 2 3"]]
    assert media["samples/_type"] == "images/separated" and media["samples/captions"] == ["a red square: 0.5, 0.25"]
    assert media["eval_video/_type"] == "video-file" and (folder / "files" / media["eval_video/path"]).read_bytes()[:3] == b"GIF"
    assert all(h["iteration"] == 1 for h in history)


# -------------------------------------------------------------------- Trackio

TRACKIO_RUN = """
import json, sys
import numpy as np
import torch
from rebel.runs import RunDir
from rebel.trainer import Trainer, TrainerConfig
from rebel_envs.tabular import TabularConfig, make_tabular
from trackio.sqlite_storage import SQLiteStorage

def trainer(iterations):
    config = TrainerConfig(output_dir=sys.argv[1], iterations=iterations, learning_rate=0.1, progress=False, plot=False,
                           report_to=["trackio"])
    torch.manual_seed(0)
    return Trainer(*make_tabular(TabularConfig(), seed=0), config)

trainer(2).train()
trainer(3).train(resume=True)
ids = json.load(open(sys.argv[1] + "/trackers.json"))["trackio"]
logs = SQLiteStorage.get_logs(ids["project"], ids["name"])

media = RunDir(sys.argv[1] + "-media")
media.open_trackers(["trackio"], {})
media.log_table("completions", ["prompt", "completion", "reward"], [["2 1", "1 2", 1.0]], 1)
media.log_image("samples", np.zeros((8, 8, 3), np.uint8), 1, caption="a red square: 0.5")
media.log_video("eval_video", sys.argv[2], 1)
media.log_text("dialogs", "**user**: 3 1 2", 1)
media.close()
media_logs = SQLiteStorage.get_logs(ids["project"], "run-media")
print(json.dumps({"ids": ids, "runs": SQLiteStorage.get_runs(ids["project"]), "logs": logs, "media": media_logs}, default=str))
"""


@pytest.mark.skipif(not HAS_TRACKIO, reason="trackio is not installed (pip install 'rebel-rl[trackio]')")
def test_trackio_local_database_holds_the_scalars_and_a_resume_continues_the_run(tmp_path):
    from PIL import Image

    frames = [Image.fromarray(np.full((8, 8, 3), k * 40, np.uint8)) for k in range(3)]
    frames[0].save(tmp_path / "eval.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    env.pop("TRACKIO_SPACE_ID", None), env.pop("TRACKIO_SERVER_URL", None), env.pop("TRACKIO_PROJECT", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TRACKIO_RUN), str(tmp_path / "run"), str(tmp_path / "eval.gif")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [found] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert found["ids"]["project"] == "rebel" and found["ids"]["name"] == "run" and found["runs"] == ["run", "run-media"]
    rows = read_metrics(tmp_path / "run")
    logged = [{k: v for k, v in log.items() if k in numbers(rows[0])} for log in found["logs"]]
    assert [log["step"] for log in found["logs"]] == [1, 2, 3]
    assert logged == [{k: v for k, v in numbers(r).items() if k != "iteration"} for r in rows]
    assert (tmp_path / "trackio" / "rebel.db").is_file()
    media = {k: v for log in found["media"] for k, v in log.items() if k not in ("step", "timestamp")}
    assert media["completions"] == {"_type": "trackio.table", "_value": [{"prompt": "2 1", "completion": "1 2", "reward": 1.0}]}
    assert media["samples"]["_type"] == "trackio.image" and media["samples"]["caption"] == "a red square: 0.5"
    assert media["dialogs"] == {"_type": "trackio.markdown", "_value": "**user**: 3 1 2"}
    assert media["eval_video"]["_type"] == "trackio.video" and media["eval_video"]["file_path"].endswith(".gif")
    assert {log["step"] for log in found["media"]} == {1}
