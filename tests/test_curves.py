"""curves.png: a grid of readable panels, the known optimum of a task drawn as a dashed line."""

import json

import pytest
from PIL import Image

from rebel.runs import CURVE_KEYS, RunDir, curves_figure


def rows_of(keys, n=5):
    return [{"iteration": i, "env_steps": 100 * i, **{k: float(i) for k in keys}} for i in range(1, n + 1)]


def dashed(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_six_panels_make_a_grid_that_fits_a_laptop_screen(tmp_path):
    keys = CURVE_KEYS[:6]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(keys)))
    out = RunDir(tmp_path).plot_curves()
    width, height = Image.open(out).size
    assert (width, height) == (1200, 640)  # three panels a row, two rows (it was one 2160 x 300 strip)
    fig = curves_figure(rows_of(keys))
    assert list(panels(fig)) == list(keys)
    assert {round(ax.get_position().x0, 1) for ax in panels(fig).values()} == {0.0, 0.4, 0.7}  # three columns
    assert all(ax.title.get_fontsize() >= 12 and ax.xaxis.label.get_fontsize() >= 10 for ax in fig.axes if ax.get_visible())


@pytest.mark.parametrize(("count", "size"), [(1, (400, 320)), (2, (800, 320)), (4, (1200, 640)), (7, (1200, 960))])
def test_the_grid_grows_by_rows_of_three(count, size):
    fig = curves_figure(rows_of(CURVE_KEYS[:count]))
    assert tuple(round(v * 100) for v in fig.get_size_inches()) == size
    assert len(panels(fig)) == count


def test_the_known_optimum_is_a_dashed_line_on_its_panel_only():
    fig = curves_figure(rows_of(["reward_mean", "eval_return", "loss"]), optimum={"eval_return": 1000.0, "kl": 0.0})
    shown = panels(fig)
    (line,) = dashed(shown["eval_return"])
    assert list(line.get_ydata()) == [1000.0, 1000.0] and line.get_label() == "optimum 1000"
    assert dashed(shown["reward_mean"]) == [] and dashed(shown["loss"]) == []
    assert curves_figure([{"iteration": 1}]) is None


def test_a_tabular_run_draws_its_optimal_return(tmp_path, monkeypatch):
    import rebel.runs
    from rebel import Trainer, TrainerConfig
    from rebel_envs.tabular import TabularConfig, make_tabular

    drawn = []
    real = rebel.runs.curves_figure
    monkeypatch.setattr(rebel.runs, "curves_figure", lambda rows, optimum=None: drawn.append(real(rows, optimum)) or drawn[-1])
    policy, sampler = make_tabular(TabularConfig())
    config = TrainerConfig(output_dir=str(tmp_path / "run"), iterations=2, learning_rate=0.1, progress=False, report_to="none")
    Trainer(policy, sampler, config).train()
    best = sampler.mdp.optimal_return()
    (line,) = dashed(panels(drawn[-1])["expected_return"])
    assert list(line.get_ydata()) == [best, best]
    assert (tmp_path / "run" / "curves.png").is_file()


def test_control_envs_that_pay_one_per_step_know_their_best_return():
    from rebel.control.agent import known_optimum

    assert known_optimum("InvertedPendulum-v5") == {"eval_return": 1000.0}
    assert known_optimum("CartPole-v1") == {"eval_return": 500.0}
    assert known_optimum("HalfCheetah-v5") is None
