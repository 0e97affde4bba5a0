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
