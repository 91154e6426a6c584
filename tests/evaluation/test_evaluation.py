"""Tests of ``meljax.evaluation`` and the ``meljax eval`` command."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from meljax.data import Problem
from meljax.data.prompts import PromptConfig
from meljax.evaluation import (
    BenchmarkSpec,
    EvalConfig,
    evaluate,
    load_benchmarks,
    mean_interval,
    parse_benchmark_specs,
    pass_at_k,
    wilson_interval,
)
from meljax.rewards import RewardConfig, Verifier
from meljax.sampling import SamplingParams
from meljax.sampling.policy import Policy, stop_token_ids
from tests.reference_sampler import Sampler, SamplerEngine, SampleResult

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "eval")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "meljax", "configs", "tiny.py")


# ---------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


def test_pass_at_k_matches_enumeration_of_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = float(brute_force_pass_at_k(n, c, k))
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset has a correct sample
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is c / n
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 100) has ~140 digits; the product form must still agree with exact arithmetic.
    exact = 1 - Fraction(math.comb(990, 100), math.comb(1000, 100))
    assert pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)


@pytest.mark.parametrize(
    "n, c, k, error",
    [
        (0, 0, 1, ValueError),
        (5, 6, 1, ValueError),
        (5, -1, 1, ValueError),
        (5, 2, 0, ValueError),
        (5, 2, 6, ValueError),
        (5.0, 2, 1, TypeError),
        (5, True, 1, TypeError),
    ],
)
def test_pass_at_k_rejects_bad_arguments(n, c, k, error):
    with pytest.raises(error):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------
# Aggregation with a scripted sampler (known right and wrong answers).
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from meljax.models.tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer()


class ScriptedSampler:
    """Test double of ``Sampler``: fixed completions, looked up by the question in the prompt.

    Greedy calls (temperature 0) return ``greedy[q]``; sampled calls return ``samples[q]``,
    row ``i*G + g`` = sample ``g`` of prompt ``i``. Completions listed in ``truncated`` get no
    stop token (as if cut by ``max_new_tokens``); the others end with EOS.
    """

    def __init__(self, tokenizer, greedy, samples, truncated=()):
        self.tok = tokenizer
        self.greedy = greedy
        self.samples = samples
        self.truncated = set(truncated)
        self.calls: list[tuple[int, SamplingParams]] = []

    def _question(self, prompt_ids):
        text = self.tok.decode(prompt_ids)
        found = [q for q in self.greedy if q in text]
        assert len(found) == 1, text
        return found[0]

    def sample(self, params, prompts, sampling, key):
        self.calls.append((len(prompts), sampling))
        texts = []
        for p in prompts:
            q = self._question(p)
            outs = [self.greedy[q]] if sampling.temperature == 0 else self.samples[q]
            assert len(outs) == sampling.num_samples
            texts += outs
        rows = []
        for t in texts:
            ids = self.tok.encode(t, add_special_tokens=False)
            rows.append(ids if t in self.truncated else ids + [self.tok.eos_token_id])
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), self.tok.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            mask[i, : len(r)] = True
        return SampleResult(
            tokens=tokens,
            mask=mask,
            logprobs=np.zeros(tokens.shape, np.float32),
            lengths=mask.sum(1).astype(np.int32),
            truncated=np.array([t in self.truncated for t in texts]),
        )


@dataclasses.dataclass
class Verdict:
    """What a verifier returns (``meljax.rewards.RewardResult``'s fields)."""

    score: float
    reason: str
    extracted: str | None


def B(x):  # noqa: N802 - reads like the LaTeX it writes
    return "The answer is \\boxed{" + x + "}."


# Benchmark "alpha": a1 greedy right, 2/4 samples right; a2 greedy wrong, 0/4 right.
# Benchmark "beta": b1 greedy right, 4/4; b2 greedy wrong, 1/4; b3 greedy right, 3/4.
GREEDY = {
    "apples?": B("4"),
    "pears?": B("8"),
    "plums?": B("10"),
    "figs?": "I do not know...",
    "kiwis?": B("12"),
}
SAMPLES = {
    "apples?": [B("4"), B("5"), B("4"), "no box"],
    "pears?": [B("1"), B("2"), B("3"), B("6")],
    "plums?": [B("10")] * 4,
    "figs?": [B("9"), B("3"), B("1"), B("4")],
    "kiwis?": [B("12"), B("12"), B("2"), B("12")],
}
ANSWERS = {"apples?": "4", "pears?": "7", "plums?": "10", "figs?": "3", "kiwis?": "12"}


def problems(*questions):
    return [Problem(id=f"id-{q[:-1]}", question=q, answer=ANSWERS[q]) for q in questions]


BENCHMARKS = {"alpha": problems("apples?", "pears?"), "beta": problems("plums?", "figs?", "kiwis?")}


def scripted_policy(tok, sampler, max_rows=8):
    prompt = PromptConfig(instruction="none")
    return Policy(
        tok,
        SamplerEngine(sampler, max_rows=max_rows),
        prompt,
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
    )


# math-verify in this process: no worker start-up in tests
IN_PROCESS = Verifier(RewardConfig(num_workers=0))


def scripted_report(tok, verifier=IN_PROCESS, **kw):
    sampler = ScriptedSampler(tok, GREEDY, SAMPLES, truncated={"I do not know..."})
    args = dict(num_samples=4, pass_ks=(1, 2, 4), keep_sample_completions=True)
    args.update(kw)
    policy = scripted_policy(tok, sampler)
    report = evaluate(policy, None, verifier, BENCHMARKS, EvalConfig(**args), progress=False)
    return report, sampler


def test_metrics_per_benchmark_and_macro_average(tok):
    report, _ = scripted_report(tok)
    alpha, beta, avg = report.benchmarks["alpha"], report.benchmarks["beta"], report.average
    # alpha: pass@1 = 1/2; avg@4 = (2/4 + 0)/2; pass@2 = (1 - C(2,2)/C(4,2) + 0)/2 = (5/6)/2.
    assert alpha.pass1 == pytest.approx(0.5)
    assert alpha.avg == pytest.approx(0.25)
    assert alpha.pass_at[2] == pytest.approx(5 / 12)
    assert alpha.pass_at[4] == pytest.approx(0.5)
    # beta: pass@1 = 2/3; avg@4 = (1 + 1/4 + 3/4)/3; pass@2 = (1 + 1/2 + 1)/3; pass@4 = 1.
    assert beta.pass1 == pytest.approx(2 / 3)
    assert beta.avg == pytest.approx(2 / 3)
    assert beta.pass_at[2] == pytest.approx(5 / 6)
    assert beta.pass_at[4] == pytest.approx(1.0)
    # Sampled pass@1 is the mean of c/n.
    assert alpha.pass_at[1] == pytest.approx(alpha.avg) and beta.pass_at[1] == pytest.approx(2 / 3)
    # Macro average: each benchmark weighs the same (the micro pass@1 would be 3/5).
    assert avg.pass1 == pytest.approx((0.5 + 2 / 3) / 2)
    assert avg.avg == pytest.approx((0.25 + 2 / 3) / 2)
    assert avg.pass_at[2] == pytest.approx((5 / 12 + 5 / 6) / 2)
    assert avg.pass_at[4] == pytest.approx(0.75)
    assert (alpha.num_problems, beta.num_problems, avg.num_problems) == (2, 3, 5)
    # One greedy completion out of 5 was cut; its length is the text without a stop token.
    assert beta.greedy_truncated == pytest.approx(1 / 3)
    assert alpha.greedy_truncated == 0.0


def test_records_hold_each_problem_s_completions(tok):
    report, _ = scripted_report(tok)
    recs = {r.id: r for r in report.records}
    assert [r.id for r in report.records] == [p.id for ps in BENCHMARKS.values() for p in ps]
    a1, a2, b2 = recs["id-apples"], recs["id-pears"], recs["id-figs"]
    assert a1.benchmark == "alpha" and b2.benchmark == "beta"
    assert (a1.question, a1.answer) == ("apples?", "4")
    assert a1.greedy_completion == B("4")  # decoded without the EOS token
    assert a1.greedy_extracted == "4" and a1.greedy_correct is True
    assert a2.greedy_extracted == "8" and a2.greedy_correct is False
    assert b2.greedy_completion == "I do not know..." and b2.greedy_truncated is True
    assert b2.greedy_tokens == len("I do not know...")  # char-level tokenizer
    assert a1.greedy_tokens == len(B("4")) + 1 and a1.greedy_truncated is False  # + EOS
    # Samples stay in the sampler's row order i*G + g.
    assert a1.sample_extracted[:3] == ["4", "5", "4"]
    assert a1.sample_correct == [True, False, True, False]
    assert a1.num_correct == 2 and a1.num_samples == 4
    assert b2.sample_extracted == ["9", "3", "1", "4"] and b2.num_correct == 1
    assert recs["id-kiwis"].num_correct == 3 and recs["id-plums"].num_correct == 4
    assert a1.sample_completions == SAMPLES["apples?"]


def test_passes_use_the_protocol_s_sampling_settings_and_batches(tok):
    report, sampler = scripted_report(tok, temperature=0.7, max_new_tokens=33)
    greedy_calls = [c for c in sampler.calls if c[1].temperature == 0]
    sampled_calls = [c for c in sampler.calls if c[1].temperature != 0]
    # batch_size=8 sequences: greedy sends all 5 prompts at once, sampling 8 // 4 = 2 prompts.
    assert [n for n, _ in greedy_calls] == [5]
    assert sorted(n for n, _ in sampled_calls) == [1, 2, 2]
    assert all(s.num_samples == 1 and s.max_new_tokens == 33 for _, s in greedy_calls)
    assert all(
        s.num_samples == 4 and s.temperature == 0.7 and s.max_new_tokens == 33
        for _, s in sampled_calls
    )
    assert len(sampled_calls) == 3


def test_sampled_or_greedy_pass_can_be_skipped(tok):
    report, sampler = scripted_report(tok, num_samples=0, pass_ks=())
    assert all(s.temperature == 0 for _, s in sampler.calls)
    assert report.benchmarks["alpha"].avg is None and report.benchmarks["alpha"].pass_at == {}
    assert all(r.num_samples == 0 and r.sample_extracted == [] for r in report.records)
    assert report.average.pass1 == pytest.approx((0.5 + 2 / 3) / 2)
    assert "Avg@" not in report.table()

    report, sampler = scripted_report(tok, greedy=False)
    assert all(s.temperature > 0 for _, s in sampler.calls)
    assert report.average.pass1 is None and report.records[0].greedy_completion is None
    assert report.average.avg == pytest.approx((0.25 + 2 / 3) / 2)

    with pytest.raises(ValueError, match="nothing to run"):
        scripted_report(tok, greedy=False, num_samples=0, pass_ks=())


def test_table_json_and_files(tok, tmp_path):
    report, _ = scripted_report(tok)
    table = report.table().splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "benchmark",
        "n",
        "Pass@1",
        "Avg@4",
        "Pass@2",
        "Pass@4",
    ]
    rows = {line.strip("|").split("|")[0].strip(): line for line in table[2:]}
    # Each cell: the value, then its 95% interval (Wilson for Pass@1).
    assert rows["alpha"].split("|")[3].strip() == "50.0 (9.5-90.5)"
    assert [c.split()[0] for c in rows["alpha"].strip("|").split("|")] == [
        "alpha",
        "2",
        "50.0",
        "25.0",
        "41.7",
        "50.0",
    ]
    assert [c.split()[0] for c in rows["average"].strip("|").split("|")][:4] == [
        "average",
        "5",
        "58.3",
        "45.8",
    ]

    report_path, records_path = report.write(str(tmp_path / "out" / "report.json"))
    assert records_path == str(tmp_path / "out" / "report.records.jsonl")
    with open(report_path) as f:
        saved = json.load(f)
    assert "records" not in saved and saved["records_file"] == "report.records.jsonl"
    assert saved["benchmarks"]["alpha"]["pass@1"] == pytest.approx(0.5)
    assert saved["benchmarks"]["alpha"]["avg@4"] == pytest.approx(0.25)
    assert saved["benchmarks"]["beta"]["pass@2"] == pytest.approx(5 / 6)
    assert saved["benchmarks"]["beta"]["sampled_pass@1"] == pytest.approx(2 / 3)
    assert saved["average"]["pass@4"] == pytest.approx(0.75)
    assert saved["config"]["num_samples"] == 4 and saved["config"]["pass_ks"] == [1, 2, 4]
    with open(records_path) as f:
        lines = [json.loads(line) for line in f]
    assert [r["id"] for r in lines] == [r.id for r in report.records]
    assert lines[0]["sample_correct"] == [True, False, True, False]
    assert lines[0]["greedy_completion"] == B("4")
    assert report.to_json()["records"] == lines


def test_custom_verifiers_are_used(tok):
    seen = []

    class EverythingRight:
        def score(self, completions, answers):
            seen.append(len(completions))
            return [Verdict(1.0, "ok", "x") for _ in completions]

    class Pool:
        def score(self, completions, answers):
            return [Verdict(0.0, "no", None) for _ in completions]

    report, _ = scripted_report(tok, verifier=EverythingRight())
    assert seen == [5, 20]  # one call per pass: 5 greedy, 5 x 4 sampled
    assert report.average.pass1 == 1.0 and report.average.avg == 1.0
    report, _ = scripted_report(tok, verifier=Pool())
    assert report.average.pass1 == 0.0 and report.average.pass_at[4] == 0.0


def test_evaluate_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="'empty' has no problems"):
        evaluate(scripted_policy(tok, None), None, IN_PROCESS, {"empty": []}, progress=False)
    with pytest.raises(ValueError, match="pass_ks"):
        scripted_report(tok, pass_ks=(5,))
    with pytest.raises(ValueError, match="temperature > 0"):
        scripted_report(tok, temperature=0.0)


# ---------------------------------------------------------------------------------------
# Benchmark specs and files.
# ---------------------------------------------------------------------------------------


def test_parse_benchmark_specs_names_and_presets():
    specs = parse_benchmark_specs(
        ["data/gsm8k/test.jsonl", "math500=some/dir", "data/gsm8k/train.jsonl"]
    )
    assert specs == [
        BenchmarkSpec("gsm8k/test", None, "data/gsm8k/test.jsonl"),
        BenchmarkSpec("math500", "math500", "some/dir"),
        BenchmarkSpec("gsm8k/train", None, "data/gsm8k/train.jsonl"),
    ]
    assert parse_benchmark_specs("aime24=x.jsonl, data/amc23") == [
        BenchmarkSpec("aime24", "aime24", "x.jsonl"),
        BenchmarkSpec("amc23", None, "data/amc23"),
    ]
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        parse_benchmark_specs(["nope=x.jsonl"])
    # no preset: question / answer fields, named after the file (or its folder)
    assert parse_benchmark_specs(["files/mystery.jsonl", "data/sums/test.jsonl"]) == [
        BenchmarkSpec("mystery", None, "files/mystery.jsonl"),
        BenchmarkSpec("sums", None, "data/sums/test.jsonl"),
    ]


def test_load_benchmarks_reads_fixtures_and_names_missing_files():
    specs = parse_benchmark_specs(
        [os.path.join(FIXTURES, "gsm8k", "test.jsonl"), os.path.join(FIXTURES, "math500")]
    )
    loaded, info = load_benchmarks(specs, limit=2)
    assert [p.answer for p in loaded["gsm8k"]] == ["4", "12"]
    assert [p.answer for p in loaded["math500"]] == ["2", "\\frac{1}{2}"]
    assert loaded["math500"][1].question == "$2/4$?"
    assert info["math500"]["num_problems"] == 2 and info["gsm8k"]["preset"] == "gsm8k"
    with pytest.raises(FileNotFoundError, match="no such file or folder: /nope/gsm8k"):
        load_benchmarks(parse_benchmark_specs(["/nope/gsm8k/test.jsonl"]))


# ---------------------------------------------------------------------------------------
# A real (tiny, random) model through the jitted sampler.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tok):
    from flax import nnx

    from meljax.models import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        eos_token_id=tok.eos_token_id,
    )
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_stop_tokens_include_eos_and_end_of_turn(tok, tiny_model):
    ids = stop_token_ids(tok, tiny_model.cfg)
    assert ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def even_length_is_right(completions, answers):
    """A verifier whose verdict the test can recompute from the completion text."""
    return [Verdict(float(len(c) % 2 == 0), "parity", str(len(c))) for c in completions]


def test_tiny_model_report_matches_direct_sampling(tok, tiny_model):
    from flax import nnx

    # Short questions keep every prompt in one length bucket (one compile per pass).
    benchmarks = {
        "arith": [
            Problem(f"a{i}", q, a) for i, (q, a) in enumerate([("1+2?", "3"), ("3+4?", "7")])
        ],
        "more": [
            Problem(f"m{i}", q, a)
            for i, (q, a) in enumerate([("10-7?", "3"), ("6/3?", "2"), ("2*5?", "10")])
        ],
    }
    graphdef, params = nnx.split(tiny_model)
    policy = Policy.build(graphdef, tok, PromptConfig(instruction="none"), max_slots=4)
    weights = policy.prepare(params)
    config = EvalConfig(
        num_samples=2, max_new_tokens=6, temperature=1.0, keep_sample_completions=True
    )

    class EvenLength:
        score = staticmethod(even_length_is_right)

    def run(seed):
        return evaluate(
            policy, weights, EvenLength(), benchmarks, config, seed=seed, progress=False
        )

    report = run(3)
    assert [r.benchmark for r in report.records] == ["arith"] * 2 + ["more"] * 3

    # Greedy completions equal one-prompt-at-a-time sampling with the static reference sampler:
    # sharing 4 slots with the sampled requests did not mix problems up.
    sampler = Sampler(graphdef, stop_token_ids=policy.stop_ids, pad_id=policy.pad_id)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, num_samples=1)
    import jax

    for rec, p in zip(report.records, [*benchmarks["arith"], *benchmarks["more"]], strict=True):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True
        )
        ids = tok.encode(prompt, add_special_tokens=False)
        assert rec.prompt_tokens == len(ids)
        out = sampler.sample(params, [ids], greedy, jax.random.PRNGKey(0))
        assert rec.greedy_completion == tok.decode(out.completion(0), skip_special_tokens=True)
        assert rec.greedy_tokens == int(out.lengths[0]) <= 6
        assert rec.greedy_truncated == bool(out.truncated[0])
        # Verdicts and counts come from this problem's own completions.
        assert rec.greedy_correct == (len(rec.greedy_completion) % 2 == 0)
        assert rec.num_correct == sum(len(c) % 2 == 0 for c in rec.sample_completions)
        assert rec.sample_extracted == [str(len(c)) for c in rec.sample_completions]
        assert all(0 < n <= 6 for n in rec.sample_tokens)

    for name, m in report.benchmarks.items():
        recs = [r for r in report.records if r.benchmark == name]
        assert m.pass1 == pytest.approx(np.mean([r.greedy_correct for r in recs]))
        assert m.avg == pytest.approx(np.mean([r.num_correct / 2 for r in recs]))
        assert m.pass_at[2] == pytest.approx(np.mean([r.num_correct > 0 for r in recs]))
    assert report.timing["greedy"]["generated_tokens"] == sum(
        r.greedy_tokens for r in report.records
    )

    # Same seed: same samples; another seed: other samples.
    again = run(3)
    assert [r.sample_completions for r in again.records] == [
        r.sample_completions for r in report.records
    ]
    other = run(4)
    assert [r.sample_completions for r in other.records] != [
        r.sample_completions for r in report.records
    ]
    assert [r.greedy_completion for r in other.records] == [
        r.greedy_completion for r in report.records
    ]


# ---------------------------------------------------------------------------------------
# The command line, end to end on a saved tiny model.
# ---------------------------------------------------------------------------------------


def run_cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "meljax.commands.eval", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_report_for_saved_model(tok, tiny_model, tmp_path):
    from meljax.models import save_pretrained

    model_dir = save_pretrained(tiny_model, str(tmp_path / "model"), tokenizer=tok)
    gsm8k = os.path.join(FIXTURES, "gsm8k", "test.jsonl")
    math500 = os.path.join(FIXTURES, "math500")
    proc = run_cli(
        f"--config.model.path={model_dir}",
        f"--config.eval.benchmarks={gsm8k},math500={math500}",
        "--config.eval.limit=2",
        "--config.eval.num_samples=2",
        "--config.eval.max_new_tokens=4",
        "--config.rollout.max_slots=4",
        "--config.data.instruction=none",
        "--config.reward.mode=last_number",
        "--config.reward.num_workers=0",
        "--config.logging.progress_bar=off",
        "--config.mesh.fsdp=-1",  # the demo config's one device: here every device
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c.strip() for c in proc.stdout.splitlines()[0].strip("|").split("|")] == [
        "benchmark",
        "n",
        "Pass@1",
        "Avg@2",
        "Pass@2",
    ]
    report_path = tmp_path / "eval_report.json"  # the default, in the current folder
    saved = json.loads(report_path.read_text())
    assert list(saved["benchmarks"]) == ["gsm8k", "math500"]
    assert saved["benchmarks"]["gsm8k"]["num_problems"] == 2
    assert saved["meta"]["answer_mode"] == "last_number" and saved["meta"]["instruction"] == ""
    assert saved["meta"]["model"] == model_dir
    records = [
        json.loads(line)
        for line in (tmp_path / "eval_report.records.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in records] == [
        "gsm8k/0",
        "gsm8k/1",
        "math500/test/prealgebra/1.json",
        "math500/test/prealgebra/2.json",
    ]
    assert all(r["num_samples"] == 2 and len(r["sample_extracted"]) == 2 for r in records)
    assert all(r["greedy_tokens"] <= 4 for r in records)


def test_cli_errors_name_the_missing_path(tmp_path):
    missing = f"--config.eval.benchmarks={tmp_path}/gsm8k/test.jsonl"
    proc = run_cli(f"--config={TINY}", missing, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"no such file or folder: {tmp_path}/gsm8k/test.jsonl" in proc.stderr
    proc = run_cli(
        f"--config.model.path={tmp_path}/missing_model",
        f"--config.eval.benchmarks={os.path.join(FIXTURES, 'gsm8k')}",
        "--config.mesh.fsdp=-1",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "model folder not found" in proc.stderr and "missing_model" in proc.stderr


def test_confidence_intervals_by_hand(tok):
    # Wilson 95% for 1 of 2: center (0.5 + z^2/4) / (1 + z^2/2) = 0.5, half-width 0.4055.
    lo, hi = wilson_interval(1, 2)
    assert (lo, hi) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0) and wilson_interval(10, 10)[
        1
    ] == pytest.approx(1.0)
    # Avg@k: a normal interval over per-problem means (mean 0.5, sd 0.2041, n 4 -> se 0.1021).
    lo, hi, se = mean_interval([0.25, 0.5, 0.75, 0.5])
    assert se == pytest.approx(math.sqrt(0.125 / 3) / 2, abs=1e-9)
    assert (lo, hi) == pytest.approx((0.5 - 1.959964 * se, 0.5 + 1.959964 * se), abs=1e-6)
    # No spread at all (nothing solved): the Wilson interval over the problems, not [0, 0].
    assert mean_interval([0.0, 0.0, 0.0])[:2] == pytest.approx(wilson_interval(0, 3))
    assert wilson_interval(0, 3)[1] == pytest.approx(0.5615, abs=1e-4)
    report, _ = scripted_report(tok)
    alpha, avg = report.benchmarks["alpha"], report.average
    assert alpha.ci["pass@1"] == pytest.approx(wilson_interval(1, 2))
    # alpha's per-problem Avg@4 values are 2/4 and 0/4.
    assert alpha.ci["avg@4"] == pytest.approx(mean_interval([0.5, 0.0])[:2])
    # The macro average's interval combines the benchmarks' standard errors.
    beta = report.benchmarks["beta"]
    se = math.sqrt(alpha.se["avg@4"] ** 2 + beta.se["avg@4"] ** 2) / 2
    assert avg.ci["avg@4"] == pytest.approx(
        (avg.avg - 1.959964 * se, min(1.0, avg.avg + 1.959964 * se)), abs=1e-6
    )
    saved = report.to_json()
    assert saved["benchmarks"]["alpha"]["pass@1_ci95"] == pytest.approx(list(wilson_interval(1, 2)))
