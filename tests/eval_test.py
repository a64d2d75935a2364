"""Tests of eval_math.py on CPU: the grader on MATH-500's gold answers, every method end to end with
the tiny models of tiny.py saved to a temporary folder, resuming, sharding and every bad-input error.

The grader test reads MATH-500 from ../shared/data or the Hugging Face cache and is skipped, with the reason,
when neither has it; the end-to-end tests use MATH-500 when it is there and a few synthetic problems in its
schema otherwise.
"""
import copy
import errno
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import hf_hub_download

import eval_math as em
from nabla import chat_prompt_ids, reward_ids, score


def _math500() -> Path | None:
    """MATH-500 from the shared data folder beside the repository, else from the Hugging Face cache, where
    eval_math.py's first run puts it; None when neither has it (nothing is downloaded)."""
    if (path := Path(__file__).resolve().parents[2] / "shared" / "data" / "math500.jsonl").exists():
        return path
    try:
        return Path(hf_hub_download(*em.MATH500_HUB, repo_type="dataset", local_files_only=True))
    except Exception:  # not in the cache
        return None


MATH500 = _math500()
needs_data = pytest.mark.skipif(MATH500 is None, reason="MATH-500 is in neither ../shared/data nor the hub's cache")
# MATH-style problems in MATH-500's schema, for the end-to-end tests when MATH-500 is absent.
SYNTHETIC = [
    {"problem": "What is $2+3$?", "answer": "5", "unique_id": "test/algebra/1.json"},
    {"problem": "Compute $\\frac{14}{3} \\cdot 3$.", "answer": "14", "unique_id": "test/prealgebra/2.json"},
    {"problem": "How many positive divisors does 36 have?", "answer": "9", "unique_id": "test/number_theory/3.json"},
    {"problem": "Solve for $x$: $2x + 7 = 19$.", "answer": "6", "unique_id": "test/algebra/4.json"},
    {"problem": "A rectangle has sides 3 and 8. What is the length of its diagonal?", "answer": "\\sqrt{73}",
     "unique_id": "test/geometry/5.json"},
    {"problem": "What is the remainder when $7^{10}$ is divided by 5?", "answer": "4",
     "unique_id": "test/number_theory/6.json"},
    {"problem": "Evaluate $\\sum_{k=1}^{10} k$.", "answer": "55", "unique_id": "test/algebra/7.json"},
    {"problem": "In how many ways can 3 books be arranged on a shelf?", "answer": "6",
     "unique_id": "test/counting_and_probability/8.json"},
]


def _problems_file() -> Path:
    """MATH-500 when it is there, else the synthetic problems above."""
    if MATH500:
        return MATH500
    path = Path(tempfile.mkdtemp(prefix="eval_test_")) / "problems.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SYNTHETIC))
    return path


PROBLEMS = _problems_file()
Q = "What is 2+3?"
ON_RECORD = {m: {"method": m} for m in em.METHODS}  # settings on record, for write_summary called directly
REQUIRED_KEYS = {"id", "method", "prompt", "response", "prediction", "answer", "correct", "model_calls",
                 "wall_time_s", "error"}


def math500_golds() -> list[str]:
    return [p.answer for p in em.load_problems(MATH500)]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tok, lm, rm) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("models")
    for name, model in (("lm", lm), ("rm", rm)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return str(root / "lm"), str(root / "rm")


def run(model_dirs, out: Path, *extra: str, methods: str = "greedy", limit: int = 3, tokens: int = 4) -> int:
    lm_dir, rm_dir = model_dirs
    return em.main(["--method", methods, "--model", lm_dir, "--reward-model", rm_dir, "--data", str(PROBLEMS),
                    "--limit", str(limit), "--n", "2", "--max-new-tokens", str(tokens), "--output", str(out), *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Grading


@needs_data
def test_grader_accepts_every_math500_gold_answer_and_rejects_another_problems_answer():
    golds = math500_golds()
    assert len(golds) == 500
    rejected_wrong = 0
    for i, gold in enumerate(golds):
        assert em.is_correct(f"So the final answer is $\\boxed{{{gold}}}$.", gold), (i, gold)
        assert em.extract_answer(f"So the final answer is \\boxed{{{gold}}}.") is not None, (i, gold)
        # A wrong answer: the next gold written differently. Equations are not used as wrong answers,
        # and an equation's right-hand side counts as the same answer: "x=5" and "5" rightly match.
        j = (i + 1) % len(golds)
        while "=" in golds[j] or em._normalise(golds[j]) in {em._normalise(gold), em._normalise(gold.split("=")[-1])}:
            j = (j + 1) % len(golds)
        assert not em.is_correct(f"So the final answer is $\\boxed{{{golds[j]}}}$.", gold), (i, gold, golds[j])
        rejected_wrong += 1
    assert rejected_wrong == 500


@pytest.mark.parametrize("response, gold, expected", [
    ("The answer is $\\boxed{14/3}$.", "\\frac{14}{3}", True),
    ("so it is 14/3", "\\frac{14}{3}", True),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
    ("\\boxed{\\frac{14}{3}}", "14/3", True),
    ("\\boxed{\\frac{14}{3}}", "\\dfrac{14}{3}", True),
    ("\\boxed{90}", "90^\\circ", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{Evelyn}}", "Evelyn", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{864}", "864 \\mbox{ inches}^2", True),
    ("\\boxed{25}", "025", True),          # AIME answers are zero-padded
    ("\\boxed{142}", "142.0", True),       # AMC answers are floats
    ("\\boxed{A, C}", "\\text{A, C}", True),  # math-verify alone says no: the string fallback says yes
    ("\\boxed{4.67}", "\\frac{14}{3}", False),
    ("\\boxed{Eevlny}", "\\text{Evelyn}", False),
    ("\\boxed{\\text{odd}}", "\\text{even}", False),
    ("\\boxed{91}", "90^\\circ", False),
    ("no answer here", "5", False),
    ("\\boxed{10\\,080}", "10,\\!080", True),  # a thin space between digit groups, not a product
    ("\\boxed{1\\,000}", "0", False),         # math-verify alone reads 1\\,000 as 1 · 000 = 0
    ("\\boxed{2^3\\,125}", "1000", True),     # ...which is right after an exponent: 2³ · 125
    ("$\\boxed{90°}$", "90^\\circ", True),   # math-verify reads neither ° nor \degree
    ("\\boxed{30\\degree}", "30^\\circ", True),
    ("\\boxed{90°}", "91^\\circ", False),
    ("\\boxed{90^°}", "90^\\circ", True),
    ("\\boxed{30^\\degree}", "30", True),
])
def test_equivalent_forms(response, gold, expected):
    assert em.is_correct(response, gold) is expected


def test_extract_answer_reads_the_boxed_or_final_answer_and_none_without_one():
    assert em.extract_answer("We get 3+4=7, so the answer is \\boxed{7}.") == "7"
    assert em.extract_answer("$\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert em.extract_answer("First 12, then 3 + 4 = 7. The final answer is 9.") == "9"
    # Several boxed answers are read together (math-verify's default), as a model boxing each root does.
    assert em.extract_answer("so \\boxed{1} and \\boxed{-2}") == "1,-2"
    assert em.is_correct("so \\boxed{1} and \\boxed{-2}", "1,-2")
    assert em.extract_answer("I do not know.") is None


def test_vote_groups_equivalent_answers_ignores_missing_ones_and_breaks_ties_by_first_occurrence():
    winner, groups = em.vote(["\\boxed{3}", "no idea", "\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{3}"])
    assert (winner, groups) == (2, [[0, 5], [2, 3, 4]])
    assert em.vote(["\\boxed{7}", "\\boxed{4}", "\\boxed{4}", "\\boxed{7}"]) == (0, [[0, 3], [1, 2]])
    assert em.vote(["no", "answers"]) == (0, [])


def test_data_files_as_aime_and_amc_ship_them(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text('\n  [{"prompt": "1+1", "answer": "2", "id": "a"}, {"prompt": "2+2", "answer": 4}]\n')
    assert [(p.id, p.answer) for p in em.load_problems(path)] == [("a", "2"), ("1", "4")]  # no id: the position
    path.write_text('[{"prompt": "a", "answer": 142.0, "id": "x"}]')
    assert [p.answer for p in em.load_problems(path)] == ["142.0"]
    path.write_text('[{"prompt": "a", "answer": true, "id": "x"}]')
    with pytest.raises(em.InputError, match="entry 0: no 'answer'"):
        em.load_problems(path)


def test_a_jsonl_line_ends_at_a_newline_only(tmp_path):
    path = tmp_path / "data.jsonl"  # json.dumps(ensure_ascii=False) leaves these characters raw inside a string
    path.write_text("".join(json.dumps({"problem": f"a{c}b", "answer": "1", "unique_id": c}, ensure_ascii=False) + "\n"
                            for c in "\u2028\u2029\x85"), encoding="utf-8")
    assert [p.problem for p in em.load_problems(path)] == [f"a{c}b" for c in "\u2028\u2029\x85"]


def test_string_fallback_ignores_case_and_a_final_full_stop():
    assert em.is_correct("\\boxed{A, C}", "\\text{a, c}")  # math-verify says no: the fallback ignores case
    assert em.is_correct("\\boxed{\\text{Monday.}}", "\\text{Monday}")  # ...and a full stop


def test_the_gold_answer_plays_the_gold_in_math_verify():
    # math-verify is one-sided: an interval answer matches an inequality gold, not the other way round
    assert em.is_correct("\\boxed{[1,2]}", "1 \\le x \\le 2")
    assert not em.is_correct("\\boxed{1 \\le x \\le 2}", "[1,2]")
    assert em.vote(["\\boxed{1 \\le x \\le 2}", "\\boxed{[1,2]}"]) == (0, [[0, 1]])  # a group's first is its gold


# ----------------------------------------------------------------------------------------------
# Methods


def test_sampling_is_seeded_and_ignores_the_models_own_generation_defaults(tok, lm):
    greedy_lm = copy.deepcopy(lm)
    # Defaults that, if generate() picked them up, would make every sample the greedy one.
    greedy_lm.generation_config.top_k = 1
    greedy_lm.generation_config.do_sample = False
    models = em.Models(greedy_lm, tok)
    config = em.NablaConfig(max_new_tokens=6)
    samples = em.sample(models, [Q], 4, seed=5, config=config)[0]
    assert len({s.text for s in samples}) > 1
    assert [s.text for s in em.sample(models, [Q], 4, seed=5, config=config)[0]] == \
           [s.text for s in samples]
    assert [s.text for s in em.sample(models, [Q], 4, seed=6, config=config)[0]] != \
           [s.text for s in samples]
    assert all(1 <= s.tokens <= 6 for s in samples)


def test_sampling_keeps_every_gpus_random_state(tok, lm, forked):
    em.sample(em.Models(lm, tok), [Q], 2, seed=0, config=em.NablaConfig(max_new_tokens=2))
    assert forked == [[0, 1]]


def test_a_sample_ends_at_its_end_of_sequence_token_which_counts_as_generated(tok, lm):
    config = em.NablaConfig(max_new_tokens=6, rollout_temperature=0)
    first = em.sample(em.Models(lm, tok), [Q], 1, seed=0, config=config)[0][0]
    stopping_lm = copy.deepcopy(lm)
    stopping_lm.generation_config.eos_token_id = [tok.convert_tokens_to_ids(first.scored_text[0])]
    stopped = em.sample(em.Models(stopping_lm, tok), [Q], 1, seed=0, config=config)[0][0]
    assert first.tokens == 6 and (stopped.tokens, stopped.text) == (1, "")  # the greedy first token, now the end


def test_a_base_models_sample_ends_where_the_chat_template_ends_a_turn(tok, lm):
    base, end_of_turn = copy.deepcopy(lm), tok.convert_tokens_to_ids("<|im_end|>")
    base.generation_config.eos_token_id = tok.pad_token_id  # Qwen2.5-7B (base) lists <|endoftext|> only
    with torch.no_grad():  # make <|im_end|> the greedy first token
        h = base.model(torch.tensor([em.chat_prompt_ids(tok, Q)])).last_hidden_state[0, -1]
        base.lm_head.weight[end_of_turn] = 100 * h / h.norm()
    config = em.NablaConfig(max_new_tokens=6, rollout_temperature=0)
    out = em.sample(em.Models(base, tok), [Q], 1, seed=0, config=config)
    assert (out[0][0].tokens, out[0][0].text, out[0][0].scored_text) == (1, "", "")  # the RM reads no <|im_end|>


def test_a_batch_shares_its_time_out_evenly(tok, lm, monkeypatch):
    clock = iter([100.0, 110.0, 110.0])
    monkeypatch.setattr(em, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    results = em.solve("greedy", [Q, "What is 7*6?"], em.Models(lm, tok), config=em.NablaConfig(max_new_tokens=2))
    assert [r["wall_time_s"] for r in results] == [5.0, 5.0]


def test_solve_counts_model_calls_and_bon_returns_the_best_scored_sample(tok, lm, rm):
    models, config = em.Models(lm, tok, rm, tok), em.NablaConfig(max_new_tokens=5)
    greedy = em.solve("greedy", [Q], models, config=config)[0]
    assert greedy["model_calls"] == greedy["generated_tokens"] == 5  # a random model does not stop early
    sc = em.solve("sc", [Q], models, n=3, seed=1, config=config)[0]
    assert sc["model_calls"] == sc["generated_tokens"] == sum(sc["stats"]["sample_tokens"])
    bon = em.solve("bon", [Q], models, n=3, seed=1, config=config)[0]
    rewards = bon["stats"]["rewards"]
    assert bon["model_calls"] == bon["generated_tokens"] + 3 and len(rewards) == 3
    assert rewards[bon["stats"]["chosen"]] == max(rewards)
    samples = em.sample(models, [Q], 3, seed=1, config=config)[0]
    assert bon["response"] == samples[bon["stats"]["chosen"]].text
    # batched scoring (right-padded) gives each sample's own score, as nabla.score reads it
    assert rewards == pytest.approx([score(rm, tok, "What is 2+3?", s.scored_text) for s in samples], abs=1e-5)
    pairs = [("What is 2+3?", "5"), ("Why?", "because 2+3 is 5, see"), ("What is 2+3?", "")]
    batched, lengths = em.score_batch(models, pairs, batch=2)  # padded, and split in two batches
    assert batched == pytest.approx([score(rm, tok, *pair) for pair in pairs], abs=1e-5)
    assert lengths == [len(reward_ids(tok, *pair)) for pair in pairs]
    # a reward tokenizer without a pad token, beside a policy whose end-of-sequence id the reward model
    # lacks: padding uses the reward model's own pad id
    rm_tok = copy.deepcopy(tok)
    rm_tok.pad_token = None
    other_lm = copy.deepcopy(lm)
    other_lm.generation_config.eos_token_id = [10_000]
    batched, _ = em.score_batch(em.Models(other_lm, tok, rm, rm_tok), pairs, batch=3)
    assert batched == pytest.approx([score(rm, tok, *pair) for pair in pairs], abs=1e-5)
    with pytest.raises(ValueError, match="needs sampling"):
        em.solve("sc", [Q], models, n=2, config=em.NablaConfig(rollout_temperature=0.0))
    # forward-token-equivalents: each sample's prompt and tokens but the last, and what the RM read
    prompt_len = len(chat_prompt_ids(tok, "What is 2+3?"))
    rm_len = sum(len(reward_ids(tok, "What is 2+3?", s.scored_text)) for s in samples)
    assert bon["forward_token_equivalents"] == sum(prompt_len + t - 1 for t in bon["stats"]["sample_tokens"]) + rm_len
    with pytest.raises(ValueError, match="unknown method"):
        em.solve("beam", [Q], models)


def test_solve_nabla_revises_and_its_model_calls_follow_the_counting_rule(tok, lm, rm):
    # Thresholds that make every position worth optimizing, so revisions happen even with random models.
    config = em.NablaConfig(max_new_tokens=5, grad_norm_threshold=0.0, confidence_threshold=1.0, dto_iters=2)
    result = em.solve("nabla", [Q], em.Models(lm, tok, rm, tok), n=2, seed=0, config=config)[0]
    stats = result["stats"]
    assert stats["rollouts"] == 2 and stats["revisions_proposed"] >= 1 and stats["grad_steps"] >= 1
    # One call per generated token, one per scored draft, four per gradient pass (COUNTING_RULE).
    assert result["model_calls"] == result["generated_tokens"] + stats["rollouts"] + 4 * stats["grad_steps"]
    assert json.loads(em._to_json(result))["stats"]["rollouts"] == 2


def test_every_method_end_to_end_on_three_math500_problems(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, methods="greedy,sc,bon,nabla", tokens=6) == 0
    records = read_jsonl(out)
    problems = em.load_problems(PROBLEMS)[:3]
    assert [(r["id"], r["method"]) for r in records] == \
           [(p.id, m) for p in problems for m in ("greedy", "sc", "bon", "nabla")]
    for r in records:
        assert REQUIRED_KEYS <= r.keys() and r["error"] is None
        assert r["prompt"] == problems[r["index"]].problem and r["answer"] == problems[r["index"]].answer
        assert r["prediction"] == em.extract_answer(r["response"])
        assert r["correct"] is em.is_correct(r["response"], r["answer"])
        if r["method"] == "greedy":
            assert r["model_calls"] == r["generated_tokens"] <= 6
        elif r["method"] == "sc":
            assert r["model_calls"] == r["generated_tokens"] <= 12
        elif r["method"] == "bon":
            assert r["model_calls"] == r["generated_tokens"] + 2 <= 14
        else:
            assert r["stats"]["rollouts"] <= 2 and r["model_calls"] >= r["generated_tokens"] > 0
    summary = json.loads((tmp_path / "math500.jsonl.summary.json").read_text())
    assert list(summary["methods"]) == ["greedy", "sc", "bon", "nabla"]
    for method, row in summary["methods"].items():
        mine = [r for r in records if r["method"] == method]
        assert row["problems"] == 3 and row["errors"] == 0
        assert row["accuracy_pct"] == pytest.approx(100 * sum(r["correct"] for r in mine) / 3, abs=0.01)
        assert row["mean_model_calls"] == pytest.approx(sum(r["model_calls"] for r in mine) / 3, abs=1e-3)
    assert "per generated token" in summary["counting_rule"]
    assert summary["paper_math500_qwen2.5_7b_instruct_pct"]["nabla"] == 80.4


def test_sc_returns_the_first_sample_of_the_winning_group(tok, lm, monkeypatch):
    texts = ["\\boxed{3}", "\\boxed{4}", "\\boxed{4}"]
    monkeypatch.setattr(em, "sample", lambda models, prompts, n, seed, config:
                        [[em.Sample(t, 2, 5, t) for t in texts] for _ in prompts])
    result = em.solve("sc", [Q], em.Models(lm, tok), n=3)[0]
    assert (result["response"], result["stats"]["chosen"]) == ("\\boxed{4}", 1)


def test_batched_bon_scores_each_problem_with_its_own_samples(tok, lm, rm):
    models, config, prompts = em.Models(lm, tok, rm, tok), em.NablaConfig(max_new_tokens=5), [Q, "Why is 7*6 42?"]
    results = em.solve("bon", prompts, models, n=2, seed=3, config=config)
    samples = em.sample(models, prompts, 2, seed=3, config=config)
    for prompt, result, mine in zip(prompts, results, samples):
        assert result["stats"]["rewards"] == pytest.approx([score(rm, tok, prompt, s.scored_text) for s in mine],
                                                           abs=1e-5)
        rm_len = sum(len(reward_ids(tok, prompt, s.scored_text)) for s in mine)
        assert result["forward_token_equivalents"] == \
               sum(len(chat_prompt_ids(tok, prompt)) + s.tokens - 1 for s in mine) + rm_len


# ----------------------------------------------------------------------------------------------
# Resuming and failures


def test_resume_after_an_interrupted_run(model_dirs, tmp_path, monkeypatch):
    out, calls, real_solve = tmp_path / "out.jsonl", [], em.solve

    def interrupted_solve(method, prompts, *args, **kwargs):
        calls.extend(prompts)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the third problem
        return real_solve(method, prompts, *args, **kwargs)

    monkeypatch.setattr(em, "solve", interrupted_solve)
    assert run(model_dirs, out, "--prompt-suffix", "Put the answer in \\boxed{}.") == 130  # interrupted
    first_two = out.read_text()
    assert len(first_two.splitlines()) == 2
    with out.open("a") as f:
        f.write('{"id": "test/algebra/1", "meth')  # a line cut off by the kill

    calls.clear()
    assert run(model_dirs, out, "--prompt-suffix", "Put the answer in \\boxed{}.") == 0
    assert len(calls) == 1 and calls[0].endswith("\nPut the answer in \\boxed{}.")
    text = out.read_text()
    assert text.startswith(first_two) and len(text.splitlines()) == 3
    assert len({r["id"] for r in read_jsonl(out)}) == 3

    calls.clear()
    assert run(model_dirs, out, "--prompt-suffix", "Put the answer in \\boxed{}.") == 0
    assert calls == [] and out.read_text() == text


def test_resume_repairs_what_a_kill_left_at_the_end_of_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    done = {"id": "a", "method": "greedy", "correct": True, "error": None}
    failed = {"id": "b", "method": "greedy", "correct": False, "error": "RuntimeError: CUDA out of memory"}
    path.write_text(json.dumps(failed) + "\n" + json.dumps(done))  # complete, but its newline never written
    before = path.read_text()
    finished, untidy = em.finished_records(path)
    assert finished == {("a", "greedy"): done} and untidy  # the failed problem will be retried
    assert path.read_text() == before  # reading changes nothing
    em.write_records(path, finished.values())
    assert path.read_text() == json.dumps(done) + "\n"
    path.write_text(json.dumps(done) + "\n" + '{"id": "b", "meth')  # cut off in the middle
    finished, untidy = em.finished_records(path)
    assert list(finished) == [("a", "greedy")] and untidy
    em.write_records(path, finished.values())
    assert path.read_text() == json.dumps(done) + "\n"
    assert em.finished_records(path)[1] is False


def test_a_second_run_on_a_file_another_run_is_writing_is_refused(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, limit=2) == 0
    with em.exclusive_lock(out):  # as a run of the same command, still going, holds it
        before = snapshot(tmp_path)
        assert run(model_dirs, out, limit=3) == 2
        assert f"{out}: another run is writing it now" in capsys.readouterr().err
        assert snapshot(tmp_path) == before
        assert run(model_dirs, out, "--shard", "1/2", limit=3) == 0  # a shard writes a file of its own
    assert run(model_dirs, out, limit=3) == 0  # released: the run goes on
    assert len(read_jsonl(out)) == 3


def test_no_merge_replaces_a_file_another_run_is_writing(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, "--shard", "0/2", limit=4) == 0
    with em.exclusive_lock(out):  # e.g. an unsharded run on the same output, still going
        assert run(model_dirs, out, "--shard", "1/2", limit=4) == 0  # its own results are kept...
        assert "not merged: " in capsys.readouterr().err and not out.exists()  # ...but it does not merge
        assert em.main(["--merge", str(tmp_path)]) == 2
        assert "another run is writing it now" in capsys.readouterr().err and not out.exists()
    assert em.main(["--merge", str(tmp_path)]) == 0 and len(read_jsonl(out)) == 4


def test_each_problem_is_solved_with_its_own_seed_from_the_base_seed(model_dirs, tmp_path, monkeypatch):
    seeds, real_solve = [], em.solve

    def recording_solve(method, prompts, models, n, seed, config):
        seeds.append(seed)
        return real_solve(method, prompts, models, n=n, seed=seed, config=config)

    monkeypatch.setattr(em, "solve", recording_solve)
    assert run(model_dirs, tmp_path / "a.jsonl", methods="sc") == 0
    assert run(model_dirs, tmp_path / "b.jsonl", "--seed", "1", methods="sc") == 0
    assert seeds == [em.problem_seed(base, i) for base in (0, 1) for i in range(3)] and len(set(seeds)) == 6
    assert [r["seed"] for r in read_jsonl(tmp_path / "a.jsonl")] == seeds[:3]


def test_the_summary_counts_failed_problems_as_wrong_and_keeps_failures_out_of_the_means(tmp_path):
    records = [{"id": str(i), "method": "greedy", "correct": ok, "error": error, "model_calls": calls,
                "forward_token_equivalents": calls, "generated_tokens": calls, "wall_time_s": seconds, "stats": {},
                "peak_gpu_memory_gib": peak} for i, (ok, error, calls, seconds, peak) in
               enumerate([(True, None, 10, 1.0, 1.5), (False, None, 20, 2.0, 3.25),
                          (False, "RuntimeError: CUDA out of memory", None, 9.0, 2.0)])]
    records.append(dict(records[0], method="sc"))
    summary = em.write_summary(tmp_path / "out.jsonl", records, {}, ON_RECORD)
    row = summary["methods"]["greedy"]
    assert (row["problems"], row["correct"], row["errors"], row["accuracy_pct"]) == (3, 1, 1, 33.33)
    assert (row["mean_model_calls"], row["mean_seconds"], row["peak_gpu_memory_gib"]) == (15, 1.5, 3.25)
    assert summary["config"]["problems"] == 3  # problems, not records


def test_a_result_replaces_an_earlier_one_but_an_error_never_replaces_a_result():
    ok, ok2, failed = ({"id": "a", "method": "sc", "n": i, "error": e} for i, e in ((1, None), (2, None), (3, "E")))
    assert em.best_records([ok, failed])[("a", "sc")] is ok
    assert em.best_records([failed, ok])[("a", "sc")] is ok
    assert em.best_records([ok, ok2])[("a", "sc")] is ok2
    assert em.best_records([failed])[("a", "sc")] is failed


def test_a_failed_problem_is_recorded_the_run_goes_on_and_a_rerun_retries_it(model_dirs, tmp_path, monkeypatch):
    out, real_solve = tmp_path / "out.jsonl", em.solve
    second = em.load_problems(PROBLEMS)[1].problem

    def oom_on_second(method, prompts, *args, **kwargs):
        if second in prompts:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real_solve(method, prompts, *args, **kwargs)

    monkeypatch.setattr(em, "solve", oom_on_second)
    assert run(model_dirs, out) == 0
    records = read_jsonl(out)
    assert [r["error"] for r in records] == [None, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", None]
    assert records[1]["correct"] is False and records[1]["response"] is None
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["methods"]["greedy"]["errors"] == 1 and summary["methods"]["greedy"]["problems"] == 3

    monkeypatch.setattr(em, "solve", real_solve)
    assert run(model_dirs, out) == 0
    records = read_jsonl(out)
    assert len(records) == 3 and all(r["error"] is None for r in records)
    assert {r["index"] for r in records} == {0, 1, 2}


def test_resume_refuses_results_of_other_settings(model_dirs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, limit=1) == 0
    assert run(model_dirs, out, limit=1, tokens=5) == 2
    assert "max_new_tokens: 4 in the file, 5 now" in capsys.readouterr().err
    out = tmp_path / "nabla.jsonl"
    assert run(model_dirs, out, methods="nabla", limit=1) == 0
    assert run(model_dirs, out, "--grad-norm-threshold", "8", methods="nabla", limit=1) == 2
    assert "nabla.grad_norm_threshold: 4.0 in the file, 8.0 now" in capsys.readouterr().err
    assert run(model_dirs, out, "--grad-norm-threshold", "-1", methods="nabla", limit=1) == 2
    assert "--grad-norm-threshold must not be negative" in capsys.readouterr().err


def test_only_the_last_line_may_be_cut_off_and_a_record_has_a_string_id(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"id": "a", "method": "greedy", "error": None}) + "\ngarbage\n" + '{"id": "b", "meth')
    with pytest.raises(em.InputError, match="line 2: not a result record"):
        em.read_records(path)
    path.write_text('{"id": 1, "method": "greedy"}\n')
    with pytest.raises(em.InputError, match="line 1: not a result record"):
        em.read_records(path)


def test_a_record_cut_off_inside_a_character_is_dropped_like_any_cut_off_record(tmp_path):
    path, record = tmp_path / "out.jsonl", {"id": "a", "method": "greedy", "response": "π ≤ 4", "error": None}
    line = em._to_json(record).encode()
    path.write_bytes(line + b"\n" + line[:line.index("≤".encode()) + 1])  # a kill inside the UTF-8 of ≤
    assert em.finished_records(path) == ({("a", "greedy"): record}, True)
    path.write_bytes(line.replace("π".encode(), b"\xcf") + b"\n" + line + b"\n")  # not UTF-8, not the last line
    with pytest.raises(em.InputError, match="line 1: not a result record"):
        em.read_records(path)


def test_only_a_file_with_more_than_its_finished_results_needs_tidying(tmp_path):
    assert em.finished_records(tmp_path / "none.jsonl") == ({}, False)
    (tmp_path / "empty.jsonl").write_text("")
    assert em.finished_records(tmp_path / "empty.jsonl") == ({}, False)
    first, again = ({"id": "a", "method": "greedy", "n": i, "error": None} for i in (1, 2))
    (tmp_path / "twice.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(again) + "\n")
    assert em.finished_records(tmp_path / "twice.jsonl") == ({("a", "greedy"): again}, True)


def test_write_atomically_leaves_no_temporary_file(tmp_path):
    em.write_atomically(tmp_path / "m.json", "a", exclusive=True)
    em.write_atomically(tmp_path / "s.json", "b")
    with pytest.raises(FileExistsError):
        em.write_atomically(tmp_path / "m.json", "c", exclusive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "s.json"]
    assert (tmp_path / "m.json").read_text() == "a"


def test_an_exclusive_write_without_hard_links_still_creates_the_file_once(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # what vfat and exFAT say

    monkeypatch.setattr(em.os, "link", no_links)
    em.write_atomically(tmp_path / "m.json", "a", exclusive=True)
    with pytest.raises(FileExistsError):
        em.write_atomically(tmp_path / "m.json", "b", exclusive=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"] and (tmp_path / "m.json").read_text() == "a"


def test_a_field_only_one_side_has_is_a_conflict():
    assert em.conflict({"a": 1}, {"a": 1, "b": 2}) == ("b", None, 2)
    assert em.conflict({"a": 1, "c": 3}, {"a": 1}) == ("c", 3, None)


EVERY_METHOD = json.dumps({m: {} for m in em.METHODS})


@pytest.mark.parametrize("text", ['{"settings": {"greedy": {}}}', '{"settings": ["greedy"]}', '{"settings": 5}',
                                  f'{{"settings": {EVERY_METHOD}, "ran": "greedy"}}',
                                  f'{{"settings": {EVERY_METHOD}, "ran": ["beam"]}}'])
def test_a_manifest_without_every_methods_settings_or_with_bad_methods_run_is_refused(tmp_path, text):
    path = tmp_path / "out.jsonl.manifest.json"
    path.write_text(text)
    with pytest.raises(em.InputError, match="not a settings manifest"):
        em.read_manifest(path)
    path.write_text(f'{{"settings": {EVERY_METHOD}}}')  # from before manifests named the methods run: all ran
    assert em.read_manifest(path) == ({m: {} for m in em.METHODS}, list(em.METHODS))


def test_a_new_manifest_keeps_an_old_outputs_settings_for_methods_not_run_now(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a", "method": "sc", "settings": {"max_new_tokens": 4}}) + "\n")
    em.agree_on_settings(out, {m: {"max_new_tokens": 5} for m in em.METHODS}, ["greedy"], write=True)
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["settings"]
    assert manifest["sc"] == {"max_new_tokens": 4} and manifest["greedy"] == {"max_new_tokens": 5}


def test_a_finished_run_does_not_load_the_models_again(model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, limit=1) == 0
    monkeypatch.setattr(em, "load_models", lambda *a, **k: pytest.fail("nothing is left to solve"))
    assert run(model_dirs, out, limit=1) == 0


def test_a_run_of_another_shard_count_takes_the_results_the_outputs_other_files_hold(model_dirs, tmp_path,
                                                                                     monkeypatch):
    out, real_solve, solved = tmp_path / "math500.jsonl", em.solve, []
    assert run(model_dirs, out, "--shard", "0/2") == 0  # problems 0 and 2, then the run is stopped
    shard = read_jsonl(tmp_path / "math500.rank0.jsonl")
    monkeypatch.setattr(em, "solve", lambda method, prompts, *a, **k: solved.extend(prompts) or real_solve(
        method, prompts, *a, **k))
    assert run(model_dirs, out) == 0  # on one GPU now: only problem 1 is left to solve
    assert len(solved) == 1 and [r["index"] for r in read_jsonl(out)] == [0, 2, 1]
    assert read_jsonl(out)[:2] == shard
    monkeypatch.setattr(em, "load_models", lambda *a, **k: pytest.fail("nothing is left to solve"))
    for i in range(3):  # and on three: every shard finds its results in the output
        assert run(model_dirs, out, "--shard", f"{i}/3") == 0
    assert sorted(r["index"] for r in read_jsonl(out)) == [0, 1, 2] and len(solved) == 1


def test_a_failed_problem_in_another_file_is_solved_again_not_copied(model_dirs, tmp_path, monkeypatch):
    out, real_solve = tmp_path / "math500.jsonl", em.solve
    monkeypatch.setattr(em, "solve", lambda *a, **k: 1 / 0)
    assert run(model_dirs, out, "--shard", "0/2") == 0
    failed = read_jsonl(tmp_path / "math500.rank0.jsonl")
    assert [r["error"] for r in failed] == ["ZeroDivisionError: division by zero"] * 2
    monkeypatch.setattr(em, "solve", real_solve)
    assert run(model_dirs, out) == 0
    assert [(r["index"], r["error"]) for r in read_jsonl(out)] == [(0, None), (1, None), (2, None)]


def test_an_unsharded_run_summarises_its_own_problems_and_merges_nothing(model_dirs, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, limit=2) == 0
    assert run(model_dirs, out, limit=1) == 0  # a smaller --limit: the file keeps both, the summary covers one
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["methods"]["greedy"]["problems"] == 1 and summary["config"]["problems"] == 1
    assert summary["config"]["shard"] == "0/1" and "merged_from" not in summary["config"]
    assert len(read_jsonl(out)) == 2


def test_the_summary_covers_every_methods_results_for_the_runs_problems(model_dirs, tmp_path):
    """The README's table runs one method at a time: the summary after the last holds all of them."""
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, methods="greedy", limit=2) == 0
    assert run(model_dirs, out, methods="sc", limit=1) == 0
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert {m: row["problems"] for m, row in summary["methods"].items()} == {"greedy": 1, "sc": 1}
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["settings"]
    assert summary["config"]["settings"] == {m: manifest[m] for m in ("greedy", "sc")}
    assert summary["config"]["methods"] == ["sc"]  # what this run ran


def test_a_file_system_without_locks_is_a_warning_not_an_error(model_dirs, tmp_path, monkeypatch, capsys):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(em.fcntl, "flock", no_locks)
    assert run(model_dirs, tmp_path / "out.jsonl", limit=1) == 0
    assert "No locks available): never start two runs on it at once" in capsys.readouterr().err
    monkeypatch.setattr(em, "fcntl", None)  # as on native Windows, which has no fcntl module
    assert run(model_dirs, tmp_path / "out.jsonl", limit=2) == 0
    assert "(no file locks on this platform): never start two runs on it at once" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Several GPUs


def test_shards_cover_every_problem_exactly_once_and_match_one_unsharded_run(model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "sharded" / "math500.jsonl"
    assert run(model_dirs, out, "--shard", "0/3", methods="sc", limit=5) == 0
    assert run(model_dirs, out, "--shard", "1/3", methods="sc", limit=5) == 0
    assert not out.exists()  # shard 2 has not run: nothing to combine yet
    monkeypatch.setenv("RANK", "2")  # as torchrun would start the third process
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run(model_dirs, out, methods="sc", limit=5) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    ids = [p.id for p in em.load_problems(PROBLEMS)[:5]]
    seen = []
    for shard in range(3):
        shard_records = read_jsonl(out.with_name(f"math500.rank{shard}.jsonl"))
        assert [r["index"] for r in shard_records] == list(range(shard, 5, 3))
        seen += [r["id"] for r in shard_records]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) == 5

    merged = read_jsonl(out)  # written by the shard that finished last
    assert [r["id"] for r in merged] == ids
    single = tmp_path / "single" / "math500.jsonl"
    assert run(model_dirs, single, methods="sc", limit=5) == 0
    # Seeds come from the problem's place in the file, so sharding does not change any sample.
    assert [r["response"] for r in read_jsonl(single)] == [r["response"] for r in merged]

    summary = json.loads((tmp_path / "sharded" / "math500.jsonl.summary.json").read_text())
    assert summary["methods"]["sc"]["problems"] == 5 and summary["config"]["shard"] is None
    out.unlink()
    assert em.main(["--merge", str(out.parent)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ids
    assert json.loads((tmp_path / "sharded" / "math500.jsonl.summary.json").read_text())["methods"] == \
           summary["methods"]


def test_the_merge_command_a_shard_suggests_works_for_any_output_name(model_dirs, tmp_path, capsys):
    out = tmp_path / "custom.jsonl"
    assert run(model_dirs, out, "--shard", "0/2", limit=2) == 0
    suggested = re.search(r"or (--merge \S+ --output \S+)\)", capsys.readouterr().err)[1].split()
    assert run(model_dirs, out, "--shard", "1/2", limit=2) == 0  # merges, being the last
    merged = read_jsonl(out)
    out.unlink()
    assert em.main(suggested) == 0 and read_jsonl(out) == merged


def test_a_merge_of_shards_one_of_which_has_not_run_says_so(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, "--shard", "0/2", limit=4) == 0
    capsys.readouterr()
    assert em.main(["--merge", str(tmp_path)]) == 0
    assert "1 of the first 3 problems have no greedy result (a shard that has not run?)" in capsys.readouterr().err
    assert run(model_dirs, out, "--shard", "1/2", limit=4) == 0  # the last shard: merges all, and says nothing
    assert "have no" not in capsys.readouterr().err and len(read_jsonl(out)) == 4


def test_merge_orders_by_problem_then_method_and_its_config_names_the_methods_merged(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    for shard in ("0/2", "1/2"):
        assert run(model_dirs, out, "--shard", shard, methods="greedy,sc", limit=2) == 0
    expected = [(p.id, m) for p in em.load_problems(PROBLEMS)[:2] for m in ("greedy", "sc")]
    assert [(r["id"], r["method"]) for r in read_jsonl(out)] == expected
    assert em.main(["--merge", str(tmp_path)]) == 0
    assert [(r["id"], r["method"]) for r in read_jsonl(out)] == expected
    config = json.loads((tmp_path / "math500.jsonl.summary.json").read_text())["config"]
    assert list(config["settings"]) == ["greedy", "sc"]
    assert config["merged_from"] == [str(tmp_path / "math500.rank0.jsonl"), str(tmp_path / "math500.rank1.jsonl")]


def test_shards_and_devices_from_the_launchers_environment(monkeypatch):
    assert em.resolve_shard(None, {"WORLD_SIZE": "2"}) == (0, 2)  # RANK unset: rank 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "9")  # on a second node the global rank is no GPU index
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert em.resolve_device("auto") == torch.device("cuda", 1)
    assert em.resolve_device("cuda") == torch.device("cuda", 1)  # not every rank on GPU 0
    assert em.resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")  # more processes than GPUs
    with pytest.raises(em.InputError, match=r"--device auto: no GPU cuda:2 here \(this machine has 2;"):
        em.resolve_device("auto")


def test_methods_keep_their_order_without_repeats_or_spaces():
    assert em.parse_methods("nabla, greedy,nabla") == ["nabla", "greedy"]


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing data file": (lambda d: ["--data", str(d / "nope.jsonl")], "data file not found"),
    "malformed JSONL": (lambda d: ["--data", _write(d / "bad.jsonl", '{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2",\n')],
                        "bad.jsonl line 3: malformed JSON"),
    "JSONL without an answer": (lambda d: ["--data", _write(d / "bad.jsonl", '{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')],
                                "bad.jsonl line 2: no 'answer'"),
    "malformed JSON array": (lambda d: ["--data", _write(d / "bad.json", '[\n{"prompt": "1+1", "answer": "2", "id": "0"},\n{"prompt": }\n]')],
                             "bad.json line 3: malformed JSON"),
    "JSON array of non-objects": (lambda d: ["--data", _write(d / "bad.json", '["1+1"]')], "entry 0: expected a JSON object"),
    "duplicate ids": (lambda d: ["--data", _write(d / "dup.json", '[{"prompt": "a", "answer": "1", "id": "7"}, {"prompt": "b", "answer": "2", "id": "7"}]')],
                      "id '7' appears twice"),
    "empty data file": (lambda d: ["--data", _write(d / "empty.jsonl", "\n")], "no problems"),
    "unknown method": (lambda d: ["--method", "greedy,beam"], "unknown method 'beam'"),
    "unloadable model": (lambda d: ["--model", str(d / "no-such-model")], "there is no such folder (download"),
    "unopenable lock file": (lambda d: (d / ".o.jsonl.lock").mkdir() or ["--output", str(d / "o.jsonl")],
                             "o.jsonl: cannot open its lock file"),
    "shard out of range": (lambda d: ["--shard", "3/3"], "--shard 3/3: out of range"),
    "shard of zero": (lambda d: ["--shard", "0/0"], "out of range"),
    "shard not I/N": (lambda d: ["--shard", "first"], "expected I/N"),
    "n of zero": (lambda d: ["--n", "0"], "--n must be at least 1"),
    "not a number": (lambda d: ["--limit", "three"], "invalid int value"),
    "unknown device": (lambda d: ["--device", "tpu9"], "not a device"),
    "merge without shard files": (lambda d: ["--merge", str(d)], "no math500.rank*.jsonl files"),
    "garbage output file": (lambda d: ["--output", _write(d / "out.jsonl", "hello\n{}\n")], "out.jsonl line 1: not a result record"),
    "record of an unknown method": (lambda d: ["--output", _write(d / "out.jsonl", '{"id": "1", "method": "beam"}\n')],
                                    "out.jsonl line 1: not a result record"),
    "record whose settings are not a mapping": (lambda d: ["--output", _write(d / "out.jsonl", '{"id": "1", "method": '
                                                '"greedy", "settings": [1]}\n')], "out.jsonl line 1: not a result record"),
    "output under a regular file": (lambda d: ["--output", _write(d / "afile", "x") + "/o.jsonl"], "cannot create the folder"),
    "output under an uncreatable path": (lambda d: ["--output", "/proc/no-such-dir/o.jsonl"], "cannot create the folder"),
    "output names a folder": (lambda d: ["--output", str(d)], "is a folder"),
    "merge of a missing folder": (lambda d: ["--merge", str(d / "nope")], "no such folder"),
    "nan threshold": (lambda d: ["--grad-norm-threshold", "nan"], "must be a finite number"),
    "infinite threshold": (lambda d: ["--grad-norm-threshold", "inf"], "must be a finite number"),
    "negative top-k": (lambda d: ["--top-k", "-1"], "--top-k must be 0"),
    "batch size of zero": (lambda d: ["--batch-size", "0"], "--batch-size must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_status_2(case, model_dirs, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    lm_dir, rm_dir = model_dirs
    base = {"--method": "greedy", "--model": lm_dir, "--reward-model": rm_dir, "--data": str(PROBLEMS),
            "--limit": "1", "--max-new-tokens": "2", "--output": str(tmp_path / "math500.jsonl")}
    args = make_args(tmp_path)
    for option in set(base) & set(args[::2]):
        del base[option]
    assert em.main([x for kv in base.items() for x in kv] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eval_math.py: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_shard_out_of_range_from_the_environment(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(model_dirs, tmp_path / "out.jsonl") == 2
    assert "RANK/WORLD_SIZE 4/2: out of range" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["policy", "reward model"])
def test_a_model_without_chat_template_is_refused_and_named_by_its_role(role, tok, lm, rm, model_dirs, tmp_path,
                                                                       capsys):
    plain, folder = copy.deepcopy(tok), tmp_path / "plain"
    plain.chat_template = None
    (lm if role == "policy" else rm).save_pretrained(folder)
    plain.save_pretrained(folder)
    lm_dir, rm_dir = (folder, model_dirs[1]) if role == "policy" else (model_dirs[0], folder)
    assert em.main(["--method", "bon", "--model", str(lm_dir), "--reward-model", str(rm_dir), "--data", str(PROBLEMS),
                    "--limit", "1", "--output", str(tmp_path / "out.jsonl")]) == 2
    assert f"error: {role} '{folder}': its tokenizer has no chat template" in capsys.readouterr().err


def test_a_checkpoint_of_the_other_kind_is_refused_not_filled_at_random(model_dirs, tmp_path, capsys):
    lm_dir, rm_dir = model_dirs
    for policy, reward_model, missing in ((rm_dir, rm_dir, "lm_head.weight"), (lm_dir, lm_dir, "score.weight")):
        assert em.main(["--method", "bon", "--model", policy, "--reward-model", reward_model, "--data", str(PROBLEMS),
                        "--limit", "1", "--output", str(tmp_path / "out.jsonl")]) == 2
        assert f"lacks weights" in (err := capsys.readouterr().err) and missing in err
    assert not (tmp_path / "out.jsonl.manifest.json").exists()


def test_an_interrupted_run_says_how_to_resume_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(em, "evaluate", interrupted)
    assert em.main(["--method", "greedy"]) == 130
    assert capsys.readouterr().err == ("eval_math.py: interrupted; the results written so far are kept, the same "
                                       "command resumes\n")


def test_the_sample_count_passes_through_torchrun_as_N():
    from torch.distributed.run import get_args_parser
    launcher = get_args_parser().parse_args(["--nproc-per-node", "2", "eval_math.py", "--N", "4"])
    assert em.build_parser().parse_args(launcher.training_script_args).n == 4
    with pytest.raises(SystemExit):  # what --n meets there
        get_args_parser().parse_args(["--nproc-per-node", "2", "eval_math.py", "--n", "4"])


def test_settings_a_first_run_recorded_for_a_method_it_did_not_run_say_how_to_change_them(model_dirs, tmp_path,
                                                                                            capsys):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, methods="greedy", limit=1) == 0  # records sc's settings with n = 2 too
    assert run(model_dirs, out, "--n", "3", methods="sc", limit=1) == 2
    assert "holds the sc settings of the first run on this output, which ran no sc (n: 2 there, 3 now)" in \
           capsys.readouterr().err
    (tmp_path / "out.jsonl.manifest.json").unlink()  # as the message says
    assert run(model_dirs, out, "--n", "3", methods="sc", limit=1) == 0
    assert {r["method"]: r["settings"].get("n") for r in read_jsonl(out)} == {"greedy": None, "sc": 3}
    assert json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["ran"] == ["greedy", "sc"]
    assert run(model_dirs, out, "--max-new-tokens", "5", methods="greedy", limit=1) == 2  # still checked


def test_a_model_folder_written_another_way_is_the_same_setting(model_dirs, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, limit=1) == 0
    assert run((model_dirs[0] + "/", "./" + os.path.relpath(model_dirs[1])), out, limit=2) == 0
    assert {r["settings"]["model"] for r in read_jsonl(out)} == {model_dirs[0]}


def test_hub_data_unavailable_says_to_pass_data(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert em.main(["--method", "greedy", "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "HuggingFaceH4/MATH-500" in err and "--data PATH" in err


def test_command_line_offline_hub_model_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(em.__file__)), "--method", "greedy", "--model", "no-such-org/no-such-model",
         "--data", str(PROBLEMS), "--limit", "1", "--output", str(tmp_path / "out.jsonl")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eval_math.py: error: cannot load model 'no-such-org/no-such-model'")
    assert "downloaded" in last and "local path" in last


# ----------------------------------------------------------------------------------------------
# Results are never lost or mixed


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_run_leaves_every_file_as_it_was(model_dirs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out) == 0
    record = dict(read_jsonl(out)[0], error="RuntimeError: CUDA out of memory", correct=False)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")  # a failed attempt, to be retried by the same run
    before = snapshot(tmp_path)
    assert len(out.read_text().splitlines()) == 4
    assert run(model_dirs, out, tokens=5) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_shards_refuse_to_merge_with_another_runs_results(model_dirs, tmp_path, capsys):
    """The issue's repro: an unsharded run, then two shards of other settings on the same --output."""
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, limit=5, tokens=4) == 0
    before = snapshot(tmp_path)
    assert run(model_dirs, out, "--shard", "0/2", limit=3, tokens=9) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_new_tokens" in err and "math500.jsonl" in err
    assert snapshot(tmp_path) == before


def test_merge_refuses_shards_of_two_runs_and_changes_nothing(model_dirs, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(model_dirs, a / "math500.jsonl", "--shard", "0/2", tokens=4) == 0
    assert run(model_dirs, b / "math500.jsonl", "--shard", "1/2", tokens=9) == 0
    (a / "math500.rank1.jsonl").write_bytes((b / "math500.rank1.jsonl").read_bytes())
    before = snapshot(a)
    assert em.main(["--merge", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_new_tokens: 9 vs 4" in err and "math500.rank1.jsonl" in err and "nothing was merged" in err
    assert snapshot(a) == before and not (a / "math500.jsonl").exists()


@pytest.mark.parametrize("method, option, field", [
    ("greedy", ["--dtype", "bfloat16"], "dtype"),
    ("sc", ["--top-k", "5"], "top_k"),
    ("nabla", ["--top-k", "5"], "nabla.resample_top_k"),
    ("nabla", ["--compile"], "nabla.fast_rollout"),
    ("bon", ["--reward-model", "another/reward-model"], "reward_model"),
    ("nabla", ["--reward-model", "another/reward-model"], "reward_model"),
    ("greedy", ["--compile"], "compile"),
    ("sc", ["--seed", "1"], "base_seed"),
])
def test_each_result_records_the_settings_it_depends_on(model_dirs, tmp_path, capsys, method, option, field):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, methods=method, limit=1) == 0
    settings = read_jsonl(out)[0]["settings"]
    assert settings["dtype"] == "float32" and settings["device"] == "cpu" and settings["base_seed"] == 0
    if method != "greedy":
        assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (0.6, 0.95, 20)
    assert run(model_dirs, out, *option, methods=method, limit=1) == 2
    assert f"({field}: " in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bf16, batches and the fast path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_method_runs_in_fp32_and_bf16(model_dirs, tmp_path, dtype):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, "--dtype", dtype, "--grad-norm-threshold", "0", methods="greedy,sc,bon,nabla",
               limit=2, tokens=6) == 0
    records = read_jsonl(out)
    assert len(records) == 8 and all(r["error"] is None for r in records)
    assert {r["settings"]["dtype"] for r in records} == {dtype}
    for r in records:
        assert r["forward_token_equivalents"] > r["model_calls"] > 0
        if r["method"] == "nabla":
            assert r["stats"]["reward_final"] >= r["stats"]["reward_initial"]
            assert r["stats"]["grad_steps"] >= 1
        if r["method"] == "bon":  # rewards from the fp32 head: distinct, not bf16-rounded ties
            assert len(set(r["stats"]["rewards"])) == 2
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["methods"]["nabla"]["mean_forward_token_equivalents"] > summary["methods"]["bon"]["mean_forward_token_equivalents"]
    nabla_rows = [r for r in records if r["method"] == "nabla"]
    assert summary["methods"]["bon"]["mean_reward_scores"] == 2 and summary["methods"]["sc"]["mean_reward_scores"] == 0
    assert summary["methods"]["nabla"]["mean_reward_scores"] == sum(r["stats"]["rollouts"] for r in nabla_rows) / 2
    assert summary["methods"]["nabla"]["mean_grad_passes"] == sum(r["stats"]["grad_steps"] for r in nabla_rows) / 2


def test_batched_greedy_is_token_identical_to_one_at_a_time(model_dirs, tmp_path):
    one, batched = tmp_path / "one.jsonl", tmp_path / "batched.jsonl"
    assert run(model_dirs, one, methods="greedy,sc,bon", limit=5, tokens=12) == 0
    assert run(model_dirs, batched, "--batch-size", "3", methods="greedy,sc,bon", limit=5, tokens=12) == 0
    by_key = lambda path: {(r["id"], r["method"]): r for r in read_jsonl(path)}
    a, b = by_key(one), by_key(batched)
    assert set(a) == set(b) and len(a) == 15
    for key in a:
        assert b[key]["error"] is None
        if key[1] == "greedy":
            assert b[key]["response"] == a[key]["response"]
            assert b[key]["forward_token_equivalents"] == a[key]["forward_token_equivalents"]
        else:
            assert len(b[key]["stats"]["sample_tokens"]) == 2
    prompts = {len(r["prompt"]) for r in read_jsonl(one)}
    assert len(prompts) > 1  # prompts of different lengths, so the batches were left-padded
    first_batch = [r for r in read_jsonl(batched) if r["method"] == "sc"][:3]
    assert all(r["batch"] == {"seed": first_batch[0]["seed"], "ids": [x["id"] for x in first_batch]}
               for r in first_batch)
    assert all("batch" not in r for r in read_jsonl(one))


def test_a_run_may_resume_with_another_batch_size(model_dirs, tmp_path):
    """The batch size, like the shard layout, is how the work is split: a ∇-Reasoner run, then baselines batched
    by 2, then one more problem one at a time, all on one output; each batched record names its batch."""
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, methods="nabla", limit=1) == 0
    assert run(model_dirs, out, "--batch-size", "2", methods="greedy,sc", limit=2) == 0
    assert run(model_dirs, out, methods="greedy,sc", limit=3) == 0
    records = read_jsonl(out)
    assert [(r["index"], r["method"]) for r in records] == [(0, "nabla"), (0, "greedy"), (1, "greedy"), (0, "sc"),
                                                            (1, "sc"), (2, "greedy"), (2, "sc")]
    assert [r.get("batch", {}).get("ids") for r in records] == [None] + [[r["id"] for r in records[1:3]]] * 4 + [None] * 2
    assert len({json.dumps(r["settings"], sort_keys=True) for r in records if r["method"] == "greedy"}) == 1
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["config"]["batch_size"] == 1  # this run's


def test_an_output_whose_settings_hold_a_batch_size_still_resumes(model_dirs, tmp_path):
    """Older versions kept the batch size among the settings, in the manifest and in every record."""
    out, manifest = tmp_path / "out.jsonl", tmp_path / "out.jsonl.manifest.json"
    assert run(model_dirs, out, methods="greedy", limit=1) == 0
    with_size = lambda settings: {**settings, "batch_size": 1}
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"settings": {m: with_size(s) for m, s in old["settings"].items()}}))
    out.write_text("".join(json.dumps({**r, "settings": with_size(r["settings"])}) + "\n" for r in read_jsonl(out)))
    assert run(model_dirs, out, "--batch-size", "2", methods="greedy", limit=3) == 0
    assert [r["index"] for r in read_jsonl(out)] == [0, 1, 2]


def test_batches_group_one_baseline_method_at_a_time_and_nabla_alone():
    problems = [em.Problem(i, str(i), "p", "1") for i in range(5)]
    todo = [(p, m) for p in problems for m in ("greedy", "nabla", "bon")]
    got = [([p.index for p in ps], m) for ps, m in em.batches(todo, 2)]
    assert got == [([0, 1], "greedy"), ([2, 3], "greedy"), ([4], "greedy"), ([0, 1], "bon"), ([2, 3], "bon"),
                   ([4], "bon")] + [([i], "nabla") for i in range(5)]
    assert em.batches(todo, 1) == [([p], m) for p, m in todo]


def test_compile_switch_gives_the_same_answers_on_cpu(model_dirs, tmp_path):
    """--compile (a static KV cache; compiled on a GPU only) changes no token in fp32 on CPU."""
    plain, fast = tmp_path / "plain.jsonl", tmp_path / "fast.jsonl"
    for out, extra in ((plain, []), (fast, ["--compile"])):
        assert run(model_dirs, out, "--grad-norm-threshold", "0", *extra, methods="greedy,bon,nabla", limit=2,
                   tokens=10) == 0
    for a, b in zip(read_jsonl(plain), read_jsonl(fast)):
        assert (a["id"], a["method"], a["response"]) == (b["id"], b["method"], b["response"])
        assert a["error"] is None and b["error"] is None


def test_models_load_straight_onto_the_gpu_when_accelerate_is_installed(model_dirs, monkeypatch):
    loaded = []
    real_load = em._load

    def spy(loader, name, **kwargs):
        loaded.append(kwargs)
        return real_load(loader, name, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(em, "_load", spy)
    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    model = em._load_model(em.AutoModelForCausalLM, model_dirs[0], torch.device("cpu"), torch.bfloat16)
    assert loaded[-1] == {"dtype": torch.bfloat16, "output_loading_info": True} and model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    # on a GPU the weights are placed at load (device_map), not copied there afterwards
    device = torch.device("cuda", 1)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    em._load_model(em.AutoModelForCausalLM, model_dirs[0], device, torch.bfloat16)
    assert loaded[-1] == {"dtype": torch.bfloat16, "output_loading_info": True, "device_map": "cuda:1"}


def test_merged_summary_covers_this_runs_problems_and_the_file_keeps_every_result(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    for shard in ("0/2", "1/2"):
        assert run(model_dirs, out, "--shard", shard, limit=4) == 0
    assert len(read_jsonl(out)) == 4
    for shard in ("0/2", "1/2"):  # everything is done; the last shard merges again
        assert run(model_dirs, out, "--shard", shard, limit=2) == 0
    summary = json.loads((tmp_path / "math500.jsonl.summary.json").read_text())
    assert summary["methods"]["greedy"]["problems"] == 2 and summary["config"]["problems"] == 2
    assert len(read_jsonl(out)) == 4


# ----------------------------------------------------------------------------------------------
# The settings manifest: a sharded run of mixed settings is refused at start


def launch_shards(model_dirs, out: Path, *extra_per_shard: list[str]) -> list[subprocess.CompletedProcess]:
    """Shards as separate processes, all started at the same moment, as torchrun would start them."""
    lm_dir, rm_dir = model_dirs
    procs = [subprocess.Popen(
        [sys.executable, str(Path(em.__file__)), "--method", "greedy", "--model", lm_dir, "--reward-model", rm_dir,
         "--data", str(PROBLEMS), "--limit", "4", "--n", "2", "--output", str(out),
         "--shard", f"{shard}/{len(extra_per_shard)}", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for shard, extra in enumerate(extra_per_shard)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_shards_started_together_with_one_differing_setting_refuse_before_running_a_problem(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    procs = launch_shards(model_dirs, out, ["--max-new-tokens", "4"], ["--max-new-tokens", "5"])
    assert sorted(p.returncode for p in procs) == [0, 2]  # whichever wrote the manifest first runs
    refused = next(s for s, p in enumerate(procs) if p.returncode == 2)
    last = procs[refused].stderr.strip().splitlines()[-1]
    assert last.startswith("eval_math.py: error: ") and "math500.jsonl.manifest.json" in last
    assert "max_new_tokens: " in last and "Traceback" not in procs[refused].stderr
    assert not out.with_name(f"math500.rank{refused}.jsonl").exists()  # not one problem ran
    manifest = json.loads((tmp_path / "math500.jsonl.manifest.json").read_text())
    assert manifest["settings"]["greedy"]["max_new_tokens"] == 4 + (refused == 0)  # the winner's settings


def test_shards_started_together_with_the_same_settings_run_and_merge(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    procs = launch_shards(model_dirs, out, [], [])
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    ids = [p.id for p in em.load_problems(PROBLEMS)[:4]]
    assert [r["id"] for r in read_jsonl(out)] == ids  # merged by whichever finished last
    summary = json.loads((tmp_path / "math500.jsonl.summary.json").read_text())
    manifest = json.loads((tmp_path / "math500.jsonl.manifest.json").read_text())
    assert summary["methods"]["greedy"]["problems"] == 4
    assert summary["config"]["settings"]["greedy"] == manifest["settings"]["greedy"] == read_jsonl(out)[0]["settings"]


def test_a_shard_that_loses_the_race_to_write_the_manifest_compares_with_the_winners(model_dirs, tmp_path,
                                                                                      monkeypatch, capsys):
    """The race itself: another shard writes the manifest between this one's look and its exclusive create."""
    out, real_read = tmp_path / "math500.jsonl", em.read_manifest
    path = tmp_path / "math500.jsonl.manifest.json"
    assert run(model_dirs, tmp_path / "other" / "math500.jsonl", tokens=9) == 0
    winner = (tmp_path / "other" / "math500.jsonl.manifest.json").read_text()
    looks = []

    def read_then_lose_the_race(p):
        looks.append(p)
        if len(looks) == 2:  # the second look, just before the exclusive create: the other shard wins
            p.write_text(winner)
            return None
        return real_read(p)

    monkeypatch.setattr(em, "read_manifest", read_then_lose_the_race)
    assert run(model_dirs, out, "--shard", "0/2") == 2
    assert "max_new_tokens: 9 in the file, 4 now" in capsys.readouterr().err
    assert path.read_text() == winner and not (tmp_path / "math500.rank0.jsonl").exists()
    assert not list(tmp_path.rglob(".*.tmp"))  # the loser's temporary file is gone too


def test_a_manifest_that_is_a_broken_link_is_a_one_line_error_not_an_endless_loop(model_dirs, tmp_path, capsys):
    (tmp_path / "math500.jsonl.manifest.json").symlink_to(tmp_path / "nowhere.json")
    assert run(model_dirs, tmp_path / "math500.jsonl") == 2
    assert "math500.jsonl.manifest.json: exists but cannot be read" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_manifest_that_is_not_valid_json_is_a_one_line_error_naming_it(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    for shard in ("0/2", "1/2"):
        assert run(model_dirs, out, "--shard", shard) == 0
    capsys.readouterr()
    for broken in ('{"settings": {"greedy": ', '["a list"]', '{"settings": {"greedy": 3}}', '{"settings": {}}'):
        (tmp_path / "math500.jsonl.manifest.json").write_text(broken)
        before = snapshot(tmp_path)
        for args in (["--shard", "0/2"], ["--merge", str(tmp_path)]):  # a run, and a merge
            assert (run(model_dirs, out, *args) if args[0] == "--shard" else em.main(args)) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "math500.jsonl.manifest.json: not a settings manifest" in err[0], err
            assert snapshot(tmp_path) == before


def test_an_output_from_before_manifests_still_resumes_and_merges(model_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "math500.jsonl"
    for shard in ("0/2", "1/2"):
        assert run(model_dirs, out, "--shard", shard, limit=4) == 0
    manifest = tmp_path / "math500.jsonl.manifest.json"
    written = manifest.read_text()
    manifest.unlink()  # as a run made before manifests existed left it: only the records carry the settings
    before = snapshot(tmp_path)
    assert run(model_dirs, out, "--shard", "0/2", limit=4, tokens=5) == 2  # the records refuse other settings
    assert f"{out} was written by a run with other settings (max_new_tokens: 4 in the file, 5 now)" in \
           capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert em.main(["--merge", str(tmp_path)]) == 0  # merging goes by the records too
    assert len(read_jsonl(out)) == 4 and not manifest.exists()
    monkeypatch.setattr(em, "solve", lambda *a, **k: pytest.fail("nothing is left to solve"))
    assert run(model_dirs, out, "--shard", "1/2", limit=4) == 0  # resumes, and writes the manifest from the records
    assert manifest.read_text() == written


def test_an_old_output_whose_records_disagree_is_refused(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, limit=2) == 0
    (tmp_path / "math500.jsonl.manifest.json").unlink()  # from before manifests, and two runs' records in it:
    records = read_jsonl(out)
    records[1]["settings"]["base_seed"] = 99
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = snapshot(tmp_path)
    assert run(model_dirs, out, limit=3) == 2
    assert f"{out} holds greedy results of another run than {out} (base_seed: 99 vs 0)" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_an_old_output_with_unmerged_shards_refuses_a_run_of_another_shard_count(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, "--shard", "0/2", limit=4) == 0
    (tmp_path / "math500.jsonl.manifest.json").unlink()  # from before manifests; shard 1 has not run
    assert run(model_dirs, out, limit=4, tokens=7) == 2  # unsharded now: the shard's records still count
    assert "math500.rank0.jsonl was written by a run with other settings (max_new_tokens: 4 in the file, 7 now)" \
           in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "math500.jsonl.manifest.json").exists()


def test_a_model_that_fails_to_load_leaves_no_manifest(model_dirs, tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    assert em.main(["--method", "greedy", "--model", str(tmp_path / "typo"), "--data", str(PROBLEMS), "--limit", "1",
                    "--output", str(out)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "math500.jsonl.manifest.json").exists()  # the corrected command is not refused
    assert run(model_dirs, out, limit=1) == 0


# Each of the tests below fails for a mutant of eval_math.py that the tests above let through.
def test_string_fallback_drops_mbox_spacing_commands_and_degrees():
    assert em.is_correct("\\boxed{A, C}", "\\mbox{A, C}")                    # \mbox{} like \text{}
    assert em.is_correct("\\boxed{\\text{A},\\;\\text{C}}", "\\text{A, C}")   # \; is only spacing
    assert em.is_correct("\\boxed{\\text{N}30^\\circ\\text{E}}", "\\text{N30E}")  # ^\circ dropped


def test_a_gold_that_math_verify_cannot_read_is_wrong_not_an_error():
    assert em._parse("$\\ldots$") == []
    assert em.is_correct("\\boxed{5}", "\\ldots") is False


def test_unique_id_wins_over_id(tmp_path):
    path = tmp_path / "both.json"
    path.write_text('[{"prompt": "1+1", "answer": "2", "id": "x", "unique_id": "test/a/1.json"}]')
    assert em.load_problems(path)[0].id == "test/a/1.json"


def test_vote_compares_with_each_groups_first_answer_as_the_gold():
    ineq, interval = "\\boxed{1 \\le x \\le 2}", "\\boxed{[1,2]}"  # ineq as gold accepts interval, not vice versa
    assert em.vote([ineq, interval, ineq]) == (0, [[0, 1, 2]])


# ---------------------------------------------------------------------------------------------- methods
@pytest.fixture
def special_lm(tok, lm):
    """A policy whose greedy (and, by far, most likely) first token is <|im_start|>: special, not end-of-sequence."""
    out, start = copy.deepcopy(lm), tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        h = out.model(torch.tensor([chat_prompt_ids(tok, Q)])).last_hidden_state[0, -1]
        out.lm_head.weight[start] = 100 * h / h.norm()
    return out


def test_graded_text_drops_special_tokens_and_scored_text_keeps_them(tok, special_lm, rm):
    config = em.NablaConfig(max_new_tokens=4, rollout_temperature=0)
    s = em.sample(em.Models(special_lm, tok), [Q], 1, seed=0, config=config)[0][0]
    assert s.scored_text.startswith("<|im_start|>") and "<|im_start|>" not in s.text
    assert s.scored_text.replace("<|im_start|>", "") == s.text
    greedy = em.solve("greedy", [Q], em.Models(special_lm, tok), config=config)[0]
    assert greedy["response"] == s.text
    models, config = em.Models(special_lm, tok, rm, tok), em.NablaConfig(max_new_tokens=4)
    bon = em.solve("bon", [Q], models, n=2, seed=1, config=config)[0]
    samples = em.sample(models, [Q], 2, seed=1, config=config)[0]
    assert all(x.scored_text != x.text for x in samples)
    assert bon["response"] == samples[bon["stats"]["chosen"]].text
    assert bon["stats"]["rewards"] == pytest.approx([score(rm, tok, Q, x.scored_text) for x in samples], abs=1e-5)


def test_sc_votes_on_the_graded_text(tok, lm, monkeypatch):
    pairs = [("\\boxed{12}", "\\boxed{1<|im_start|>2}"), ("\\boxed{12}", "\\boxed{1<|im_start|>2}"),
             ("\\boxed{5}", "\\boxed{5}")]
    monkeypatch.setattr(em, "sample", lambda models, prompts, n, seed, config:
                        [[em.Sample(t, 3, 5, s) for t, s in pairs] for _ in prompts])
    result = em.solve("sc", [Q], em.Models(lm, tok), n=3)[0]
    assert result["stats"]["answers"] == ["12", "12", "5"] and result["stats"]["groups"] == [[0, 1], [2]]


def test_bon_takes_the_first_of_equal_rewards(tok, lm, rm, monkeypatch):
    monkeypatch.setattr(em, "sample", lambda models, prompts, n, seed, config:
                        [[em.Sample(f"s{i}", 2, 5, f"s{i}") for i in range(3)] for _ in prompts])
    monkeypatch.setattr(em, "score_batch", lambda models, pairs: ([1.0, 2.0, 2.0], [7, 7, 7]))
    result = em.solve("bon", [Q], em.Models(lm, tok, rm, tok), n=3)[0]
    assert (result["stats"]["chosen"], result["response"]) == (1, "s1")


def test_nabla_gets_the_problems_seed(tok, lm, rm, monkeypatch):
    seeds = []
    fake = types.SimpleNamespace(generate=lambda prompt, seed: seeds.append(seed) or types.SimpleNamespace(
        text="x", stats={"model_calls": 1, "forward_token_equivalents": 1, "generated_tokens": 1, "wall_time_s": 0.0}))
    models = em.Models(lm, tok, rm, tok)
    monkeypatch.setattr(models, "reasoner", lambda config: fake)
    em.solve("nabla", [Q], models, n=2, seed=1234)
    assert seeds == [1234]


def test_problem_seeds_of_other_base_seed_and_index_pairs_differ():
    assert em.problem_seed(1, 11) != em.problem_seed(11, 1)


# ---------------------------------------------------------------------------------------------- run_batch
ARGS = types.SimpleNamespace(prompt_suffix="", seed=0, n=2)


def test_a_batch_is_drawn_with_its_first_problems_seed(tok, lm, monkeypatch):
    seen = []
    monkeypatch.setattr(em, "solve", lambda method, prompts, models, n, seed, config:
                        seen.append(seed) or [{"response": "\\boxed{1}"} for _ in prompts])
    problems = [em.Problem(i, str(i), f"p{i}", "1") for i in (3, 4)]
    records = em.run_batch(problems, "sc", em.Models(lm, tok), ARGS, em.NablaConfig(), {})
    assert seen == [em.problem_seed(0, 3)] == [records[0]["batch"]["seed"]]


def test_run_batch_grades_with_the_gold_as_the_gold(tok, lm, monkeypatch):
    monkeypatch.setattr(em, "solve", lambda method, prompts, models, n, seed, config:
                        [{"response": "\\boxed{[1,2]}"} for _ in prompts])  # an interval, to an inequality gold
    record = em.run_batch([em.Problem(0, "a", "p", "1 \\le x \\le 2")], "greedy", em.Models(lm, tok), ARGS,
                          em.NablaConfig(), {})[0]
    assert record["correct"] is True and record["prediction"] == "[1,2]"


def test_a_failed_batch_shares_its_time_out_evenly(tok, lm, monkeypatch):
    clock = iter([100.0, 110.0, 110.0])
    monkeypatch.setattr(em, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(em, "solve", lambda *a, **k: 1 / 0)
    problems = [em.Problem(i, str(i), f"p{i}", "1") for i in (0, 1)]
    records = em.run_batch(problems, "sc", em.Models(lm, tok), ARGS, em.NablaConfig(), {})
    assert [r["wall_time_s"] for r in records] == [5.0, 5.0]


# ---------------------------------------------------------------------------------------------- settings
def test_settings_name_the_data_model_prompt_suffix_and_nabla_budget():
    args = types.SimpleNamespace(model="m", max_new_tokens=4, seed=0, prompt_suffix="Box it.", n=2,
                                 reward_model="r", compile=False)
    s = em.method_settings("nabla", args, em.NablaConfig(), torch.float32, torch.device("cpu"), "abc")
    assert (s["data_sha256"], s["model"], s["prompt_suffix"], s["nabla.max_rollouts"]) == ("abc", "m", "Box it.", 2)


def test_resume_refuses_another_prompt_suffix(model_dirs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, limit=1) == 0
    assert run(model_dirs, out, "--prompt-suffix", "Put the answer in \\boxed{}.", limit=1) == 2
    assert "(prompt_suffix: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- summary
def _row(i, method="nabla", error=None, peak=None, grad_steps=0, calls=10, seconds=1.0):
    return {"id": str(i), "method": method, "correct": False, "error": error, "model_calls": calls,
            "forward_token_equivalents": calls, "generated_tokens": calls, "wall_time_s": seconds,
            "stats": None if error else {"grad_steps": grad_steps, "rollouts": 2}, "peak_gpu_memory_gib": peak}


def test_summary_peak_includes_failed_problems_and_stat_means_only_finished_ones(tmp_path):
    records = [_row(0, peak=3.0, grad_steps=1), _row(1, peak=2.0, grad_steps=2),
               _row(2, error="RuntimeError: CUDA out of memory", peak=70.0)]
    row = em.write_summary(tmp_path / "out.jsonl", records, {}, ON_RECORD)["methods"]["nabla"]
    assert row["peak_gpu_memory_gib"] == 70.0  # the problem that ran out of memory peaked highest
    assert row["mean_grad_passes"] == 1.5 and row["mean_reward_scores"] == 2


def test_summary_means_keep_three_decimals(tmp_path):
    records = [_row(i, calls=c) for i, c in enumerate((1, 2, 2))]
    summary = em.write_summary(tmp_path / "out.jsonl", records, {}, ON_RECORD)
    assert summary["methods"]["nabla"]["mean_model_calls"] == 1.667


# ---------------------------------------------------------------------------------------------- records
def test_of_two_failures_the_later_is_kept():
    first, second = ({"id": "a", "method": "sc", "error": e} for e in ("E1", "E2"))
    assert em.best_records([first, second])[("a", "sc")] is second


def test_a_shards_file_holds_only_its_own_problems(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out) == 0  # unsharded: problems 0, 1, 2
    assert run(model_dirs, out, "--shard", "0/2") == 0  # finds its problems in the output, copies only them
    assert [r["index"] for r in read_jsonl(tmp_path / "math500.rank0.jsonl")] == [0, 2]


def test_baselines_summarise_zero_gradient_passes(tmp_path):
    records = [dict(_row(0, method="greedy"), stats={"sample_tokens": [10], "chosen": 0})]
    row = em.write_summary(tmp_path / "out.jsonl", records, {}, ON_RECORD)["methods"]["greedy"]
    assert (row["mean_grad_passes"], row["mean_reward_scores"]) == (0, 0)


def test_a_result_this_file_holds_is_kept_not_replaced_by_another_files(model_dirs, tmp_path, capsys):
    """Two files hold different results for one problem (e.g. a shard and an unsharded run that ran at once):
    a run keeps the result its own file holds, and a run with nothing to copy leaves its file as it was."""
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, "--shard", "0/2", limit=2) == 0  # problem 0 in the shard's file
    assert run(model_dirs, out, limit=2) == 0  # copies it, solves problem 1
    rank0 = tmp_path / "math500.rank0.jsonl"
    rank0.write_text("".join(json.dumps({**r, "response": "other attempt"}) + "\n" for r in read_jsonl(rank0)))
    before = out.read_text()
    capsys.readouterr()
    assert run(model_dirs, out, limit=2) == 0
    assert out.read_text() == before and "taken from the output's other files" not in capsys.readouterr().err
