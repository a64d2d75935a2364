"""bench.py: what the ∇-Reasoner optimizations in nabla.py buy, measured side by side in one run.

    python bench.py                                  # CPU, small random models, under 3 minutes
    python bench.py --device cuda --size 7b          # Qwen2.5-7B-shaped policy + Qwen3-8B-shaped reward model

Nothing is downloaded: both models are built from configs with random weights (the 7B/8B shapes directly
in bf16 on the GPU), and token ids are drawn at random. Random weights change no cost of a forward or
backward pass, so the timings carry over to the real models; the generate-level rates (how often a
gradient is cached) depend on the models' distributions and are only indicative. Timings are given as
ratios measured in the same process, with the variants interleaved, because machines are noisy.

What is measured:

1. One DTO gradient step: the LM and the reward model (RM) forward and backward over
   prompt + committed prefix + ahead span, and ∂L/∂ŷ_0, the loss's gradient with respect to the first
   ahead token's one-hot (L = -λ r - c Σ_s log π(ŷ_s), as in nabla.py). Four ways, from the authors'
   to ours, each adding one optimization so that what each buys shows up as a ratio:
     authors'     the whole sequence through both models at every step, vocabulary logits at every
                  position, and the [ahead x vocab] one-hot (straight-through, from an [ahead x vocab]
                  logit tensor) multiplied into both embedding matrices, as in the public code;
     +ahead logits   the same, with vocabulary logits only where the loss reads them;
     +prefix cache   only the ahead span runs, on KV caches of prompt + committed prefix;
     ours         nabla.ahead_loss_and_grads on a nabla.Prefix whose caches cover the prefix, then
                  nabla.onehot_grads for position 0: the input embeddings are the autograd leaves,
                  and the one-hot gradient is formed for the one position DTO updates.
   All four must give the same ∂L/∂ŷ_0 (asserted in fp32) before anything is timed. Then median times
   of several interleaved repeats; dto_step_speedup = authors' / ours. On CPU torch runs on one thread
   by default: on a shared machine, OpenMP threads that wait for each other on busy cores make timings
   swing by several times (and by op: small elementwise ops suffer most), while one thread gives steady
   ratios that do not depend on how well each op parallelizes. --threads 2 uses both cores.
   On CUDA also: the peak memory of one step at the paper's MATH-500 lengths (the first pass over a full
   1024-token draft), and dto_mfu = model FLOPs of our step / step time / the GPU's dense bf16 peak, with
   model FLOPs = 6 x parameters x tokens with gradients (+ 2 x parameters x forward-only tokens, of which
   our step has none). The 6 counts weight gradients, which DTO never computes, so the FLOPs the GPU
   actually executes are about 2/3 of that; dto_mfu_executed uses 4 x parameters instead.

2. A real NablaReasoner.generate run on the same models: how many DTO iterations the gradient cache
   serves (grad_cache_skip_rate = cached_steps / (optimized_tokens x dto_iters)) and how many full passes
   the reuse of the token-selection gradient saves. Random models give tiny gradients, so the run uses
   grad_norm_threshold=0 (every unsure token is optimized); everything else is the paper's setting.

3. Rollouts: tokens per second of NablaReasoner._rollout (HF generate on a cache built from the stored
   prefix KV), of the same with fast_rollout=True (a static cache, which generate compiles on a GPU) and
   of plain model.generate from scratch, with the same prefix, length and sampling; and the time of one
   reward-model scoring of prompt + committed + ahead tokens.

4. With --tokens-from SUMMARY (the summary eval_math.py writes, from a run of the real models on a few
   problems): the projected single-GPU hours of the whole table, per method,
       hours = problems x (tokens / rollout tokens/s + grad passes x DTO step s + scorings x scoring s) / 3600
   with each method's mean tokens, gradient passes and reward scorings per problem from the summary, and
   the rates measured here. Tokens are generated one sequence at a time, so sc and bon, which generate
   their N samples as one batch, are overestimated; a DTO pass is timed at this run's lengths.
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForSequenceClassification

import nabla
from tiny import PRINTABLE, make_tokenizer

# Model shapes. "7b" is Qwen2.5-7B-Instruct (policy) and Skywork-Reward-V2-Qwen3-8B (= Qwen3-8B, reward model).
# "small" keeps a realistic vocabulary but few, narrow layers, so a CPU runs the whole bench in minutes;
# its vocabulary weighs far more than in the 7B model, which exaggerates the full-vocab-logits effect.
# "tiny" is for the tests. `generate` sets the length and number of answers of the generate-level run,
# `rollout_tokens` the default rollout length (short on CPU, where HF decoding costs ~50 ms a token).
SHAPES = {
    "7b": dict(
        lm=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6),
        rm=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6),
        generate=dict(max_new_tokens=128, prompts=2), rollout_tokens=300),
    "small": dict(
        lm=dict(hidden_size=384, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=32000),
        rm=dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=2, head_dim=64, vocab_size=32000),
        generate=dict(max_new_tokens=32, prompts=1), rollout_tokens=64),
    "tiny": dict(
        lm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512),
        rm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=512),
        generate=dict(max_new_tokens=12, prompts=1), rollout_tokens=8),
}

# Dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s) by device name; the first match wins.
GPU_PEAKS = [("H200", 989, 4.8), ("H100 PCIe", 756, 2.0), ("H100 NVL", 835, 3.9), ("H100", 989, 3.35),
             ("A100", 312, 2.0)]

PROMPT = "Find the sum of all positive divisors of 36. Reason step by step, then give the final answer."


@dataclass
class Lengths:
    prompt: int     # chat-template prompt tokens
    committed: int  # response tokens already fixed
    ahead: int      # draft tokens after them: the span DTO's loss covers


# ----------------------------------------------------------------------------------------------
# Models, tokenizer and inputs


def vocab_chars(n: int) -> list[str]:
    """n distinct characters: printable ASCII, then CJK, Hangul and private-use code points.

    One token per character gives a tokenizer of any vocabulary size whose decode and encode are exact
    inverses, so the generate-level run can use full-size vocabularies without downloading a tokenizer.
    """
    chars = list(PRINTABLE)
    for lo, hi in [(0x4E00, 0xA000), (0xAC00, 0xD7A4), (0xE000, 0xF900), (0xF0000, 0xFFFFE), (0x100000, 0x10FFFE)]:
        chars.extend(chr(c) for c in range(lo, min(hi, lo + n - len(chars))))
    return chars[:n]


def build_models(shape: dict, device: str, dtype: torch.dtype, seed: int, layers: int | None = None):
    """A Qwen2 causal LM and a Qwen3 one-output sequence classifier with random weights, frozen.

    They are created directly on the device in the target dtype: a 7B model never exists in fp32 on the CPU.
    Neither has an end-of-sequence token, so every rollout runs to its length limit and rollouts compare
    at equal lengths.
    """
    extra = {} if layers is None else dict(num_hidden_layers=layers)
    common = dict(tie_word_embeddings=False, max_position_embeddings=32768, eos_token_id=None, bos_token_id=None)
    lm_cfg = Qwen2Config(**{**shape["lm"], **extra, **common})
    rm_cfg = Qwen3Config(**{**shape["rm"], **extra, **common}, num_labels=1)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = Qwen2ForCausalLM._from_config(lm_cfg, dtype=dtype)
        rm = Qwen3ForSequenceClassification._from_config(rm_cfg, dtype=dtype)
    for model in (lm, rm):
        model.eval().requires_grad_(False)  # the authors freeze both models too: no weight gradients anywhere
    lm.generation_config.eos_token_id = None
    return lm, rm


def non_embedding_params(model) -> int:
    """Parameters that do matrix work per token: all but the input embedding table (a lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


@dataclass
class StepInputs:
    """One DTO step's data: random ids standing for prompt, committed tokens and the ahead span."""
    prompt: list[int]
    committed: list[int]
    ahead: list[int]
    rm_suffix: list[int]        # the RM chat template after the response
    vocab_map: torch.Tensor     # LM id -> RM id (-1 where the RM has none), as NablaReasoner holds it
    prefix: nabla.Prefix        # prompt + committed with KV caches, as the decoding loop holds it


@torch.no_grad()
def prefill(model, ids: list[int]) -> nabla.KV:
    """KV cache of ids (what the decoding loop has stored from earlier passes when a DTO step runs)."""
    if not ids:
        return ()
    out = model.base_model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    return nabla._keep(out.past_key_values, len(ids))


def make_inputs(lm, rm, lengths: Lengths, seed: int) -> StepInputs:
    lm_rows, rm_rows = lm.get_input_embeddings().weight.shape[0], rm.get_input_embeddings().weight.shape[0]
    # Qwen2.5's embedding table has padding rows past Qwen3's vocabulary; real text never uses them.
    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(min(lm_rows, rm_rows), (n,), generator=gen).tolist()
    prompt, committed, ahead, suffix = draw(lengths.prompt), draw(lengths.committed), draw(lengths.ahead), draw(2)
    vocab_map = torch.arange(lm_rows)
    vocab_map[vocab_map >= rm_rows] = -1
    # The RM sees the same ids: its template before the response is taken to be as long as the LM's prompt.
    prefix = nabla.Prefix(prompt + committed, prompt + committed, suffix)
    prefix.lm_kv = prefill(lm, prefix.lm_ids[:-1])  # the last id's state predicts ŷ_0, so it runs with the span
    prefix.rm_kv = prefill(rm, prefix.rm_ids)
    return StepInputs(prompt, committed, ahead, suffix, vocab_map.to(lm.device), prefix)


# ----------------------------------------------------------------------------------------------
# One DTO gradient step, four ways


def aligned_rm_embeddings(rm, vocab_map: torch.Tensor) -> torch.Tensor:
    """The authors' RM embedding matrix in LM vocabulary order (zero rows for tokens the RM lacks).

    Built once, like their registered buffer, so that (one-hot in LM vocabulary) @ matrix = RM embeddings.
    """
    E = rm.get_input_embeddings().weight
    return E[vocab_map.clamp(min=0).to(E.device)] * (vocab_map >= 0).to(E.device, E.dtype)[:, None]


def reference_step(lm, rm, x: StepInputs, rm_aligned: torch.Tensor, cfg: nabla.NablaConfig,
                   ahead_logits_only: bool = False, prefix_cache: bool = False) -> torch.Tensor:
    """∂L/∂ŷ_0 the authors' way, optionally with one of our optimizations switched on.

    The variable is a [ahead x vocab] logit tensor; its straight-through one-hot is multiplied into both
    embedding matrices and its gradient is kept (retain_grad), as in the public code. The logits are set
    so that their argmax is the ahead tokens, so every variant evaluates the same sequence.
    """
    with torch.enable_grad():
        return _reference_step(lm, rm, x, rm_aligned, cfg, ahead_logits_only, prefix_cache)


def _reference_step(lm, rm, x, rm_aligned, cfg, ahead_logits_only, prefix_cache):
    device, n, vocab = lm.device, len(x.ahead), lm.get_input_embeddings().weight.shape[0]
    ahead = torch.tensor(x.ahead, device=device)
    z = F.one_hot(ahead, vocab).float().mul(5.0).requires_grad_()
    onehot = nabla.straight_through_onehot(z)
    onehot.retain_grad()
    E_lm, embed_lm, embed_rm = lm.get_input_embeddings().weight, lm.get_input_embeddings(), rm.get_input_embeddings()
    ahead_lm = onehot.to(E_lm.dtype) @ E_lm
    ahead_rm = onehot.to(rm_aligned.dtype).to(rm_aligned.device) @ rm_aligned
    ids = lambda seq: torch.tensor(seq, dtype=torch.long, device=device)
    if prefix_cache:  # only the last prefix token and the span run; the rest comes from the caches
        lm_in = torch.cat([embed_lm(ids(x.prefix.lm_ids[-1:])), ahead_lm])
        rm_in = torch.cat([ahead_rm, embed_rm(ids(x.rm_suffix))])
        lm_cache, rm_cache = nabla._cache(x.prefix.lm_kv), nabla._cache(x.prefix.rm_kv)
    else:
        lm_in = torch.cat([embed_lm(ids(x.prefix.lm_ids)), ahead_lm])
        rm_in = torch.cat([embed_rm(ids(x.prefix.rm_ids)), ahead_rm, embed_rm(ids(x.rm_suffix))])
        lm_cache = rm_cache = None
    # logits_to_keep=0 is HF's default: logits at every position, which the public code computes.
    keep = n + 1 if ahead_logits_only else 0
    logits = lm(inputs_embeds=lm_in[None], past_key_values=lm_cache, logits_to_keep=keep).logits[0, -n - 1:-1]
    logp = logits.float().log_softmax(-1)
    likelihood = (logp * onehot).sum()
    reward = rm(inputs_embeds=rm_in[None], past_key_values=rm_cache).logits[0, 0].float()
    loss = -(cfg.likelihood_coeff * likelihood + cfg.reward_coeff * reward)
    loss.backward()
    return onehot.grad[0]


def our_step(lm, rm, x: StepInputs, cfg: nabla.NablaConfig) -> torch.Tensor:
    """∂L/∂ŷ_0 the way NablaReasoner takes a DTO step (its full_grad)."""
    step = nabla.ahead_loss_and_grads(lm, rm, x.vocab_map, x.prefix, x.ahead, cfg)
    return nabla.onehot_grads(step, torch.tensor([0], device=step.logp.device), lm, rm, x.vocab_map, cfg)[0]


def step_variants(lm, rm, x: StepInputs, cfg: nabla.NablaConfig) -> dict:
    """The four ways, in the order the optimizations are added. Each returns ∂L/∂ŷ_0."""
    rm_aligned = aligned_rm_embeddings(rm, x.vocab_map)
    return {
        "authors": lambda: reference_step(lm, rm, x, rm_aligned, cfg),
        "ahead_logits": lambda: reference_step(lm, rm, x, rm_aligned, cfg, ahead_logits_only=True),
        "prefix_cache": lambda: reference_step(lm, rm, x, rm_aligned, cfg, ahead_logits_only=True, prefix_cache=True),
        "ours": lambda: our_step(lm, rm, x, cfg),
    }


STEP_LABELS = {
    "authors": "authors': full recompute, full-vocab logits, [A x V] one-hot",
    "ahead_logits": "+ vocabulary logits for the ahead span only",
    "prefix_cache": "+ prefix KV caches: only the ahead span runs",
    "ours": "ours: nabla.ahead_loss_and_grads + onehot_grads",
}


def check_gradients(grads: dict, exact: bool) -> dict:
    """How far each way's ∂L/∂ŷ_0 is from the authors'; in fp32 they must agree to rounding."""
    ref = grads["authors"].float()
    report = {}
    for name, g in grads.items():
        g = g.float().to(ref.device)
        err = ((g - ref).abs().max() / ref.abs().max()).item()
        report[name] = dict(max_rel_err=err, cosine=F.cosine_similarity(g, ref, dim=0).item())
        if exact and err > 1e-4:
            raise AssertionError(f"the '{name}' step's gradient differs from the authors' by {err:.2e} "
                                 f"(relative to its largest entry): the comparison would not be fair")
    return report


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_times(variants: dict, repeats: int, device: str) -> dict:
    """Median seconds per variant; the variants take turns, so a noisy spell hits all of them alike."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_gb(fn) -> float:
    """Peak CUDA memory while fn runs, weights and caches included (GB = 1e9 bytes)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def step_flops(lm, rm, x: StepInputs, per_param: int) -> float:
    """Model FLOPs of our step: per_param x parameters x tokens run with gradients (attention scores left out).

    Our step runs with gradients exactly what is not in the caches: the LM's last prefix token + the span,
    and the RM's span + template suffix. It has no forward-only tokens.
    """
    lm_tokens = len(x.prefix.lm_ids) - nabla._kv_len(x.prefix.lm_kv) + len(x.ahead)
    rm_tokens = len(x.prefix.rm_ids) - nabla._kv_len(x.prefix.rm_kv) + len(x.ahead) + len(x.rm_suffix)
    return per_param * (non_embedding_params(lm) * lm_tokens + non_embedding_params(rm) * rm_tokens)


def gpu_peaks(args) -> tuple[str, float | None, float | None]:
    name = torch.cuda.get_device_name()
    tflops = tbps = None
    for key, peak_tflops, peak_tbps in GPU_PEAKS:
        if key in name:
            tflops, tbps = peak_tflops, peak_tbps
            break
    return name, args.peak_tflops or tflops, args.peak_tbps or tbps


# ----------------------------------------------------------------------------------------------
# Generate-level: gradient cache and selection-gradient reuse in a real run


@contextlib.contextmanager
def counting_selection_reuse():
    """Count the DTO runs whose first iteration is served by the token-selection gradient.

    NablaReasoner hands dto() the gradient it computed for token selection (`first`). Whether dto() can
    use it depends on dto's own test (the selection gradient was taken at the drafted token, and dto's
    first iteration is at the argmax of its starting logits), which the stats do not show. So for the
    duration of the run nabla.dto is wrapped to watch it: `to_logits` is called once per iteration, so if
    the first full pass (`full_grad`) comes at the first call, iteration 0 had to run a pass of its own;
    otherwise the selection gradient served it and saved that pass.
    """
    original, count = nabla.dto, dict(offered=0, reused=0)

    def dto(z0, full_grad, cfg, first=None, to_logits=lambda z: z):
        seen = dict(iterations=0, first_pass_at=None)

        def counted_logits(z):
            seen["iterations"] += 1
            return to_logits(z)

        def counted_grad(token):
            if seen["first_pass_at"] is None:
                seen["first_pass_at"] = seen["iterations"]
            return full_grad(token)

        result = original(z0, counted_grad, cfg, first=first, to_logits=counted_logits)
        if first is not None and cfg.dto_iters > 0:
            count["offered"] += 1
            count["reused"] += int(seen["first_pass_at"] != 1)
        return result

    nabla.dto = dto
    try:
        yield count
    finally:
        nabla.dto = original


def generate_run(lm, rm, tok, max_new_tokens: int, answers: int, seed: int) -> dict:
    """Run NablaReasoner.generate and add up what its stats say about the gradient cache."""
    cfg = nabla.NablaConfig(max_new_tokens=max_new_tokens, grad_norm_threshold=0.0)
    reasoner = nabla.NablaReasoner(lm, tok, rm, tok, cfg)
    totals: dict = {}
    start = time.perf_counter()
    with counting_selection_reuse() as reuse:
        for i in range(answers):
            stats = reasoner.generate(PROMPT, seed=seed + i).stats
            if "optimized_tokens" not in stats:
                raise KeyError("nabla.py's stats have no 'optimized_tokens' (positions DTO ran on); it is needed here")
            for key in ("optimized_tokens", "grad_steps", "cached_steps", "rollouts", "generated_tokens", "model_calls"):
                totals[key] = totals.get(key, 0) + stats[key]
    iterations = totals["optimized_tokens"] * cfg.dto_iters
    dto_passes = iterations - totals["cached_steps"]
    return dict(
        **totals, answers=answers, max_new_tokens=cfg.max_new_tokens, dto_iters=cfg.dto_iters,
        dto_iterations=iterations, dto_full_passes=dto_passes,
        selection_passes=totals["grad_steps"] - dto_passes,
        grad_cache_skip_rate=totals["cached_steps"] / iterations if iterations else None,
        selection_reuse=reuse["reused"], selection_reuse_offered=reuse["offered"],
        grad_steps_without_reuse=totals["grad_steps"] + reuse["reused"],
        grad_steps_without_any_cache=totals["grad_steps"] + totals["cached_steps"],
        wall_s=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Rollouts


def rollout_rates(lm, tok, x: StepInputs, new_tokens: int, repeats: int, seed: int, device: str) -> dict:
    """Tokens/s of our rollout (generate on the stored prefix cache), of the fast path (the same on a static
    cache, which generate compiles on a GPU) and of plain generate from scratch.

    All continue prompt + committed by new_tokens tokens with the same sampling settings and seed; the
    models have no end-of-sequence token, so all produce exactly new_tokens tokens.
    """
    cfg = nabla.NablaConfig(max_new_tokens=new_tokens)
    reasoners = {fast: nabla.NablaReasoner(lm, tok, config=replace(cfg, fast_rollout=fast)) for fast in (False, True)}
    reasoner = reasoners[False]  # _rollout needs the LM only
    ids = x.prefix.lm_ids
    input_ids = torch.tensor([ids], device=lm.device)

    def rollout(fast: bool) -> int:
        prefix = nabla.Prefix(list(ids), [], [], lm_kv=x.prefix.lm_kv)
        stats = dict(rollouts=0, generated_tokens=0, model_calls=0, forward_token_equivalents=0)
        reasoners[fast]._rollout(prefix, [], 0, stats)
        return stats["generated_tokens"]

    def plain(n=new_tokens):
        config = GenerationConfig(**reasoner.sampling, max_new_tokens=n)
        out = lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        return out.shape[1] - len(ids)

    variants = dict(ours=lambda: rollout(False), fast=lambda: rollout(True), plain=plain)
    plain(4)  # warm-up: first-call allocations and kernel selection
    rollout(True)  # warm-up of the fast path: on a GPU, generate compiles the decode step here
    times, counts = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            torch.manual_seed(seed)
            synchronize(device)
            start = time.perf_counter()
            counts[name].append(fn())
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    if not counts["ours"] == counts["fast"] == counts["plain"]:
        raise AssertionError(f"rollout lengths differ: {counts}")
    return {name: counts[name][0] / statistics.median(times[name]) for name in times} | dict(tokens=counts["ours"][0])


# ----------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Measure what nabla.py's optimizations buy (see the module docstring).")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=list(SHAPES), default="small", help="model shapes (tiny: for tests)")
    p.add_argument("--prompt", type=int, default=150, help="prompt tokens")
    p.add_argument("--committed", type=int, default=450, help="committed response tokens")
    p.add_argument("--ahead", type=int, default=300, help="ahead-span tokens")
    p.add_argument("--rollout-tokens", type=int, default=None, help="new tokens per timed rollout (default: per size)")
    p.add_argument("--gen-tokens", type=int, default=None, help="max_new_tokens of the generate run (default: per size)")
    p.add_argument("--gen-answers", type=int, default=None, help="answers in the generate run (default: per size)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: 5 on CPU, 10 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: fp32 for small models on CPU, bf16 otherwise")
    p.add_argument("--layers", type=int, default=None, help="override both models' layer counts (quick checks)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, see the module docstring; on CUDA: torch's choice)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if the device is not known")
    p.add_argument("--peak-tbps", type=float, default=None, help="GPU memory bandwidth in TB/s, if not known")
    p.add_argument("--tokens-from", metavar="SUMMARY", default=None,
                   help="an eval_math.py summary JSON: project the table's single-GPU hours from its per-problem means")
    p.add_argument("--problems", type=int, default=500, help="problems in the projected table (default 500)")
    args = p.parse_args(argv)
    if args.tokens_from and not Path(args.tokens_from).is_file():
        p.error(f"--tokens-from {args.tokens_from}: no such file (an eval_math.py *.summary.json)")
    if args.prompt < 1 or args.committed < 0 or args.ahead < 1:
        p.error("need --prompt >= 1, --committed >= 0, --ahead >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    if args.size == "7b" and args.device == "cpu" and args.layers is None:
        p.error("--size 7b needs about 32 GB of bf16 weights: use --device cuda (or --layers N for a CPU smoke test)")
    args.repeats = args.repeats or (10 if args.device == "cuda" else 5)
    args.threads = args.threads or (1 if args.device == "cpu" else None)
    args.rollout_tokens = args.rollout_tokens or SHAPES[args.size]["rollout_tokens"]
    args.gen_tokens = args.gen_tokens or SHAPES[args.size]["generate"]["max_new_tokens"]
    args.gen_answers = args.gen_answers or SHAPES[args.size]["generate"]["prompts"]
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" and args.size != "7b" else "bf16"
    return args


def describe(model, cfg) -> str:
    return (f"{type(model).__name__} h={cfg.hidden_size} L={cfg.num_hidden_layers} V={cfg.vocab_size}, "
            f"{non_embedding_params(model) / 1e6:.1f}M non-embedding params")


def step_section(lm, rm, x: StepInputs, args, exact: bool) -> tuple[dict, list[str]]:
    """The DTO step four ways: the same gradient first, then interleaved timings."""
    variants = step_variants(lm, rm, x, nabla.NablaConfig())
    agreement = check_gradients({name: fn() for name, fn in variants.items()}, exact=exact)
    secs = median_times(variants, args.repeats, args.device)
    worst = max(a["max_rel_err"] for a in agreement.values())
    lines = ["", f"DTO gradient step (LM + RM forward and backward, ∂L/∂ŷ_0), median of {args.repeats}",
             f"  {'':58s} {'ms':>9s} {'vs authors':>11s} {'vs previous':>12s}"]
    previous = None
    for name, s in secs.items():
        gain = "" if previous is None else f"{previous / s:11.2f}x"
        lines.append(f"  {STEP_LABELS[name]:58s} {s * 1e3:9.1f} {secs['authors'] / s:10.2f}x {gain:>12s}")
        previous = s
    lines.append(f"  same ∂L/∂ŷ_0 from all four: largest difference {worst:.1e} of the largest entry"
                 + ("" if exact else f" (bf16; lowest cosine {min(a['cosine'] for a in agreement.values()):.4f})"))
    record = dict(
        dto_step_speedup=secs["authors"] / secs["ours"],
        dto_step_ms={name: s * 1e3 for name, s in secs.items()},
        speedup_ahead_logits=secs["authors"] / secs["ahead_logits"],
        speedup_prefix_cache=secs["ahead_logits"] / secs["prefix_cache"],
        speedup_embedding_leaves=secs["prefix_cache"] / secs["ours"],
        grad_check_max_rel_err=worst)
    return record, lines


def cuda_section(lm, rm, x: StepInputs, ours_s: float, args) -> tuple[dict, list[str]]:
    """Utilization of our step, and its peak memory at the default and at the paper's MATH-500 lengths."""
    cfg, lines = nabla.NablaConfig(), []
    name, tflops, tbps = gpu_peaks(args)
    record = dict(gpu=name, peak_tflops=tflops, peak_tbps=tbps)
    if tflops:
        flops_6, flops_4 = step_flops(lm, rm, x, 6), step_flops(lm, rm, x, 4)
        record |= dict(dto_mfu=flops_6 / ours_s / (tflops * 1e12), dto_mfu_executed=flops_4 / ours_s / (tflops * 1e12))
        lines.append(f"  our step: {flops_6 / 1e12:.1f} model TFLOP (6 x params x tokens) -> MFU {record['dto_mfu']:.1%} "
                     f"of {tflops:.0f} TFLOP/s; {record['dto_mfu_executed']:.1%} counting the 4 x params it executes")
    else:
        lines.append(f"  MFU: unknown peak for {name}; pass --peak-tflops")
    record["peak_memory_gb_default_lengths"] = peak_memory_gb(lambda: our_step(lm, rm, x, cfg))
    math500 = Lengths(args.prompt, 0, cfg.max_new_tokens)  # the first pass, over a whole 1024-token draft
    xm = make_inputs(lm, rm, math500, args.seed)
    ours_gb = peak_memory_gb(lambda: our_step(lm, rm, xm, cfg))
    rm_aligned = aligned_rm_embeddings(rm, xm.vocab_map)
    authors_gb = peak_memory_gb(lambda: reference_step(lm, rm, xm, rm_aligned, cfg))
    del xm, rm_aligned
    torch.cuda.empty_cache()
    record |= dict(peak_memory_gb=ours_gb, peak_memory_gb_authors=authors_gb, peak_memory_lengths=vars(math500))
    lines.append(f"  peak memory of one step, weights included: ours {record['peak_memory_gb_default_lengths']:.1f} GB "
                 f"at these lengths; at prompt {math500.prompt} + ahead {math500.ahead} (MATH-500's longest pass) "
                 f"ours {ours_gb:.1f} GB, authors' {authors_gb:.1f} GB")
    return record, lines


def generate_section(lm, rm, tok, args) -> tuple[dict, list[str]]:
    """A real generate run: gradient cache and selection-gradient reuse."""
    gen = generate_run(lm, rm, tok, args.gen_tokens, args.gen_answers, args.seed)
    rate = gen["grad_cache_skip_rate"]
    lines = ["", f"generate run: {gen['answers']} answer(s) x {gen['max_new_tokens']} new tokens, the paper's settings "
                 f"except grad_norm_threshold=0 (random weights give tiny gradients), {gen['wall_s']:.1f} s",
             f"  DTO ran on {gen['optimized_tokens']} positions x {gen['dto_iters']} iterations = "
             f"{gen['dto_iterations']} iterations; {gen['cached_steps']} served by a cached gradient "
             f"(grad_cache_skip_rate {'n/a' if rate is None else f'{rate:.2f}'}), {gen['dto_full_passes']} full passes",
             f"  selection-gradient reuse saved {gen['selection_reuse']} full passes of {gen['selection_reuse_offered']} "
             f"offered (it serves only when the drafted token is the LLM's argmax)",
             f"  grad_steps {gen['grad_steps']}; {gen['grad_steps_without_reuse']} without the reuse; "
             f"{gen['grad_steps_without_any_cache']} without any gradient caching"]
    record = dict(grad_cache_skip_rate=rate, selection_reuse=gen["selection_reuse"], generate=gen)
    return record, lines


def rollout_section(lm, tok, x: StepInputs, args, peak_tbps: float | None) -> tuple[dict, list[str]]:
    """Rollouts: ours on the stored prefix cache against plain generate from scratch."""
    rates = rollout_rates(lm, tok, x, args.rollout_tokens, min(args.repeats, 3), args.seed, args.device)
    record = dict(rollout_tokens_per_s=dict(ours=rates["ours"], fast=rates["fast"], plain=rates["plain"]))
    lines = ["", f"rollout: {rates['tokens']} new tokens after a {len(x.prefix.lm_ids)}-token prefix, same sampling",
             f"  ours (generate on the stored prefix KV): {rates['ours']:.1f} tokens/s; plain generate from scratch: "
             f"{rates['plain']:.1f} tokens/s ({rates['ours'] / rates['plain']:.2f}x)",
             f"  fast_rollout=True (static cache, {'compiled' if args.device == 'cuda' else 'not compiled on CPU'}): "
             f"{rates['fast']:.1f} tokens/s ({rates['fast'] / rates['ours']:.2f}x ours)"]
    if peak_tbps:  # batch-1 decoding reads every weight but the input embedding once per token
        embedding = lm.get_input_embeddings().weight
        weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters()) - embedding.numel() * embedding.element_size()
        record["rollout_bandwidth_fraction"] = {k: rates[k] * weight_bytes / (peak_tbps * 1e12)
                                                for k in ("ours", "fast")}
        lines.append(f"  decoding reads {weight_bytes / 1e9:.1f} GB of weights a token: ours at "
                     f"{record['rollout_bandwidth_fraction']['ours']:.1%}, fast at "
                     f"{record['rollout_bandwidth_fraction']['fast']:.1%} of {peak_tbps} TB/s")
    return record, lines


def score_seconds(rm, x: StepInputs, repeats: int, device: str) -> float:
    """One reward-model scoring of the whole conversation, as NablaReasoner and best-of-N score a draft."""
    ids = x.prefix.rm_ids + [int(t) for t in x.vocab_map[torch.tensor(x.ahead)]] + x.rm_suffix
    return median_times({"score": lambda: nabla.score_ids(rm, ids)}, repeats, device)["score"]


def workload(row: dict) -> tuple[float, float, float]:
    """A method's mean generated tokens, gradient passes and reward scorings per problem (summary row)."""
    return tuple(row.get(k) or 0 for k in ("mean_generated_tokens", "mean_grad_passes", "mean_reward_scores"))


def projected_hours(summary: dict, rates: dict, step_s: float, score_s: float, problems: int) -> dict:
    """hours = problems x (tokens / rate + grad passes x step + scorings x scoring) / 3600, per method and
    rollout path, from the summary's per-problem means."""
    hours = {}
    for method, row in summary["methods"].items():
        tokens, passes, scores = workload(row)
        hours[method] = {path: problems * (tokens / rates[path] + passes * step_s + scores * score_s) / 3600
                         for path in ("ours", "fast")}
    return hours


def projection_section(record: dict, args) -> list[str]:
    summary = json.loads(Path(args.tokens_from).read_text())
    hours = projected_hours(summary, record["rollout_tokens_per_s"], record["dto_step_ms"]["ours"] / 1e3,
                            record["score_ms"] / 1e3, args.problems)
    record["projected_hours"] = hours
    lines = ["", f"projected single-GPU hours for {args.problems} problems, per-problem means from {args.tokens_from}",
             f"  {'method':8s} {'tokens':>8s} {'grad passes':>12s} {'scorings':>9s} {'hours':>8s} {'fast':>8s}"]
    for method, h in hours.items():
        tokens, passes, scores = workload(summary["methods"][method])
        lines.append(f"  {method:8s} {tokens:8.0f} {passes:12.1f} {scores:9.1f} {h['ours']:8.1f} {h['fast']:8.1f}")
    lines.append(f"  table: {sum(h['ours'] for h in hours.values()):.1f} h, "
                 f"{sum(h['fast'] for h in hours.values()):.1f} h with fast rollouts")
    return lines


@torch.no_grad()  # only the DTO steps take gradients, and they switch them on themselves
def run(args) -> tuple[dict, list[str]]:
    """Everything, in order; returns the JSON record and the table's lines."""
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[args.dtype]
    lm, rm = build_models(SHAPES[args.size], args.device, dtype, args.seed, args.layers)
    lengths = Lengths(args.prompt, args.committed, args.ahead)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} thread(s)"
    lines = [f"device {args.device} ({where}), {args.dtype}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}",
             f"LM {describe(lm, lm.config)}; RM {describe(rm, rm.config)} (random weights)",
             f"lengths: prompt {lengths.prompt} + committed {lengths.committed} + ahead {lengths.ahead} tokens"]
    record = dict(device=args.device, size=args.size, dtype=args.dtype, lengths=vars(lengths),
                  peak_memory_gb=None, dto_mfu=None, dto_mfu_executed=None)

    x = make_inputs(lm, rm, lengths, args.seed)
    sections = [step_section(lm, rm, x, args, exact=dtype == torch.float32)]
    if args.device == "cuda":
        sections.append(cuda_section(lm, rm, x, sections[0][0]["dto_step_ms"]["ours"] / 1e3, args))
    tok = make_tokenizer(vocab_chars(min(lm.config.vocab_size, rm.config.vocab_size) - 3))
    sections.append(generate_section(lm, rm, tok, args))
    peak_tbps = sections[1][0].get("peak_tbps") if args.device == "cuda" else None
    sections.append(rollout_section(lm, tok, x, args, peak_tbps))
    for part, part_lines in sections:
        record |= part
        lines += part_lines
    record["score_ms"] = score_seconds(rm, x, args.repeats, args.device) * 1e3
    lines.append(f"  one reward-model scoring of {len(x.prefix.rm_ids) + len(x.ahead) + len(x.rm_suffix)} tokens: "
                 f"{record['score_ms']:.1f} ms")
    if args.tokens_from:
        lines += projection_section(record, args)

    record["wall_s"] = time.perf_counter() - wall
    lines += ["", f"dto_step_speedup {record['dto_step_speedup']:.2f}x; wall time {record['wall_s']:.0f} s"]
    return record, lines


def rounded(value):
    """Floats to 4 significant digits, so the JSON line stays readable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main(argv=None) -> dict:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # e.g. "will not detect padding tokens in inputs_embeds"
    record, lines = run(args)
    print("\n".join(lines))
    print(json.dumps(rounded(record)), flush=True)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
