"""Tests of eval_math.py on CPU: the grader on MATH-500's gold answers, every method end to end with
the tiny models of tiny.py saved to a temporary folder, resuming, sharding and every bad-input error.

Tests that read ../shared/data are skipped, with the reason, when that folder is absent.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_math as em

DATA = Path(__file__).parent.parent / "shared" / "data"
MATH500 = DATA / "math500.jsonl"
needs_data = pytest.mark.skipif(not MATH500.exists(), reason=f"{MATH500} is absent (the shared data folder)")
REQUIRED_KEYS = {"id", "method", "prompt", "response", "prediction", "answer", "correct", "model_calls",
                 "wall_time_s", "error"}


def math500_golds() -> list[str]:
    return [json.loads(line)["answer"] for line in MATH500.read_text().splitlines()]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tok, lm, rm) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("models")
    for name, model in (("lm", lm), ("rm", rm)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return str(root / "lm"), str(root / "rm")


def run(model_dirs, out: Path, *extra: str, methods: str = "greedy", limit: int = 3, tokens: int = 4) -> int:
    lm_dir, rm_dir = model_dirs
    return em.main(["--method", methods, "--model", lm_dir, "--reward-model", rm_dir, "--data", str(MATH500),
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


# ----------------------------------------------------------------------------------------------
# Methods


def test_sampling_is_seeded_and_ignores_the_models_own_generation_defaults(tok, lm):
    greedy_lm = copy.deepcopy(lm)
    # Defaults that, if generate() picked them up, would make every sample the greedy one.
    greedy_lm.generation_config.top_k = 1
    greedy_lm.generation_config.do_sample = False
    models = em.Models(greedy_lm, tok)
    config = em.NablaConfig(max_new_tokens=6)
    samples = em.sample_responses(models, "What is 2+3?", 4, seed=5, config=config)
    assert len({s.text for s in samples}) > 1
    assert [s.text for s in em.sample_responses(models, "What is 2+3?", 4, seed=5, config=config)] == \
           [s.text for s in samples]
    assert [s.text for s in em.sample_responses(models, "What is 2+3?", 4, seed=6, config=config)] != \
           [s.text for s in samples]
    assert all(1 <= s.tokens <= 6 for s in samples)


def test_solve_counts_model_calls_and_bon_returns_the_best_scored_sample(tok, lm, rm):
    models, config = em.Models(lm, tok, rm, tok), em.NablaConfig(max_new_tokens=5)
    greedy = em.solve("greedy", "What is 2+3?", models, config=config)
    assert greedy["model_calls"] == greedy["generated_tokens"] == 5  # a random model does not stop early
    sc = em.solve("sc", "What is 2+3?", models, n=3, seed=1, config=config)
    assert sc["model_calls"] == sc["generated_tokens"] == sum(sc["stats"]["sample_tokens"])
    bon = em.solve("bon", "What is 2+3?", models, n=3, seed=1, config=config)
    rewards = bon["stats"]["rewards"]
    assert bon["model_calls"] == bon["generated_tokens"] + 3 and len(rewards) == 3
    assert rewards[bon["stats"]["chosen"]] == max(rewards)
    assert em.score(rm, tok, "What is 2+3?", bon["response"]) == pytest.approx(max(rewards), abs=1e-5)
    with pytest.raises(ValueError, match="unknown method"):
        em.solve("beam", "What is 2+3?", models)


def test_solve_nabla_revises_and_its_model_calls_follow_the_counting_rule(tok, lm, rm):
    # Thresholds that make every position worth optimizing, so revisions happen even with random models.
    config = em.NablaConfig(max_new_tokens=5, grad_norm_threshold=0.0, confidence_threshold=1.0, dto_iters=2)
    result = em.solve("nabla", "What is 2+3?", em.Models(lm, tok, rm, tok), n=2, seed=0, config=config)
    stats = result["stats"]
    assert stats["rollouts"] == 2 and stats["revisions_proposed"] >= 1 and stats["grad_steps"] >= 1
    # One call per generated token, one per scored draft, four per gradient pass (COUNTING_RULE).
    assert result["model_calls"] == result["generated_tokens"] + stats["rollouts"] + 4 * stats["grad_steps"]
    assert json.loads(em._to_json(result))["stats"]["rollouts"] == 2


@needs_data
def test_every_method_end_to_end_on_three_math500_problems(model_dirs, tmp_path):
    out = tmp_path / "math500.jsonl"
    assert run(model_dirs, out, methods="greedy,sc,bon,nabla", tokens=6) == 0
    records = read_jsonl(out)
    problems = em.load_problems(MATH500)[:3]
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


# ----------------------------------------------------------------------------------------------
# Resuming and failures


@needs_data
def test_resume_after_an_interrupted_run(model_dirs, tmp_path, monkeypatch):
    out, calls, real_solve = tmp_path / "out.jsonl", [], em.solve

    def interrupted_solve(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the third problem
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(em, "solve", interrupted_solve)
    with pytest.raises(KeyboardInterrupt):
        run(model_dirs, out, "--prompt-suffix", "Put the answer in \\boxed{}.")
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
    assert em.open_for_resume(path) == {("a", "greedy"): done}  # the failed problem will be retried
    assert path.read_text() == json.dumps(done) + "\n"
    path.write_text(json.dumps(done) + "\n" + '{"id": "b", "meth')  # cut off in the middle
    assert list(em.open_for_resume(path)) == [("a", "greedy")]
    assert path.read_text() == json.dumps(done) + "\n"


@needs_data
def test_a_failed_problem_is_recorded_the_run_goes_on_and_a_rerun_retries_it(model_dirs, tmp_path, monkeypatch):
    out, real_solve = tmp_path / "out.jsonl", em.solve
    second = em.load_problems(MATH500)[1].problem

    def oom_on_second(method, prompt, *args, **kwargs):
        if prompt == second:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real_solve(method, prompt, *args, **kwargs)

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


@needs_data
def test_resume_refuses_results_of_other_settings(model_dirs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(model_dirs, out, limit=1) == 0
    assert run(model_dirs, out, limit=1, tokens=5) == 2
    assert "max_new_tokens differs" in capsys.readouterr().err
    out = tmp_path / "nabla.jsonl"
    assert run(model_dirs, out, methods="nabla", limit=1) == 0
    assert run(model_dirs, out, "--grad-norm-threshold", "8", methods="nabla", limit=1) == 2
    assert "grad_norm_threshold differs" in capsys.readouterr().err
    assert run(model_dirs, out, "--grad-norm-threshold", "-1", methods="nabla", limit=1) == 2
    assert "--grad-norm-threshold must not be negative" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Several GPUs


@needs_data
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

    ids = [p.id for p in em.load_problems(MATH500)[:5]]
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
    "unloadable model": (lambda d: ["--model", str(d / "no-such-model")], "must be downloaded first"),
    "shard out of range": (lambda d: ["--shard", "3/3"], "--shard 3/3: out of range"),
    "shard of zero": (lambda d: ["--shard", "0/0"], "out of range"),
    "shard not I/N": (lambda d: ["--shard", "first"], "expected I/N"),
    "n of zero": (lambda d: ["--n", "0"], "--n must be at least 1"),
    "not a number": (lambda d: ["--limit", "three"], "invalid int value"),
    "unknown device": (lambda d: ["--device", "tpu9"], "not a device"),
    "merge without shard files": (lambda d: ["--merge", str(d)], "no math500.rank*.jsonl files"),
    "garbage output file": (lambda d: ["--output", _write(d / "out.jsonl", "hello\n{}\n")], "out.jsonl line 1: not a result record"),
}


@needs_data
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_status_2(case, model_dirs, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    lm_dir, rm_dir = model_dirs
    base = {"--method": "greedy", "--model": lm_dir, "--reward-model": rm_dir, "--data": str(MATH500),
            "--limit": "1", "--max-new-tokens": "2", "--output": str(tmp_path / "math500.jsonl")}
    args = make_args(tmp_path)
    for option in set(base) & set(args[::2]):
        del base[option]
    assert em.main([x for kv in base.items() for x in kv] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eval_math.py: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


@needs_data
def test_shard_out_of_range_from_the_environment(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(model_dirs, tmp_path / "out.jsonl") == 2
    assert "RANK/WORLD_SIZE 4/2: out of range" in capsys.readouterr().err


@needs_data
def test_model_without_chat_template_is_refused(tok, lm, tmp_path, capsys):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    lm.save_pretrained(tmp_path / "plain")
    plain.save_pretrained(tmp_path / "plain")
    assert em.main(["--method", "greedy", "--model", str(tmp_path / "plain"), "--data", str(MATH500),
                    "--limit", "1", "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "chat template" in capsys.readouterr().err


def test_hub_data_unavailable_says_to_pass_data(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert em.main(["--method", "greedy", "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "HuggingFaceH4/MATH-500" in err and "--data PATH" in err


@needs_data
def test_command_line_offline_hub_model_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(em.__file__)), "--method", "greedy", "--model", "no-such-org/no-such-model",
         "--data", str(MATH500), "--limit", "1", "--output", str(tmp_path / "out.jsonl")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eval_math.py: error: cannot load model 'no-such-org/no-such-model'")
    assert "downloaded" in last and "local path" in last
