"""The config is declared once: the ConfigDict is built from the settings dataclasses."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from meljax.config.schema import config_key, from_section
from meljax.config.settings import SCHEMA, base_config, config_from_json, settings, validate
from meljax.rl import objective as losses
from meljax.rl import optim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def flat_keys(node, prefix=""):
    out = []
    for k in node:
        v = node[k]
        if hasattr(v, "keys"):
            out += flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_every_config_key_is_one_dataclass_field_with_its_comment():
    keys = flat_keys(base_config())
    declared = {}
    for section, cls in SCHEMA:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no comment"
            path = config_key(section, f)
            if path is None:
                assert f.metadata["derived"], f"{cls.__name__}.{f.name}"
                continue
            assert path not in declared, f"{path} declared twice"
            declared[path] = (cls, f)
    assert sorted(keys) == sorted(declared)  # nothing unreachable, nothing undeclared
    # The user-facing names stay what configs and --config.a.b=v use.
    for key in (
        "algorithm.name",
        "algorithm.logprob_chunk",
        "mel.enabled",
        "mel.lambda_mel",
        "rollout.group_size",
        "reward.num_workers",
        "data.prompt_template",
        "eval.every_steps",
        "distributed.process_id",
    ):
        assert key in declared


def test_choices_come_from_the_implementation():
    cfg = base_config()
    for name in losses.ADVANTAGES:  # all six estimators, not a hand-kept list of four
        cfg.algorithm.advantage = name
        assert settings(cfg).loss.advantage == name
    cfg.algorithm.advantage = "nope"
    with pytest.raises(ValueError, match="config: algorithm.advantage='nope' is not one of"):
        validate(cfg)
    cfg = base_config()
    cfg.optim.schedule = "linear"  # optim.SCHEDULES has it; the old validate() refused it
    assert settings(cfg).optim.schedule == "linear" and "linear" in optim.SCHEDULES


def test_settings_round_trip_and_derived_fields():
    cfg = base_config()
    cfg.rollout.max_new_tokens = 77
    cfg.algorithm.eps_high = 0.28
    cfg.mel.enabled = False
    cfg.data.instruction = "demo"
    s = settings(cfg, data_parallel=4)
    assert s.loss == losses.LossConfig(eps_high=0.28, use_mel=False, max_len=77)
    assert s.mel.nll_batch_multiple == 4 and s.mel.replay_instruction.startswith("Answer")
    with pytest.raises(ValueError, match="max_len is derived"):
        from_section(losses.LossConfig, "algorithm", cfg)
    with pytest.raises(ValueError, match="config: rollout.group_size=1 must be at least 2"):
        cfg.rollout.group_size = 1
        validate(cfg)


def _meljax(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meljax", *args], cwd=REPO, capture_output=True, text=True
    )


def test_unknown_fields_fail():
    # On the command line: one line naming the key, with a hint, and exit code 2 (it was a
    # 40-line ml_collections traceback and exit code 1).
    for args in (["--config=configs/tiny.py"], []):
        proc = _meljax("train", *args, "--config.rollout.group_sise=8", "--workdir=/nonexistent")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            "meljax train: error: unknown config key rollout.group_sise "
            "(did you mean rollout.group_size?)"
        ]
    saved = json.loads(base_config().to_json())
    saved["rollout"]["group_sise"] = 4
    with pytest.raises(ValueError, match=r"unknown fields \['rollout.group_sise'\]"):
        config_from_json(json.dumps(saved))
    # An older run's config.json without today's new fields still loads (defaults fill in).
    del saved["rollout"]["group_sise"], saved["data"]["stop_strings"], saved["eval"]["at_start"]
    cfg = config_from_json(json.dumps(saved))
    assert cfg.data.stop_strings == () and cfg.eval.at_start is False


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["plan", "--topology=cpu:8", "--config.mel.enabledd=False"],
            "meljax plan: error: unknown config key mel.enabledd (did you mean mel.enabled?)",
        ),
        (
            ["train", "--config=configs/nope.py"],
            "meljax train: error: --config: config file not found: configs/nope.py",
        ),
        (
            ["train", "--config=configs/tiny.py", "--config.rollout.group_size=abc"],
            "meljax train: error: config key rollout.group_size expects int, got 'abc'",
        ),
        (
            ["train", "--config.group_size=8"],
            "meljax train: error: unknown config key group_size (did you mean rollout.group_size?)",
        ),
    ],
)
def test_bad_config_arguments_are_one_line_and_exit_2(args, line):
    """A missing config file, a misspelt key, a value of the wrong type: one line naming the
    culprit and exit code 2, before the command runs (was a traceback, or exit code 1)."""
    proc = _meljax(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line]


def test_did_you_mean_hints():
    from meljax.cli import config_arg_error, did_you_mean

    assert did_you_mean("rollout.group_sise", ["rollout.group_size", "seed"]).endswith(
        "rollout.group_size?)"
    )
    assert did_you_mean("zzz", ["rollout.group_size"]) == ""
    assert config_arg_error(["--config.rollout.group_size=8", "--noconfig.mel.enabled"]) is None
    assert "model.random.hidden_sise" in config_arg_error(["--config.model.random.hidden_sise=4"])


def test_shipped_configs_validate():
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        spec = importlib.util.spec_from_file_location("c", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        variants = getattr(module, "SIZES", None)  # qwen3_paper.py: every SIZE,ARM[,v6e]
        if variants is None:
            validate(module.get_config())
            continue
        for size in variants:
            for arm in module.ARMS:
                for slice_ in module.SLICES:
                    validate(module.get_config(f"{size},{arm},{slice_}"))
        with pytest.raises(ValueError, match="expected SIZE,ARM"):
            module.get_config("8b")


def test_demo_heldout_set_is_fixed_large_and_never_trained_on():
    from meljax.evaluation import load_benchmarks, parse_benchmark_specs
    from meljax.trainer import setup

    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    assert cfg.eval.at_start and cfg.eval.every_steps == cfg.total_steps  # before and after
    assert cfg.eval.temperature == cfg.rollout.temperature and cfg.eval.num_samples > 0
    (problems,) = load_benchmarks(parse_benchmark_specs(cfg.eval.benchmarks))[0].values()
    questions = {p.question for p in problems}
    assert len(questions) == len(problems) >= 200
    for p in problems:  # the demo task's own problems, with right answers
        a, b = (int(x) for x in p.question.removeprefix("What is ").rstrip("?").split(" plus "))
        assert cfg.data.arithmetic_min <= min(a, b) <= max(a, b) <= cfg.data.arithmetic_max
        assert p.answer == str(a + b)
    source, _ = setup.build_problem_source(settings(cfg).data, cfg.seed)
    drawn = {source[i].question for i in range(4 * cfg.total_steps * cfg.rollout.num_questions)}
    assert drawn and not drawn & questions
