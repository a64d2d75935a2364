"""Tests of nabla.py on tiny models built in-process (tiny.py); CPU, fp32."""
import copy
import gc
import logging
import math
import time
import warnings
import weakref
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models as token_models
from tokenizers.processors import TemplateProcessing
from transformers import GenerationConfig, PreTrainedTokenizerFast

import nabla
from tiny import CHAT_TEMPLATE, PRINTABLE, SPECIALS, char_tokenizer, make_lm, make_rm, make_tokenizer, tiny_config
from nabla import (AheadGrads, NablaConfig, NablaReasoner, Prefix, _keep, accept, ahead_loss_and_grads, align_vocab,
                   chat_prompt_ids, dto, eos_token_ids, onehot_grads, reward_template, sample_top_p, score,
                   select_position, straight_through_onehot, token_entropy)

PROMPT = "What is 2+3?"
# Random tiny models have small gradients: a zero gradient threshold lets DTO run at every uncertain token.
FAST = NablaConfig(max_new_tokens=16, grad_norm_threshold=0.0, dto_iters=5)


def without_time(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "wall_time_s"}


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def make_prefix(lm, rm, tok, rm_tok, vocab_map, committed_text="", cached=True):
    """A Prefix over prompt + committed text, with KV caches filled by a plain forward pass."""
    lm_ids = chat_prompt_ids(tok, PROMPT) + ids_of(tok, committed_text)
    before, after = reward_template(rm_tok, PROMPT) if rm is not None else ([], [])
    rm_ids = before + (vocab_map[torch.tensor(ids_of(tok, committed_text), dtype=torch.long)].tolist()
                       if rm is not None else [])
    prefix = Prefix(lm_ids, rm_ids, after)
    if cached:
        with torch.no_grad():
            prefix.lm_kv = _keep(lm(torch.tensor([lm_ids]), use_cache=True).past_key_values, len(lm_ids) - 1)
            if rm is not None:
                prefix.rm_kv = _keep(rm(torch.tensor([rm_ids]), use_cache=True).past_key_values, len(rm_ids))
    return prefix


def reference_grads(lm, rm, tok, rm_tok, vocab_map, committed_text, ahead, cfg, eos=()):
    """∂L/∂ŷ for every ahead token, the slow and obvious way: the whole sequence through both models,
    the ahead tokens as one-hot rows multiplied into the embedding matrices, full-vocabulary logits."""
    lm_ids = chat_prompt_ids(tok, PROMPT) + ids_of(tok, committed_text)
    y = F.one_hot(torch.tensor(ahead), lm.config.vocab_size).float().requires_grad_()
    E = lm.get_input_embeddings()(torch.arange(lm.config.vocab_size))  # the rows the model looks up (scaled, if so)
    emb = torch.cat([E[torch.tensor(lm_ids)], y @ E])
    logp = lm(inputs_embeds=emb[None]).logits[0].log_softmax(-1)
    loss = -cfg.likelihood_coeff * (logp[len(lm_ids) - 1:-1] * y).sum()
    if rm is not None:
        before, after = reward_template(rm_tok, PROMPT)
        n_rm = len(ahead) - (ahead[-1] in eos)
        y_rm = torch.zeros(n_rm, rm.config.vocab_size).index_add(1, vocab_map, y[:n_rm])
        response = [vocab_map[t] for t in ids_of(tok, committed_text)]
        R = rm.get_input_embeddings()(torch.arange(rm.config.vocab_size))
        rm_emb = torch.cat([R[torch.tensor(before + response, dtype=torch.long)], y_rm @ R, R[torch.tensor(after)]])
        loss = loss - cfg.reward_coeff * rm(inputs_embeds=rm_emb[None]).logits[0, 0]
    loss.backward()
    return loss.item(), y.grad


# ------------------------------------------------------------------------------------------ DTO pieces


def test_straight_through_forward_is_onehot_and_backward_is_softmax_gradient():
    torch.manual_seed(0)
    z = torch.randn(3, 50, requires_grad=True)
    y = straight_through_onehot(z)
    assert torch.equal(y, F.one_hot(z.argmax(-1), 50).float())  # exactly, not approximately
    g = torch.randn(3, 50)
    (y * g).sum().backward()
    p = z.detach().softmax(-1)
    expected = p * (g - (p * g).sum(-1, keepdim=True))  # vector-Jacobian product of softmax
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shuffled_rm_vocab", [False, True])
def test_prefix_kv_gradients_equal_full_recompute(tok, lm, shuffled_rm_vocab):
    rm_tok = make_tokenizer(shuffle_seed=3) if shuffled_rm_vocab else tok
    rm = make_rm(rm_tok)
    vocab_map = align_vocab(tok, rm_tok, lm.config.vocab_size)
    cfg = NablaConfig(likelihood_coeff=0.5)  # a larger c, so the likelihood terms weigh in the comparison
    ahead = ids_of(tok, "5. So x=") + [tok.eos_token_id]
    ref_loss, ref = reference_grads(lm, rm, tok, rm_tok, vocab_map, "2+3 is ", ahead, cfg, eos={tok.eos_token_id})
    for cached in (True, False):
        prefix = make_prefix(lm, rm, tok, rm_tok, vocab_map, "2+3 is ", cached=cached)
        step = ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, cfg, {tok.eos_token_id})
        grads = onehot_grads(step, torch.arange(len(ahead)), lm, rm, vocab_map, cfg)
        assert step.loss == pytest.approx(ref_loss, abs=1e-5)
        torch.testing.assert_close(grads, ref, rtol=0, atol=1e-5)
    assert ref.abs().max() > 1e-3  # the comparison is not between two zeros


def test_a_scaled_embedding_carries_its_scale_into_the_onehot_gradient(tok):
    """Gemma looks up rows scaled by √d: ∂L/∂ŷ must carry the scale, as the reference's one-hots multiplied into
    the rows the models look up do."""
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lm = transformers.GemmaForCausalLM(transformers.GemmaConfig(**shape)).eval()
    rm = transformers.GemmaForSequenceClassification(transformers.GemmaConfig(**shape, num_labels=1)).eval()
    assert float(lm.get_input_embeddings().embed_scale) == 8.0  # √64: the case this test is about
    vocab_map = align_vocab(tok, tok, len(tok))
    cfg = NablaConfig(likelihood_coeff=0.5)
    ahead = ids_of(tok, "5. So x=")
    ref_loss, ref = reference_grads(lm, rm, tok, tok, vocab_map, "2+3 is ", ahead, cfg)
    step = ahead_loss_and_grads(lm, rm, vocab_map, make_prefix(lm, rm, tok, tok, vocab_map, "2+3 is "), ahead, cfg)
    assert step.loss == pytest.approx(ref_loss, abs=1e-5)
    torch.testing.assert_close(onehot_grads(step, torch.arange(len(ahead)), lm, rm, vocab_map, cfg), ref,
                               rtol=0, atol=1e-4)


def test_an_lm_with_soft_capped_logits_is_refused(tok):
    config = transformers.Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, head_dim=16,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="soft-capped logits"):
        NablaReasoner(transformers.Gemma2ForCausalLM(config).eval(), tok)


def test_selection_gradient_equals_first_dto_gradient_after_commit(tok, lm, rm):
    """The gradient at position s from the selection pass is DTO's gradient for the drafted token: reusing it
    is exact."""
    vocab_map = align_vocab(tok, tok, lm.config.vocab_size)
    prefix = make_prefix(lm, rm, tok, tok, vocab_map)
    ahead = ids_of(tok, "x = 5 and y = 2")
    step = ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, FAST)
    s = 6
    probe = onehot_grads(step, torch.tensor([s]), lm, rm, vocab_map, FAST)[0]
    later = make_prefix(lm, rm, tok, tok, vocab_map, "x = 5 ")
    fresh = ahead_loss_and_grads(lm, rm, vocab_map, later, ahead[s:], FAST)
    torch.testing.assert_close(probe, onehot_grads(fresh, torch.tensor([0]), lm, rm, vocab_map, FAST)[0],
                               rtol=0, atol=1e-5)


def test_a_passs_later_rows_are_the_pass_over_the_same_draft_after_more_commits(tok, lm, rm):
    """What a rejected or unchanged redraw lets the next selection reuse: the rows of a pass from position k on
    equal a fresh pass over the same draft with k more tokens committed, log-probs and one-hot gradients."""
    reasoner = NablaReasoner(lm, tok, rm, tok, FAST)
    prefix = make_prefix(lm, rm, tok, tok, reasoner.vocab_map)
    ahead, k = ids_of(tok, "x = 5 and y = 2"), 6
    rows = reasoner._rows_after(ahead_loss_and_grads(lm, rm, reasoner.vocab_map, prefix, ahead, FAST), k)
    fresh = ahead_loss_and_grads(lm, rm, reasoner.vocab_map, make_prefix(lm, rm, tok, tok, reasoner.vocab_map,
                                                                         "x = 5 "), ahead[k:], FAST)
    every = torch.arange(len(ahead) - k)
    torch.testing.assert_close(rows.logp, fresh.logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(reasoner._onehot_grads(rows, every), reasoner._onehot_grads(fresh, every), rtol=0,
                               atol=1e-5)


def test_a_draft_that_stands_reuses_its_selection_pass_for_the_same_answer(tok, lm, rm, monkeypatch):
    """After a rejected or unchanged redraw the next selection runs no pass; keeping nothing (every selection
    runs its own pass) gives the same answers and differs only in the passes counted."""
    def answers():
        return [NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=seed) for seed in range(3)]

    reused = answers()
    monkeypatch.setattr(nabla, "replace", lambda step, **changes: None)  # nothing kept: every selection runs a pass
    fresh = answers()
    for a, b in zip(reused, fresh):
        saved = b.stats["grad_steps"] - a.stats["grad_steps"]
        assert a.token_ids == b.token_ids and saved >= 1
        assert b.stats["model_calls"] - a.stats["model_calls"] == 4 * saved
        assert b.stats["forward_token_equivalents"] > a.stats["forward_token_equivalents"]
        counts = ("model_calls", "forward_token_equivalents", "grad_steps", "wall_time_s")
        assert all(a.stats[k] == b.stats[k] for k in a.stats if k not in counts)


def train_rm_preferring(tok, good: str, bad: str, steps: int = 60):
    """A tiny reward model trained (Bradley-Terry) to prefer responses that start with `good` over `bad`."""
    rm = make_rm(tok, seed=5)
    rm.train()
    opt = torch.optim.Adam(rm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tail = "".join(PRINTABLE[i] for i in torch.randint(10, 60, (6,), generator=gen))
        pair = [torch.tensor([ids_of(tok, tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first + tail}], tokenize=False))])
            for first in (good, bad)]
        loss = -F.logsigmoid(rm(pair[0]).logits[0, 0] - rm(pair[1]).logits[0, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rm.eval()


def test_dto_moves_a_wrong_first_token_to_the_token_the_reward_model_prefers(tok, lm):
    rm = train_rm_preferring(tok, "7", "3")
    assert score(rm, tok, PROMPT, "7 apples") > score(rm, tok, PROMPT, "3 apples") + 1.0
    vocab_map = align_vocab(tok, tok, lm.config.vocab_size)
    prefix = make_prefix(lm, rm, tok, tok, vocab_map)
    three, seven = tok.convert_tokens_to_ids(["3", "7"])
    ahead = ids_of(tok, "3 apples")
    z0 = torch.full((lm.config.vocab_size,), -5.0)
    z0[three], z0[seven] = 0.1, 0.0  # the draft's wrong token leads slightly

    def optimized_token(cfg):
        def full_grad(token):
            step = ahead_loss_and_grads(lm, rm, vocab_map, prefix, [token] + ahead[1:], cfg)
            return onehot_grads(step, torch.tensor([0]), lm, rm, vocab_map, cfg)[0]
        return dto(z0, full_grad, cfg)[0].argmax().item()

    # The reward term alone (c = 0) must do it: the policy's own slight preferences play no part.
    assert optimized_token(NablaConfig(likelihood_coeff=0.0)) == seven
    assert optimized_token(NablaConfig(likelihood_coeff=0.0, reward_coeff=0.0)) == three


def test_gradient_cache_gives_the_same_trajectory_with_fewer_full_passes(tok, lm, rm):
    vocab_map = align_vocab(tok, tok, lm.config.vocab_size)
    prefix = make_prefix(lm, rm, tok, tok, vocab_map)
    ahead = ids_of(tok, "the answer")
    passes = []

    def full_grad(token):
        passes.append(token)
        step = ahead_loss_and_grads(lm, rm, vocab_map, prefix, [token] + ahead[1:], FAST)
        return onehot_grads(step, torch.tensor([0]), lm, rm, vocab_map, FAST)[0]

    z0 = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(1)) * 0.05
    cfg = NablaConfig(dto_iters=12, lr=0.2)  # a large step: the argmax flips, and comes back to tokens it left
    z_cached, full_cached, n_cached = dto(z0, full_grad, cfg)
    tokens_seen = list(passes)
    passes.clear()
    z_plain, full_plain, n_plain = dto(z0, full_grad, replace(cfg, grad_cache=False))
    torch.testing.assert_close(z_cached, z_plain, rtol=0, atol=1e-6)  # caching is exact
    assert (full_plain, n_plain) == (12, 0)
    argmaxes = passes  # without the cache, one pass per iteration, for that iteration's argmax
    flips = sum(a != b for a, b in zip(argmaxes, argmaxes[1:]))
    assert full_cached + n_cached == 12 and 2 <= full_cached < 12
    assert tokens_seen == list(dict.fromkeys(argmaxes))  # one pass per token, the first time it is the argmax
    assert full_cached < 1 + flips  # the argmax came back to a token: recomputing after every flip costs more


def test_zero_dto_iterations_redraw_from_the_llm_logits(tok, lm, rm):
    z0 = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0))
    z, n_full, n_cached = dto(z0, lambda token: pytest.fail("no gradient is needed"), NablaConfig(dto_iters=0))
    assert torch.equal(z, z0) and (n_full, n_cached) == (0, 0)
    stats = [NablaReasoner(lm, tok, rm, tok, cfg).generate(PROMPT, seed=0).stats
             for cfg in (replace(FAST, dto_iters=0), FAST)]
    # Without DTO the only gradient passes are token selection's: one over the first draft and one after each
    # accepted revision (unless the budget ends there), since a redraw that is rejected or unchanged leaves the
    # draft, and its pass, as they were. With DTO there are more.
    assert stats[0]["optimized_tokens"] > stats[0]["grad_steps"] and stats[0]["cached_steps"] == 0
    assert stats[0]["grad_steps"] - stats[0]["revisions_accepted"] in (0, 1)
    assert stats[1]["grad_steps"] - stats[1]["revisions_accepted"] > 1


def test_optimized_variable_stays_fp32_and_moves_for_bf16_logits():
    z0 = torch.full((10,), 12.0, dtype=torch.bfloat16)
    z0[3] = 12.5
    grad = torch.zeros(10)
    grad[3], grad[4] = 1.0, -1.0
    z, n_full, n_cached = dto(z0, lambda t: grad, NablaConfig(dto_iters=3))
    assert z.dtype == torch.float32 and n_full == 1 and n_cached == 2
    assert 0 < (z[4] - 12.0).item() < 0.05  # 12 + 0.03 is not representable in bf16


# ------------------------------------------------------------------------------------------ selection


def fake_step(top_probs):
    """An AheadGrads whose positions have the given top probabilities (the rest spread evenly)."""
    V = 8
    probs = torch.tensor([[p] + [(1 - p) / (V - 1)] * (V - 1) for p in top_probs])
    z = torch.zeros(len(top_probs), 2)
    return AheadGrads(torch.tensor(0.0), 0, probs.log(), z, z, None, None, None)


def test_selection_skips_confident_tokens_and_small_gradients():
    cfg = NablaConfig()
    step = fake_step([0.99, 0.5, 0.6, 0.98, 0.4])
    norms = {1: 1.0, 2: 9.0, 4: 9.0}  # position 1 is uncertain but the loss barely depends on it
    asked = []

    def grads_of(positions):
        asked.extend(positions.tolist())
        return torch.stack([torch.tensor([norms[p], 0.0]) for p in positions.tolist()])

    s, g = select_position(step, cfg, grads_of)
    assert s == 2 and g.tolist() == [9.0, 0.0]
    assert g.untyped_storage().nbytes() == g.nbytes  # a copy of its row: the chunk's [k x V] memory can go
    assert 0 not in asked and 3 not in asked  # confident tokens are not even differentiated
    assert select_position(step, replace(cfg, grad_norm_threshold=100.0), grads_of) == (None, None)
    # the optional entropy criterion: every position here has entropy below 3 nats
    assert select_position(step, replace(cfg, entropy_threshold=3.0), grads_of) == (None, None)


def test_entropy_has_no_nan_when_a_probability_is_zero():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf"), 0.0, float("-inf")]])
    h = token_entropy(logits.log_softmax(-1))
    p = torch.tensor([1, math.e]) / (1 + math.e)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, torch.tensor([-(p * p.log()).sum().item(), 0.0]))


def test_confident_tokens_are_committed_without_optimization(tok):
    lm = make_lm(tok, seed=2)
    with torch.no_grad():
        lm.lm_head.weight.mul_(5000.0)  # a very sharp policy: every token is drafted with probability ~1
    reasoner = NablaReasoner(lm, tok, make_rm(tok), tok, replace(FAST, max_new_tokens=20))
    out = reasoner.generate(PROMPT, seed=0)
    assert out.stats["optimized_tokens"] == 0 and out.stats["grad_steps"] == 1 and out.stats["rollouts"] == 1
    torch.manual_seed(0)
    draft = lm.generate(torch.tensor([chat_prompt_ids(tok, PROMPT)]), max_new_tokens=20, do_sample=False)
    assert out.token_ids == [t for t in draft[0, len(chat_prompt_ids(tok, PROMPT)):].tolist()
                             if t not in eos_token_ids(lm)]


# ------------------------------------------------------------------------------------------ decoding loop


def test_sampling_respects_top_p_and_temperature():
    logits = torch.tensor([3.0, 2.9, -10.0, -10.0])
    torch.manual_seed(0)
    draws = {sample_top_p(logits, 0.5, 0.95) for _ in range(200)}
    assert draws == {0, 1}
    assert {sample_top_p(logits, 1.0, 0.3) for _ in range(50)} == {0}
    assert sample_top_p(logits, 0.0, 0.95) == 0
    assert {sample_top_p(logits, 1.0, 0.0) for _ in range(20)} == {0}  # top_p 0 keeps the top token, as in HF


def test_acceptance_keeps_only_strictly_better_drafts():
    assert accept(1.5, 1.0) and not accept(0.5, 1.0) and not accept(1.0, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_rejection_sampling_never_returns_a_worse_draft(tok, lm, rm, seed):
    out = NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=seed)
    st = out.stats
    assert st["reward_final"] >= st["reward_initial"]
    assert st["reward_final"] == pytest.approx(score(rm, tok, PROMPT, tok.decode(out.token_ids)), abs=1e-5)
    assert st["revisions_proposed"] == st["rollouts"] - 1 >= 1
    # every forward and backward pass is counted: tokens, 4 per gradient pass, 1 per reward scoring
    assert st["model_calls"] == st["generated_tokens"] + 4 * st["grad_steps"] + 1 + st["revisions_proposed"]


def test_a_proposal_is_compared_with_the_current_draft(tok, lm, rm, monkeypatch):
    """Each acceptance test weighs the proposal against the draft that stands now (the last accepted one), not
    against the first draft."""
    tests, real_accept = [], nabla.accept
    monkeypatch.setattr(nabla, "accept", lambda proposed, current: tests.append((proposed, current))
                        or real_accept(proposed, current))
    accepted_later = 0
    for seed in range(4):
        tests.clear()
        st = NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=seed).stats
        current = st["reward_initial"]
        for proposed, compared in tests:
            assert compared == current
            accepted_later += proposed > current and current != st["reward_initial"]
            current = max(current, proposed)
        assert current == st["reward_final"]
    assert accepted_later >= 1  # a draft that replaced a revision: comparing with the first would differ


def test_dto_passes_run_the_token_dto_asks_for_before_the_rest_of_the_draft(tok, lm, rm, monkeypatch):
    passes, checked = [], []
    real_pass, real_dto = nabla.ahead_loss_and_grads, nabla.dto
    monkeypatch.setattr(nabla, "ahead_loss_and_grads", lambda lm_, rm_, vmap, prefix, ahead, *args:
                        passes.append(list(ahead)) or real_pass(lm_, rm_, vmap, prefix, ahead, *args))

    def spy_dto(z0, full_grad, cfg, first=None, to_logits=lambda x: x):
        other = (first[0] + 1) % lm.config.vocab_size
        full_grad(other)
        full_grad(first[0])
        checked.append(passes[-2] == [other] + passes[-1][1:] and passes[-1][0] == first[0])
        return real_dto(z0, full_grad, cfg, first, to_logits)

    monkeypatch.setattr(nabla, "dto", spy_dto)
    NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=0)
    assert checked and all(checked)


def test_rejection_sampling_rejects_and_accepts_across_seeds(tok, lm, rm):
    stats = [NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=s).stats for s in range(6)]
    accepted = sum(s["revisions_accepted"] for s in stats)
    proposed = sum(s["revisions_proposed"] for s in stats)
    assert 0 < accepted < proposed
    off = NablaReasoner(lm, tok, rm, tok, replace(FAST, rejection_sampling=False)).generate(PROMPT, seed=0).stats
    assert off["revisions_accepted"] == off["revisions_proposed"] >= 1


@pytest.mark.parametrize("max_rollouts,max_new_tokens", [(1, 12), (2, 5), (3, 16), (8, 9)])
def test_rollout_budget_and_length_limit(tok, lm, rm, max_rollouts, max_new_tokens):
    cfg = replace(FAST, max_rollouts=max_rollouts, max_new_tokens=max_new_tokens)
    spent = 0
    for seed in range(2):
        out = NablaReasoner(lm, tok, rm, tok, cfg).generate(PROMPT, seed=seed)
        assert 1 <= out.stats["rollouts"] <= max_rollouts
        assert len(out.token_ids) <= max_new_tokens
        assert out.stats["generated_tokens"] <= max_rollouts * max_new_tokens
        if max_rollouts == 1:
            assert out.stats["optimized_tokens"] == 0
        spent += out.stats["rollouts"] == max_rollouts
    assert spent >= 1  # the last rollout of the budget is used too


def test_same_seed_same_output(tok, lm, rm):
    reasoner = NablaReasoner(lm, tok, rm, tok, FAST)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = (reasoner.generate(PROMPT, seed=s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is left as it was
    assert a.token_ids == b.token_ids and a.text == b.text and without_time(a.stats) == without_time(b.stats)
    assert a.token_ids != c.token_ids


def test_generate_keeps_every_gpus_random_state_not_only_the_lms(tok, lm, forked):
    """torch.manual_seed seeds every GPU, and a reward model may sit on another one: all are forked."""
    NablaReasoner(lm, tok, config=replace(FAST, max_new_tokens=2)).generate(PROMPT)
    assert forked == [[0, 1]]


def test_a_reasoners_settings_cannot_change_behind_its_back(tok, lm):
    config = NablaConfig()  # the rollouts' sampling is read once, when the reasoner is built
    NablaReasoner(lm, tok, config=config)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        config.rollout_temperature = 0.0


def test_without_reward_model_dto_follows_likelihood_and_keeps_every_revision(tok, lm):
    out = NablaReasoner(lm, tok, None, None, FAST).generate(PROMPT, seed=0)
    st = out.stats
    assert st["reward_initial"] is None and st["reward_final"] is None
    assert st["revisions_accepted"] == st["revisions_proposed"] >= 1
    assert st["model_calls"] == st["generated_tokens"] + 2 * st["grad_steps"]


def test_latent_space_optimization_runs_and_redraws_from_vocabulary_logits(tok, lm, rm, monkeypatch):
    widths, real_sample = [], nabla.sample_top_p
    monkeypatch.setattr(nabla, "sample_top_p", lambda z, *args: widths.append(z.shape[-1]) or real_sample(z, *args))
    out = NablaReasoner(lm, tok, rm, tok, replace(FAST, space="latents")).generate(PROMPT, seed=0)
    assert out.stats["optimized_tokens"] >= 1 and out.stats["cached_steps"] >= 1
    assert out.stats["reward_final"] >= out.stats["reward_initial"]
    assert len(widths) == out.stats["optimized_tokens"] and set(widths) == {lm.config.vocab_size}  # not [d]


def test_output_is_the_response_only(tok, lm, rm):
    out = NablaReasoner(lm, tok, rm, tok, replace(FAST, max_new_tokens=40)).generate(PROMPT, seed=1)
    eos = set(eos_token_ids(lm))
    assert not eos & set(out.token_ids)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert "user" not in out.text and PROMPT not in out.text  # neither the template nor the prompt


# ------------------------------------------------------------------------------------------ vocabularies


def test_vocabulary_alignment_by_token_string(tok, lm):
    rm_tok = make_tokenizer(shuffle_seed=11)
    vocab_map = align_vocab(tok, rm_tok, lm.config.vocab_size)
    assert rm_tok.convert_ids_to_tokens(vocab_map.tolist()) == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert not torch.equal(vocab_map, torch.arange(len(tok)))


def test_shuffled_reward_vocabulary_gives_the_same_gradients(tok, lm, rm):
    """A reward model whose embedding rows are permuted along with its tokenizer is the same function:
    the aligned soft path must give the same gradients as with the shared vocabulary."""
    rm_tok = make_tokenizer(shuffle_seed=11)
    vocab_map = align_vocab(tok, rm_tok, lm.config.vocab_size)
    permuted = make_rm(rm_tok)
    permuted.load_state_dict(rm.state_dict())
    with torch.no_grad():
        permuted.get_input_embeddings().weight[vocab_map] = rm.get_input_embeddings().weight
    same_map = align_vocab(tok, tok, lm.config.vocab_size)
    ahead = ids_of(tok, "it is 5")
    results = []
    for model, rtok, vmap in ((rm, tok, same_map), (permuted, rm_tok, vocab_map)):
        step = ahead_loss_and_grads(lm, model, vmap, make_prefix(lm, model, tok, rtok, vmap), ahead, FAST)
        results.append(onehot_grads(step, torch.arange(len(ahead)), lm, model, vmap, FAST))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)
    assert score(permuted, rm_tok, PROMPT, "it is 5") == pytest.approx(score(rm, tok, PROMPT, "it is 5"), abs=1e-5)
    out = NablaReasoner(lm, tok, permuted, rm_tok, FAST).generate(PROMPT, seed=0)
    assert out.stats["reward_final"] >= out.stats["reward_initial"]


def test_too_small_vocabulary_overlap_is_a_clear_error(tok, lm):
    digits = make_tokenizer(chars=list("0123456789"))
    with pytest.raises(ValueError, match="vocabulary"):
        NablaReasoner(lm, tok, make_rm(digits), digits, FAST)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_value_errors(tok, lm, rm):
    bare = make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        NablaReasoner(lm, bare, rm, tok, FAST)
    with pytest.raises(ValueError, match="chat template"):
        NablaReasoner(lm, tok, rm, bare, FAST)
    with pytest.raises(ValueError, match="both"):
        NablaReasoner(lm, tok, rm, None, FAST)
    with pytest.raises(ValueError, match="space"):
        NablaReasoner(lm, tok, rm, tok, replace(FAST, space="embeddings"))
    reasoner = NablaReasoner(lm, tok, rm, tok, FAST)
    for prompt in ("", "   ", None):
        with pytest.raises(ValueError, match="non-empty"):
            reasoner.generate(prompt)


# ------------------------------------------------------------------------------------------ bf16


def _cast(model, dtype):
    """A copy of the model in another dtype (the fixtures stay fp32)."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    if hasattr(model, "generation_config"):
        copy.generation_config = model.generation_config
    return copy.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_invariants_in_fp32_and_bf16(tok, lm, rm, dtype, monkeypatch):
    """The decoding loop in both precisions: DTO's variable is fp32 and moves, the reward never drops,
    the reward of the answer is its score, and the score keeps fp32 precision."""
    lm_d, rm_d = _cast(lm, dtype), _cast(rm, dtype)
    moved = []

    def spy_dto(z0, full_grad, cfg, first=None, to_logits=lambda x: x):
        z, n_full, n_cached = real_dto(z0, full_grad, cfg, first, to_logits)
        assert z0.dtype == torch.float32 and z.dtype == torch.float32
        moved.append((z - z0).abs().max().item())
        return z, n_full, n_cached

    real_dto = nabla.dto
    monkeypatch.setattr(nabla, "dto", spy_dto)
    for seed in range(3):
        out = NablaReasoner(lm_d, tok, rm_d, tok, FAST).generate(PROMPT, seed=seed)
        st = out.stats
        assert st["reward_final"] >= st["reward_initial"]
        assert st["reward_final"] == pytest.approx(score(rm_d, tok, PROMPT, tok.decode(out.token_ids)), abs=1e-6)
    assert moved and max(moved) > 1e-3
    if dtype == torch.bfloat16:  # the score is not rounded to bf16's 8 bits
        assert torch.tensor(st["reward_final"]).to(torch.bfloat16).item() != st["reward_final"]


def test_bf16_gradient_matches_fp32_gradient(tok, lm, rm):
    """The DTO gradient of the bf16 models is the fp32 one up to bf16 rounding: cosine > 0.99, and the
    largest entry within 1%. (Measured on these models: cosine 0.99999994, largest entry 0.08% off.)"""
    vocab_map = align_vocab(tok, tok, lm.config.vocab_size)
    cfg = NablaConfig(likelihood_coeff=0.5)
    ahead = ids_of(tok, "5. So x=") + [tok.eos_token_id]
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        lm_d, rm_d = _cast(lm, dtype), _cast(rm, dtype)
        prefix = make_prefix(lm_d, rm_d, tok, tok, vocab_map, "2+3 is ")
        step = ahead_loss_and_grads(lm_d, rm_d, vocab_map, prefix, ahead, cfg, {tok.eos_token_id})
        grads.append(onehot_grads(step, torch.arange(len(ahead)), lm_d, rm_d, vocab_map, cfg))
    g32, g16 = grads
    assert g16.dtype == torch.float32
    assert F.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99
    assert (g16 - g32).abs().max() < 0.01 * g32.abs().max()


def test_reward_head_runs_in_fp32(tok, rm):
    rm16 = _cast(rm, torch.bfloat16)
    ids = nabla.reward_ids(tok, PROMPT, "it is 5")
    hidden = rm16.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    expected = (hidden.float() @ rm16.score.weight.float().T).item()
    assert score(rm16, tok, PROMPT, "it is 5") == pytest.approx(expected, abs=1e-6)
    # and in fp32 it is the model's own logit
    assert score(rm, tok, PROMPT, "it is 5") == pytest.approx(rm(torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)


# ------------------------------------------------------------------------------------------ memory


def test_reasoner_freezes_weights_so_autograd_saves_less(tok):
    lm, rm = make_lm(tok, seed=4), make_rm(tok, seed=5)
    assert all(p.requires_grad for p in lm.parameters())
    vocab_map = align_vocab(tok, tok, lm.config.vocab_size)
    prefix = make_prefix(lm, rm, tok, tok, vocab_map, "2+3 is ")
    ahead = ids_of(tok, "5. So the answer is 5")

    def saved_bytes():
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, FAST)
        return total[0]

    unfrozen = saved_bytes()
    NablaReasoner(lm, tok, rm, tok, FAST)
    assert not any(p.requires_grad for p in lm.parameters()) and not any(p.requires_grad for p in rm.parameters())
    assert saved_bytes() < 0.9 * unfrozen


def test_selection_pass_is_released_before_dto(tok, lm, rm, monkeypatch):
    """The selection pass's [ahead x vocabulary] log-probs (0.6 GB at 1024 x 152k in fp32) are gone
    before DTO runs its own passes."""
    live, reread = [], []
    real_pass, real_dto, real_rows = nabla.ahead_loss_and_grads, nabla.dto, NablaReasoner._rows_after

    def spy_pass(*args, **kwargs):
        step = real_pass(*args, **kwargs)
        live.append(weakref.ref(step.logp))
        return step

    def spy_rows(*args):  # a pass's later rows, read again while its draft stands: their log-probs go too
        step = real_rows(*args)
        live.append(weakref.ref(step.logp))
        reread.append(len(step.g_lm))
        return step

    def spy_dto(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in live), "a selection pass's log-probs are still alive during DTO"
        return real_dto(*args, **kwargs)

    monkeypatch.setattr(nabla, "ahead_loss_and_grads", spy_pass)
    monkeypatch.setattr(nabla, "dto", spy_dto)
    monkeypatch.setattr(NablaReasoner, "_rows_after", spy_rows)
    out = NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=0)
    assert out.stats["optimized_tokens"] >= 2 and reread


# ------------------------------------------------------------------------------------------ fast rollouts


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_fast_rollout_gives_the_same_tokens(tok, lm, rm, temperature):
    """Rollouts on the static cache, refilled from the stored prefix, give token for token the same
    drafts as the default path (fp32, CPU), across revisions that resume from a prefix."""
    cfg = replace(FAST, max_new_tokens=24, rollout_temperature=temperature)
    for seed in range(2):
        a, b = (NablaReasoner(lm, tok, rm, tok, replace(cfg, fast_rollout=f)).generate(PROMPT, seed=seed)
                for f in (False, True))
        assert a.stats["revisions_proposed"] >= 2
        assert a.token_ids == b.token_ids
        assert without_time(a.stats) == without_time(b.stats)


# ------------------------------------------------------------------------------------------ compute accounting


def test_forward_token_equivalents_count_every_token_run(tok, lm, rm, monkeypatch):
    """1 per token a forward pass runs (prefills included), 3 per token of a pass with a backward."""
    expected = [0]
    real_generate, real_pass, real_score = type(lm).generate, nabla.ahead_loss_and_grads, nabla.score_ids

    def spy_generate(self, input_ids, past_key_values=None, **kw):
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        out = real_generate(self, input_ids, past_key_values=past_key_values, **kw)
        new = out.sequences.shape[1] - input_ids.shape[1]
        expected[0] += input_ids.shape[1] - int(cached) + max(new - 1, 0)
        return out

    def spy_pass(lm_, rm_, vmap, prefix, ahead, cfg, eos_ids=()):
        n_rm = len(ahead) - (ahead[-1] in eos_ids)
        expected[0] += 3 * (len(prefix.lm_ids) - nabla._kv_len(prefix.lm_kv) + len(ahead))
        expected[0] += 3 * (len(prefix.rm_ids) - nabla._kv_len(prefix.rm_kv) + n_rm + len(prefix.rm_suffix))
        return real_pass(lm_, rm_, vmap, prefix, ahead, cfg, eos_ids)

    def spy_score(rm_, ids):
        expected[0] += len(ids)
        return real_score(rm_, ids)

    monkeypatch.setattr(type(lm), "generate", spy_generate)
    monkeypatch.setattr(nabla, "ahead_loss_and_grads", spy_pass)
    monkeypatch.setattr(nabla, "score_ids", spy_score)
    st = NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=0).stats
    assert st["grad_steps"] >= 3 and st["rollouts"] >= 2
    assert st["forward_token_equivalents"] == expected[0]
    assert st["forward_token_equivalents"] > 10 * st["model_calls"]  # what the call count hides


# ------------------------------------------------------------------------------------------ the decoding loop, line by line


def test_redraw_samples_from_dto_output_with_the_redraw_settings(tok, lm, rm, monkeypatch):
    """The token is redrawn from DTO's optimized logits (not the LLM's), with the resample temperature,
    top-p and top-k (not the rollout's)."""
    cfg = replace(FAST, resample_temperature=0.37, resample_top_p=0.83, resample_top_k=7, lr=0.5)
    returned, drawn = [], []
    real_dto, real_sample = nabla.dto, nabla.sample_top_p

    def spy_dto(z0, *args, **kwargs):
        z, n_full, n_cached = real_dto(z0, *args, **kwargs)
        returned.append((z0, z))
        return z, n_full, n_cached

    def spy_sample(logits, temperature, top_p, top_k=0):
        drawn.append((logits, temperature, top_p, top_k))
        return real_sample(logits, temperature, top_p, top_k)

    monkeypatch.setattr(nabla, "dto", spy_dto)
    monkeypatch.setattr(nabla, "sample_top_p", spy_sample)
    NablaReasoner(lm, tok, rm, tok, cfg).generate(PROMPT, seed=0)
    assert len(drawn) == len(returned) >= 2
    for (z0, z), (logits, temperature, top_p, top_k) in zip(returned, drawn):
        assert (temperature, top_p, top_k) == (0.37, 0.83, 7)
        assert torch.equal(logits, z) and not torch.equal(logits, z0)


@pytest.mark.parametrize("space", ["logits", "latents"])
def test_dto_starts_from_the_selected_positions_logits_with_its_drafted_tokens_gradient(tok, lm, rm, monkeypatch,
                                                                                         space):
    """z0 is the LLM's log-probabilities at the selected position (checked against a plain forward pass; in
    latent space, the logits the hidden state z0 gives through the output head), and the gradient handed over
    from selection is the one of the drafted token there."""
    seen, selections = [], []
    real_pass, real_select, real_dto = nabla.ahead_loss_and_grads, nabla.select_position, nabla.dto
    real_rows = NablaReasoner._rows_after

    def spy_pass(lm_, rm_, vmap, prefix, ahead, *args):
        seen.append((list(prefix.lm_ids), list(ahead)))
        return real_pass(lm_, rm_, vmap, prefix, ahead, *args)

    def spy_rows(self, step, start):  # the last selection's draft stands, `start` more of its tokens committed
        (ids, ahead), _ = selections[-1]
        seen.append((ids + ahead[:start], ahead[start:]))
        checked["reused"] += 1
        return real_rows(self, step, start)

    def spy_select(step, cfg, grads_of, chunk=64):
        s, grad = real_select(step, cfg, grads_of, chunk)
        selections.append((seen[-1], s))
        return s, grad

    checked = {"differs_from_argmax": 0, "reused": 0}

    def spy_dto(z0, full_grad, cfg, first=None, to_logits=lambda x: x):
        (ids, ahead), s = selections[-1]
        with torch.no_grad():
            logits = lm(torch.tensor([ids + ahead])).logits[0, len(ids) - 1 + s]
        z = to_logits(z0.float())
        torch.testing.assert_close(z if space == "logits" else z.log_softmax(-1), logits.log_softmax(-1), rtol=0,
                                   atol=1e-4)
        assert first[0] == ahead[s]
        torch.testing.assert_close(first[1], full_grad(first[0]), rtol=0, atol=1e-5)
        checked["differs_from_argmax"] += int(z.argmax()) != ahead[s]
        return real_dto(z0, full_grad, cfg, first, to_logits)

    monkeypatch.setattr(nabla, "ahead_loss_and_grads", spy_pass)
    monkeypatch.setattr(nabla, "select_position", spy_select)
    monkeypatch.setattr(nabla, "dto", spy_dto)
    monkeypatch.setattr(NablaReasoner, "_rows_after", spy_rows)
    for seed in range(3):
        NablaReasoner(lm, tok, rm, tok, replace(FAST, space=space, confidence_threshold=0.015)).generate(PROMPT,
                                                                                                      seed=seed)
    assert checked["differs_from_argmax"] >= 1  # sampled drafts: the drafted token is not always the argmax
    assert checked["reused"] >= 1  # and some selections read the rows of a pass over a draft that stood
    assert any(s > 0 for _, s in selections)  # and selection sometimes skips tokens


def test_prefix_holds_exactly_the_committed_tokens_in_both_vocabularies(tok, lm, monkeypatch):
    """At every pass the prefix is prompt + committed tokens (a prefix of the final answer) and the reward
    model's prefix is the same tokens through the vocabulary map (a shuffled one here)."""
    rm_tok = make_tokenizer(shuffle_seed=3)
    rm = make_rm(rm_tok)
    prompt_ids = chat_prompt_ids(tok, PROMPT)
    before, _ = reward_template(rm_tok, PROMPT)
    vocab_map = align_vocab(tok, rm_tok, lm.config.vocab_size)
    prefixes = []
    real_pass = nabla.ahead_loss_and_grads

    def spy_pass(lm_, rm_, vmap, prefix, *args):
        prefixes.append((list(prefix.lm_ids), list(prefix.rm_ids)))
        return real_pass(lm_, rm_, vmap, prefix, *args)

    monkeypatch.setattr(nabla, "ahead_loss_and_grads", spy_pass)
    out = NablaReasoner(lm, tok, rm, rm_tok, replace(FAST, max_new_tokens=24)).generate(PROMPT, seed=0)
    assert out.stats["optimized_tokens"] >= 2
    final = out.token_ids
    for lm_ids, rm_ids in prefixes:
        committed = lm_ids[len(prompt_ids):]
        assert lm_ids[:len(prompt_ids)] == prompt_ids and committed == final[:len(committed)]
        assert rm_ids == before + vocab_map[torch.tensor(committed, dtype=torch.long)].tolist()
    assert max(len(p[0]) for p in prefixes) > len(prompt_ids)


def test_selection_thresholds_at_their_boundaries():
    """The paper skips tokens whose top probability is above the threshold and whose gradient norm is
    below its threshold: a token exactly at either threshold is optimized."""
    step = fake_step([0.5])
    grad = torch.tensor([[3.0, 4.0]])  # norm exactly 5
    cfg = NablaConfig(confidence_threshold=0.5, grad_norm_threshold=5.0)
    s, g = select_position(step, cfg, lambda pos: grad)
    assert s == 0 and torch.equal(g, grad[0])
    assert select_position(step, replace(cfg, confidence_threshold=0.4999), lambda pos: grad) == (None, None)
    assert select_position(step, replace(cfg, grad_norm_threshold=5.0001), lambda pos: grad) == (None, None)
    entropy = token_entropy(step.logp)[0].item()  # with the entropy rule, a token exactly at it is optimized too
    cfg = NablaConfig(entropy_threshold=entropy, grad_norm_threshold=0.0)
    assert select_position(step, cfg, lambda pos: grad)[0] == 0
    assert select_position(step, replace(cfg, entropy_threshold=entropy * 1.0001), lambda pos: grad) == (None, None)


def test_sample_top_p_follows_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    gen_draws = 4000

    def frequencies(**kw):
        torch.manual_seed(0)
        counts = torch.bincount(torch.tensor([sample_top_p(logits, **kw) for _ in range(gen_draws)]), minlength=5)
        return counts.float() / gen_draws

    for temperature in (0.5, 2.0):
        expected = (logits / temperature).softmax(-1)
        assert (frequencies(temperature=temperature, top_p=1.0) - expected).abs().max() < 0.03
    top2 = frequencies(temperature=1.0, top_p=1.0, top_k=2)
    assert top2[2:].sum() == 0 and abs(top2[0] - logits[:2].softmax(-1)[0]) < 0.03
    # top-k first, then the nucleus of what is left
    assert (frequencies(temperature=1.0, top_p=0.5, top_k=3) == torch.tensor([1.0, 0, 0, 0, 0])).all()
    # the nucleus of the tempered distribution: at T = 0.25 token 0 alone holds 98% (untempered, 48%)
    assert (frequencies(temperature=0.25, top_p=0.95) == torch.tensor([1.0, 0, 0, 0, 0])).all()


def test_learning_rate_schedule_is_the_authors_clipped_cosine():
    cfg = NablaConfig()
    factors = [nabla.lr_factor(t, cfg) for t in range(cfg.dto_iters)]
    assert factors == [max(0.1, 0.5 * (1 + math.cos(math.pi * t / 20))) for t in range(20)]
    assert factors[0] == 1.0 and factors[-1] == 0.1 and factors[-4] == 0.1 and factors[-5] > 0.1


def test_dto_steps_follow_adam_and_the_schedule():
    """Adam moves each coordinate by about lr * lr_factor(t) per step under a constant gradient: the sum over the
    schedule is 0.107, where a flat rate would give 0.2 and SGD would follow the gradient's size."""
    cfg = NablaConfig()
    z0 = torch.tensor([1.0, 0.0])  # the argmax stays 0: one gradient serves every iteration
    z, n_full, n_cached = dto(z0, lambda token: torch.tensor([0.0, -1e-3]), cfg)
    assert (n_full, n_cached) == (1, cfg.dto_iters - 1)
    moved = cfg.lr * sum(nabla.lr_factor(t, cfg) for t in range(cfg.dto_iters))
    assert z[1].item() == pytest.approx(moved, rel=0.02) and 1 - z[0].item() == pytest.approx(moved, rel=0.02)
    # The same steps from Adam written out with PyTorch's defaults (β = 0.9, 0.999; ε = 1e-8), as the authors use it,
    # on the straight-through gradient p ⊙ (G - <p, G>) of <G, one-hot>.
    x, m, v, G = z0.clone(), torch.zeros(2), torch.zeros(2), torch.tensor([0.0, -1e-3])
    for t in range(cfg.dto_iters):
        p = x.softmax(-1)
        g = p * (G - (p * G).sum())
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        x = x - cfg.lr * nabla.lr_factor(t, cfg) * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(z, x, rtol=0, atol=1e-6)


def test_gradient_norm_threshold_floor_from_the_likelihood_term():
    """‖c·log π‖₂ ≥ c·√V·ln V for every distribution π (equality at the uniform one): 4.65 at Qwen's
    152,064 tokens, above the paper's threshold of 4, and 0.018 at the miniature's 29."""
    c = NablaConfig().likelihood_coeff
    floor = lambda V: c * math.sqrt(V) * math.log(V)
    assert floor(152_064) == pytest.approx(4.65, abs=0.01) and floor(29) == pytest.approx(0.018, abs=0.001)
    gen = torch.Generator().manual_seed(0)
    for V in (29, 152_064):
        for sharpness in (0.0, 1.0, 5.0, 20.0):
            logp = (torch.randn(V, generator=gen, dtype=torch.float64) * sharpness).log_softmax(-1)
            assert c * logp.norm() >= floor(V) * (1 - 1e-9)


def test_reward_splice_mismatch_is_counted_and_warned_for_a_template_that_strips(tok, lm, rm):
    """A template that trims the response (as Qwen3's strips leading newlines) changes what the reward
    model reads from text, but not the token splice the loss uses: counted and warned."""
    stripping = make_tokenizer(chat_template=tok.chat_template.replace("{{ m['content'] }}",
                                                                       "{{ m['content'] | trim }}"))
    reasoner = NablaReasoner(lm, tok, rm, stripping, FAST)
    before, after = reward_template(stripping, PROMPT)
    stats = dict(model_calls=0, forward_token_equivalents=0, reward_splice_mismatches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reasoner._reward(PROMPT, ids_of(tok, "x = 5"), stats, before, after)
    assert stats["reward_splice_mismatches"] == 0
    with pytest.warns(UserWarning, match="differently"):
        reasoner._reward(PROMPT, ids_of(tok, "\nx = 5 "), stats, before, after)
    assert stats["reward_splice_mismatches"] == 1


def test_reward_model_coverage_of_the_response_is_reported(tok, lm):
    """rm_token_coverage: the share of the answer's tokens the reward model has, by occurrence."""
    missing = set("qz")
    rm_tok = make_tokenizer(chars=[c for c in PRINTABLE if c not in missing])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reward model reads text without the missing tokens: warned
        out = NablaReasoner(lm, tok, make_rm(rm_tok), rm_tok, FAST).generate(PROMPT, seed=0)
    tokens = tok.convert_ids_to_tokens(out.token_ids)
    expected = sum(t not in missing for t in tokens) / len(tokens)
    assert out.stats["rm_token_coverage"] == pytest.approx(expected)


@pytest.mark.parametrize("first_layer", ["sliding_attention", "full_attention"])
def test_fast_rollout_refuses_sliding_window_models_every_time(tok, first_layer):
    """Also when the first layer has full attention, and on a second call (a caller may catch the error and go
    on): the refused cache is not kept."""
    torch.manual_seed(0)
    lm = transformers.Qwen2ForCausalLM(tiny_config(tok, 64, 2, use_sliding_window=True, sliding_window=16,
                                                   layer_types=[first_layer, "sliding_attention"])).eval()
    reasoner = NablaReasoner(lm, tok, None, None, replace(FAST, fast_rollout=True))
    for _ in range(2):
        with pytest.raises(ValueError, match="sliding-window"):
            reasoner.generate(PROMPT)


# ------------------------------------------------------------------------------------------ caches, rollouts, end of sequence


def test_each_pass_runs_only_what_the_kv_caches_lack(tok, lm, rm, monkeypatch):
    """The caches cover all of the prefix they can: a selection pass runs the last prefix id (the LM cache stops
    before it), plus the token committed after DTO unless a revision's rollout cached it; the RM runs that token
    again. DTO's passes come right after the selection pass's commit: LM gap 1, RM gap 0. Every proposal is kept
    here, so after each rollout the LM gap is 1."""
    passes, in_dto = [], [False]
    real_pass, real_dto, real_rollout = nabla.ahead_loss_and_grads, nabla.dto, NablaReasoner._rollout

    def spy_pass(lm_, rm_, vmap, prefix, *args):
        gaps = (len(prefix.lm_ids) - nabla._kv_len(prefix.lm_kv), len(prefix.rm_ids) - nabla._kv_len(prefix.rm_kv))
        passes.append(("dto" if in_dto[0] else "select", *gaps))
        return real_pass(lm_, rm_, vmap, prefix, *args)

    def spy_dto(*args, **kwargs):
        in_dto[0] = True
        try:
            return real_dto(*args, **kwargs)
        finally:
            in_dto[0] = False

    def spy_rollout(self, *args):
        passes.append(("rollout",))
        return real_rollout(self, *args)

    monkeypatch.setattr(nabla, "ahead_loss_and_grads", spy_pass)
    monkeypatch.setattr(nabla, "dto", spy_dto)
    monkeypatch.setattr(NablaReasoner, "_rollout", spy_rollout)
    NablaReasoner(lm, tok, rm, tok, replace(FAST, rejection_sampling=False, max_new_tokens=24)).generate(PROMPT)
    selections = [i for i, p in enumerate(passes) if p[0] == "select"]
    assert passes[0] == ("rollout",) and len(selections) >= 3
    assert passes[1][:2] == ("select", 1)  # the first draft's rollout cached the prompt but its last id
    assert all(p[1:] == (1, 0) for p in passes if p[0] == "dto") and any(p[0] == "dto" for p in passes)
    assert all(passes[i][1] in (1, 2) and passes[i][2] == 1 for i in selections[1:])
    assert all(passes[i + 1][:2] == ("select", 1) for i, p in enumerate(passes[:-1]) if p[0] == "rollout")


def test_every_rollout_gets_the_room_the_length_limit_leaves(tok, lm, rm, monkeypatch):
    prompt_len, rooms = len(chat_prompt_ids(tok, PROMPT)), []
    real_generate = type(lm).generate

    def spy_generate(self, input_ids, generation_config=None, **kwargs):
        rooms.append(input_ids.shape[1] - prompt_len + generation_config.max_new_tokens)
        return real_generate(self, input_ids, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(type(lm), "generate", spy_generate)
    NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=0)
    assert len(rooms) >= 2 and set(rooms) == {FAST.max_new_tokens}  # committed + redrawn + new = the limit


def test_a_revision_of_the_last_allowed_token_rolls_out_nothing(tok, lm, rm):
    runs = [NablaReasoner(lm, tok, rm, tok, replace(FAST, max_new_tokens=1)).generate(PROMPT, seed=s).stats
            for s in range(4)]
    assert any(run["revisions_proposed"] for run in runs) and all(run["generated_tokens"] == 1 for run in runs)
    # a proposal with no room left still counts as a rollout of the budget, and its draft is scored
    assert all(run["rollouts"] == 1 + run["revisions_proposed"] for run in runs)


def test_a_redraw_of_the_drafted_token_rolls_out_nothing(tok, lm, rm, monkeypatch):
    drafted, real_dto = [], nabla.dto

    def spy_dto(z0, full_grad, cfg, first=None, to_logits=lambda x: x):
        drafted.append(first[0])
        return real_dto(z0, full_grad, cfg, first, to_logits)

    monkeypatch.setattr(nabla, "dto", spy_dto)
    monkeypatch.setattr(nabla, "sample_top_p", lambda *args, **kwargs: drafted[-1])
    stats = NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=0).stats
    assert stats["optimized_tokens"] >= 2 and stats["rollouts"] == 1 and stats["revisions_proposed"] == 0


def test_dto_takes_the_selection_gradient_even_without_gradient_caching():
    """grad_cache=False recomputes the gradient at every later iteration, but the first iteration's gradient,
    handed over from selection for the same token, is exact: recomputing it would waste a pass."""
    g, z0, asked = torch.zeros(10), torch.zeros(10), []
    g[3], z0[3] = 1.0, 5.0
    _, n_full, n_cached = dto(z0, lambda t: asked.append(t) or g, NablaConfig(dto_iters=4, grad_cache=False),
                              first=(3, g))
    assert (n_full, n_cached, len(asked)) == (3, 1, 3)


def test_latent_dto_takes_the_argmax_of_the_logits_not_of_the_hidden_state():
    W = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    h0 = torch.tensor([3.0, 2.0, 1.0])  # argmax(h0) = 0, argmax(W h0) = 1
    dto(h0, lambda token: pytest.fail("the gradient handed over is the argmax token's"), NablaConfig(dto_iters=1),
        first=(1, torch.zeros(3)), to_logits=lambda h: W @ h)


def test_top_p_keeps_the_smallest_nucleus_that_reaches_it():
    torch.manual_seed(0)  # two equally likely tokens and top_p 0.5: the first alone reaches it
    assert len({sample_top_p(torch.zeros(2), 1.0, 0.5) for _ in range(50)}) == 1


def test_a_redrawn_end_of_sequence_token_ends_the_draft(tok, lm, rm):
    reasoner, stats = NablaReasoner(lm, tok, rm, tok, FAST), dict.fromkeys(nabla.STATS, 0)
    tokens, _ = reasoner._rollout(Prefix(chat_prompt_ids(tok, PROMPT), [], []), [tok.eos_token_id], 0, stats)
    assert tokens == [tok.eos_token_id] and stats["generated_tokens"] == stats["model_calls"] == 0


def test_the_reward_model_never_reads_the_end_of_sequence_token(tok, lm, rm):
    """The RM's template closes the response itself: the acceptance score and the DTO loss both leave the
    LM's end-of-sequence token out."""
    reasoner, stats = NablaReasoner(lm, tok, rm, tok, FAST), dict.fromkeys(nabla.STATS, 0)
    before, after = reward_template(tok, PROMPT)
    reward = reasoner._reward(PROMPT, ids_of(tok, "x = 5") + [tok.eos_token_id], stats, before, after)
    assert reward == pytest.approx(score(rm, tok, PROMPT, "x = 5"), abs=1e-6)
    assert stats["reward_splice_mismatches"] == 0
    vocab_map, ahead = align_vocab(tok, tok, lm.config.vocab_size), ids_of(tok, "5.")
    prefix = lambda: make_prefix(lm, rm, tok, tok, vocab_map)  # noqa: E731
    with_eos = reasoner._loss_and_grads(prefix(), ahead + [tok.eos_token_id], stats)
    without = ahead_loss_and_grads(lm, rm, vocab_map, prefix(), ahead, FAST)
    likelihood_of_eos = FAST.likelihood_coeff * with_eos.logp[-1, tok.eos_token_id]
    assert with_eos.loss.item() == pytest.approx(without.loss.item() - likelihood_of_eos.item(), abs=1e-6)


def test_tokens_the_reward_model_lacks_get_no_reward_gradient(tok, lm):
    rm_tok = make_tokenizer(chars=[c for c in PRINTABLE if c not in "qz"])
    rm = make_rm(rm_tok)
    with torch.no_grad():  # row 0 is a padding row of zeros: make it one a wrong lookup would show
        rm.get_input_embeddings().weight[0] = torch.randn(rm.config.hidden_size)
    vocab_map, ahead = align_vocab(tok, rm_tok, lm.config.vocab_size), ids_of(tok, "it is 5")
    prefix = make_prefix(lm, rm, tok, rm_tok, vocab_map)
    step = ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, FAST)
    positions, missing = torch.arange(len(ahead)), (vocab_map < 0).nonzero().flatten()
    both = onehot_grads(step, positions, lm, rm, vocab_map, FAST)
    lm_only = onehot_grads(step, positions, lm, None, None, FAST)
    assert len(missing) >= 2 and torch.equal(both[:, missing], lm_only[:, missing])
    # ... and a draft holding such a token gets a reward that does not read row 0 either
    ahead = ids_of(tok, "q is 5")
    before = ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, FAST).loss
    with torch.no_grad():
        rm.get_input_embeddings().weight[0] = torch.randn(rm.config.hidden_size)
    assert ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, FAST).loss == before


def test_drafts_use_the_rollout_settings_and_every_end_of_sequence_id(tok, lm):
    cfg = NablaConfig(rollout_temperature=0.7, rollout_top_p=0.9, rollout_top_k=11, resample_temperature=0.3,
                      resample_top_p=0.5, resample_top_k=3)
    sampling = nabla.draft_sampling(lm, tok, cfg)
    assert [sampling[k] for k in ("do_sample", "temperature", "top_p", "top_k")] == [True, 0.7, 0.9, 11]
    assert sampling["eos_token_id"] == eos_token_ids(lm) and len(sampling["eos_token_id"]) == 2
    assert sampling["repetition_penalty"] == 1.0
    assert not nabla.draft_sampling(lm, tok, replace(cfg, rollout_temperature=0))["do_sample"]


def test_a_base_models_drafts_also_end_where_the_chat_template_ends_a_turn(tok, lm):
    base, end_of_text, end_of_turn = copy.deepcopy(lm), tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    base.generation_config.eos_token_id = end_of_text  # Qwen2.5-7B (base) lists <|endoftext|> only
    assert eos_token_ids(base) == [end_of_text]
    assert eos_token_ids(base, tok) == [end_of_text, end_of_turn]
    assert nabla.draft_sampling(base, tok, NablaConfig())["eos_token_id"] == [end_of_text, end_of_turn]
    assert NablaReasoner(base, tok).eos == {end_of_text, end_of_turn}
    other = copy.deepcopy(tok)
    for template in ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}",  # a turn ends with a newline
                     "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}"):  # no content
        other.chat_template = template
        assert eos_token_ids(base, other) == [end_of_text]
    other.chat_template = "{% for m in messages %}{{ m['content'] }} <|im_end|>{% endfor %}"  # text, then the end
    assert eos_token_ids(base, other) == [end_of_text, end_of_turn]


def test_selection_finds_the_first_big_gradient_past_the_first_chunk():
    norms = [1.0, 1.0, 9.0, 9.0, 9.0]
    s, grad = select_position(fake_step([0.5] * 5), NablaConfig(),
                              lambda p: torch.tensor([[norms[i], 0.0] for i in p.tolist()]), chunk=2)
    assert s == 2 and grad.tolist() == [9.0, 0.0]


# ------------------------------------------------------------------------------------------ helpers, one mutant each


def bang_first_tokenizer():
    """Printable characters with "!" at id 0 and the special tokens last, as in Qwen2.5's vocabulary."""
    symbols = ["!"] + [c for c in PRINTABLE if c != "!"]
    backend = Tokenizer(token_models.BPE(vocab={s: i for i, s in enumerate(symbols + SPECIALS)}, merges=[]))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def fresh_stats():
    return dict.fromkeys(nabla.STATS, 0)


# ------------------------------------------------------------------------------------------ vocabularies


def test_a_token_with_reward_id_zero_is_read_scored_and_covered(tok, lm):
    """Qwen2.5's id 0 is "!": a reward-model id of 0 is a real token, not a missing one (-1)."""
    rm_tok = bang_first_tokenizer()
    rm = make_rm(rm_tok)
    vocab_map = align_vocab(tok, rm_tok, lm.config.vocab_size, min_overlap=1.0)  # every LM token is there
    bang = tok.convert_tokens_to_ids("!")
    assert vocab_map[bang] == 0
    cfg = NablaConfig(likelihood_coeff=0.5)
    ahead = ids_of(tok, "5! = x") + [tok.eos_token_id]
    ref_loss, ref = reference_grads(lm, rm, tok, rm_tok, vocab_map, "2+3! is ", ahead, cfg, eos={tok.eos_token_id})
    prefix = make_prefix(lm, rm, tok, rm_tok, vocab_map, "2+3! is ")
    step = ahead_loss_and_grads(lm, rm, vocab_map, prefix, ahead, cfg, {tok.eos_token_id})
    assert step.loss.item() == pytest.approx(ref_loss, abs=1e-5)
    torch.testing.assert_close(onehot_grads(step, torch.arange(len(ahead)), lm, rm, vocab_map, cfg), ref, rtol=0,
                               atol=1e-5)
    reasoner = NablaReasoner(lm, tok, rm, rm_tok, FAST)
    out = reasoner._answer(ids_of(tok, "5!"), None, fresh_stats(), time.perf_counter())
    assert out.stats["rm_token_coverage"] == 1.0


def test_vocabulary_map_has_one_entry_per_embedding_row(tok):
    """Qwen2.5-7B has 152,064 embedding rows for 151,665 tokens: rows past the tokenizer map to nothing, and the
    overlap is over the tokenizer's tokens; a tokenizer longer than the embedding is cut to it."""
    V = len(tok)
    padded = align_vocab(tok, tok, 2 * V)
    assert len(padded) == 2 * V and torch.equal(padded[:V], torch.arange(V)) and (padded[V:] == -1).all()
    assert len(align_vocab(tok, tok, V - 3)) == V - 3
    missing_two = make_tokenizer(chars=[c for c in PRINTABLE if c not in "qz"])
    align_vocab(tok, missing_two, V, min_overlap=(V - 2) / V)  # "at least" the overlap asked for: exactly it passes
    with pytest.raises(ValueError):
        align_vocab(tok, missing_two, V, min_overlap=(V - 1) / V)


def test_ids_past_the_reward_models_embedding_map_to_nothing(tok, lm):
    config = tiny_config(tok, 64, 2, num_labels=1)
    config.vocab_size = len(tok) - 1  # its tokenizer has one token more than its embedding rows
    torch.manual_seed(1)
    small = transformers.Qwen2ForSequenceClassification(config).eval()
    vocab_map = NablaReasoner(lm, tok, small, tok, FAST).vocab_map
    assert vocab_map[-1] == -1 and torch.equal(vocab_map[:-1], torch.arange(len(tok) - 1))


# ------------------------------------------------------------------------------------------ heads with a bias


def test_the_reward_heads_bias_is_part_of_the_score(tok, rm):
    biased = copy.deepcopy(rm)
    biased.score = torch.nn.Linear(rm.config.hidden_size, 1, bias=True)
    with torch.no_grad():
        biased.score.weight.copy_(rm.score.weight)
        biased.score.bias.fill_(0.75)
    ids = nabla.reward_ids(tok, PROMPT, "it is 5")
    assert score(biased, tok, PROMPT, "it is 5") == pytest.approx(biased(torch.tensor([ids])).logits[0, 0].item(),
                                                                  abs=1e-5)


def test_latent_logits_are_the_output_heads_with_its_bias(tok, lm):
    biased = copy.deepcopy(lm)
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.lm_head.weight)
        head.bias.copy_(torch.randn(lm.config.vocab_size))
    biased.lm_head = head
    reasoner = NablaReasoner(biased, tok, None, None, replace(FAST, space="latents"))
    h = torch.randn(lm.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(reasoner._latent_logits(h), head(h), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ end of a turn


def test_only_the_first_special_token_after_an_answer_ends_a_turn(tok, lm):
    base, end_of_text, end_of_turn = copy.deepcopy(lm), tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    base.generation_config.eos_token_id = end_of_text
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|><|im_start|>{% endfor %}"
    assert eos_token_ids(base, other) == [end_of_text, end_of_turn]
    # an added token that is not special (a word of the vocabulary) does not end a turn
    worded = char_tokenizer(PRINTABLE, words=["END"])
    worded.chat_template = "{% for m in messages %}{{ m['content'] }}END<|im_end|>{% endfor %}"
    assert eos_token_ids(base, worded) == [end_of_text, worded.convert_tokens_to_ids("<|im_end|>")]


# ------------------------------------------------------------------------------------------ greedy drafts


def test_greedy_drafts_pass_no_flag_that_generation_ignores(tok, lm):
    """Greedy drafts get generate's defaults, so that the model's do not trigger 'flags are not valid' messages."""
    messages = []

    class Record(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, logger = Record(), transformers.utils.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        sampling = nabla.draft_sampling(lm, tok, NablaConfig(rollout_temperature=0, rollout_top_k=20))
        GenerationConfig(**sampling, max_new_tokens=3).validate()
    finally:
        logger.removeHandler(handler)
    assert not sampling["do_sample"] and not [m for m in messages if "not valid" in m]


# ------------------------------------------------------------------------------------------ templates, scoring


def test_a_template_that_renders_the_response_twice_is_refused_with_a_clear_message(tok):
    content = "{{ m['content'] }}"
    twice = make_tokenizer(chat_template=CHAT_TEMPLATE.replace(content, content + content))
    with pytest.raises(ValueError, match="once"):
        reward_template(twice, PROMPT)


def test_the_splice_warning_is_raised_once(tok, lm, rm):
    stripping = make_tokenizer(chat_template=tok.chat_template.replace("{{ m['content'] }}",
                                                                       "{{ m['content'] | trim }}"))
    reasoner, stats = NablaReasoner(lm, tok, rm, stripping, FAST), fresh_stats()
    before, after = reward_template(stripping, PROMPT)
    with pytest.warns(UserWarning, match="differently"):
        reasoner._reward(PROMPT, ids_of(tok, "\nx = 5 "), stats, before, after)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reasoner._reward(PROMPT, ids_of(tok, "\ny = 6 "), stats, before, after)
    assert stats["reward_splice_mismatches"] == 2


def test_special_tokens_the_lm_wrote_are_scored_as_the_loss_reads_them(tok, lm, rm):
    reasoner, stats = NablaReasoner(lm, tok, rm, tok, FAST), fresh_stats()
    before, after = reward_template(tok, PROMPT)
    draft = ids_of(tok, "x") + [tok.convert_tokens_to_ids("<|im_start|>")] + ids_of(tok, "= 5")
    reward = reasoner._reward(PROMPT, draft, stats, before, after)
    assert stats["reward_splice_mismatches"] == 0
    assert reward == pytest.approx(nabla.score_ids(rm, before + draft + after), abs=1e-6)


def test_the_answer_text_and_coverage_leave_special_tokens_out(tok, lm):
    rm_tok = make_tokenizer(chars=[c for c in PRINTABLE if c not in "qz"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reasoner = NablaReasoner(lm, tok, make_rm(rm_tok), rm_tok, FAST)
    tokens = ids_of(tok, "q") + [tok.convert_tokens_to_ids("<|im_start|>")] + ids_of(tok, "5") + [tok.eos_token_id]
    out = reasoner._answer(tokens, None, fresh_stats(), time.perf_counter())
    assert out.text == "q5" and out.token_ids == tokens[:-1]
    assert out.stats["rm_token_coverage"] == pytest.approx(2 / 3)  # q missing; <|im_start|> and 5 there; no eos


# ------------------------------------------------------------------------------------------ the static cache


def test_the_static_cache_is_allocated_once_in_multiples_of_256(tok, lm):
    reasoner = NablaReasoner(lm, tok, None, None, replace(FAST, fast_rollout=True))
    first = reasoner._static_cache((), 10)
    assert first.layers[0].max_cache_len == 256
    assert reasoner._static_cache((), 256) is first and reasoner._static_cache((), 200) is first
    assert reasoner._static_cache((), 257).layers[0].max_cache_len == 512


def test_a_tokenizer_that_adds_bos_gets_it_once_from_the_template(tok):
    """The chat template writes BOS itself (Llama's does): ids are taken without the tokenizer's own specials."""
    bos_tok = make_tokenizer()
    bos_tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", tok.pad_token_id)])
    assert bos_tok("x")["input_ids"][0] == tok.pad_token_id  # the tokenizer does add it
    assert chat_prompt_ids(bos_tok, PROMPT) == chat_prompt_ids(tok, PROMPT)
    assert reward_template(bos_tok, PROMPT) == reward_template(tok, PROMPT)
    assert nabla.reward_ids(bos_tok, PROMPT, "x = 5") == nabla.reward_ids(tok, PROMPT, "x = 5")


def test_a_kept_cache_is_a_copy_that_later_rollouts_leave_alone(tok, lm):
    """_keep copies: a view would hold the whole cache, and the static cache of fast rollouts is refilled by the
    next rollout."""
    reasoner = NablaReasoner(lm, tok, None, None, replace(FAST, fast_rollout=True, rollout_temperature=0))
    _, kv = reasoner._rollout(nabla.Prefix(chat_prompt_ids(tok, PROMPT), [], []), [], 0, fresh_stats())
    snapshot = [(k.clone(), v.clone()) for k, v in kv]
    assert all(k.untyped_storage().nbytes() == k.nbytes and v.untyped_storage().nbytes() == v.nbytes for k, v in kv)
    reasoner._rollout(nabla.Prefix(chat_prompt_ids(tok, "Another question, longer"), [], []), [], 0, fresh_stats())
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, snapshot))


def test_cached_steps_count_the_iterations_a_known_gradient_served(tok, lm, rm, monkeypatch):
    """stats["cached_steps"]: the DTO iterations a gradient already known served, not DTO's full passes."""
    returned, real_dto = [], nabla.dto

    def spy_dto(*args, **kwargs):
        z, n_full, n_cached = real_dto(*args, **kwargs)
        returned.append((n_full, n_cached))
        return z, n_full, n_cached

    monkeypatch.setattr(nabla, "dto", spy_dto)
    for seed in range(2):
        returned.clear()
        st = NablaReasoner(lm, tok, rm, tok, FAST).generate(PROMPT, seed=seed).stats
        full, cached = (sum(r[i] for r in returned) for i in (0, 1))
        assert len(returned) == st["optimized_tokens"] >= 1 and full != cached
        assert st["cached_steps"] == cached and full + cached == FAST.dto_iters * st["optimized_tokens"]


def test_fast_rollouts_past_the_first_256_positions(tok, lm, rm):
    """The static cache holds the prompt and the room left, not the room alone."""
    prompt = "What is 2+3? Think step by step, then answer. " * 7  # over 300 positions with the template
    assert len(chat_prompt_ids(tok, prompt)) > 256
    cfg = replace(FAST, max_new_tokens=8, rollout_temperature=0)
    a, b = (NablaReasoner(lm, tok, rm, tok, replace(cfg, fast_rollout=f)).generate(prompt, seed=0)
            for f in (False, True))
    assert a.token_ids == b.token_ids and a.stats["reward_final"] == pytest.approx(b.stats["reward_final"], abs=1e-6)
