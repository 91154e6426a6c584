"""``--config`` resolution: shipped configs by name, from any folder; paths stay paths."""

import fnmatch
import os
import tomllib

from meljax.commands import config_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shipped_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: only the package's copy can answer
    demo = config_files.shipped("demo")
    assert os.path.isfile(demo) and os.path.dirname(demo) == config_files.SHIPPED_DIR
    assert config_files.resolve("demo") == demo
    assert config_files.resolve("demo.py") == demo
    assert config_files.resolve("configs/demo.py") == demo  # the README's spelling
    assert (
        config_files.resolve("qwen3_paper:8b,mel")
        == config_files.shipped("qwen3_paper") + ":8b,mel"
    )
    assert config_files.resolve_argv(["--config", "tiny", "--config.seed=3"]) == [
        "--config",
        config_files.shipped("tiny"),
        "--config.seed=3",
    ]
    assert {"demo", "tiny", "qwen3_paper"} <= set(config_files.shipped_names())


def test_existing_paths_and_unknown_names_are_left_alone(tmp_path, monkeypatch):
    mine = tmp_path / "demo.py"
    mine.write_text("def get_config(): ...\n")
    monkeypatch.chdir(tmp_path)
    assert config_files.resolve("demo.py") == "demo.py"  # the user's own file wins
    assert config_files.resolve(str(mine)) == str(mine)
    assert config_files.resolve("nope") == "nope"  # the config loader names it


def test_the_wheel_ships_every_file_a_shipped_config_reads():
    """pyproject's package data must cover the configs folder (the demo's held-out set)."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["meljax.configs"]
    for name in os.listdir(config_files.SHIPPED_DIR):
        if name != "__pycache__":
            assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_the_cli_finds_a_shipped_config_by_name_from_another_folder(tmp_path):
    """``meljax train --config=tiny`` outside a checkout: the name reaches the shipped file (a
    misspelt override then fails on that config's keys, before any work)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "meljax", "train", "--config=tiny", "--config.rollout.group_sise=3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "group_sise" in proc.stderr and "group_size" in proc.stderr  # did you mean ...
    assert "not found" not in proc.stderr and "No such file" not in proc.stderr
