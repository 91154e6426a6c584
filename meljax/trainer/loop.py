"""The main job: batch of questions -> rollouts -> rewards -> meta-experiences -> update.

Everything a step draws at random derives from ``(config.seed, step)`` and the data iterator's
state is checkpointed with the weights, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from meljax import sharding as shd
from meljax.batch import TrainBatch, build_sequence_batch
from meljax.buckets import bucket
from meljax.losses import LossConfig
from meljax.meta import MetaConfig, MetaExperiencePipeline
from meljax.models import save_pretrained
from meljax.optim import OptimizerConfig, make_optimizer
from meljax.train_step import (
    make_compute_logprobs,
    make_train_step,
    train_on_batch,
)
from meljax.trainer import setup
from meljax.trainer.checkpointing import Checkpointer
from meljax.trainer.metrics import MetricsWriter, Progress, read_metrics
from meljax.trainer.rollout import run_rollouts

EXPORT_DIR = "export"


@dataclasses.dataclass
class TrainSummary:
    workdir: str
    start_step: int
    final_step: int
    records: list[dict]
    export_dir: str | None

    def describe(self) -> str:
        lines = [f"run folder: {self.workdir}"]
        if self.start_step >= self.final_step:
            lines.append(f"nothing to do: already at step {self.final_step}")
        rows = [r for r in self.records if r.get("reward_mean") is not None]
        if rows:
            curve = " ".join(f"{r['reward_mean']:.2f}" for r in rows)
            kept = int(sum(r.get("mel/kept") or 0 for r in rows))
            made = int(sum(r.get("mel/generated") or 0 for r in rows))
            lines.append(f"starting accuracy (step {rows[0]['step']}): {rows[0]['accuracy']:.3f}")
            lines.append(f"reward curve (mean reward per step): {curve}")
            if made:
                lines.append(
                    f"meta-experiences kept / generated: {kept} / {made} "
                    f"(retention ratio {kept / made:.3f})"
                )
        w = self.workdir
        lines += [
            f"metrics:          {os.path.join(w, 'metrics.jsonl')}",
            f"meta-experiences: {os.path.join(w, 'meta_experiences.jsonl')}",
            f"checkpoints:      {os.path.join(w, 'checkpoints')}",
        ]
        if self.export_dir:
            lines.append(f"exported model:   {self.export_dir}")
        return "\n".join(lines)


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    a = cfg.algorithm
    return LossConfig(
        algorithm=a.name,
        advantage=a.advantage,
        eps_low=a.eps_low,
        eps_high=a.eps_high,
        aggregation=a.aggregation,
        max_len=cfg.rollout.max_new_tokens,
        kl_beta=a.kl_beta,
        kl_estimator=a.kl_estimator,
        use_mel=cfg.mel.enabled,
        lambda_mel=cfg.mel.lambda_mel,
        rft_threshold=a.rft_threshold,
        logprob_chunk_size=a.logprob_chunk,
    )


def meta_config(cfg: ml_collections.ConfigDict, dp: int) -> MetaConfig:
    m = cfg.mel
    return MetaConfig(
        max_pairs_per_query=m.max_pairs_per_query,
        analysis_template=m.analysis_template or None,
        replay_template=m.replay_template or None,
        replay_instruction=setup.instruction_text(cfg),
        analysis_max_prompt_tokens=m.analysis_max_prompt_tokens,
        analysis_max_new_tokens=m.analysis_max_new_tokens,
        analysis_temperature=m.analysis_temperature,
        analysis_top_p=m.analysis_top_p,
        replay_max_new_tokens=m.replay_max_new_tokens,
        replay_temperature=m.replay_temperature,
        filter_leaks=m.filter_leaks,
        answer_mode=cfg.reward.mode,
        nll_batch_multiple=dp,
        nll_bucketed=m.nll_bucketed,
        seed=cfg.seed,
    )


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        learning_rate=o.learning_rate,
        schedule=o.schedule,
        warmup_steps=o.warmup_steps,
        # one update per pass; the schedule spans the whole run
        total_steps=max(cfg.total_steps * cfg.algorithm.num_passes, o.warmup_steps + 1),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
    )


class PeriodicEval:
    """Evaluation on the configured benchmarks during training (``eval.every_steps``)."""

    def __init__(self, cfg, workdir, tokenizer, stop_ids, mesh, verifier):
        from meljax import evaluation

        self.cfg, self.workdir, self.tokenizer = cfg, workdir, tokenizer
        self.stop_ids, self.mesh, self.verifier = stop_ids, mesh, verifier
        specs = evaluation.parse_benchmark_specs(cfg.eval.benchmarks)
        self.benchmarks, _ = evaluation.load_benchmarks(
            specs, limit=cfg.eval.limit, on_bad_row=cfg.data.on_bad_row
        )

    def __call__(self, step: int, graphdef, params) -> dict[str, float]:
        from meljax import evaluation

        c = self.cfg
        report = evaluation.evaluate(
            (graphdef, params),
            self.tokenizer,
            self.benchmarks,
            num_samples=c.eval.num_samples,
            temperature=c.eval.temperature,
            max_new_tokens=c.eval.max_new_tokens,
            answer_mode=c.reward.mode,
            prompt_template=c.data.prompt_template,
            instruction=setup.instruction_text(c),
            system_prompt=c.data.system_prompt or None,
            seed=c.seed + step,
            progress=False,
            verify=self.verifier,
            stop_token_ids=self.stop_ids,
            mesh=self.mesh,
        )
        if jax.process_index() == 0:
            report.write(os.path.join(self.workdir, "eval", f"step_{step}.json"))
        out = {}
        for name, m in list(report.benchmarks.items()) + [("average", report.average)]:
            for k, v in m.to_json().items():
                if isinstance(v, int | float) and k != "num_samples":
                    out[f"eval/{name}/{k}"] = float(v)
        return out


def _scalars(metrics: list[dict]) -> dict[str, float]:
    """Update metrics (device scalars) of the step's last update, on the host."""
    last = shd.to_host(metrics[-1])
    return {f"train/{k}": float(np.asarray(v)) for k, v in last.items()}


def train(cfg: ml_collections.ConfigDict, workdir: str) -> TrainSummary:
    """Runs (or resumes) training until ``cfg.total_steps``; returns a summary."""
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = setup.build_mesh(cfg)
    dp = shd.data_parallel_size(mesh)
    model, tokenizer = setup.build_model_and_tokenizer(cfg, mesh=mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    stop_ids = setup.stop_token_ids(nnx.merge(graphdef, params), tokenizer)
    pad_id = setup.pad_token_id(tokenizer, stop_ids)

    optimizer, schedule = make_optimizer(optimizer_config(cfg))
    state = setup.init_state(cfg, params, optimizer, mesh)
    ref_params = (
        jax.tree.map(lambda x: x.copy(), state.params) if cfg.algorithm.kl_beta > 0 else None
    )
    del params
    lcfg = loss_config(cfg)
    train_step = make_train_step(
        graphdef,
        optimizer,
        lcfg,
        mesh=mesh,
        num_microbatches=cfg.algorithm.num_microbatches,
        schedule=schedule,
    )
    compute_logprobs = make_compute_logprobs(
        graphdef, mesh=mesh, chunk_size=cfg.algorithm.logprob_chunk
    )
    sampler = setup.build_sampler(cfg, graphdef, stop_ids, pad_id, mesh)
    render = setup.prompt_renderer(cfg, tokenizer)
    source, skipped_rows = setup.build_problem_source(cfg)
    data_iter = setup.build_data_iterator(cfg, source)

    ckpt = Checkpointer(workdir, max_to_keep=cfg.checkpoint.max_to_keep)
    writer = MetricsWriter(workdir, is_chief=is_chief, tensorboard=cfg.logging.tensorboard)
    start = ckpt.latest_step() or 0
    if start:
        state, extra = ckpt.restore(start, state)
        data_iter.set_state(extra["data_iterator"])
        logging.info("resumed from step %d in %s", start, workdir)
    writer.truncate_after(start)
    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json(indent=2))
        if skipped_rows:
            logging.warning("data: %d bad rows skipped", skipped_rows)

    rollout_sampling = setup.rollout_sampling(cfg)
    pool = setup.build_verifier(cfg)
    pipeline = None
    if cfg.mel.enabled:
        pipeline = MetaExperiencePipeline(
            sampler=sampler,
            tokenizer=tokenizer,
            render_prompt=setup.message_renderer(cfg, tokenizer),
            config=meta_config(cfg, dp),
            verify=pool.score,
            workdir=workdir,
            is_chief=is_chief,
            pad_id=pad_id,
        )
    # Without MEL the update still takes a (tiny, all-padding) NLL batch: one code path.
    no_mel = build_sequence_batch(
        [], [], pad_id=pad_id, min_rows=dp, batch_multiple=dp, max_len=bucket(1)
    )
    evaluator = (
        PeriodicEval(cfg, workdir, tokenizer, stop_ids, mesh, pool)
        if cfg.eval.every_steps
        else None
    )
    base_key = jax.random.key(cfg.seed)
    progress = Progress(start, cfg.total_steps, cfg.logging.progress_bar, cfg.logging.log_every)
    try:
        for step in range(start + 1, cfg.total_steps + 1):
            t_step = time.perf_counter()
            k_rollout, k_meta = jax.random.split(jax.random.fold_in(base_key, step))
            problems = next(data_iter)
            ro = run_rollouts(
                sampler=sampler,
                params=state.params,
                tokenizer=tokenizer,
                problems=problems,
                render_prompt=render,
                sampling=rollout_sampling,
                key=k_rollout,
                verify=pool.score,
                advantage=cfg.algorithm.advantage,
                max_prompt_tokens=cfg.data.max_prompt_tokens,
                pad_id=pad_id,
                batch_multiple=dp,
            )
            metrics = ro.metrics()
            timings = {f"time/{k}": v for k, v in ro.timings.items()}
            mel_batch = no_mel
            if pipeline is not None:
                meta = pipeline.run(
                    step,
                    problems,
                    ro.texts,
                    ro.rewards,
                    cfg.rollout.group_size,
                    state.params,
                    k_meta,
                )
                mel_batch = meta.batch
                metrics.update(meta.metrics())
                metrics["retention_ratio"] = meta.retention_ratio
                timings["time/meta_analysis"] = meta.timings.get("analysis_s", 0.0)
                timings["time/meta_replay"] = meta.timings.get("replay_s", 0.0)
            policy = ro.batch
            if ref_params is not None:
                policy = policy.replace(ref_logprobs=compute_logprobs(ref_params, policy.seq))
            t_update = time.perf_counter()
            state, updates = train_on_batch(
                state,
                TrainBatch(policy=policy, mel=mel_batch),
                train_step,
                num_passes=cfg.algorithm.num_passes,
                old_logprobs=cfg.algorithm.old_logprobs,
                compute_logprobs=compute_logprobs,
            )
            metrics.update(_scalars(updates))
            timings["time/update"] = time.perf_counter() - t_update
            timings["time/step"] = time.perf_counter() - t_step
            gen_tokens = float(ro.sample.lengths.sum())
            metrics["rollout_tokens_per_s"] = gen_tokens / max(ro.timings["rollout"], 1e-9)
            train_tokens = float(
                np.asarray(policy.seq.kv_mask).sum() + np.asarray(mel_batch.kv_mask).sum()
            )
            metrics["update_tokens_per_s"] = train_tokens / max(timings["time/update"], 1e-9)
            if evaluator is not None and (
                step % cfg.eval.every_steps == 0 or step == cfg.total_steps
            ):
                t_eval = time.perf_counter()
                metrics.update(evaluator(step, graphdef, state.params))
                timings["time/eval"] = time.perf_counter() - t_eval
            metrics.update(timings)
            writer.write(step, metrics)
            progress.update(step, cfg.total_steps, metrics)
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.total_steps:
                ckpt.save(
                    step,
                    state,
                    {
                        "data_iterator": data_iter.get_state(),
                        "config": cfg.to_json(),
                        "step": step,
                    },
                )
    finally:
        progress.close()
        pool.close()
        writer.close()
        ckpt.close()
    export_dir = None
    if cfg.export.at_end and cfg.total_steps > start:
        export_dir = os.path.join(workdir, EXPORT_DIR)
        save_pretrained(
            nnx.merge(graphdef, state.params),
            export_dir,
            tokenizer=tokenizer,
            dtype=cfg.export.dtype or None,
        )
    return TrainSummary(
        workdir=workdir,
        start_step=start,
        final_step=cfg.total_steps,
        records=read_metrics(workdir) if is_chief else [],
        export_dir=export_dir,
    )


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
