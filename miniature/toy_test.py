"""Tests of the miniature: the task, the reward model's labels, the controls, and the whole pipeline in seconds."""
import json
import math
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nabla import NablaConfig
from task import Problem, corrupt, held_out_problems, make_tokenizer, random_problem, worked_steps
from toy_arith import kl, main, mean_se, redraw_probs, sharpened, verdict
from train import ratio_se, rm_example, step_labels


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


def test_process_labels_fall_at_the_first_wrong_step_and_stay_down():
    tok = make_tokenizer()
    p = Problem("3+4*2=", "4*2=8 3+8=11 \\boxed{11}", "11")
    wrong = "4*2=8 3+8=12 \\boxed{12}"
    labels = step_labels(tok, tok(wrong, add_special_tokens=False)["input_ids"], p.chain)
    first = wrong.index("12") + 1  # "1" is still right, "2" is not
    assert labels == [1.0] * first + [0.0] * (len(wrong) - first)
    ids, labels = rm_example(tok, p, wrong)
    assert len(ids) == len(labels) and labels[0] == -1 and labels[-1] == 0.0  # prompt unlabelled, verdict: wrong
    ids, labels = rm_example(tok, p, p.chain)
    assert min(l for l in labels if l >= 0) == 1.0  # gold: right at every step and finished
    ids, labels = rm_example(tok, p, p.chain[:-3])  # a right prefix that stops early is not a right answer
    assert labels[-2:] == [0.0, 0.0] and labels[-3] == 1.0  # the closing tokens of the template: unfinished


def test_sharpening_control_moves_by_the_asked_kl_toward_the_argmax():
    cfg = NablaConfig()
    z = torch.tensor([2.0, 1.5, 0.0, -1.0]).log_softmax(-1)
    p0 = redraw_probs(z, cfg)
    for target in (1e-4, 1e-2, 0.1):
        zs = sharpened(z, target, cfg)
        assert kl(redraw_probs(zs, cfg), p0) == pytest.approx(target, rel=1e-3)
        assert redraw_probs(zs, cfg)[0] > p0[0] and redraw_probs(zs, cfg)[1] < p0[1]


def test_statistics_and_verdicts():
    assert mean_se([0, 1, 0, 1]) == pytest.approx((0.5, 0.2886751))
    r, se = ratio_se([1, 0, 2], [2, 1, 2])
    assert r == pytest.approx(0.6) and se > 0
    assert verdict(0.05, 0.02) == "holds" and verdict(0.03, 0.02).startswith("not shown")
    assert verdict(-0.05, 0.02) == "reversed"


def test_quick_run_end_to_end(tmp_path):
    start = time.perf_counter()
    report = main(["--quick", "--models", str(tmp_path / "models")])
    assert time.perf_counter() - start < 30
    res = report["results"]
    assert res["greedy"]["problems"] == 4 and [res["nabla"][n]["n"] for n in (1, 2)] == [1, 2]
    for n in (1, 2):
        for method in ("sc", "bon"):
            row = res[f"{method}_{n}"]
            assert 0 <= row["accuracy"][0] <= res[f"pass_{n}"][0]  # a selector picks one of the samples
            assert row["forward_tokens"] > row["model_calls"] > 0
        assert res["nabla"][n]["forward_tokens"] > res["nabla"][n]["model_calls"] > 0
    assert res["bon_2"]["model_calls"] == pytest.approx(res["sc_2"]["model_calls"] + 2)  # two reward scorings
    claims = {c["claim"]: c for c in report["claims"]}
    assert any(c.startswith("Table 2") for c in claims) and all(c["verdict"] for c in claims.values())
    assert report["dto_claims"]["passes_with_cache_and_reuse"][0] <= report["dto_claims"]["passes_with_cache"][0] <= 20
    assert (tmp_path / "models" / "policy" / "config.json").exists()
    assert (tmp_path / "models" / "reward" / "model.safetensors").exists()
    again = main(["--quick", "--models", str(tmp_path / "models")])  # cached models: loaded, not retrained
    assert again["training"] == report["training"]


def test_committed_models_load_and_verify():
    """The committed checkpoint is the one the default settings ask for, and its reward model checks steps."""
    from task import greedy_accuracy
    from train import TrainSettings, load_or_train, reward_quality
    s = TrainSettings()
    test, val = held_out_problems(0, 500, s.val_problems)
    folder = Path(__file__).parent / "models"
    tok, lm, rm, meta, trained = load_or_train(folder, s, 0, val, {q.prompt for q in test + val}, retrain=False)
    assert not trained  # loaded: the settings recorded beside the weights are the defaults
    assert 0.45 <= greedy_accuracy(lm, tok, val[:100]) <= 0.65  # imperfect, with room for test-time scaling
    quality = reward_quality(rm, tok, lm, val[:100], 0)
    assert quality["gold_vs_corrupted"] >= 0.9 and quality["right_vs_wrong"] >= 0.7 and quality["top_is_right"] >= 0.8


def test_models_trained_holding_out_fewer_problems_than_asked_are_refused(tmp_path):
    """--problems past those the models were trained without would be training problems: not loaded."""
    from train import TrainSettings, load_or_train
    s = TrainSettings()
    (tmp_path / "meta.json").write_text(json.dumps(dict(seed=0, settings=asdict(s), held_out=2)))
    with pytest.raises(SystemExit, match="trained with 2 problems held out, fewer than the 3 asked for"):
        load_or_train(tmp_path, s, 0, [], {"1+1=", "2+2=", "3+3="}, retrain=False)


def test_a_paired_difference_of_rates_is_the_paired_mean_difference_when_every_denominator_is_one():
    from toy_arith import paired_ratio_difference
    a, b = [1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]
    diff, se = paired_ratio_difference((a, [1] * 6), (b, [1] * 6))
    d = [x - y for x, y in zip(a, b)]
    assert diff == pytest.approx(sum(d) / 6) and se == pytest.approx(statistics.pstdev(d) / math.sqrt(6))
    assert paired_ratio_difference((a, [1] * 6), (a, [1] * 6)) == (0.0, 0.0)
