"""The layout the code promises: each setting declared once, layers that only point down,
and run folders written by earlier versions that still resume."""

import argparse
import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

import rebel
from rebel.control.agent import ControlConfig, Rebel, run_config
from rebel.diffusion.trainer import DiffusionConfig
from rebel.text.trainer import TextConfig
from rebel.trainer import TrainerConfig

ROOT = Path(rebel.__file__).parent
TRAINER_FIELDS = {f.name: f for f in dataclasses.fields(TrainerConfig)}
ADAPTER_CONFIGS = (TextConfig, DiffusionConfig, ControlConfig)


def declared_fields(cls: type) -> set[str]:
    """The names the class body of ``cls`` annotates (what its source declares)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    return {node.target.id for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


@pytest.mark.parametrize("cls", ADAPTER_CONFIGS, ids=lambda c: c.__name__)
def test_no_adapter_config_redeclares_a_trainer_field(cls):
    assert issubclass(cls, TrainerConfig)
    assert declared_fields(cls), "the parser found the class body"
    assert declared_fields(cls) & set(TRAINER_FIELDS) == set()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, field in TRAINER_FIELDS.items():  # inherited with TrainerConfig's type and help
        assert (fields[name].type, fields[name].metadata["help"]) == (field.type, field.metadata["help"]), name


def test_adapter_defaults_differ_only_where_the_adapter_says():
    changed = {
        cls.__name__: {name for name in TRAINER_FIELDS if getattr(cls(), name) != getattr(TrainerConfig(), name)}
        for cls in (TextConfig, DiffusionConfig)
    }
    assert changed == {"TextConfig": {"output_dir", "learning_rate"}, "DiffusionConfig": {"output_dir"}}
    assert ControlConfig().iterations is None and ControlConfig(total_steps=5000).budget == 5000.0  # a control run stops on env steps


def test_every_trainer_setting_reaches_each_command_line():
    from rebel.control import cli as control_cli
    from rebel.diffusion import cli as diffusion_cli
    from rebel.text import cli as text_cli

    for module, set_elsewhere in ((text_cli, set()), (diffusion_cli, set()), (control_cli, set(control_cli.SET_BY_TOTAL_STEPS))):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        dests = {action.dest for action in parser._actions}
        assert set(TRAINER_FIELDS) - set_elsewhere <= dests, module.__name__


def module_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


WORLDS = ("rebel.control", "rebel.text", "rebel.diffusion")


def test_layers_only_point_down():
    for path in ROOT.glob("*.py"):  # the core
        if path.name == "cli.py":  # the command dispatcher finds the worlds by name, at run time
            continue
        bad = {m for m in module_imports(path) if m.startswith((*WORLDS, "rebel.hf", "rebel_envs"))}
        assert bad == set(), f"core module {path.name} imports {bad}"
    for path in (ROOT / "hf").glob("*.py"):
        bad = {m for m in module_imports(path) if m.startswith(WORLDS)}
        assert bad == set(), f"rebel/hf/{path.name} imports {bad}"
    for world in WORLDS:
        folder = ROOT / world.split(".")[1]
        for path in folder.glob("*.py"):
            others = {m for m in module_imports(path) if m.startswith(WORLDS) and not m.startswith(world)}
            assert others == set(), f"{world} imports another world: {others}"


def test_control_only_code_lives_under_rebel_control():
    core = {path.stem for path in ROOT.glob("*.py")}
    users: dict[str, set[str]] = {name: set() for name in core}
    for path in ROOT.rglob("*.py"):
        for module in module_imports(path):
            match = re.fullmatch(r"rebel\.(\w+)", module)
            if match and match.group(1) in core:
                users[match.group(1)].add(path.relative_to(ROOT).parts[0])
    control_only = sorted(name for name, where in users.items() if where == {"control"})
    assert control_only == []


# ------------------------------------------------------------- earlier run folders


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def test_a_text_run_written_before_the_split_resumes_with_its_settings(tmp_path):
    """Runs written before adapter configs derived from TrainerConfig kept the trainer's
    settings in the text section too (and only some of them)."""
    from rebel.cli import resolve_configs

    trainer = {**TrainerConfig().trainer_settings(), "output_dir": "elsewhere", "learning_rate": 2e-5, "eta": 0.5}
    text = {"output_dir": "elsewhere", "learning_rate": 2e-5, "eta": 0.5, "max_new_tokens": 12, "seed": 3}
    run = write_config(tmp_path / "old", {"adapter": "text", "text": text, "trainer": {**trainer, "seed": 3}})
    args = argparse.Namespace(resume=str(run), epochs=2)
    config = resolve_configs(args, {"text": TextConfig})["text"]
    assert (config.learning_rate, config.eta, config.max_new_tokens, config.seed, config.epochs) == (2e-5, 0.5, 12, 3, 2)
    assert config.output_dir == str(run)  # a resumed run keeps its folder


def test_a_control_run_written_before_the_merge_resumes_with_its_settings(tmp_path):
    """Runs written before ControlConfig derived from TrainerConfig held the seed in both sections."""
    agent = Rebel("Pendulum-v1", variant="mc", seed=4, output_dir=str(tmp_path / "new"), eta=0.7, num_groups=8)
    old_control = {**agent.config.adapter_settings(), "seed": 4}
    trainer = agent.config.trainer_settings()
    run = write_config(tmp_path / "old", {"adapter": "control", "control": old_control, "trainer": trainer})
    resumed = run_config(run)
    assert (resumed.seed, resumed.eta, resumed.num_groups, resumed.variant) == (4, 0.7, 8, "mc")
    assert dataclasses.replace(resumed, output_dir=agent.config.output_dir) == agent.config


def test_the_package_list_installs_every_subpackage():
    import tomllib

    setuptools = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(path.parent.relative_to(ROOT.parent).parts) for path in ROOT.rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"rebel_envs"}
    assert setuptools["package-dir"] == {"rebel_envs": "envs"}  # no top-level module named envs
