"""Smoke test of toy_arith.py: the whole pipeline (train, diagnose DTO, evaluate) with tiny step counts."""
import random
import time

from toy_arith import corrupt, held_out_problems, main, make_tokenizer, random_problem, worked_steps


def test_task_chains_are_right_and_corruptions_are_wrong():
    rng = random.Random(0)
    for _ in range(200):
        p = random_problem(rng)
        assert p.chain.endswith(f"\\boxed{{{p.answer}}}")
        assert int(p.answer) == eval(p.prompt[:-1])  # the usual precedence
        assert corrupt(p, rng) != p.chain
    assert worked_steps([3, 4, 2], ["+", "*"]) == [(4, "*", 2, 8), (3, "+", 8, 11)]
    test, val = held_out_problems(0, 50, 50)
    assert len({p.prompt for p in test + val}) == 100


def test_tokenizer_is_character_level_with_a_chat_template():
    tok = make_tokenizer()
    text = "4*2=8 3+8=11 \\boxed{11}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "3+4*2="}], tokenize=False)


def test_quick_run_end_to_end(tmp_path):
    start = time.perf_counter()
    report = main(["--quick", "--models", str(tmp_path / "models")])
    assert time.perf_counter() - start < 30
    labels = [r["label"] for r in report["table"]]
    assert labels[:5] == ["greedy", "self-consistency", "best-of-N (reward model)", "∇-Reasoner (tuned)",
                          "∇-Reasoner without DTO (tuned)"]
    for row in report["table"]:
        assert 0 <= row["accuracy"] <= 1 and row["model_calls"] > 0 and row["problems"] == 4
    assert [r["n"] for r in report["curve"]["∇-Reasoner"]] == [1, 2]
    for row in report["curve"]["self-consistency"]:  # the vote picks one of the samples
        assert row["accuracy"] <= row["pass_at_n"]
    assert (tmp_path / "models" / "policy" / "config.json").exists()
    assert (tmp_path / "models" / "reward" / "model.safetensors").exists()
    again = main(["--quick", "--models", str(tmp_path / "models")])  # cached models: loaded, not retrained
    assert again["training"] == report["training"]
