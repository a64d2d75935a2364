"""∇-Reasoner: LLM reasoning by test-time gradient descent on token logits, in one file.

Paper: P. Wang, R. Cai, Z. Wang, H. Mei, Q. Liu, P. Li, Z. Wang. "∇-Reasoner: LLM Reasoning via
Test-Time Gradient Descent in Latent Space", ICLR 2026, https://arxiv.org/abs/2603.04948

Instead of sampling many answers and keeping the best (best-of-N, self-consistency, tree search),
∇-Reasoner revises one draft token by token: it takes the gradient of a reward model's score and
of the LLM's own likelihood with respect to the draft's tokens, runs a few steps of gradient descent
on the logits of the first uncertain token, redraws that token, and keeps the revision only if the
reward model prefers the draft that follows from it.

The file reads top to bottom in the order of the paper:

  NablaConfig               the paper's MATH-500 settings
  straight_through_onehot   Differentiable Textual Optimization (DTO): hard one-hot forward, softmax backward
  align_vocab               a reward model with another tokenizer, aligned to the LLM by token string
  draft_sampling            `generate`'s settings for every draft, each knob explicit
  chat_prompt_ids, reward_template, reward_head, score
                            the prompt in each model's chat template; r(x, y) for a whole response
  Prefix, ahead_loss_and_grads
                            the DTO loss  L = -λ r(x, y_<t ⊕ ŷ) - c Σ_s log π(ŷ_s | x, y_<t, ŷ_<s)
                            over the ahead span, run on KV caches of the fixed prefix
  onehot_grads              ∂L/∂ŷ_s: the gradient with respect to each ahead token's one-hot
  select_position           token selection: skip confident tokens and tokens with small gradients
  lr_factor, dto            DTO itself: Adam with cosine decay on one position, with gradient caching
  sample_top_p, accept      redraw the optimized token; rejection sampling by the reward model
  NablaReasoner._decode     the decoding loop: draft, select, optimize, redraw, roll out, accept

Beyond the authors' release (VITA-Group/Nabla-Reasoner), each where it happens: both drafts of an
acceptance test are scored as the same thing (score); a DTO step runs both models over the ahead span
only, on KV caches of the prefix, with vocabulary logits for the ahead span only (ahead_loss_and_grads);
the variable is one fp32 position (dto) and the reward head runs in fp32 (reward_head); DTO computes each
token's gradient once, the drafted token's in the selection pass (dto, NablaReasoner._dto), and a draft that
stands keeps its selection pass (NablaReasoner._rows_after); rollouts run in-process on the same KV cache
(NablaReasoner._rollout); every pass is counted, in forward-token-equivalents too.
"""
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, StaticCache

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (key, value) per layer, [1, heads, positions, dim]
# The counters of NablaOutput.stats (see NablaReasoner), in the order they are reported.
STATS = ("model_calls", "forward_token_equivalents", "generated_tokens", "rollouts", "revisions_proposed",
         "revisions_accepted", "grad_steps", "cached_steps", "optimized_tokens", "reward_splice_mismatches")


@dataclass(frozen=True)
class NablaConfig:
    """Settings of the paper's MATH-500 runs. AIME uses max_new_tokens=3072 and grad_norm_threshold=8."""
    max_new_tokens: int = 1024              # length limit of the response, in LM tokens
    max_rollouts: int = 8                   # N_max: drafts rolled out per problem, the first one included
    rollout_temperature: float = 0.6        # sampling temperature of every draft (0: greedy drafts)
    rollout_top_p: float = 0.95             # nucleus of every draft
    rollout_top_k: int = 20                 # top-k of every draft (0: none); 20 is Qwen2.5-7B-Instruct's default,
                                            # which the authors' runs fell back to
    resample_temperature: float = 0.5       # temperature of the redraw from the optimized logits
    resample_top_p: float = 0.95            # nucleus of that redraw
    resample_top_k: int = 20                # top-k of that redraw (0: none), as for the drafts
    reward_coeff: float = 1.0               # λ: weight of the reward in the loss
    likelihood_coeff: float = 1e-3          # c: weight of the LLM log-likelihood in the loss
    lr: float = 0.01                        # Adam learning rate on the optimized logits (or latents)
    min_lr_ratio: float = 0.1               # cosine decay of lr, clipped below at min_lr_ratio * lr, no warm-up
    dto_iters: int = 20                     # DTO iterations per optimized token (0: redraw from the LLM's logits)
    confidence_threshold: float = 0.97      # a token whose top probability is above this is committed as drafted
    grad_norm_threshold: float = 4.0        # so is a token whose ‖∂L/∂one-hot‖₂ is below this
    entropy_threshold: float | None = None  # optional: so is a token whose entropy (nats) is below this
    space: str = "logits"                   # "logits": optimize z; "latents": optimize h, with z = W_out h
    grad_cache: bool = True                 # compute ∂L/∂one-hot once per argmax token (exact)
    rejection_sampling: bool = True         # keep a revised draft only if the reward model scores it higher
    fast_rollout: bool = False              # rollouts on a static KV cache, which `generate` compiles on a GPU


# Differentiable Textual Optimization: the straight-through one-hot ---------------------------------------
def straight_through_onehot(z: torch.Tensor) -> torch.Tensor:
    """One-hot of argmax(z) in the forward pass; the gradient of softmax(z) in the backward pass.

    The models only ever see real tokens, since the forward value is exactly one-hot, yet the gradient
    says how the loss would change if probability mass moved between tokens. The parentheses matter:
    `soft - soft.detach()` is exactly zero, so the sum is exactly the one-hot.
    """
    soft = z.softmax(-1)
    hard = F.one_hot(z.argmax(-1), z.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


# Models, tokenizers and chat templates -------------------------------------------------------------------
def align_vocab(lm_tokenizer, rm_tokenizer, lm_vocab_rows: int, min_overlap: float = 0.9) -> torch.Tensor:
    """For each LM token id, the reward model's id of the same token string (-1 where it has none).

    The one-hot of a token lives in the LM's vocabulary; the reward model reads it through this map, so a
    Qwen3 reward model can score and differentiate a Qwen2.5 policy's tokens.
    """
    rm_vocab = rm_tokenizer.get_vocab()
    lm_tokens = lm_tokenizer.convert_ids_to_tokens(list(range(min(len(lm_tokenizer), lm_vocab_rows))))
    rm_ids = torch.tensor([rm_vocab.get(t, -1) for t in lm_tokens] + [-1] * (lm_vocab_rows - len(lm_tokens)))
    overlap = (rm_ids >= 0).sum().item() / max(len(lm_tokens), 1)
    if overlap < min_overlap:
        raise ValueError(f"only {overlap:.1%} of the policy's tokens exist in the reward model's vocabulary "
                         f"(at least {min_overlap:.0%} needed): the two models need the same (or an aligned) tokenizer")
    return rm_ids


def eos_token_ids(lm, tokenizer=None) -> list[int]:
    """Every end-of-sequence id of the LM's generation config (Qwen2.5-Instruct has two) and, given the tokenizer,
    the special token that ends an assistant turn of its chat template, which a base model's config may lack."""
    eos = next((e for e in (lm.generation_config.eos_token_id, lm.config.eos_token_id) if e is not None), [])
    ids = [eos] if isinstance(eos, int) else list(eos)
    if getattr(tokenizer, "chat_template", None):  # the first special token the template writes after an answer
        turn = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "∇∇"}]
        _, mark, after = tokenizer.apply_chat_template(turn, tokenize=False).rpartition("∇∇")
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        end = [t for t in tokenizer(after, add_special_tokens=False).input_ids if mark and t in special][:1]
        ids += [t for t in end if t not in ids]
    return ids


def draft_sampling(lm, tokenizer, cfg: NablaConfig) -> dict:
    """`generate`'s settings for a draft. Every knob is explicit: an unset one is filled in from the model's
    generation config (e.g. Qwen's repetition_penalty=1.05) and would silently change the sampling. Greedy
    drafts get the global defaults, which greedy decoding ignores, so that the model's do not warn."""
    eos, greedy = eos_token_ids(lm, tokenizer), cfg.rollout_temperature <= 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    return dict(do_sample=not greedy, temperature=1.0 if greedy else cfg.rollout_temperature,
                top_p=1.0 if greedy else cfg.rollout_top_p, top_k=50 if greedy else cfg.rollout_top_k,
                repetition_penalty=1.0, eos_token_id=eos or None, pad_token_id=pad)


def _check_inputs(tokenizer, who: str, prompt: str = "a prompt") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the {who} tokenizer has no chat template; ∇-Reasoner puts the prompt in the user turn of "
                         f"the chat template, so set tokenizer.chat_template first")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt must be a non-empty string")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS, if any


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the user turn of the chat template, followed by the assistant's header."""
    _check_inputs(tokenizer, "policy", prompt)
    messages = [{"role": "user", "content": prompt}]
    return _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _conversation(rm_tokenizer, prompt: str, response: str) -> str:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return rm_tokenizer.apply_chat_template(messages, tokenize=False)


def reward_template(rm_tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """The reward model's token ids before and after the response in its chat template.

    The differentiable path splices the response's tokens in between. Splitting the rendered text at a
    marker works for any template, including ones that add text around the response.
    """
    _check_inputs(rm_tokenizer, "reward model", prompt)
    marker = "\u2063RESPONSE\u2063"
    text = _conversation(rm_tokenizer, prompt, marker)
    if text.count(marker) != 1:
        raise ValueError("the reward model's chat template does not render the assistant response once")
    before, after = text.split(marker)
    return _ids(rm_tokenizer, before), _ids(rm_tokenizer, after)


def reward_head(rm, hidden: torch.Tensor) -> torch.Tensor:
    """The reward model's score head on its last hidden state(s), in fp32.

    In bf16 a reward near 5 is rounded to a multiple of 1/32, so two different drafts often tie, and a
    tie rejects a revision. The head is one row of weights, so fp32 costs nothing.
    """
    head = getattr(rm, "score", None)
    head = getattr(rm, "classifier", None) if head is None else head
    if not isinstance(head, torch.nn.Linear):
        raise ValueError("the reward model needs a linear score head (`score` or `classifier`), as "
                         "AutoModelForSequenceClassification models of the Llama/Qwen families have")
    bias = None if head.bias is None else head.bias.float()
    return F.linear(hidden.float(), head.weight.float(), bias)[..., 0]


def reward_ids(rm_tokenizer, prompt: str, response: str) -> list[int]:
    """The reward model's input for r(x, y): the whole conversation in its chat template."""
    return _ids(rm_tokenizer, _conversation(rm_tokenizer, prompt, response))


@torch.no_grad()
def score_ids(rm, ids: list[int]) -> float:
    """The reward of one conversation, read at its last token."""
    hidden = rm.base_model(input_ids=torch.tensor([ids], device=rm.device)).last_hidden_state
    return reward_head(rm, hidden[0, -1]).item()


def score(rm, rm_tokenizer, prompt: str, response: str) -> float:
    """r(x, y): the reward model's score for the response, both in the reward model's chat template. Every
    draft, first or revised, is scored on its whole text this way, so rewards are comparable (the authors'
    acceptance test scored the two drafts of a comparison differently)."""
    return score_ids(rm, reward_ids(rm_tokenizer, prompt, response))


# The DTO loss on the ahead span, with the prefix held in KV caches ---------------------------------------
def _cache(kv: KV) -> DynamicCache:
    """A fresh cache over stored tensors: a forward pass appends to it, the stored prefix stays as it is."""
    return DynamicCache(kv) if kv else DynamicCache()


def _keep(cache, n: int) -> KV:
    """A copy of the first n positions of a cache, cut off from the autograd graph. A copy, not a view: a view
    would keep the whole cache (the ahead span too) alive, and a static cache is overwritten by the next rollout."""
    return tuple((layer.keys[:, :, :n].detach().clone(), layer.values[:, :, :n].detach().clone())
                 for layer in cache.layers)


def _kv_len(kv: KV) -> int:
    return kv[0][0].shape[2] if kv else 0


@dataclass
class Prefix:
    """What DTO holds fixed while it optimizes the ahead span: the prompt and the committed tokens.

    Each KV cache covers a leading part of its ids; whatever it does not cover is run again with the
    ahead span. The LM cache never covers the last id, whose output state predicts the first ahead token.
    """
    lm_ids: list[int]      # chat-template prompt + committed response tokens (LM vocabulary)
    rm_ids: list[int]      # RM chat template up to the response + committed tokens in RM ids (-1: none)
    rm_suffix: list[int]   # RM chat template after the response
    lm_kv: KV = ()
    rm_kv: KV = ()


@dataclass
class AheadGrads:
    """One full pass of the loss over the ahead span: LM and RM forward, then backward."""
    loss: torch.Tensor           # scalar, detached: read it only when needed (reading it waits for the GPU)
    positions: int               # token positions the two forward passes ran (the backward costs about twice that)
    logp: torch.Tensor           # [A, V] fp32: log π(· | x, y_<t, ŷ_<s) at each ahead position s
    hidden: torch.Tensor         # [A, d]: the LM's last hidden states that give those log-probs (the latents)
    g_lm: torch.Tensor           # [A, d]: ∂L/∂(LM input embedding of ŷ_s)
    g_rm: torch.Tensor | None    # [A, d]: ∂L/∂(RM input embedding of ŷ_s), zero for an end-of-sequence token
    lm_cache: DynamicCache       # the caches after the pass: prefix + everything that was run
    rm_cache: DynamicCache | None


def ahead_loss_and_grads(lm, rm, vocab_map: torch.Tensor | None, prefix: Prefix, ahead: list[int],
                         cfg: NablaConfig, eos_ids=()) -> AheadGrads:
    """L = -λ r(x, y_<t ⊕ ŷ) - c Σ_s log π(ŷ_s | x, y_<t, ŷ_<s) and its gradient, for the ahead tokens ŷ.

    Only the ahead span carries gradients, so both models run over it alone, on KV caches of the prefix,
    and vocabulary logits are computed for the ahead positions only. Input embeddings are looked up
    and made leaves; onehot_grads turns their gradients into gradients with respect to one-hots.
    """
    device, n = lm.device, len(ahead)
    with torch.enable_grad():
        k = _kv_len(prefix.lm_kv)
        ids = torch.tensor(prefix.lm_ids[k:] + ahead, device=device)
        emb = lm.get_input_embeddings()(ids)[None].detach().requires_grad_()
        out = lm.base_model(inputs_embeds=emb, past_key_values=_cache(prefix.lm_kv), use_cache=True)
        hidden = out.last_hidden_state[0, -n - 1:-1]  # the states that predict ŷ_0 .. ŷ_{A-1}
        logp = lm.get_output_embeddings()(hidden).float().log_softmax(-1)
        loss = -cfg.likelihood_coeff * logp.gather(-1, ids[-n:, None]).sum()
        leaves, rm_cache = [emb], None
        if rm is not None:
            # The LM's end-of-sequence token is not part of the response: the RM's template closes it.
            n_rm = n - (ahead[-1] in eos_ids)
            kr = _kv_len(prefix.rm_kv)
            mapped = vocab_map[torch.tensor(ahead[:n_rm], dtype=torch.long, device=vocab_map.device)]
            rids = torch.cat([torch.tensor(prefix.rm_ids[kr:], dtype=torch.long, device=rm.device),
                              mapped.to(rm.device), torch.tensor(prefix.rm_suffix, dtype=torch.long, device=rm.device)])
            remb = rm.get_input_embeddings()(rids.clamp(min=0)) * (rids >= 0)[:, None]  # tokens it lacks: zero
            remb = remb[None].detach().requires_grad_()
            rout = rm.base_model(inputs_embeds=remb, past_key_values=_cache(prefix.rm_kv), use_cache=True)
            loss = loss - cfg.reward_coeff * reward_head(rm, rout.last_hidden_state[0, -1]).to(device)
            leaves.append(remb)
            rm_cache = rout.past_key_values
        grads = torch.autograd.grad(loss, leaves)
    g_rm = None
    if rm is not None:
        start = len(prefix.rm_ids) - kr
        g_rm = grads[1].new_zeros(n, grads[1].shape[-1])  # the RM's width may differ from the LM's
        g_rm[:n_rm] = grads[1][0, start:start + n_rm]
    positions = len(ids) + (len(rids) if rm is not None else 0)
    return AheadGrads(loss.detach(), positions, logp.detach(), hidden.detach(), grads[0][0, -n:], g_rm,
                      out.past_key_values, rm_cache)


@torch.no_grad()
def onehot_grads(step: AheadGrads, positions: torch.Tensor, lm, rm, vocab_map: torch.Tensor | None,
                 cfg: NablaConfig) -> torch.Tensor:
    """∂L/∂ŷ_s in the LM's vocabulary for the given ahead positions: [len(positions), V], fp32.

    The one-hot ŷ_s enters the loss three ways: through the LM's input embedding (ŷ_s E_lm), through
    the RM's input embedding (ŷ_s mapped to the RM's vocabulary, times E_rm), and directly through its
    own likelihood term c ⟨log π(· | ...), ŷ_s⟩. These are the three terms below.
    """
    def through(model, g: torch.Tensor) -> torch.Tensor:  # g: ∂L/∂ rows looked up, which Gemma scales by √d
        emb = model.get_input_embeddings()
        return ((g * getattr(emb, "embed_scale", 1.0)) @ emb.weight.T).float()

    grad = through(lm, step.g_lm[positions]) - cfg.likelihood_coeff * step.logp[positions]
    if rm is not None:
        g_rm = through(rm, step.g_rm[positions.to(step.g_rm.device)]).to(grad.device)
        grad = grad + g_rm[:, vocab_map.clamp(min=0)] * (vocab_map >= 0)
    return grad


# Token selection, DTO, redraw and acceptance -------------------------------------------------------------
def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats from log-probabilities; a zero probability contributes 0, not NaN (0 · -inf)."""
    return torch.special.entr(logp.exp()).sum(-1)


def select_position(step: AheadGrads, cfg: NablaConfig,
                    grads_of: Callable[[torch.Tensor], torch.Tensor], chunk: int = 64):
    """The first ahead position worth optimizing, and its gradient ∂L/∂ŷ_s; (None, None) if there is none.

    A token is optimized only when the LLM is unsure of it (top probability at most the threshold), the
    loss is sensitive to it (gradient norm at least the threshold) and, optionally, its entropy is high.
    Confident tokens are committed as drafted: most tokens of a solution are, which is where the savings
    come from. Gradients are formed for a few candidates at a time, since only the first hit matters.
    """
    worth = step.logp.max(-1).values.exp() <= cfg.confidence_threshold
    if cfg.entropy_threshold is not None:
        worth &= token_entropy(step.logp) >= cfg.entropy_threshold
    candidates = worth.nonzero().flatten()
    for i in range(0, len(candidates), chunk):
        grads = grads_of(candidates[i:i + chunk])
        big = (grads.norm(dim=-1) >= cfg.grad_norm_threshold).nonzero().flatten()
        if len(big):
            return int(candidates[i + big[0]]), grads[big[0]].clone()  # a copy: the chunk can go
    return None, None


def lr_factor(t: int, cfg: NablaConfig) -> float:
    """The learning rate of iteration t over cfg.lr, the authors' cosine decay clipped below at min_lr_ratio:
    max(0.1, 0.5 (1 + cos(π t / T))), flat at 0.1 for the last fifth of the 20 steps."""
    return max(cfg.min_lr_ratio, 0.5 * (1 + math.cos(math.pi * t / max(cfg.dto_iters, 1))))


def dto(z0: torch.Tensor, full_grad: Callable[[int], torch.Tensor], cfg: NablaConfig,
        first: tuple[int, torch.Tensor] | None = None, to_logits: Callable = lambda x: x):
    """Differentiable Textual Optimization of one position: Adam on z (or h) with cosine decay.

    Gradient caching: the forward pass sees only argmax(z), so ∂L/∂one-hot depends on that token alone and
    is computed once per token (the authors' code recomputes it after every flip, even back to a token it
    left). Each step minimizes the linear surrogate <G, ŷ(z)>, whose gradient through the straight-through
    one-hot equals the true one: exact. `full_grad(token)` runs both models; `first` is a gradient already
    known (from token selection) for one token.

    Returns the optimized logits, the number of full passes and of iterations a cached gradient served.
    """
    x = z0.detach().float().clone().requires_grad_()  # fp32: a bf16 logit of 12 cannot move by 0.01
    opt = torch.optim.Adam([x], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, cfg))
    grads, n_full, n_cached = dict([first] if first else []), 0, 0  # token -> ∂L/∂one-hot, [V] each
    for it in range(cfg.dto_iters):
        with torch.enable_grad():
            z = to_logits(x)
            token = int(z.argmax())  # the one read of the GPU per iteration: it decides whether a pass must run
            if token not in grads or (it > 0 and not cfg.grad_cache):
                grads[token], n_full = full_grad(token), n_full + 1
            else:
                n_cached += 1
            opt.zero_grad()
            (straight_through_onehot(z) * grads[token]).sum().backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        return to_logits(x).detach(), n_full, n_cached


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> int:
    """Draw a token from softmax(logits / temperature), restricted to the top-k tokens (0: all), then to
    the top-p nucleus of those: the order of Hugging Face's sampling and of the authors' redraw."""
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], -math.inf)
    probs, order = scaled.softmax(-1).sort(descending=True)
    keep = probs.cumsum(-1) - probs < top_p  # the smallest set whose mass reaches top_p
    keep[0] = True  # never empty: top_p = 0 keeps the top token, as in Hugging Face
    return int(order[torch.multinomial(probs * keep, 1)])


def accept(reward_proposed: float, reward_current: float) -> bool:
    """Rejection sampling: a revised draft replaces the current one only if the reward model prefers it."""
    return reward_proposed > reward_current


# The decoding loop ---------------------------------------------------------------------------------------
@dataclass
class NablaOutput:
    text: str             # the response only: no prompt, no end-of-sequence token
    token_ids: list[int]  # the response in the LM's vocabulary
    stats: dict           # model calls, rollouts, revisions, gradient passes, rewards, time


class NablaReasoner:
    """∇-Reasoner decoding with a causal LM and, optionally, a sequence-classification reward model.

    Without a reward model, DTO follows the likelihood term alone and every revision is kept.
    Models are used as given (device, dtype, eval mode), except that their weights are frozen
    (requires_grad=False): only the token embeddings need gradients, and a weight that requires one
    makes autograd keep every activation a weight gradient would need (more saved memory for nothing).

    stats["model_calls"] counts every pass that runs: 1 per generated token, 1 per scoring, 4 per gradient
    pass, the passes that select tokens included (more than the authors count: docs/deviations.md).
    stats["forward_token_equivalents"] counts the tokens they run: 1 per token of a forward pass (prefills
    included), 3 per token of a pass with a backward.
    """

    def __init__(self, lm, lm_tokenizer, rm=None, rm_tokenizer=None, config: NablaConfig | None = None):
        self.cfg = cfg = config or NablaConfig()
        if cfg.space not in ("logits", "latents"):
            raise ValueError(f"space must be 'logits' or 'latents', not {cfg.space!r}")
        if (rm is None) != (rm_tokenizer is None):
            raise ValueError("give both the reward model and its tokenizer, or neither")
        _check_inputs(lm_tokenizer, "policy")
        vocab_rows = lm.get_input_embeddings().weight.shape[0]
        if lm.get_output_embeddings().weight.shape[0] != vocab_rows:
            raise ValueError("the LM's input and output vocabularies differ in size")
        if getattr(lm.config, "final_logit_softcapping", None):  # the loss reads the output head's logits as they are
            raise ValueError("an LM with soft-capped logits (as Gemma 2's) is not supported")
        lm.requires_grad_(False)  # frozen: see the class docstring
        self.lm, self.lm_tokenizer, self.rm, self.rm_tokenizer = lm, lm_tokenizer, rm, rm_tokenizer
        self.vocab_map = self._rm_id = None
        if rm is not None:
            _check_inputs(rm_tokenizer, "reward model")
            if rm.config.num_labels != 1:
                raise ValueError(f"the reward model must have one output (num_labels=1), not {rm.config.num_labels}")
            rm.requires_grad_(False)
            reward_head(rm, torch.zeros(1, rm.config.hidden_size, device=rm.device))  # fails now without a score head
            vocab_map = align_vocab(lm_tokenizer, rm_tokenizer, vocab_rows)
            vocab_map[vocab_map >= rm.get_input_embeddings().weight.shape[0]] = -1
            self.vocab_map, self._rm_id = vocab_map.to(lm.device), vocab_map.tolist()
        self.sampling = draft_sampling(lm, lm_tokenizer, cfg)
        self.eos = set(self.sampling["eos_token_id"] or ())  # the drafts' stop tokens
        self._w_out = None  # fp32 copy of the output head for latent space, made once: 2.2 GB at Qwen2.5-7B
        self._static = None  # the static KV cache of fast rollouts, allocated once and refilled per rollout
        self._warned = False

    def generate(self, prompt: str, seed: int = 0) -> NablaOutput:
        """Answer one prompt. The same seed on the same device gives the same output (on CUDA, as far as its
        backward kernels are deterministic: docs/deviations.md)."""
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # manual_seed seeds every GPU
            torch.manual_seed(seed)  # seeded locally: the caller's random state stays as it was
            return self._decode(prompt)

    def _decode(self, prompt: str) -> NablaOutput:
        cfg, stats, start_time = self.cfg, dict.fromkeys(STATS, 0), time.perf_counter()
        rm_before, rm_after = reward_template(self.rm_tokenizer, prompt) if self.rm is not None else ([], [])
        prefix = Prefix(chat_prompt_ids(self.lm_tokenizer, prompt), rm_before, rm_after)
        committed: list[int] = []  # response tokens fixed for good
        kept = None  # the last selection pass, while the draft it ran over stands

        # 1. Roll out a full draft from the prompt.
        ahead, prefix.lm_kv = self._rollout(prefix, [], 0, stats)
        reward = stats["reward_initial"] = self._reward(prompt, ahead, stats, rm_before, rm_after)

        while ahead and stats["rollouts"] < cfg.max_rollouts:
            # 2. One pass over the ahead span (or the later rows of the last one, if its draft stands) gives every
            #    position's confidence and gradient; commit the tokens before the first one worth optimizing.
            step = self._rows_after(kept, s + 1) if kept else self._loss_and_grads(prefix, ahead, stats)
            s, grad = select_position(step, cfg, lambda pos: self._onehot_grads(step, pos))
            n_commit = len(ahead) if s is None else s
            self._commit(prefix, ahead[:n_commit], step if s is not None else None)
            committed, ahead = committed + ahead[:n_commit], ahead[n_commit:]
            if s is None:
                break

            # 3. DTO on that position, from the LLM's own logits (or latents) there; redraw the token from
            #    the optimized logits. The row is copied so that the pass's [ahead x V] tensors can go first.
            z0 = (step.logp[s] if cfg.space == "logits" else step.hidden[s]).clone()
            kept = replace(step, logp=None)  # for the next selection if the draft stands: all but [A x V]
            del step
            z = self._dto(prefix, ahead, z0, grad, stats)
            token = sample_top_p(z, cfg.resample_temperature, cfg.resample_top_p, cfg.resample_top_k)

            # 4. A changed token gets a new continuation, kept only if the reward model prefers it.
            if token != ahead[0]:
                stats["revisions_proposed"] += 1
                proposal, kv = self._rollout(prefix, [token], len(committed), stats)
                proposed_reward = self._reward(prompt, committed + proposal, stats, rm_before, rm_after)
                if self.rm is None or not cfg.rejection_sampling or accept(proposed_reward, reward):
                    ahead, reward, prefix.lm_kv, kept = proposal, proposed_reward, kv, None
                    stats["revisions_accepted"] += 1
            self._commit(prefix, ahead[:1])
            committed, ahead = committed + ahead[:1], ahead[1:]

        # 5. Budget spent, end of sequence or nothing left to optimize: the current draft is the answer.
        return self._answer(committed + ahead, reward, stats, start_time)

    def _dto(self, prefix: Prefix, ahead: list[int], z0: torch.Tensor, grad: torch.Tensor, stats: dict):
        """dto() on ahead[0] with the rest of the draft held fixed. Whenever the argmax is the drafted token, the
        selection pass's gradient serves (dto checks the token)."""
        def full_grad(token: int) -> torch.Tensor:
            return self._onehot_grads(self._loss_and_grads(prefix, [token] + ahead[1:], stats), [0])[0]

        to_logits = (lambda z: z) if self.cfg.space == "logits" else self._latent_logits
        z, n_full, n_cached = dto(z0, full_grad, self.cfg, first=(ahead[0], grad), to_logits=to_logits)
        stats["cached_steps"] += n_cached
        stats["optimized_tokens"] += 1
        return z

    def _answer(self, tokens: list[int], reward: float | None, stats: dict, start_time: float) -> NablaOutput:
        response = [t for t in tokens if t not in self.eos]
        stats["reward_final"] = reward
        if self.rm is not None:  # how much of the response the reward model can read (token string alignment)
            stats["rm_token_coverage"] = sum(self._rm_id[t] >= 0 for t in response) / max(len(response), 1)
        stats["wall_time_s"] = time.perf_counter() - start_time
        return NablaOutput(self.lm_tokenizer.decode(response, skip_special_tokens=True), response, stats)

    def _rollout(self, prefix: Prefix, start: list[int], n_committed: int, stats: dict) -> tuple[list[int], KV]:
        """Sample a draft after prefix + start with `generate`, on the prefix's KV cache. Returns start + the
        continuation and a KV cache of a leading part of prefix + start (all but its last id if `generate` ran)."""
        stats["rollouts"] += 1
        ids = prefix.lm_ids + start
        room = self.cfg.max_new_tokens - n_committed - len(start)
        if room <= 0 or (start and start[-1] in self.eos):
            return list(start), prefix.lm_kv
        input_ids = torch.tensor([ids], device=self.lm.device)
        cache = self._static_cache(prefix.lm_kv, len(ids) + room) if self.cfg.fast_rollout else _cache(prefix.lm_kv)
        config = GenerationConfig(**self.sampling, max_new_tokens=room, return_dict_in_generate=True)
        out = self.lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                               generation_config=config)
        new = out.sequences[0, len(ids):].tolist()
        stats["generated_tokens"] += len(new)
        stats["model_calls"] += len(new)  # one forward pass per generated token, the prefill included
        # The prefill runs the ids the cache lacks; every generated token but the last is run once more.
        stats["forward_token_equivalents"] += len(ids) - _kv_len(prefix.lm_kv) + max(len(new) - 1, 0)
        return list(start) + new, _keep(out.past_key_values, len(ids) - 1)

    def _static_cache(self, kv: KV, length: int) -> StaticCache:
        """The static cache, refilled with the prefix. Its size is rounded up, so a compiled decode step is
        reused across rollouts and problems instead of being compiled again for every length."""
        if self._static is None or self._static.layers[0].max_cache_len < length:
            size = 256 * math.ceil(length / 256)
            static = StaticCache(config=self.lm.config, max_cache_len=size)
            if any(layer.max_cache_len < size for layer in static.layers):  # refused every time, not only once
                raise ValueError("fast_rollout needs full attention in every layer: this model has sliding-window "
                                 "layers, whose static cache is a ring buffer that the stored prefix cannot refill")
            self._static = static
        self._static.reset()
        for layer, (k, v) in enumerate(kv):
            self._static.update(k, v, layer)
        return self._static

    def _reward(self, prompt: str, response: list[int], stats: dict, rm_before=(), rm_after=()) -> float | None:
        """The score of a draft, from its text. The loss reads the same draft spliced into the template token
        by token; where the two inputs differ (tokenizers that merge differently, a template that edits the
        response), the loss optimizes a slightly different reward than the one that accepts: counted and warned."""
        if self.rm is None:
            return None
        response = [t for t in response if t not in self.eos]
        # Special tokens the LM wrote stay in: the loss reads them too.
        ids = reward_ids(self.rm_tokenizer, prompt, self.lm_tokenizer.decode(response))
        if ids != list(rm_before) + [self._rm_id[t] for t in response] + list(rm_after):
            stats["reward_splice_mismatches"] += 1
            if not self._warned:
                self._warned = True
                warnings.warn("the reward model reads a draft differently from text than token by token (other "
                              "merges, or a template that edits the response): DTO's reward differs slightly from "
                              "the accepting one; stats['reward_splice_mismatches'] counts the drafts", stacklevel=2)
        stats["model_calls"] += 1
        stats["forward_token_equivalents"] += len(ids)
        return score_ids(self.rm, ids)

    def _loss_and_grads(self, prefix: Prefix, ahead: list[int], stats: dict) -> AheadGrads:
        step = ahead_loss_and_grads(self.lm, self.rm, self.vocab_map, prefix, ahead, self.cfg, self.eos)
        stats["grad_steps"] += 1
        stats["model_calls"] += 2 if self.rm is None else 4  # forward and backward of each model
        stats["forward_token_equivalents"] += 3 * step.positions  # a backward costs about two forwards
        return step

    def _rows_after(self, step: AheadGrads, start: int) -> AheadGrads:
        """A selection pass's rows from ahead position `start` on: the pass the same draft needs once `start` more
        of its tokens are committed (attention is causal, the reward is the whole response's either way, and the
        committed tokens' likelihood terms do not depend on later tokens). Only the log-probs, dropped during
        DTO, are made again, from the hidden states; loss and positions stay the first pass's."""
        g_rm = None if step.g_rm is None else step.g_rm[start:]
        logp = self.lm.get_output_embeddings()(step.hidden[start:]).float().log_softmax(-1)
        return replace(step, logp=logp, hidden=step.hidden[start:], g_lm=step.g_lm[start:], g_rm=g_rm)

    def _onehot_grads(self, step: AheadGrads, positions) -> torch.Tensor:
        positions = torch.as_tensor(positions, device=step.logp.device)
        return onehot_grads(step, positions, self.lm, self.rm, self.vocab_map, self.cfg)

    def _latent_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self._w_out is None:
            head = self.lm.get_output_embeddings()
            bias = None if head.bias is None else head.bias.detach().float()
            self._w_out = (head.weight.detach().float(), bias)
        return F.linear(h, *self._w_out)

    def _commit(self, prefix: Prefix, tokens: list[int], step: AheadGrads | None = None) -> None:
        """Append tokens to the prefix; a pass that ran over them also gives their KV entries."""
        prefix.lm_ids = prefix.lm_ids + tokens
        if self.rm is not None:
            prefix.rm_ids = prefix.rm_ids + [self._rm_id[t] for t in tokens]
        if step is not None:
            prefix.lm_kv = _keep(step.lm_cache, len(prefix.lm_ids) - 1)
            if step.rm_cache is not None:
                prefix.rm_kv = _keep(step.rm_cache, len(prefix.rm_ids))
