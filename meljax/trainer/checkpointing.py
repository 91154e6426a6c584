"""Checkpoints of a training run with orbax ``CheckpointManager`` under ``WORKDIR/checkpoints``.

A checkpoint holds the whole train state (params, optimizer state, step, counters) as a flat
dict of arrays keyed by their pytree paths, plus a JSON item with the data-iterator state, the
config and run bookkeeping. Orbax writes each checkpoint into a temporary folder and renames it
when complete, so a run killed while saving resumes from the last complete checkpoint. A
checkpoint that is complete but does not restore (a truncated file, a deleted one) is reported
and set aside as ``STEP.unrestorable``, never deleted, and the run resumes from the one before
(:meth:`Checkpointer.restore_latest`).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from meljax.runtime import files
from meljax.trainer.workdir import CONFIG_FILE, on_process_0

CHECKPOINT_DIR = "checkpoints"
UNRESTORABLE_SUFFIX = ".unrestorable"


def _key(path) -> str:
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return ".".join(parts)


def flatten_state(state: Any) -> dict[str, jax.Array]:
    """``{"params.layers.0.attn.q_proj.value": array, ...}`` for any pytree of arrays."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    out = {_key(path): leaf for path, leaf in flat}
    if len(out) != len(flat):
        raise ValueError("train state has colliding leaf paths")
    return out


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
    """Rebuilds a pytree shaped like ``template`` from ``flatten_state`` output."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [_key(p) for p, _ in paths if _key(p) not in flat]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} arrays, e.g. {missing[:3]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[_key(p)] for p, _ in paths])


def checkpoint_dir(workdir: str, directory: str = "") -> str:
    """Where a run's checkpoints are: ``checkpoint.directory`` or ``WORKDIR/checkpoints``."""
    return directory or str(files.path(workdir, CHECKPOINT_DIR))


class Checkpointer:
    """Saves and restores ``(train_state, extra_json)`` pairs by step in ``directory``."""

    def __init__(self, directory: str, *, max_to_keep: int = 2, create: bool = True):
        if "://" not in directory:  # orbax wants absolute paths; gs:// ones already are
            directory = os.path.abspath(os.path.expanduser(directory))
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "extra")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Writes a checkpoint and waits until it is complete on disk."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flatten_state(state)),
                extra=ocp.args.JsonSave(extra),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int | None, template: Any) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of ``template`` (a live state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")

        def abstract(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

        target = jax.tree.map(abstract, flatten_state(template))
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
            ),
        )
        return unflatten_like(template, dict(out["state"])), dict(out["extra"])

    def restore_latest(self, template: Any) -> tuple[int, Any, dict]:
        """``(step, state, extra)`` of the newest checkpoint that restores (``(0, template,
        {})`` without any). A newer one that fails is reported in one warning line (step,
        folder, reason) and renamed ``STEP.unrestorable``, never deleted: the resumed run
        saves that step again. Raises ``ValueError`` when none restores.

        Why: one corrupt file should cost the steps since the previous checkpoint, not the
        run."""
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, extra = self.restore(step, template)
            except Exception as e:  # tensorstore, orbax, JSON, shape errors: all say "corrupt"
                failures.append((step, _reason(e)))
                continue
            for bad, reason in failures:
                kept = self._set_aside(bad)
                logging.warning(
                    "checkpoint step %d does not restore (%s); kept as %s, resuming from step %d",
                    bad,
                    reason,
                    kept,
                    step,
                )
            return step, state, extra
        if failures:
            listed = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise ValueError(f"no checkpoint in {self.directory} restores ({listed})")
        return 0, template, {}

    def _set_aside(self, step: int) -> str:
        """Renames checkpoint ``step`` to ``STEP.unrestorable`` (a free name) on process 0;
        every process then forgets the step. Returns the new path."""
        source = self.directory / str(step)
        name, i = f"{step}{UNRESTORABLE_SUFFIX}", 0
        while (self.directory / name).exists():  # set aside before, e.g. after a restore
            i += 1
            name = f"{step}{UNRESTORABLE_SUFFIX}.{i}"

        def rename() -> None:
            try:
                source.rename(self.directory / name)
            except OSError as e:
                raise ValueError(
                    f"checkpoint step {step} ({source}) does not restore and cannot be moved "
                    f"aside ({e}); move it out of {self.directory} and rerun"
                ) from None

        on_process_0(rename)
        self.manager.reload()
        return str(self.directory / name)

    def read_extra(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(out["extra"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reason(e: BaseException) -> str:
    """The first line of an error's innermost cause (TensorStore names the file and array
    there, its wrapper does not), without the spec dump, at most 600 characters."""
    seen = [e]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    for err in reversed(seen):
        text = re.sub(r"\s*\[tensorstore_spec.*$", "", (str(err).strip().splitlines() or [""])[0])
        if text:
            text = f"{type(err).__name__}: {text}"
            return text if len(text) <= 600 else text[:597] + "..."
    return type(e).__name__


def _restore_readonly(ckpt: Checkpointer, step: int | None) -> dict:
    """The flat state of checkpoint ``step``, or of the newest one that restores when ``step``
    is None (a newer one that fails is reported and skipped; a reader renames nothing).

    Raises:
      ValueError: the asked step, or every step, does not restore (step and reason named).
    """
    steps = [step] if step is not None else sorted(ckpt.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for s in steps:
        try:
            out = ckpt.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:  # tensorstore, orbax, JSON errors: all say "corrupt"
            failures.append((s, _reason(e)))
            continue
        for bad, reason in failures:
            logging.warning(
                "checkpoint step %d does not restore (%s); using step %d", bad, reason, s
            )
        return dict(out["state"])
    listed = "; ".join(f"step {s}: {r}" for s, r in failures)
    raise ValueError(f"no checkpoint in {ckpt.directory} restores ({listed})")


def has_checkpoint(workdir: str) -> bool:
    """True when ``workdir`` holds a run (its ``config.json``) with at least one checkpoint."""
    cfg_file = files.path(workdir, CONFIG_FILE)
    if not cfg_file.exists():
        return False
    from meljax.config.settings import config_from_json

    try:
        cfg = config_from_json(cfg_file.read_text())
    except ValueError:  # e.g. a Hugging Face folder's config.json
        return False
    return files.path(checkpoint_dir(workdir, cfg.checkpoint.directory)).exists()


def load_policy_from_workdir(workdir: str, step: int | None = None, *, mesh=None):
    """The policy model of a training run's checkpoint (latest by default).

    Returns ``(model, tokenizer, config)``. The model architecture and tokenizer come from the
    run's config (``model.path`` or its random architecture); weights from the checkpoint.
    """
    from flax import nnx

    from meljax.config.settings import config_from_json, settings
    from meljax.trainer import setup

    cfg_file = files.path(workdir, CONFIG_FILE)
    if not cfg_file.exists():
        raise FileNotFoundError(f"no training run in {workdir} (no {CONFIG_FILE})")
    cfg = config_from_json(cfg_file.read_text())
    where = checkpoint_dir(workdir, cfg.checkpoint.directory)
    if not files.path(where).exists():
        raise FileNotFoundError(f"no checkpoint under {where}")
    ckpt = Checkpointer(where, create=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {where}")
    s = settings(cfg)
    model, tokenizer = setup.build_model_and_tokenizer(s.model, s.random, s.run.seed, mesh=mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    flat = _restore_readonly(ckpt, step)
    prefix = "params."
    restored = {k[len(prefix) :]: v for k, v in dict(flat).items() if k.startswith(prefix)}
    params = unflatten_like(params, restored)
    ckpt.close()
    return nnx.merge(graphdef, params), tokenizer, cfg
