"""``data.source=tfds``: array_record datasets of any TFDS builder, and an exactly resumed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from meljax.data import PRESETS, BadRowError, Problem, make_problem_iterator
from meljax.data.tfds_builder import ArrayRecordProblems, build_array_record
from meljax.trainer.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.py")


def prepare_foreign_dataset(data_dir: str, rows: dict[str, list[dict]], version: str = "1.2.0"):
    """A TFDS dataset that is not meljax's own: fields of ``rows``, no id, an int column."""
    import tensorflow_datasets as tfds

    text = tfds.features.Text()
    keys = sorted(rows["train"][0])

    class QaToy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            features = {k: text for k in keys if k != "level"}
            features["level"] = tfds.features.Scalar(dtype=np.int32)
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(features),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in rows}

        def _generate_examples(self, split):
            yield from enumerate(rows[split])

    builder = QaToy(data_dir=data_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(download_dir=download_dir, file_format="array_record")
    return str(builder.data_path)


def qa_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}", "level": i % 3}
        for i in range(offset, offset + n)
    ]


def test_any_tfds_builder_with_question_answer_fields(tmp_path):
    path = prepare_foreign_dataset(
        str(tmp_path), {"train": qa_rows(5), "test": qa_rows(2, offset=10)}
    )
    assert path == str(tmp_path / "qa_toy" / "1.2.0")
    source = ArrayRecordProblems(path)
    assert len(source) == 5
    assert source[3] == Problem(
        id="3", question="What is 3 plus 1?", answer="#### 4", extra={"level": 0}
    )  # a plain int, not a numpy scalar
    assert type(source[3].extra["level"]) is int

    # the same dataset by its parent folder (newest version), by name under a data dir,
    # another split, a slice, a limit, and a preset's layout (GSM8K's "#### N" answers)
    assert [p.question for p in ArrayRecordProblems(str(tmp_path / "qa_toy"))] == [
        p.question for p in source
    ]
    by_name = ArrayRecordProblems("qa_toy", split="test", data_dir=str(tmp_path))
    assert [p.id for p in by_name] == ["0", "1"] and by_name[1].question == "What is 11 plus 1?"
    assert len(ArrayRecordProblems(path, split="train[:3]")) == 3
    assert len(ArrayRecordProblems(path, limit=2)) == 2
    gsm = ArrayRecordProblems(path, fields=PRESETS["gsm8k"])
    assert [p.answer for p in gsm] == ["1", "2", "3", "4", "5"]
    assert gsm[4].id == "gsm8k/4"

    with pytest.raises(ValueError, match="no split 'validation'"):
        ArrayRecordProblems(path, split="validation")
    with pytest.raises(FileNotFoundError, match="nope"):
        ArrayRecordProblems("nope", data_dir=str(tmp_path))


def test_tfds_records_without_the_fields_fail_at_open_naming_the_field(tmp_path):
    rows = [{"prompt": "Q", "target": "1", "level": 0}]
    path = prepare_foreign_dataset(str(tmp_path), {"train": rows})
    with pytest.raises(
        BadRowError, match=r"record 0: no field 'answer'.*rows need 'question' and 'answer'"
    ):
        ArrayRecordProblems(path)
    # naming the fields reads it
    from meljax.data import FieldMap

    fields = FieldMap(question_field="prompt", answer_field="target", extra_fields=())
    assert ArrayRecordProblems(path, fields=fields)[0] == Problem(id="0", question="Q", answer="1")


def test_tfds_source_feeds_a_resumable_grain_pipeline(tmp_path):
    problems = [Problem(id=f"p{i}", question=f"q{i}", answer=str(i)) for i in range(7)]
    source = ArrayRecordProblems(build_array_record(problems, str(tmp_path)))
    it = make_problem_iterator(source, batch_size=3, seed=5)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [[p.id for p in next(it)] for _ in range(3)]
    again = make_problem_iterator(ArrayRecordProblems(source.path), batch_size=3, seed=5)
    again.set_state(json.loads(json.dumps(state)))
    assert [[p.id for p in next(again)] for _ in range(3)] == rest
    assert {p.id for b in first for p in b} <= {p.id for p in problems}


# ----------------------------------------------------------------------------- training

DETERMINISTIC = (
    "reward_mean",
    "accuracy",
    "completion_len_mean",
    "train/loss",
    "train/grad_norm",
)


def train(workdir, data_path, steps):
    # one CPU device: the run is compile-bound, and resume exactness does not need a mesh
    xla = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=xla)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meljax",
            "train",
            f"--config={TINY}",
            f"--workdir={workdir}",
            "--config.data.source=tfds",
            f"--config.data.path={data_path}",
            f"--config.total_steps={steps}",
            "--config.export.at_end=False",
            "--config.mel.enabled=False",  # the data path is what is tested: fewer compiles
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"


def test_tfds_sourced_run_resumes_exactly(tmp_path):
    # The tiny config's task (sums of 0 and 1) with ids that only this dataset has.
    problems = [
        Problem(id=f"tfds-{a}{b}-{k}", question=f"What is {a} plus {b}?", answer=str(a + b))
        for k in range(3)
        for a in (0, 1)
        for b in (0, 1)
    ]
    data = build_array_record(problems, str(tmp_path / "data"), name="sums")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole, data, 4)
    train(resumed, data, 2)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2]
    train(resumed, data, 4)

    def strip(workdir):
        return [{k: r.get(k) for k in ("step", *DETERMINISTIC)} for r in read_metrics(workdir)]

    assert [r["step"] for r in strip(whole)] == [1, 2, 3, 4]
    assert strip(resumed) == strip(whole)
    # the batches came from the dataset: the checkpointed iterator state describes it
    from meljax.trainer.checkpointing import Checkpointer, checkpoint_dir

    for workdir in (whole, resumed):
        ckpt = Checkpointer(checkpoint_dir(str(workdir)), create=False)
        state = ckpt.read_extra(4)["data_iterator"]
        ckpt.close()
        assert state["settings"]["source_len"] == len(problems)
        assert state["grain"]["next_index"] == 4  # four batches read, none twice
