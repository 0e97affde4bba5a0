"""Making environments: MuJoCo's warnings, and a missing package named with what to install."""

import re
import sys

import pytest


def test_mujoco_warnings_become_python_warnings_shown_once(capfd):
    import warnings

    import mujoco

    from rebel.control.envs import _mujoco_warning, make_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            make_env("HalfCheetah-v5").close()
    assert mujoco.get_mju_user_warning() is _mujoco_warning
    messages = [str(w.message) for w in caught if str(w.message).startswith("MuJoCo: ")]
    assert len(messages) <= 1  # (MuJoCo 3.3+ warns about settotalmass: once, not at every load)
    assert "settotalmass" not in capfd.readouterr().err  # nothing printed by MuJoCo itself


@pytest.mark.parametrize(
    ("env", "package", "install"),
    [("InvertedPendulum-v5", "mujoco", "rebel-rl[control]"), ("LunarLander-v3", "Box2D", "gymnasium[box2d]")],
)
def test_a_missing_package_is_one_line_saying_what_to_install(monkeypatch, env, package, install):
    from rebel.control.envs import make_env

    for name in [m for m in sys.modules if m.startswith(("gymnasium.envs.mujoco", "gymnasium.envs.box2d"))]:
        monkeypatch.delitem(sys.modules, name)  # gymnasium imports them again, and finds the package missing
    monkeypatch.setitem(sys.modules, package, None)
    shown = {"mujoco": "MuJoCo"}.get(package, package)
    with pytest.raises(
        ValueError,
        match=rf"^cannot make environment '{env}': {shown} is not installed; install it with pip install '{re.escape(install)}'$",
    ):
        make_env(env)
