"""bench.py: what the optimizations in nabla.py buy over the authors' code, measured side by side in one run.

    python bench.py                               # CPU, small models, about a minute
    python bench.py --device cuda --size 7b       # Qwen2.5-7B-shaped policy + Qwen3-8B-shaped reward model
    python bench.py --tokens-from S.summary.json  # also project the table's hours from an eval_math.py summary

Random weights (nothing is downloaded) change no cost of a pass; rates that depend on the models (cache hits) are
only indicative. Machines are noisy: variants take turns and compare as ratios, and a CPU runs one thread.
It prints a table, then the record as one JSON line; docs/performance.md says what each field means.
"""
import argparse
import contextlib
import json
import statistics
import time
import unittest.mock
from collections import defaultdict, namedtuple
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForSequenceClassification

import nabla
from tiny import CHAT_TEMPLATE, make_tokenizer, vocab_chars


def qwen(hidden, ffn, layers, heads, kv_heads, vocab, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, **extra)


# 7b: Qwen2.5-7B-Instruct and Skywork-Reward-V2-Qwen3-8B (= Qwen3-8B); small: for a CPU (its vocabulary weighs far
# more than at 7B); tiny: for the tests. gen: (max_new_tokens, answers) of the generate run; rollout: new tokens.
SHAPES = {
    "7b": dict(lm=qwen(3584, 18944, 28, 28, 4, 152064, rms_norm_eps=1e-6),
               rm=qwen(4096, 12288, 36, 32, 8, 151936, head_dim=128, rms_norm_eps=1e-6), gen=(128, 2), rollout=300),
    "small": dict(lm=qwen(384, 2048, 4, 6, 2, 32000), rm=qwen(384, 1152, 4, 6, 2, 32000, head_dim=64),
                  gen=(32, 1), rollout=64),
    "tiny": dict(lm=qwen(64, 128, 2, 4, 2, 512), rm=qwen(64, 128, 2, 4, 2, 512, head_dim=16), gen=(12, 1), rollout=8),
}
# Dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s) by device name; the first match wins.
GPU_PEAKS = [("H200", 989, 4.8), ("H100 PCIe", 756, 2.0), ("H100 NVL", 835, 3.9), ("H100", 989, 3.35), ("A100", 312, 2)]
PROMPT = "Find the sum of all positive divisors of 36. Reason step by step, then give the final answer."
STEP_LABELS = dict(authors="authors': full recompute, full-vocab logits, [A x V] one-hot",
                   ahead_logits="+ vocabulary logits for the ahead span only",
                   prefix_cache="+ prefix KV caches: only the ahead span runs",
                   ours="ours: nabla.ahead_loss_and_grads + onehot_grads")
Lengths = namedtuple("Lengths", "prompt committed ahead")  # tokens; the ahead span is DTO's draft
StepInputs = namedtuple("StepInputs", "prefix ahead vocab_map")


def build_models(shape: dict, device: str, dtype: torch.dtype, seed: int, layers: int | None = None):
    """Random, frozen Qwen2 LM and Qwen3 reward model, made on the device in dtype."""
    # No end-of-sequence token: every rollout runs to its length limit, so rollouts compare at equal lengths.
    common = dict(tie_word_embeddings=False, max_position_embeddings=32768, eos_token_id=None, bos_token_id=None)
    config = lambda part: {**shape[part], **common, **({} if layers is None else dict(num_hidden_layers=layers))}
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model never exists in fp32 on the CPU
        lm = Qwen2ForCausalLM._from_config(Qwen2Config(**config("lm")), dtype=dtype)
        rm = Qwen3ForSequenceClassification._from_config(Qwen3Config(**config("rm"), num_labels=1), dtype=dtype)
    return tuple(model.eval().requires_grad_(False) for model in (lm, rm))  # as the authors': no weight gradients


@torch.no_grad()
def make_inputs(lm, rm, lengths: Lengths, seed: int) -> StepInputs:
    """A DTO step's inputs as the decoding loop holds them: random ids, prefix KV caches (the RM's ids are the LM's)."""
    lm_rows, rm_rows = (m.get_input_embeddings().weight.shape[0] for m in (lm, rm))
    gen = torch.Generator().manual_seed(seed)
    # Qwen2.5's embedding table has padding rows past Qwen3's vocabulary; real text never uses them.
    draw = lambda n: torch.randint(min(lm_rows, rm_rows), (n,), generator=gen).tolist()
    ids, ahead, suffix = draw(lengths.prompt + lengths.committed), draw(lengths.ahead), draw(2)
    kv = lambda m, ids: nabla._keep(m.base_model(input_ids=torch.tensor([ids], device=m.device), use_cache=True)
                                    .past_key_values, len(ids)) if ids else ()
    vocab_map = torch.arange(lm_rows).masked_fill(torch.arange(lm_rows) >= rm_rows, -1).to(lm.device)
    # The LM cache stops before the last id: its state predicts ŷ_0, so it runs with the span.
    return StepInputs(nabla.Prefix(ids, list(ids), suffix, kv(lm, ids[:-1]), kv(rm, ids)), ahead, vocab_map)


@torch.enable_grad()
def reference_step(lm, rm, x: StepInputs, rm_aligned: torch.Tensor, cfg: nabla.NablaConfig,
                   ahead_logits_only: bool = False, prefix_cache: bool = False) -> torch.Tensor:
    """∂L/∂ŷ_0 the authors' way (the [ahead x vocab] straight-through one-hot times both embedding matrices)."""
    n, p, embed_lm, embed_rm = len(x.ahead), x.prefix, lm.get_input_embeddings(), rm.get_input_embeddings()
    ids = lambda seq: torch.tensor(seq, dtype=torch.long, device=lm.device)
    z = F.one_hot(ids(x.ahead), embed_lm.num_embeddings).float().mul(5.0).requires_grad_()  # argmax: the span
    onehot = nabla.straight_through_onehot(z)
    onehot.retain_grad()
    # With the prefix caches only what they lack runs (the LM's last prefix token, the span); else everything.
    lm_kv, rm_kv = (p.lm_kv, p.rm_kv) if prefix_cache else ((), ())
    lm_in = torch.cat([embed_lm(ids(p.lm_ids[nabla._kv_len(lm_kv):])), onehot.to(lm.dtype) @ embed_lm.weight])
    rm_in = torch.cat([embed_rm(ids(p.rm_ids[nabla._kv_len(rm_kv):])), onehot.to(rm_aligned) @ rm_aligned,
                       embed_rm(ids(p.rm_suffix))])
    keep = n + 1 if ahead_logits_only else 0  # 0, HF's default: logits at every position, as in the public code
    logits = lm(inputs_embeds=lm_in[None], past_key_values=nabla._cache(lm_kv), logits_to_keep=keep).logits
    likelihood = (logits[0, -n - 1:-1].float().log_softmax(-1) * onehot).sum()
    reward = rm(inputs_embeds=rm_in[None], past_key_values=nabla._cache(rm_kv)).logits[0, 0].float()
    (-(cfg.likelihood_coeff * likelihood + cfg.reward_coeff * reward)).backward()
    return onehot.grad[0]


def our_step(lm, rm, x: StepInputs, cfg: nabla.NablaConfig) -> torch.Tensor:
    """∂L/∂ŷ_0 the way NablaReasoner takes a DTO step (its full_grad)."""
    step = nabla.ahead_loss_and_grads(lm, rm, x.vocab_map, x.prefix, x.ahead, cfg)
    return nabla.onehot_grads(step, torch.tensor([0], device=step.logp.device), lm, rm, x.vocab_map, cfg)[0]


def step_variants(lm, rm, x: StepInputs, cfg: nabla.NablaConfig) -> dict:
    """The four ways, in the order the optimizations are added; each returns ∂L/∂ŷ_0."""
    E = rm.get_input_embeddings().weight  # the authors' RM embeddings in LM vocabulary order, built once
    rm_aligned = E[x.vocab_map.clamp(min=0).to(E.device)] * (x.vocab_map >= 0).to(E.device, E.dtype)[:, None]
    authors = partial(reference_step, lm, rm, x, rm_aligned, cfg)
    return dict(authors=authors, ahead_logits=partial(authors, ahead_logits_only=True),
                prefix_cache=partial(authors, ahead_logits_only=True, prefix_cache=True),
                ours=partial(our_step, lm, rm, x, cfg))


def check_gradients(grads: dict, exact: bool) -> dict:
    """How far each way's ∂L/∂ŷ_0 is from the authors'; in fp32 they must agree to rounding."""
    ref, report = grads["authors"].float(), {}
    for name, g in grads.items():
        g = g.float().to(ref.device)
        err = ((g - ref).abs().max() / ref.abs().max()).item()
        report[name] = dict(max_rel_err=err, cosine=F.cosine_similarity(g, ref, dim=0).item())
        if exact and err > 1e-4:
            raise AssertionError(f"{name}: {err:.1e} of the largest entry off the authors': this would not be fair")
    return report


def median_ms(fns: dict, repeats: int, cuda: bool) -> dict:
    """Median milliseconds of each function; they take turns, so that a noisy spell hits all of them alike."""
    times, sync = defaultdict(list), torch.cuda.synchronize if cuda else lambda: None
    for _ in range(repeats):
        for name, fn in fns.items():
            torch.manual_seed(0)  # the rollouts sample the same tokens
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def peak_memory_gb(fn) -> float:
    """Peak CUDA memory allocated while fn runs, what was allocated before included (GB = 1e9 bytes)."""
    torch.cuda.reset_peak_memory_stats()  # the allocator counts on the host as ops are queued: no sync needed
    fn()
    return torch.cuda.max_memory_allocated() / 1e9


@contextlib.contextmanager
def counting_selection_reuse():
    """Count the DTO runs in which the selection gradient (dto's `first`) saves a full pass: each run is replayed
    without it, on the gradients it used (no model runs), and the passes of the two are compared."""
    original, count = nabla.dto, dict(offered=0, reused=0)

    def dto(z0, full_grad, cfg, first=None, to_logits=lambda z: z):
        grads = dict([first] if first else [])

        def recording(token: int) -> torch.Tensor:
            grads[token] = full_grad(token)
            return grads[token]

        out = original(z0, recording, cfg, first=first, to_logits=to_logits)
        if first is not None and cfg.dto_iters > 0:
            count["offered"] += 1
            count["reused"] += original(z0, grads.__getitem__, cfg, to_logits=to_logits)[1] - out[1]
        return out

    with unittest.mock.patch.object(nabla, "dto", dto):
        yield count


@torch.no_grad()  # only the DTO steps take gradients, and they switch them on themselves
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Measure what nabla.py's optimizations buy (see the module docstring).")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=list(SHAPES), default="small", help="model shapes (tiny: for tests)")
    p.add_argument("--prompt", type=int, default=150, help="prompt tokens")
    p.add_argument("--committed", type=int, default=450, help="committed response tokens")
    p.add_argument("--ahead", type=int, default=300, help="ahead-span tokens")
    p.add_argument("--repeats", type=int, help="timed repeats per variant (default: 5 on CPU, 10 on CUDA)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 for small models on CPU, else bf16")
    p.add_argument("--layers", type=int, help="override both models' layer counts (quick checks)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1, for steady timings)")
    p.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak, if the device is not known")
    p.add_argument("--peak-tbps", type=float, help="GPU memory bandwidth in TB/s, if not known")
    p.add_argument("--tokens-from", metavar="SUMMARY", help="an eval_math.py summary JSON: project the table's hours")
    p.add_argument("--problems", type=int, default=500, help="problems in the projected table")
    args = p.parse_args(argv)
    if args.tokens_from and not Path(args.tokens_from).is_file():  # fail now, not after the run
        p.error(f"--tokens-from {args.tokens_from}: no such file")
    if min(args.prompt, args.ahead) < 1 or args.committed < 0:
        p.error("need --prompt >= 1, --committed >= 0, --ahead >= 1")
    if args.size == "7b" and args.device == "cpu" and not args.layers:
        p.error("--size 7b needs about 32 GB of bf16 weights: use --device cuda (or --layers N for a CPU smoke test)")
    args.repeats = args.repeats or (10 if args.device == "cuda" else 5)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" and args.size != "7b" else "bf16")
    transformers.logging.set_verbosity_error()  # e.g. "will not detect padding tokens in inputs_embeds"
    start, cuda, shape, cfg = time.perf_counter(), args.device == "cuda", SHAPES[args.size], nabla.NablaConfig()
    rec = dict(device=args.device, size=args.size, dtype=args.dtype, peak_memory_gb=None, dto_mfu=None)
    params = lambda m: sum(w.numel() for w in m.parameters()) - m.get_input_embeddings().weight.numel()  # no lookups

    def row(label: str, value: str = "", **values):  # a line of the table (a heading if no value), and the record
        rec.update(values)
        print(f"  {label:72s} {value}" if value else f"\n{label}", flush=True)

    if args.threads or not cuda:  # on a shared CPU, OpenMP threads waiting on busy cores make timings swing
        torch.set_num_threads(args.threads or 1)
    exact = args.dtype == "fp32"  # bf16 gradients differ by more than rounding: reported, not checked
    lm, rm = build_models(shape, args.device, torch.float32 if exact else torch.bfloat16, seed=0, layers=args.layers)
    lengths = Lengths(args.prompt, args.committed, args.ahead)
    x = make_inputs(lm, rm, lengths, seed=0)
    gpu = torch.cuda.get_device_name() if cuda else None
    print(f"device {args.device} ({gpu or f'{torch.get_num_threads()} thread(s)'}), {args.dtype}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    for m, c in ((lm, lm.config), (rm, rm.config)):
        row(f"{type(m).__name__}: h={c.hidden_size} L={c.num_hidden_layers} V={c.vocab_size}, random weights",
            f"{params(m) / 1e6:9.1f}M non-embedding parameters")

    # 1. The DTO step four ways: the same gradient first (this warms up too), then interleaved timings, with a scoring.
    variants = step_variants(lm, rm, x, cfg)
    agreement = check_gradients({name: fn() for name, fn in variants.items()}, exact=exact)
    worst = max(a["max_rel_err"] for a in agreement.values())
    conversation = x.prefix.rm_ids + x.vocab_map[x.ahead].tolist() + x.prefix.rm_suffix
    ms = median_ms(dict(variants, score=lambda: nabla.score_ids(rm, conversation)), args.repeats, cuda)
    score_ms = ms.pop("score")
    row(f"DTO gradient step (LM + RM forward and backward, ∂L/∂ŷ_0) at prompt {lengths.prompt} + committed "
        f"{lengths.committed} + ahead {lengths.ahead} tokens, median of {args.repeats}", lengths=lengths._asdict(),
        dto_step_ms=ms, dto_step_speedup=ms["authors"] / ms["ours"], grad_check_max_rel_err=worst)
    row("", f"{'ms':>9s} {'vs authors':>10s} {'vs previous':>10s}")
    for (name, t), previous in zip(ms.items(), [ms["authors"], *ms.values()]):
        row(STEP_LABELS[name], f"{t:9.1f} {ms['authors'] / t:9.2f}x {previous / t:10.2f}x")
    row("same ∂L/∂ŷ_0 from all four: largest difference / largest entry", f"{worst:9.1e}" + (
        "" if exact else f" ({args.dtype}; lowest cosine {min(a['cosine'] for a in agreement.values()):.4f})"))
    row(f"one reward-model scoring of {len(conversation)} tokens, ms", f"{score_ms:9.1f}", score_ms=score_ms)

    if cuda:  # MFU of our step; peak memory of a step at MATH-500's longest pass
        tflops, tbps = next(((f, b) for key, f, b in GPU_PEAKS if key in gpu), (None, None))
        tflops, tbps = args.peak_tflops or tflops, args.peak_tbps or tbps
        pre = x.prefix  # our step runs with gradients all that the caches lack, and nothing without
        flops = (params(lm) * (len(pre.lm_ids) - nabla._kv_len(pre.lm_kv) + len(x.ahead))
                 + params(rm) * (len(pre.rm_ids) - nabla._kv_len(pre.rm_kv) + len(x.ahead) + len(pre.rm_suffix)))
        mfu = {n: n * flops / (ms["ours"] / 1e3) / (tflops * 1e12) if tflops else None for n in (6, 4)}
        row(f"our step's MFU ({6 * flops / 1e12:.1f} model TFLOP), and counting the 4 x params it runs",
            f"{mfu[6]:9.1%}, {mfu[4]:.1%} of {tflops} TFLOP/s" if tflops else f"unknown peak for {gpu}: --peak-tflops",
            gpu=gpu, peak_tflops=tflops, peak_tbps=tbps, dto_mfu=mfu[6], dto_mfu_executed=mfu[4])
        del variants  # they hold the authors' aligned RM matrix, which must not count in our peak
        math500 = Lengths(args.prompt, 0, cfg.max_new_tokens)  # the first pass, over a whole 1024-token draft
        xm = make_inputs(lm, rm, math500, seed=0)
        ours = peak_memory_gb(lambda: our_step(lm, rm, xm, cfg))
        authors = peak_memory_gb(step_variants(lm, rm, xm, cfg)["authors"])  # its aligned matrix counts: built first
        row(f"peak memory GB, weights in, at prompt {math500.prompt} + ahead {math500.ahead}: ours, authors'",
            f"{ours:9.1f}, {authors:.1f}", peak_memory_gb=ours, peak_memory_gb_authors=authors,
            peak_memory_lengths=math500._asdict())

    # 2. A real generate run: the paper's settings but grad_norm_threshold=0 (random weights give tiny gradients).
    max_new, answers = shape["gen"]
    # Turns end in plain text: no token of the template stops a rollout (nabla.eos_token_ids), all run to the limit.
    tok = make_tokenizer(vocab_chars(min(lm.config.vocab_size, rm.config.vocab_size) - 3),  # + 3 special tokens
                         chat_template=CHAT_TEMPLATE.replace("<|im_end|>", ""))
    reasoner = nabla.NablaReasoner(lm, tok, rm, tok, nabla.NablaConfig(max_new_tokens=max_new, grad_norm_threshold=0.0))
    with counting_selection_reuse() as reuse:
        runs = [reasoner.generate(PROMPT, seed=seed).stats for seed in range(answers)]
    n = {key: sum(run[key] for run in runs) for key in ("optimized_tokens", "grad_steps", "cached_steps", "rollouts")}
    n["wall_s"] = sum(run["wall_time_s"] for run in runs)
    iterations = n["optimized_tokens"] * reasoner.cfg.dto_iters
    rate = n["cached_steps"] / iterations if iterations else None
    row(f"generate run: {answers} answer(s) x {max_new} new tokens, the paper's settings but grad_norm_threshold=0, "
        f"{n['wall_s']:.1f} s", generate=dict(n, answers=answers, max_new_tokens=max_new))
    row("DTO iterations served by a cached gradient (grad_cache_skip_rate)",
        f"{n['cached_steps']} of {iterations}" + (f" ({rate:.2f})" if iterations else ""), grad_cache_skip_rate=rate)
    row("full passes saved by the selection gradient (drafted token = an argmax)", f"{reuse['reused']} of "
        f"{reuse['offered']}", selection_reuse=reuse["reused"], selection_reuse_offered=reuse["offered"])
    dto_passes = iterations - n["cached_steps"]  # every other pass selected tokens (a standing draft runs none)
    row("full gradient passes: to select tokens + in DTO", f"{n['grad_steps'] - dto_passes} + {dto_passes}")

    # 3. Rollouts by NablaReasoner._rollout: generate on a cache of the given KV, the same length, sampling and seed.
    new, rollouts, counts = shape["rollout"], {}, defaultdict(int)
    for name, fast, kv in (("ours", False, x.prefix.lm_kv), ("fast", True, x.prefix.lm_kv), ("plain", False, ())):
        reasoner = nabla.NablaReasoner(lm, tok, config=nabla.NablaConfig(max_new_tokens=new, fast_rollout=fast))
        rollouts[name] = partial(reasoner._rollout, nabla.Prefix(x.prefix.lm_ids, [], [], lm_kv=kv), [], 0, counts)
        rollouts[name]()  # a warm-up: on a GPU, the fast path compiles
    tps = {name: new / (t / 1e3) for name, t in median_ms(rollouts, min(args.repeats, 3), cuda).items()}
    if counts["generated_tokens"] != new * counts["rollouts"]:  # a rate over unequal lengths would not be fair
        raise AssertionError(f"a rollout stopped short of {new} new tokens")
    row(f"rollout tokens/s: {new} new tokens after a {len(x.prefix.lm_ids)}-token prefix", rollout_tokens_per_s=tps)
    row("ours: generate on the stored prefix KV", f"{tps['ours']:9.1f} ({tps['ours'] / tps['plain']:.2f}x plain)")
    row(f"fast_rollout: on a static cache ({'compiled' if cuda else 'not compiled on CPU'})", f"{tps['fast']:9.1f}")
    row("plain: generate from scratch", f"{tps['plain']:9.1f}")
    if cuda and tbps:  # batch-1 decoding reads every weight but the input embedding once a token
        weight_gb = params(lm) * lm.dtype.itemsize / 1e9
        fraction = {name: tps[name] * weight_gb / (tbps * 1e3) for name in ("ours", "fast")}
        row(f"fraction of {tbps} TB/s, reading {weight_gb:.1f} GB of weights a token: ours, fast",
            f"{fraction['ours']:9.1%}, {fraction['fast']:.1%}", rollout_bandwidth_fraction=fraction)

    # 4. Projected single-GPU hours of the table, from the summary's per-problem means (see the module docstring).
    if args.tokens_from:
        step, scoring, hours = ms["ours"] / 1e3, score_ms / 1e3, {}
        row(f"projected single-GPU hours for {args.problems} problems from {args.tokens_from}", projected_hours=hours)
        for method, means in json.loads(Path(args.tokens_from).read_text())["methods"].items():
            tokens, passes, scores = (means.get(f"mean_{k}") or 0 for k in ("generated_tokens", "grad_passes",
                                                                             "reward_scores"))
            h = hours[method] = {path: args.problems * (tokens / tps[path] + passes * step + scores * scoring) / 3600
                                 for path in ("ours", "fast")}
            row(f"{method}: {tokens:.0f} tokens, {passes:.1f} gradient passes, {scores:.1f} scorings a problem",
                f"{h['ours']:9.1f} h, {h['fast']:.1f} h with fast rollouts")
        total = {path: sum(h[path] for h in hours.values()) for path in ("ours", "fast")}
        row("the whole table", f"{total['ours']:9.1f} h, {total['fast']:.1f} h")

    rec["wall_s"] = time.perf_counter() - start
    row(f"dto_step_speedup {rec['dto_step_speedup']:.2f}x; wall time {rec['wall_s']:.0f} s")
    # The JSON line, with floats to 4 significant digits so that it stays readable.
    print(json.dumps(json.loads(json.dumps(rec), parse_float=lambda f: float(f"{float(f):.4g}"))), flush=True)
    return rec


if __name__ == "__main__":
    main()
