"""Meta-experience pipeline: pairs, templates, parsing, filters, the step with a stub policy,
and end to end with the real sampler on a tiny random model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from meljax.data.prompts import PromptConfig
from meljax.meta import filters, pairs, parse, templates
from meljax.meta.pipeline import MetaConfig, MetaExperiencePipeline
from meljax.rewards import RewardResult, last_boxed
from meljax.sampling import SamplingParams
from meljax.sampling.policy import Policy
from tests.reference_sampler import SamplerEngine, SampleResult

# ----------------------------------------------------------------------------- fixtures


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: one token per UTF-8 byte (+ <pad> 256, <eos> 257).

    Token counts equal byte counts, which makes shortening arithmetic checkable by hand.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<pad>"] = 256
    vocab["<eos>"] = 257
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


TOK = byte_tokenizer()
EOS = TOK.eos_token_id
PAD = TOK.pad_token_id


RAW = "<|user|>\n{question}\n<|assistant|>\n"
PROMPT = PromptConfig(
    prompt_template="raw", raw_template=RAW, instruction="none", max_prompt_tokens=0
)


def render(user: str) -> str:
    return RAW.format(question=user.strip())


def as_policy(engine_like) -> Policy:
    """A real Policy (rendering, encoding, stop handling) over a scripted or real sampler."""
    return Policy(TOK, SamplerEngine(engine_like), PROMPT, stop_ids=[EOS], pad_id=PAD)


def encode(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class P:
    id: str
    question: str
    answer: str


class BoxedVerifier:
    """Verifier double: right when the last box holds the answer."""

    def score(self, completions, answers):
        out = []
        for c, a in zip(completions, answers, strict=True):
            got = last_boxed(c)
            out.append(RewardResult(float(got == a), "correct" if got == a else "mismatch", got))
        return out


class AcceptAll:
    def score(self, completions, answers):
        return [RewardResult(1.0, "correct", None) for _ in completions]


class StubPolicy:
    """Returns fixed texts through the Sampler interface. ``respond(prompt_text)`` gives
    ``(text, truncated)``; a non-truncated text gets the EOS token appended (as the real
    sampler includes the stop token), a truncated one is cut to ``max_new_tokens``."""

    def __init__(self, respond):
        self.respond = respond
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def sample(self, params, prompts, sampling, key) -> SampleResult:
        self.calls.append(([list(p) for p in prompts], sampling))
        m = sampling.max_new_tokens
        rows = []
        for p in prompts:
            text, truncated = self.respond(TOK.decode(list(p)))
            ids = encode(text)
            ids = ids[:m] if truncated else (ids + [EOS])[:m]
            rows.extend([(ids, truncated)] * sampling.num_samples)
        n = len(rows)
        tokens = np.full((n, m), PAD, np.int32)
        mask = np.zeros((n, m), bool)
        for i, (ids, _) in enumerate(rows):
            tokens[i, : len(ids)] = ids
            mask[i, : len(ids)] = True
        return SampleResult(
            tokens=tokens,
            mask=mask,
            logprobs=np.zeros((n, m), np.float32),
            lengths=mask.sum(1).astype(np.int32),
            truncated=np.array([t for _, t in rows], bool),
        )


# ----------------------------------------------------------------------------- pairs


def _select(rewards, seed=0, step=0, max_pairs=2):
    return pairs.select_pairs(
        np.asarray(rewards, float), max_pairs_per_query=max_pairs, rng=pairs.pair_rng(seed, step)
    )


def test_no_mixed_group_gives_no_pairs():
    r = [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert pairs.mixed_groups(np.asarray(r)) == []
    assert _select(r) == []


def test_pairs_one_correct_and_all_but_one_correct():
    r = np.array([[0, 0, 1, 0], [1, 1, 0, 1], [1, 0, 1, 0]])
    got = _select(r, max_pairs=2)
    by_q = {q: [p for p in got if p.question == q] for q in range(3)}
    # one correct of four -> exactly one pair using that correct answer
    assert [(p.correct) for p in by_q[0]] == [2] and len(by_q[0]) == 1
    # one incorrect of four -> exactly one pair using that incorrect answer
    assert [(p.incorrect) for p in by_q[1]] == [2] and len(by_q[1]) == 1
    assert len(by_q[2]) == 2
    assert [p.question for p in got] == sorted(p.question for p in got)
    assert pairs.ContrastivePair(1, 2, 0).rows(4) == (6, 4)


def test_pairs_invariants_random_patterns():
    rng = np.random.default_rng(7)
    for trial in range(50):
        g = int(rng.integers(2, 9))
        r = (rng.random((6, g)) < rng.random()).astype(float)
        max_pairs = int(rng.integers(1, 4))
        got = _select(r, seed=trial, max_pairs=max_pairs)
        for q in range(6):
            qp = [p for p in got if p.question == q]
            c, w = int(r[q].sum()), int(g - r[q].sum())
            assert len(qp) == min(c, w, max_pairs)
            assert all(r[q, p.correct] == 1 and r[q, p.incorrect] == 0 for p in qp)
            used = [p.correct for p in qp] + [p.incorrect for p in qp]
            assert len(used) == len(set(used))  # no answer reused


def test_pairs_deterministic_and_seed_dependent():
    r = np.tile([1, 0, 1, 0, 1, 0, 1, 0], (8, 1)).astype(float)
    assert _select(r, seed=3, step=5) == _select(r, seed=3, step=5)
    others = [_select(r, seed=3, step=s) for s in range(6, 10)]
    assert any(o != _select(r, seed=3, step=5) for o in others)
    assert _select(r, seed=4, step=5) != _select(r, seed=3, step=5)


def test_group_rewards_shape_errors():
    assert pairs.group_rewards([1, 0, 0, 1], 2).shape == (2, 2)
    with pytest.raises(ValueError, match="groups of 3"):
        pairs.group_rewards([1, 0, 0, 1], 3)


# ----------------------------------------------------------------------------- templates


def _fill(question, inc, cor, limit, min_answer_tokens=16):
    return templates.fill_analysis_prompt(
        question,
        inc,
        cor,
        template=templates.DEFAULT_ANALYSIS_TEMPLATE,
        render=render,
        encode=encode,
        cutter=templates.TokenCutter(TOK),
        max_prompt_tokens=limit,
        min_answer_tokens=min_answer_tokens,
    )


def test_fill_short_answers_unchanged_incorrect_first():
    out = _fill("What is 2+3?", "2+3=6 so \\boxed{6}", "2+3=5 so \\boxed{5}", 4000)
    assert out.omitted == (0, 0)
    assert out.ids == encode(out.text)
    text = out.text
    assert text.startswith("<|user|>\n") and text.endswith("<|assistant|>\n")
    s1, s2 = text.index("Solution 1:"), text.index("Solution 2:")
    assert s1 < text.index("\\boxed{6}") < text.index("<judge>Incorrect</judge>") < s2
    assert s2 < text.index("\\boxed{5}") < text.index("<judge>Correct</judge>")
    assert "<question>\nWhat is 2+3?\n</question>" in text


def test_fill_shortens_long_answers_in_the_middle():
    question = "Q: " + "long question words " * 20
    inc = "HEAD-INC " + "a" * 3000 + " TAIL-INC"
    cor = "HEAD-COR " + "b" * 2000 + " TAIL-COR"
    limit = 1800
    out = _fill(question, inc, cor, limit)
    assert out is not None and len(out.ids) <= limit
    assert len(out.ids) >= limit - 8  # the budget is used, not thrown away
    assert question in out.text  # never shortened
    for original, head, tail, omitted in (
        (inc, "HEAD-INC", "TAIL-INC", out.omitted[0]),
        (cor, "HEAD-COR", "TAIL-COR", out.omitted[1]),
    ):
        m = re.search(
            re.escape(head)
            + r" (a*|b*)\n\[\.\.\. (\d+) tokens omitted \.\.\.\]\n(a*|b*) "
            + re.escape(tail),
            out.text,
        )
        assert m, "marker with head and tail around it"
        n = int(m.group(2))
        assert n == omitted > 0
        head_len = len(head) + 1 + len(m.group(1))
        tail_len = len(m.group(3)) + 1 + len(tail)
        assert head_len + tail_len + n == len(original)  # byte tokenizer: tokens == characters
        assert 0 <= head_len - tail_len <= 1  # the head keeps the (larger) half


def test_fill_short_answer_kept_whole_when_other_is_long():
    inc = "x" * 50
    cor = "HEAD " + "y" * 4000 + " TAIL"
    out = _fill("What?", inc, cor, 1600)
    assert out.omitted[0] == 0 and out.omitted[1] > 0
    assert f"<answer>\n{inc}\n</answer>" in out.text
    assert len(out.ids) <= 1600


def test_fill_question_too_long_returns_none():
    assert _fill("q" * 3000, "a" * 100, "b" * 100, 2000) is None


def test_shorten_middle_fits():
    cutter = templates.TokenCutter(TOK)
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    short, omitted = templates.shorten_middle(text, 100, cutter)
    marker = templates.omission_marker(omitted)
    assert cutter.count(short) == 100 and marker in short
    assert omitted == 500 - (100 - len(marker))
    assert text.startswith(short.split("\n")[0]) and text.endswith(short.split("\n")[-1])
    assert templates.shorten_middle("short", 100, cutter) == ("short", 0)


def test_fill_template_single_pass_and_latex_braces():
    t = "Q: {question} ans \\boxed{} {other}"
    out = templates.fill_template(t, {"question": "has {question} inside"})
    assert out == "Q: has {question} inside ans \\boxed{} {other}"


def test_replay_prompt_structure():
    text = templates.fill_replay_prompt(
        "  LESSON  ", "What is 1+1?", template=templates.DEFAULT_REPLAY_TEMPLATE
    )
    assert text.index("LESSON") < text.index("What is 1+1?")
    assert "\\boxed{}" in text and "{" + "instruction}" not in text


def test_load_template_sources(tmp_path):
    default = templates.DEFAULT_REPLAY_TEMPLATE
    req = templates.REPLAY_FIELDS
    assert templates.load_template(None, default=default, required=req) == default
    assert templates.load_template("", default=default, required=req) == default
    f = tmp_path / "replay.txt"
    f.write_text("Notes: {experience}\nSolve: {question}", encoding="utf-8")
    got = templates.load_template(str(f), default=default, required=req)
    assert got == "Notes: {experience}\nSolve: {question}"
    inline = "N {experience} Q {question}"
    assert templates.load_template(inline, default=default, required=req) == inline
    with pytest.raises(ValueError, match=r"\{experience\}"):
        templates.load_template("Q {question}", default=default, required=req, what="replay")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        templates.load_template(str(tmp_path / "missing.txt"), default=default, required=req)


# ----------------------------------------------------------------------------- parsing

WELL_FORMED = """Let me look at both solutions.

1. Failure point and error pattern
Solution 1 dropped a sign in step 3.

**2. Success Factors:** careful bookkeeping.
It checked the result.

### 3. Reflective summary
I review, I learn, I act.

4) Heuristics (general rules)
- If a subtraction is moved across, then flip its sign.
"""


def test_parse_well_formed():
    p = parse.parse_analysis(WELL_FORMED)
    assert not p.malformed
    assert p.failure == "Solution 1 dropped a sign in step 3."
    assert p.success == "careful bookkeeping.\nIt checked the result."
    assert p.summary == "I review, I learn, I act."
    assert p.heuristics == "- If a subtraction is moved across, then flip its sign."


def test_parse_malformed_counted_not_raised():
    p = parse.parse_analysis("1. Failure point: sign error\n2. Success factors: care\n")
    assert p.malformed and p.failure == "sign error" and p.success == "care"
    assert p.summary is None and p.heuristics is None
    assert parse.parse_analysis("").malformed
    # prose that merely starts with a key word is not a heading
    q = parse.parse_analysis("Success depends on care.\nHeuristics are nice.")
    assert q.success is None and q.heuristics is None


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "text,answer,leak",
    [
        ("so we get 18 apples", "8", False),
        ("the value 8.5 is wrong", "8", False),
        ("it is 2.8 in total", "8", False),
        ("hence x=8 follows", "8", True),
        ("final \\boxed{8}", "8", True),
        ("the answer is 8.", "8", True),
        ("written as 8.0", "8", True),
        ("a ratio 8/3", "8", False),
        ("\\frac{8}{3} or \\frac{3}{8}", "8", False),
        ("so x = -8 here", "8", False),
        ("10-8 = 2", "8", True),
        ("we got \\frac{1}{2}", "\\frac{1}{2}", True),
        ("we got \\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("we got \\frac{1}{23}", "\\frac{1}{2}", False),
        ("half, i.e. 1/2", "\\frac{1}{2}", True),
        ("we got 11/2", "\\frac{1}{2}", False),
        ("total 1,000 items", "1000", True),
        ("answer 025", "25", True),
        ("gives 12\\sqrt{3}", "2\\sqrt{3}", False),
        ("gives 2 \\sqrt{3}", "2\\sqrt{3}", True),
        ("The answer is C", "C", True),
        ("C is a constant", "C", False),
        ("nothing here", "", False),
    ],
)
def test_leak_filter(text, answer, leak):
    assert filters.contains_answer(text, answer) is leak


def test_filter_reason_order():
    leaky = WELL_FORMED + "so x=8\n"
    assert filters.filter_reason("  \n", truncated=True, answer="8") == "empty"
    assert filters.filter_reason(leaky, truncated=True, answer="8") == "truncated"
    assert filters.filter_reason("x=8", truncated=False, answer="8") == "malformed"
    assert filters.filter_reason(leaky, truncated=False, answer="8") == "leak"
    assert filters.filter_reason(leaky, truncated=False, answer="8", check_leaks=False) == "ok"
    assert filters.filter_reason("x=8", truncated=False, answer="8", check_malformed=False) == (
        "leak"
    )
    off = dict(check_leaks=False, check_malformed=False)
    assert filters.filter_reason("x=8", truncated=False, answer="8", **off) == "ok"


# What the SmolLM2 demo wrote and kept before the quality filter existed (issue 15).
GREETING = "I'm ready to help with your math problem. What's on your mind?"
BARE_HEADINGS = """1. Failure point and error pattern
2. Success factors
3. Reflective summary (first person: review, insight, action)
4. Heuristics (general rules)
"""


@pytest.mark.parametrize(
    "text,missing",
    [
        (GREETING, ("failure", "success", "summary", "heuristics")),
        (BARE_HEADINGS, ()),  # every heading, but the heuristics say nothing
        (BARE_HEADINGS + "- ...\n* 1.\n", ()),  # bullets and numbers are no rule
        (WELL_FORMED.split("4) Heuristics")[0], ("heuristics",)),
    ],
)
def test_analysis_without_a_lesson_is_malformed_and_dropped(text, missing):
    p = parse.parse_analysis(text)
    assert p.malformed and not p.has_heuristic
    assert p.missing_sections == missing
    assert filters.filter_reason(text, truncated=False, answer="7") == "malformed"
    # the switch: kept for replay when the quality filter is off
    assert filters.filter_reason(text, truncated=False, answer="7", check_malformed=False) == "ok"


def test_analysis_with_sections_and_a_heuristic_passes():
    p = parse.parse_analysis(BARE_HEADINGS + "When adding, I count on from the larger number.")
    assert not p.malformed and p.has_heuristic and p.missing_sections == ()
    assert p.heuristics == "When adding, I count on from the larger number."
    assert filters.filter_reason(WELL_FORMED, truncated=False, answer="7") == "ok"


# ----------------------------------------------------------------------------- the step (stub)

GOOD_A = WELL_FORMED.replace("step 3", "one step") + "LESSON-A\n"
GOOD_B = "1. Failure point and error pattern\nsign slip\n2. Success factors\ncare\nLESSON-B\n"
LEAKY = WELL_FORMED + "Clearly x = 8 here.\n"

PROBLEMS = [
    P("q0", "Compute twelve.", "12"),
    P("q1", "Compute eight.", "8"),
    P("q2", "Compute three.", "3"),
    P("q3", "Compute seven.", "7"),
]
REWARDS = np.array([[0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]], float)
COMPLETIONS = [
    f"work of q{i} g{g} \\boxed{{{int(REWARDS[i, g])}}}" for i in range(4) for g in range(4)
]


def analysis_respond(prompt: str) -> tuple[str, bool]:
    if "<experience>" in prompt:  # replay
        if "LESSON-A" in prompt:
            return "seven it is \\boxed{7}", False
        if "LESSON-B" in prompt:
            return "I think \\boxed{5}", False
        raise AssertionError("replay of an analysis that should have been filtered")
    inc = re.search(r"Solution 1:\n<answer>\nwork of (q\d) (g\d)", prompt).groups()
    table = {
        "q0": ("   \n ", False),  # empty
        ("q1", "g0"): (WELL_FORMED * 40, True),  # cut off by the length limit
        ("q1", "g1"): (LEAKY, False),
        ("q3", "g1"): (GOOD_A, False),
        ("q3", "g3"): (GOOD_B, False),
    }
    return table.get(inc[0]) or table[inc]


def make_pipeline(policy, tmp_path, **cfg):
    config = MetaConfig(
        analysis_max_prompt_tokens=1600,
        analysis_max_new_tokens=400,
        replay_max_new_tokens=64,
        replay_temperature=0.7,
        seed=1,
        **cfg,
    )
    return MetaExperiencePipeline(
        policy=as_policy(policy), verifier=BoxedVerifier(), config=config, workdir=str(tmp_path)
    )


def test_step_with_stub_policy(tmp_path):
    policy = StubPolicy(analysis_respond)
    pipe = make_pipeline(policy, tmp_path)
    res = pipe.run(None, 3, PROBLEMS, COMPLETIONS, REWARDS.reshape(-1), 4, jax.random.key(0))
    c = res.counts
    assert (c.questions, c.mixed_groups, c.pairs, c.generated) == (4, 3, 5, 5)
    # GOOD_B has no heuristics section: dropped as malformed before replay
    assert (c.empty, c.truncated, c.malformed, c.leak, c.replayed, c.kept) == (1, 1, 1, 1, 1, 1)
    assert res.retention_ratio == pytest.approx(1 / 5)
    assert res.replay_pass_ratio == pytest.approx(1 / 1)

    # two sampler calls: all 5 analyses, then the survivor's replay, each with its params
    assert len(policy.calls) == 2
    (a_prompts, a_params), (r_prompts, r_params) = policy.calls
    assert len(a_prompts) == 5 and len(r_prompts) == 1
    assert a_params == SamplingParams(max_new_tokens=400, temperature=1.0, num_samples=1)
    assert r_params == SamplingParams(max_new_tokens=64, temperature=0.7, num_samples=1)
    assert all(len(p) <= 1600 for p in a_prompts)
    assert all("LESSON-" in TOK.decode(p) and "Compute seven." in TOK.decode(p) for p in r_prompts)

    # the NLL batch: fixed shape, one real row = context (no loss) + GOOD_A + EOS (loss)
    b = res.batch
    assert b.tokens.shape == (8, 1600 + 400)  # 2 pairs x 4 questions; prompt + new
    np.testing.assert_array_equal(b.weight, [1] + [0] * (b.tokens.shape[0] - 1))
    ctx = next(p for p in a_prompts if "Solution 1:\n<answer>\nwork of q3 g1" in TOK.decode(p))
    target = encode(GOOD_A) + [EOS]
    row = ctx + target
    np.testing.assert_array_equal(b.tokens[0, : len(row)], row)
    np.testing.assert_array_equal(b.tokens[0, len(row) :], PAD)
    expect_loss = np.zeros(b.tokens.shape[1])
    expect_loss[len(ctx) : len(row)] = 1
    np.testing.assert_array_equal(b.loss_mask[0], expect_loss)
    assert b.loss_mask[1:].sum() == 0 and not b.kv_mask[1:].any()
    assert b.kv_mask[0].sum() == len(row)

    # the log: one record per generated analysis, flags matching
    lines = (tmp_path / "meta_experiences.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines]
    assert recs == res.records and len(recs) == 5
    status = {(r["question_id"], r["pair"]["incorrect"]): r["status"] for r in recs}
    assert status[("q1", 0)] == "truncated" and status[("q1", 1)] == "leak"
    assert status[("q3", 1)] == "kept" and status[("q3", 3)] == "malformed"
    assert [r["status"] for r in recs if r["question_id"] == "q0"] == ["empty"]
    # the quality flag is set whatever the fate (the empty one has no sections either)
    assert sorted(r["malformed"] for r in recs) == [False, False, False, True, True]
    for r in recs:
        flags = {k: r[k] for k in ("empty", "truncated", "leak", "replay_failed", "kept")}
        flags["malformed"] = r["status"] == "malformed"
        assert sum(flags.values()) == 1 and flags[r["status"]]
        assert r["step"] == 3 and REWARDS[int(r["question_id"][1]), r["pair"]["correct"]] == 1
        assert REWARDS[int(r["question_id"][1]), r["pair"]["incorrect"]] == 0
    kept = next(r for r in recs if r["kept"])
    assert kept["replay_score"] == 1.0 and kept["replay_text"] == "seven it is \\boxed{7}"
    assert kept["sections"]["heuristics"].startswith("- If a subtraction")
    metrics = res.metrics()
    assert metrics["mel/kept"] == 1.0 and metrics["mel/retention_ratio"] == pytest.approx(0.2)

    # same step and seed -> same pairs and records; appended, not overwritten
    res2 = pipe.run(None, 3, PROBLEMS, COMPLETIONS, REWARDS, 4, jax.random.key(0))
    assert res2.records == res.records
    assert len((tmp_path / "meta_experiences.jsonl").read_text().splitlines()) == 10


def test_quality_filter_switch(tmp_path):
    policy = StubPolicy(analysis_respond)
    pipe = make_pipeline(policy, tmp_path, filter_malformed=False)
    res = pipe.run(None, 3, PROBLEMS, COMPLETIONS, REWARDS, 4, jax.random.key(0))
    c = res.counts
    # GOOD_B (no heuristics) now reaches the replay, which answers wrongly
    assert (c.empty, c.truncated, c.malformed, c.leak, c.replayed, c.kept) == (1, 1, 0, 1, 2, 1)
    status = {(r["question_id"], r["pair"]["incorrect"]): r["status"] for r in res.records}
    assert status[("q3", 3)] == "replay_failed"
    assert next(r for r in res.records if r["status"] == "replay_failed")["malformed"]


def test_leak_filter_switch(tmp_path):
    policy = StubPolicy(lambda p: ("\\boxed{8}", False) if "<experience>" in p else (LEAKY, False))
    r = np.array([[0, 1]], float)
    prob = [P("q1", "Compute eight.", "8")]
    on = make_pipeline(policy, tmp_path).run(None, 0, prob, ["a", "b"], r, 2, jax.random.key(0))
    assert (on.counts.leak, on.counts.kept) == (1, 0)
    off = make_pipeline(policy, tmp_path, filter_leaks=False).run(
        None, 0, prob, ["a", "b"], r, 2, jax.random.key(0)
    )
    assert (off.counts.leak, off.counts.kept) == (0, 1)


def test_no_mixed_group_skips_sampling(tmp_path):
    policy = StubPolicy(lambda p: pytest.fail("the sampler must not be called"))
    pipe = make_pipeline(policy, tmp_path)
    r = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], float)
    res = pipe.run(None, 0, PROBLEMS, COMPLETIONS, r, 4, jax.random.key(0))
    assert policy.calls == []
    assert res.counts.pairs == res.counts.generated == res.counts.kept == 0
    assert res.records == [] and res.retention_ratio == 0.0
    b = res.batch
    assert b.tokens.shape == (8, 2000)  # same shape as a step with kept rows
    assert not b.kv_mask.any() and b.loss_mask.sum() == 0 and b.weight.sum() == 0
    assert not (tmp_path / "meta_experiences.jsonl").exists()


def test_non_chief_writes_nothing_and_input_checks(tmp_path):
    policy = StubPolicy(analysis_respond)
    pipe = MetaExperiencePipeline(
        policy=as_policy(policy),
        verifier=BoxedVerifier(),
        config=MetaConfig(analysis_max_prompt_tokens=1600, analysis_max_new_tokens=400),
        workdir=str(tmp_path),
        is_chief=False,
    )
    res = pipe.run(None, 0, PROBLEMS, COMPLETIONS, REWARDS, 4, jax.random.key(0))
    assert res.counts.generated == 5 and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="completions"):
        pipe.run(None, 0, PROBLEMS, COMPLETIONS[:-1], REWARDS, 4, jax.random.key(0))

    class Limited(StubPolicy):
        max_prompt_len = 512

    with pytest.raises(ValueError, match="max_prompt_len=512"):
        MetaExperiencePipeline(policy=as_policy(Limited(None)), verifier=AcceptAll())


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_tiny_model(tmp_path):
    from flax import nnx

    from meljax.models import ModelConfig, build_model
    from tests.reference_sampler import Sampler

    cfg = ModelConfig(
        vocab_size=258,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=2048,
    )
    rng = np.random.default_rng(0)  # numpy weights: no per-shape jitted initialisers to compile
    model = build_model(cfg, lambda spec, shape: rng.normal(0, 0.5, shape).astype(np.float32))
    graphdef, params = nnx.split(model)
    # half the byte values stop a row, so a random model produces short, finished analyses
    # one prompt bucket: the analysis and replay passes share a single compiled program
    sampler = Sampler(
        graphdef, stop_token_ids=[EOS, *range(0, 128)], pad_id=PAD, prompt_buckets=(512,)
    )
    template = "Q {question}\nS1 {incorrect_answer} Incorrect\nS2 {correct_answer} Correct"
    config = MetaConfig(
        analysis_template=template,
        filter_malformed=False,  # a random model writes no sections
        analysis_max_prompt_tokens=160,
        analysis_max_new_tokens=8,
        replay_max_new_tokens=8,
    )
    policy = as_policy(sampler)
    weights = policy.prepare(params)
    pipe = MetaExperiencePipeline(
        policy=policy, verifier=AcceptAll(), config=config, workdir=str(tmp_path)
    )
    comps = [f"answer {g} " + "z" * 200 for g in range(8)]  # long: shortened to fit
    r = np.array([[1, 0, 1, 0], [0, 1, 1, 1]], float)
    probs = [P("a", "first question", "99999"), P("b", "second one", "88888")]
    res = pipe.run(weights, 0, probs, comps, r, 4, jax.random.key(1))
    c = res.counts
    assert c.pairs == c.generated == 3 and c.shortened == 3
    assert c.empty + c.truncated + c.leak + c.replayed == c.generated and c.malformed == 0
    assert c.kept == c.replayed >= 1  # the verifier accepts everything
    b = res.batch
    assert b.tokens.shape == (4, 168) and b.weight.sum() == c.kept
    kept = [rec for rec in res.records if rec["kept"]]
    for i, rec in enumerate(kept):
        n_ctx, n_m = rec["prompt_tokens"], rec["num_tokens"]
        assert n_ctx <= 160 and 1 <= n_m <= 8
        np.testing.assert_array_equal(b.loss_mask[i, n_ctx : n_ctx + n_m], 1)
        assert b.loss_mask[i].sum() == n_m and b.kv_mask[i].sum() == n_ctx + n_m
    assert res.timings["analysis_s"] > 0
    again = pipe.run(weights, 0, probs, comps, r, 4, jax.random.key(1))
    np.testing.assert_array_equal(again.batch.tokens, b.tokens)
    assert len((tmp_path / "meta_experiences.jsonl").read_text().splitlines()) == 6


def test_bucketed_nll_batch(tmp_path):
    fixed = make_pipeline(StubPolicy(analysis_respond), tmp_path).run(
        None, 3, PROBLEMS, COMPLETIONS, REWARDS, 4, jax.random.key(0)
    )
    pipe = make_pipeline(StubPolicy(analysis_respond), tmp_path, nll_bucketed=True)
    res = pipe.run(None, 3, PROBLEMS, COMPLETIONS, REWARDS, 4, jax.random.key(0))
    row_len = int(fixed.batch.kv_mask[0].sum())
    t = min(b for b in (32, 64, 128, 256, 512, 1024, 2000) if b >= row_len)
    assert res.batch.tokens.shape == (1, t)  # one kept row; T capped at 1600 + 400
    np.testing.assert_array_equal(res.batch.tokens[0], fixed.batch.tokens[0, :t])
    np.testing.assert_array_equal(res.batch.loss_mask[0], fixed.batch.loss_mask[0, :t])
    empty = np.zeros((4, 4))
    none = pipe.run(None, 0, PROBLEMS, COMPLETIONS, empty, 4, jax.random.key(0))
    assert none.batch.tokens.shape == (1, 32) and none.batch.weight.sum() == 0
