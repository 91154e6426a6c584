"""MEL wiring: a kept meta-experience from the pipeline reaches the update step and is learned."""

import jax
import numpy as np

from meljax.data.prompts import PromptConfig
from meljax.meta import MetaConfig, MetaExperiencePipeline
from meljax.models.tokenizer import make_tiny_tokenizer
from meljax.rewards import RewardResult
from meljax.rl.batch import TrainBatch, build_policy_batch
from meljax.rl.objective import LossConfig
from meljax.rl.optim import OptimizerConfig, make_optimizer
from meljax.rl.update import init_train_state, make_train_step
from meljax.sampling.policy import Policy
from tests.conftest import scripted_result, small_llama_params
from tests.reference_sampler import SamplerEngine

TOK = make_tiny_tokenizer()
LESSON = (
    "1. Failure point and error pattern\nI counted the wrong way.\n"
    "2. Success factors\nCounting on.\n3. Reflective summary\nI slipped.\n"
    "4. Heuristics\nWhen adding, I must count on from the larger number."
)


class ScriptedPolicy:
    """Sampler double: analyses get LESSON, replays answer 8 (correct)."""

    def sample(self, params, prompts, sampling, key):
        m, rows = sampling.max_new_tokens, []
        for p in prompts:
            text = TOK.decode(list(p))
            reply = "So 8." if "<experience>" in text else LESSON
            ids = (TOK.encode(reply, add_special_tokens=False) + [TOK.eos_token_id])[:m]
            rows += [ids] * sampling.num_samples
        return scripted_result(rows, m)


class Q:
    id, question, answer = "q0", "What is 3 plus 5?", "8"


def test_kept_meta_experience_is_trained_into_the_policy():
    graphdef, params = small_llama_params(len(TOK))

    class LastWord:
        def score(self, completions, answers):
            ok = [
                x.strip().rstrip(".").split()[-1] == y
                for x, y in zip(completions, answers, strict=True)
            ]
            return [RewardResult(float(o), "correct" if o else "mismatch", None) for o in ok]

    prompt_config = PromptConfig(instruction="none")
    policy = Policy(
        TOK,
        SamplerEngine(ScriptedPolicy()),
        prompt_config,
        stop_ids=[TOK.eos_token_id],
        pad_id=TOK.pad_token_id,
    )
    pipeline = MetaExperiencePipeline(
        policy=policy,
        verifier=LastWord(),
        config=MetaConfig(
            analysis_max_prompt_tokens=1600,
            analysis_max_new_tokens=256,  # characters: the whole four-section lesson
            replay_max_new_tokens=16,
            max_pairs_per_query=1,
        ),
    )
    answers = ["It is 8", "It is 7", "It is 8", "It is 9"]
    meta = pipeline.run(None, 1, [Q], answers, [1.0, 0.0, 1.0, 0.0], 4, jax.random.key(0))
    assert meta.counts.kept == 1 and meta.retention_ratio == 1.0
    nll_rows = np.nonzero(meta.batch.weight)[0]
    target = meta.batch.tokens[nll_rows[0]][meta.batch.loss_mask[nll_rows[0]] > 0]
    assert TOK.decode(list(target), skip_special_tokens=True) == LESSON

    prompt = policy.encode(Q.question)
    comps = [TOK.encode(a, add_special_tokens=False) for a in answers]
    policy = build_policy_batch(
        [prompt] * 4, comps, advantages=[0.0] * 4, rewards=[1, 0, 1, 0], group_index=[0] * 4
    )
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=3e-3, weight_decay=0.0))
    step = make_train_step(graphdef, optimizer, LossConfig(lambda_mel=1.0))
    state = init_train_state(params, optimizer)
    nlls = []
    for _ in range(5):
        state, m = step(state, TrainBatch(policy=policy, mel=meta.batch))
        assert float(m["mel_rows"]) == 1.0
        nlls.append(float(m["mel_nll"]))
    # Zero advantages: the policy term is 0, so only the MEL term moves the weights.
    assert nlls[-1] < nlls[0] - 0.1, nlls
