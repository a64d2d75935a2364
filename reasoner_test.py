"""Tests of nabla.py on tiny models built in-process (tiny.py); CPU, fp32."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tiny import PRINTABLE, make_lm, make_rm, make_tokenizer
from nabla import (AheadGrads, NablaConfig, NablaReasoner, Prefix, _keep, accept, ahead_loss_and_grads, align_vocab,
                   chat_prompt_ids, dto, eos_token_ids, onehot_grads, reward_template, sample_top_p, score,
                   select_position, straight_through_onehot, token_entropy)

PROMPT = "What is 2+3?"
# Random tiny models have small gradients: a zero gradient threshold lets DTO run at every uncertain token.
FAST = NablaConfig(max_new_tokens=16, grad_norm_threshold=0.0, dto_iters=5)


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
    E = lm.get_input_embeddings().weight
    emb = torch.cat([E[torch.tensor(lm_ids)], y @ E])
    logp = lm(inputs_embeds=emb[None]).logits[0].log_softmax(-1)
    loss = -cfg.likelihood_coeff * (logp[len(lm_ids) - 1:-1] * y).sum()
    if rm is not None:
        before, after = reward_template(rm_tok, PROMPT)
        n_rm = len(ahead) - (ahead[-1] in eos)
        y_rm = torch.zeros(n_rm, rm.config.vocab_size).index_add(1, vocab_map, y[:n_rm])
        response = [vocab_map[t] for t in ids_of(tok, committed_text)]
        R = rm.get_input_embeddings().weight
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


def test_selection_gradient_equals_first_dto_gradient_after_commit(tok, lm, rm):
    """The gradient at position s from the selection pass is DTO's first gradient: reusing it is exact."""
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

    z0 = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 0.05
    cfg = NablaConfig(dto_iters=12, lr=0.2)  # a large step, so the argmax flips a few times
    z_cached, full_cached, n_cached = dto(z0, full_grad, cfg)
    tokens_seen = list(passes)
    passes.clear()
    z_plain, full_plain, n_plain = dto(z0, full_grad, replace(cfg, grad_cache=False))
    torch.testing.assert_close(z_cached, z_plain, rtol=0, atol=1e-6)  # caching is exact
    assert (full_plain, n_plain) == (12, 0)
    assert full_cached + n_cached == 12 and 2 <= full_cached < 12
    assert full_cached == len(tokens_seen)
    assert all(a != b for a, b in zip(tokens_seen, tokens_seen[1:]))  # recomputed only after a flip


def test_zero_dto_iterations_redraw_from_the_llm_logits(tok, lm, rm):
    z0 = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0))
    z, n_full, n_cached = dto(z0, lambda token: pytest.fail("no gradient is needed"), NablaConfig(dto_iters=0))
    assert torch.equal(z, z0) and (n_full, n_cached) == (0, 0)
    stats = [NablaReasoner(lm, tok, rm, tok, cfg).generate(PROMPT, seed=0).stats
             for cfg in (replace(FAST, dto_iters=0), FAST)]
    # Without DTO the only gradient passes are token selection's, one per optimized token (plus a last
    # one that finds nothing to optimize); with DTO there are more.
    assert stats[0]["optimized_tokens"] >= 1 and stats[0]["cached_steps"] == 0
    assert stats[0]["grad_steps"] - stats[0]["optimized_tokens"] in (0, 1)
    assert stats[1]["grad_steps"] - stats[1]["optimized_tokens"] > 1


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
    for seed in range(2):
        out = NablaReasoner(lm, tok, rm, tok, cfg).generate(PROMPT, seed=seed)
        assert 1 <= out.stats["rollouts"] <= max_rollouts
        assert len(out.token_ids) <= max_new_tokens
        assert out.stats["generated_tokens"] <= max_rollouts * max_new_tokens
        if max_rollouts == 1:
            assert out.stats["optimized_tokens"] == 0


def test_same_seed_same_output(tok, lm, rm):
    reasoner = NablaReasoner(lm, tok, rm, tok, FAST)
    a, b, c = (reasoner.generate(PROMPT, seed=s) for s in (7, 7, 8))
    drop_time = lambda st: {k: v for k, v in st.items() if k != "wall_time_s"}
    assert a.token_ids == b.token_ids and a.text == b.text and drop_time(a.stats) == drop_time(b.stats)
    assert a.token_ids != c.token_ids


def test_without_reward_model_dto_follows_likelihood_and_keeps_every_revision(tok, lm):
    out = NablaReasoner(lm, tok, None, None, FAST).generate(PROMPT, seed=0)
    st = out.stats
    assert st["reward_initial"] is None and st["reward_final"] is None
    assert st["revisions_accepted"] == st["revisions_proposed"] >= 1
    assert st["model_calls"] == st["generated_tokens"] + 2 * st["grad_steps"]


def test_latent_space_optimization_runs(tok, lm, rm):
    out = NablaReasoner(lm, tok, rm, tok, replace(FAST, space="latents")).generate(PROMPT, seed=0)
    assert out.stats["optimized_tokens"] >= 1 and out.stats["cached_steps"] >= 1
    assert out.stats["reward_final"] >= out.stats["reward_initial"]


def test_output_is_the_response_only(tok, lm, rm):
    out = NablaReasoner(lm, tok, rm, tok, replace(FAST, max_new_tokens=40)).generate(PROMPT, seed=1)
    eos = set(eos_token_ids(lm))
    assert not eos & set(out.token_ids)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert "user" not in out.text or PROMPT not in out.text


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
