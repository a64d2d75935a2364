"""Tests of bench.py on tiny random models: the comparisons it times are fair, and its counts are right."""
import json

import pytest
import torch

import bench
import nabla


def tiny_models(lm_vocab=None):
    shape = bench.SHAPES["tiny"]
    if lm_vocab is not None:  # a policy with padding rows the reward model lacks, like Qwen2.5 vs Qwen3
        shape = dict(shape, lm=dict(shape["lm"], vocab_size=lm_vocab))
    return bench.build_models(shape, "cpu", torch.float32, seed=0)


@pytest.mark.parametrize("lm_vocab", [None, 520])
def test_all_four_ways_give_the_same_gradient(lm_vocab):
    lm, rm = tiny_models(lm_vocab)
    x = bench.make_inputs(lm, rm, bench.Lengths(prompt=7, committed=11, ahead=9), seed=0)
    variants = bench.step_variants(lm, rm, x, nabla.NablaConfig())
    report = bench.check_gradients({name: fn() for name, fn in variants.items()}, exact=True)
    assert list(report) == ["authors", "ahead_logits", "prefix_cache", "ours"]
    assert all(r["max_rel_err"] < 1e-5 and r["cosine"] > 0.99999 for r in report.values())


def test_the_gradient_check_catches_a_different_sequence():
    lm, rm = tiny_models()
    x = bench.make_inputs(lm, rm, bench.Lengths(prompt=7, committed=11, ahead=9), seed=0)
    cfg = nabla.NablaConfig()
    grads = {"authors": bench.our_step(lm, rm, x, cfg)}
    x.ahead[3] = (x.ahead[3] + 1) % 512  # a later ahead token changes ∂L/∂ŷ_0 through attention
    grads["ours"] = bench.our_step(lm, rm, x, cfg)
    with pytest.raises(AssertionError, match="not be fair"):
        bench.check_gradients(grads, exact=True)


def run_generate(rollout_temperature, drop_first=False, monkeypatch=None):
    """grad_steps of a generate run and the counter's verdict; optionally with `first` withheld from dto."""
    lm, rm = tiny_models()
    tok = bench.make_tokenizer(bench.vocab_chars(512 - 3))
    if drop_first:
        original = nabla.dto
        monkeypatch.setattr(nabla, "dto", lambda z0, full_grad, cfg, first=None, to_logits=lambda z: z:
                            original(z0, full_grad, cfg, first=None, to_logits=to_logits))
    cfg = nabla.NablaConfig(max_new_tokens=10, grad_norm_threshold=0.0, rollout_temperature=rollout_temperature)
    with torch.no_grad(), bench.counting_selection_reuse() as count:
        stats = nabla.NablaReasoner(lm, tok, rm, tok, cfg).generate(bench.PROMPT, seed=0).stats
    return stats, count


@pytest.mark.parametrize("rollout_temperature", [0.0, 0.6])
def test_selection_reuse_count_is_what_withholding_it_costs(rollout_temperature, monkeypatch):
    stats, count = run_generate(rollout_temperature)
    assert count["offered"] == stats["optimized_tokens"] > 0
    without, _ = run_generate(rollout_temperature, drop_first=True, monkeypatch=monkeypatch)
    assert without["grad_steps"] - stats["grad_steps"] == count["reused"]
    if rollout_temperature == 0:  # greedy drafts: the drafted token is the argmax, so the reuse always serves
        assert count["reused"] == count["offered"]


def test_selection_reuse_counts_a_drafted_token_the_argmax_reaches_later():
    """The argmax starts at token 0 and Adam moves it to the drafted token 1, whose gradient selection gave."""
    g, passes = torch.tensor([1e-3, -1e-3]), []
    run = lambda cfg: nabla.dto(torch.tensor([1.0, 0.9]), lambda token: passes.append(token) or g, cfg, first=(1, g))
    with bench.counting_selection_reuse() as count:
        run(nabla.NablaConfig())
    assert count == dict(offered=1, reused=1) and passes == [0]  # without it: a second pass, for token 1
    with bench.counting_selection_reuse() as count:
        run(nabla.NablaConfig(grad_cache=False))  # then dto takes `first` at the first iteration only
    assert count == dict(offered=1, reused=0) and 1 in passes


def test_main_prints_a_table_then_one_json_line(capsys, monkeypatch):
    made = []

    class Recorded(nabla.NablaReasoner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(nabla, "NablaReasoner", Recorded)
    bench.main(["--size", "tiny", "--prompt", "6", "--committed", "10", "--ahead", "8", "--repeats", "1"])
    assert len(made) == 4 and all(not r.eos and r.sampling["eos_token_id"] is None for r in made)  # full lengths
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["dto_step_speedup"] > 0 and record["grad_check_max_rel_err"] < 1e-4
    assert 0 <= record["grad_cache_skip_rate"] <= 1
    assert record["rollout_tokens_per_s"]["ours"] > 0 and record["rollout_tokens_per_s"]["plain"] > 0
    assert record["peak_memory_gb"] is None and record["dto_mfu"] is None  # CUDA only
    assert any("DTO gradient step" in line for line in lines)


def test_projected_hours_follow_the_formula(capsys, tmp_path):
    summary = {"methods": {
        "greedy": {"mean_generated_tokens": 600, "mean_grad_passes": 0, "mean_reward_scores": 0},
        "bon": {"mean_generated_tokens": 4800, "mean_grad_passes": 0, "mean_reward_scores": 8},
        "nabla": {"mean_generated_tokens": 2500, "mean_grad_passes": 40, "mean_reward_scores": 6}}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(summary))
    record = bench.main(["--size", "tiny", "--prompt", "6", "--committed", "10", "--ahead", "8", "--repeats", "1",
                         "--tokens-from", str(path), "--problems", "500"])
    rate, step, scoring = record["rollout_tokens_per_s"]["ours"], record["dto_step_ms"]["ours"] / 1e3, record["score_ms"] / 1e3
    assert record["projected_hours"]["nabla"]["ours"] == pytest.approx(500 * (2500 / rate + 40 * step + 6 * scoring) / 3600)
    assert record["projected_hours"]["greedy"]["fast"] == pytest.approx(
        500 * 600 / record["rollout_tokens_per_s"]["fast"] / 3600)
    assert "projected single-GPU hours" in capsys.readouterr().out
