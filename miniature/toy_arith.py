"""∇-Reasoner in miniature on CPU: tiny models, a synthetic arithmetic task, the paper's claims checked one by one.

    python miniature/toy_arith.py            # evaluate the committed models of miniature/models/ (about 12 minutes)
    python miniature/toy_arith.py --retrain  # train them again first (seed 0; about 16 minutes more, one CPU thread)
    python miniature/toy_arith.py --quick    # the same pipeline with tiny step counts: a smoke test (toy_test.py)

  task      (task.py) multi-step integer arithmetic with a short worked chain, e.g. the prompt "3+4*2-5=" is
            answered "4*2=8 3+8=11 11-5=6 \\boxed{6}" (3 or 4 one-digit operands, +, -, *, usual precedence);
            answers are graded by eval_math's math-verify grader, as on MATH-500.
  policy    (train.py) a character-level Qwen2ForCausalLM (3 layers, width 128), trained from scratch with a
            fixed seed and stopped as soon as its greedy accuracy on validation problems reaches 45%, so
            that greedy decoding is clearly imperfect and test-time scaling has room to help.
  reward    (train.py) a Qwen2ForSequenceClassification (num_labels=1) over the same tokenizer that verifies:
            started from the policy's layers with two fresh ones on top, trained with process supervision
            (a label per token: is the chain still right so far?) on fresh gold chains, fresh one-step
            corruptions and the policy's own samples. Its accuracy on three kinds of held-out pairs is
            printed first.
  bracket   greedy, one sampled draft, best-of-N and pass@N (what a perfect selector would get), measured
            on the test problems and printed before ∇-Reasoner runs.
  claims    the paper's claims one at a time, each a measured difference with a standard error and a
            verdict: DTO lowers the rejection rate; DTO moves the redraw toward the right token more than
            sharpening by the same KL and more than a likelihood-only DTO; skipping; gradient caching;
            ∇-Reasoner against best-of-N, self-consistency and greedy.
  curve     accuracy against model calls and against forward-token-equivalents for N in 1, 2, 4, 8,
            printed, and drawn to miniature/curve.png when matplotlib is installed.

Settings of ∇-Reasoner that the paper's do not fit (the learning rate and the gradient-norm threshold)
are chosen on validation problems; test problems are evaluated once. Trained models are saved to
--models (default miniature/models/) with save_pretrained and loaded from there on later runs.
"""
import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

# nabla.py, eval_math.py and tiny.py are at the repository root, a folder up from this script
sys.path.append(str(Path(__file__).resolve().parent.parent))
from nabla import (NablaConfig, Prefix, ahead_loss_and_grads, align_vocab, chat_prompt_ids, dto, eos_token_ids,
                   onehot_grads, reward_ids, reward_template, score, token_entropy)
from task import Problem, held_out_problems, ids_of, sample
from train import QUICK, TrainSettings, load_or_train, ratio_se, reward_quality

# ----------------------------------------------------------------------------------------------
# DTO at a single token: settings chosen on validation drafts, claims checked on test drafts


def without_dto(config: NablaConfig) -> NablaConfig:
    """∇-Reasoner without DTO: the redraw uses the LLM's own logits; token selection and rejection sampling stay."""
    return replace(config, dto_iters=0)


@dataclass
class Site:
    """A position of a draft where DTO is examined, with what is needed to run DTO there."""
    kind: str             # "mistake": the first wrong character of a wrong draft; "correct": the first
                          # uncertain token of a right draft; "selected": where ∇-Reasoner would optimize
    logp: torch.Tensor    # the LLM's log-probabilities there: DTO's starting logits
    right: int            # the gold chain's token there (an oracle knows it; ∇-Reasoner does not)
    drafted: int
    prefix: Prefix        # the prompt and the draft before the position
    rest: list[int]       # the draft after the position
    draft: list[int]      # the whole draft, end-of-sequence included
    position: int
    prompt: str


def draft_sites(lm, rm, tok, problems: list[Problem], cfg: NablaConfig, seed: int) -> tuple[list[Site], dict]:
    """One draft per problem at the rollout temperature, as ∇-Reasoner's first rollout, and its sites.

    One pass of the DTO loss over each whole draft gives every token's top probability, entropy and
    ‖∂L/∂one-hot‖₂, the three quantities token selection compares with its thresholds.
    """
    vocab_map = align_vocab(tok, tok, lm.get_input_embeddings().weight.shape[0])
    eos = set(eos_token_ids(lm, tok))
    texts = sample(lm, tok, [p.prompt for p in problems], cfg.rollout_temperature, max_new_tokens=cfg.max_new_tokens,
                   seed=seed + 2)
    sites, tokens = [], dict(top=[], entropy=[], norm=[])
    for p, text in zip(problems, texts):
        draft = ids_of(tok, text) + [tok.eos_token_id]
        prompt_ids, (rm_before, rm_after) = chat_prompt_ids(tok, p.prompt), reward_template(tok, p.prompt)
        step = ahead_loss_and_grads(lm, rm, vocab_map, Prefix(prompt_ids, rm_before, rm_after), draft, cfg, eos)
        top = step.logp.max(-1).values.exp()
        norms = onehot_grads(step, torch.arange(len(draft)), lm, rm, vocab_map, cfg).norm(dim=-1)
        tokens["top"] += top.tolist()
        tokens["entropy"] += token_entropy(step.logp).tolist()
        tokens["norm"] += norms.tolist()

        def site(kind: str, s: int, right: int) -> Site:  # same tokenizer: the RM's ids are the LM's
            return Site(kind, step.logp[s], right, draft[s],
                        Prefix(prompt_ids + draft[:s], rm_before + draft[:s], rm_after),
                        draft[s + 1:], draft, s, p.prompt)
        gold = ids_of(tok, p.chain) + [tok.eos_token_id]
        unsure = (top <= cfg.confidence_threshold).nonzero().flatten().tolist()
        if draft != gold:
            s = next(i for i, (a, b) in enumerate(zip(draft + [-1], gold + [-1])) if a != b)
            sites.append(site("mistake", s, gold[s] if s < len(gold) else tok.eos_token_id))
        elif unsure:
            sites.append(site("correct", unsure[0], draft[unsure[0]]))
        chosen = [s for s in unsure if norms[s] >= cfg.grad_norm_threshold]
        if chosen:
            s = chosen[0]
            sites.append(site("selected", s, gold[s] if s < len(gold) else -1))
    return sites, {k: torch.tensor(v) for k, v in tokens.items()}


def run_dto(lm, rm, tok, site: Site, cfg: NablaConfig, use_first: bool = True):
    """DTO at one site, as NablaReasoner runs it: from the LLM's logits, the draft's gradient reused for
    the drafted token. Returns the optimized logits, the number of full passes of both models, and the
    gradient ∂L/∂one-hot at the drafted token (what token selection computed)."""
    vocab_map = align_vocab(tok, tok, lm.get_input_embeddings().weight.shape[0])
    eos = set(eos_token_ids(lm, tok))

    def full_grad(token: int) -> torch.Tensor:
        step = ahead_loss_and_grads(lm, rm, vocab_map, site.prefix, [token] + site.rest, cfg, eos)
        return onehot_grads(step, torch.tensor([0]), lm, rm, vocab_map, cfg)[0]
    first = (site.drafted, full_grad(site.drafted))
    z, n_full, _ = dto(site.logp, full_grad, cfg, first=first if use_first else None)
    return z, n_full, first[1]


def redraw_probs(z: torch.Tensor, cfg: NablaConfig) -> torch.Tensor:
    return (z.float() / cfg.resample_temperature).softmax(-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum())


def sharpened(z0: torch.Tensor, target_kl: float, cfg: NablaConfig) -> torch.Tensor:
    """The control: z0 scaled by c ≥ 1 (sharpening, no reward) so the redraw moves by target_kl, found by bisection."""
    base = redraw_probs(z0, cfg)
    lo, hi = 1.0, 1.0
    while kl(redraw_probs(hi * z0, cfg), base) < target_kl and hi < 1e4:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(redraw_probs(mid * z0, cfg), base) < target_kl else (lo, mid)
    return hi * z0


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def paired_ratio_difference(a: tuple[list, list], b: tuple[list, list]) -> tuple[float, float]:
    """Σnum/Σden of a minus that of b, both over the same problems, with the paired delta-method standard error."""
    ta, tb = sum(a[1]), sum(b[1])
    if not ta or not tb:
        return float("nan"), float("nan")
    ra, rb = sum(a[0]) / ta, sum(b[0]) / tb
    terms = [(x - ra * y) / ta - (u - rb * v) / tb for x, y, u, v in zip(*a, *b)]
    return ra - rb, math.sqrt(sum(t * t for t in terms))


def dto_claims(lm, rm, tok, problems: list[Problem], cfg: NablaConfig, seed: int, entropy_threshold: float = 0.25,
               big_lr: float = 1.0) -> dict:
    """What DTO does at single tokens of test drafts, against two controls, and what skipping saves.

    At the first wrong token of each wrong draft, the redraw's chance of the right token: after DTO;
    after a likelihood-only DTO (λ = 0); and after sharpening the LLM's logits (z → c·z, no reward) by
    the same KL as DTO moved them. Sharpening raises p(right) wherever the LLM's argmax is already
    right, so only a gain beyond both controls is the reward's doing. The same at learning rate big_lr,
    where DTO moves the logits a lot (not a tuned setting: what a DTO that moves does). And two
    questions behind the result: does the gradient prefer the right token to the drafted one, and
    does the reward model itself score the draft higher with the right token swapped in?
    """
    sites, tokens = draft_sites(lm, rm, tok, problems, cfg, seed)
    eos = set(eos_token_ids(lm, tok))
    text = lambda ids: tok.decode([t for t in ids if t not in eos])
    rows = []
    for s in (s for s in sites if s.kind == "mistake"):
        p0 = redraw_probs(s.logp, cfg)
        z, _, grad = run_dto(lm, rm, tok, s, cfg)
        p_dto = redraw_probs(z, cfg)
        p_lik = redraw_probs(run_dto(lm, rm, tok, s, replace(cfg, reward_coeff=0.0))[0], cfg)
        p_sharp = redraw_probs(sharpened(s.logp, kl(p_dto, p0), cfg), cfg)
        p_big = redraw_probs(run_dto(lm, rm, tok, s, replace(cfg, lr=big_lr))[0], cfg)
        p_big_sharp = redraw_probs(sharpened(s.logp, kl(p_big, p0), cfg), cfg)
        # The reward itself, not its linearisation: the right token swapped in, the rest of the draft kept.
        swapped = s.draft[:s.position] + [s.right] + s.draft[s.position + 1:]
        rows.append(dict(before=float(p0[s.right]), dto=float(p_dto[s.right]), likelihood_only=float(p_lik[s.right]),
                         sharpened=float(p_sharp[s.right]), kl=kl(p_dto, p0),
                         argmax_right=int(s.logp.argmax()) == s.right,
                         big=float(p_big[s.right]), big_sharpened=float(p_big_sharp[s.right]),
                         gradient_prefers_right=bool(grad[s.right] < grad[s.drafted]),
                         reachable=bool(s.logp.max().exp() <= cfg.confidence_threshold
                                        and grad.norm() >= cfg.grad_norm_threshold),
                         reward_prefers_swap=score(rm, tok, s.prompt, text(swapped))
                         > score(rm, tok, s.prompt, text(s.draft))))
    selected = [s for s in sites if s.kind == "selected"]
    passes_cache = [run_dto(lm, rm, tok, s, cfg, use_first=False)[1] for s in selected]
    passes_reuse = [run_dto(lm, rm, tok, s, cfg)[1] for s in selected]
    n = len(tokens["top"])
    confident = tokens["top"] > cfg.confidence_threshold
    flat = tokens["norm"] < cfg.grad_norm_threshold
    share = lambda mask: (float(mask.float().mean()),
                          math.sqrt(float(mask.float().mean()) * (1 - float(mask.float().mean())) / n))
    col = lambda key: [r[key] for r in rows]
    return dict(
        drafts=len(problems), wrong_drafts=len(rows), tokens=n,
        p_right=dict(before=mean_se(col("before")), dto=mean_se(col("dto")),
                     likelihood_only=mean_se(col("likelihood_only")),
                     sharpened=mean_se(col("sharpened"))),
        dto_minus_sharpened=mean_se(a - b for a, b in zip(col("dto"), col("sharpened"))),
        dto_minus_before=mean_se(a - b for a, b in zip(col("dto"), col("before"))),
        dto_minus_likelihood_only=mean_se(a - b for a, b in zip(col("dto"), col("likelihood_only"))),
        big_lr=big_lr, p_right_big_lr=mean_se(col("big")), p_right_big_lr_sharpened=mean_se(col("big_sharpened")),
        big_lr_minus_sharpened=mean_se(a - b for a, b in zip(col("big"), col("big_sharpened"))),
        gradient_prefers_right=mean_se(col("gradient_prefers_right")),
        reward_prefers_swap=mean_se(col("reward_prefers_swap")),
        mistake_reachable=mean_se(col("reachable")),
        **{f"where_argmax_{k}": dict(sites=sum(r["argmax_right"] == right for r in rows),
                                     dto_minus_sharpened=mean_se(r["dto"] - r["sharpened"] for r in rows
                                                                 if r["argmax_right"] == right))
           for k, right in (("wrong", False), ("right", True))},
        skipped_confident=share(confident), skipped_flat_gradient=share(flat),
        skipped_low_entropy=share(tokens["entropy"] < entropy_threshold), entropy_threshold=entropy_threshold,
        skipped_confident_or_flat=share(confident | flat),
        selected_sites=len(selected), passes_without_cache=float(cfg.dto_iters),
        passes_with_cache=mean_se(passes_cache), passes_with_cache_and_reuse=mean_se(passes_reuse))


# ----------------------------------------------------------------------------------------------
# Evaluation with eval_math's methods


def summary(label: str, method: str, n: int, rows: list[dict], seconds: float) -> dict:
    accuracy = mean_se(r["correct"] for r in rows)
    rejected = ([r["proposed"] - r["accepted"] for r in rows], [r["proposed"] for r in rows])  # per problem
    rejection = ratio_se(*rejected)
    result = dict(label=label, method=method, n=n, problems=len(rows), accuracy=accuracy,
                  model_calls=statistics.mean(r["calls"] for r in rows),
                  forward_tokens=statistics.mean(r["fte"] for r in rows),
                  revisions_proposed=statistics.mean(r["proposed"] for r in rows), rejection_rate=rejection,
                  correct=[int(r["correct"]) for r in rows], rejected=rejected, seconds=round(seconds, 1))
    print(f"  {label:<40} N={n}  accuracy {accuracy[0]:6.1%} ± {accuracy[1]:.1%}"
          f"  model calls {result['model_calls']:6.1f}"
          f"  forward-token-equivalents {result['forward_tokens']:7.0f}  ({seconds:.0f}s)", flush=True)
    return result


def run_samplers(problems: list[Problem], models, config: NablaConfig, ns: tuple, seed: int) -> dict:
    """Greedy, and self-consistency and best-of-N at every N in ns from one set of max(ns) samples per problem.

    The first N of the samples make an N-sample run; the choice rules are eval_math's (solve's): the
    vote's first winning sample, the first sample of the highest reward. Model calls and forward-token-
    equivalents as solve counts them: a generated token each, a reward scoring each; each sample's prompt
    and tokens but the last, and the reward model's tokens for each scored sample.
    """
    from eval_math import is_correct, problem_seed, sample as sample_responses, solve, vote
    tok, rm, start = models.lm_tokenizer, models.rm, time.perf_counter()
    greedy, runs = [], {(m, n): [] for m in ("sc", "bon") for n in ns}
    for i, p in enumerate(problems):
        prompt_len = len(chat_prompt_ids(tok, p.prompt))
        g = solve("greedy", [p.prompt], models, n=1, seed=problem_seed(seed, i), config=config)[0]
        greedy.append(dict(correct=is_correct(g["response"], p.answer), calls=g["model_calls"],
                           fte=g["forward_token_equivalents"], proposed=0, accepted=0))
        samples = sample_responses(models, [p.prompt], max(ns), problem_seed(seed, i), config)[0]
        rewards = [score(rm, tok, p.prompt, s.scored_text) for s in samples]
        right = [is_correct(s.text, p.answer) for s in samples]
        rm_len = [len(reward_ids(tok, p.prompt, s.scored_text)) for s in samples]
        for n in ns:
            tokens = sum(s.tokens for s in samples[:n])
            chosen = dict(sc=vote([s.text for s in samples[:n]])[0], bon=max(range(n), key=rewards.__getitem__))
            for m in ("sc", "bon"):
                runs[m, n].append(dict(correct=right[chosen[m]], calls=tokens + (n if m == "bon" else 0),
                                       fte=n * (prompt_len - 1) + tokens + (sum(rm_len[:n]) if m == "bon" else 0),
                                       proposed=0, accepted=0, some_right=any(right[:n])))
    seconds = time.perf_counter() - start
    out = dict(greedy=summary("greedy", "greedy", 1, greedy, seconds))
    for n in ns:
        out["sc", n] = summary("self-consistency", "sc", n, runs["sc", n], 0)
        out["bon", n] = summary("best-of-N (reward model)", "bon", n, runs["bon", n], 0)
        out["pass", n] = mean_se(r["some_right"] for r in runs["sc", n])
    return out


def run_nabla(label: str, n: int, config: NablaConfig, problems: list[Problem], models, seed: int) -> dict:
    """∇-Reasoner on every problem through eval_math.solve; accuracy, calls, forward tokens, rejections."""
    from eval_math import is_correct, problem_seed, solve
    rows, start = [], time.perf_counter()
    for i, p in enumerate(problems):
        r = solve("nabla", [p.prompt], models, n=n, seed=problem_seed(seed, i), config=config)[0]
        st = r["stats"]
        rows.append(dict(correct=is_correct(r["response"], p.answer), calls=r["model_calls"],
                         fte=r["forward_token_equivalents"], proposed=st["revisions_proposed"],
                         accepted=st["revisions_accepted"], cached=st["cached_steps"],
                         optimized=st["optimized_tokens"]))
    result = summary(label, "nabla", n, rows, time.perf_counter() - start)
    result["cached_share"] = ratio_se([r["cached"] for r in rows], [r["optimized"] * config.dto_iters for r in rows])
    return result


def tune(lm, rm, tok, problems: list[Problem], base: NablaConfig, n: int, seed: int,
         lrs=(0.01, 0.1, 1.0)) -> tuple[NablaConfig, dict]:
    """The learning rate and the gradient-norm threshold for these models, chosen on validation problems.

    The paper's values were set for a 152k vocabulary and a 7B model (its threshold of 4 passes few
    tokens here), so ∇-Reasoner with the rollout budget n runs on the validation problems for each
    learning rate in lrs and each threshold of: 0 (every uncertain token), the median ‖∂L/∂one-hot‖₂
    among uncertain tokens of validation drafts, and the paper's 4. The most accurate pair is kept
    (the first of equals, so the smaller learning rate and threshold).
    """
    from eval_math import Models
    _, tokens = draft_sites(lm, rm, tok, problems, base, seed)
    unsure = tokens["top"] <= base.confidence_threshold
    median = round(float(tokens["norm"][unsure].median()), 4) if unsure.any() else base.grad_norm_threshold
    models, accuracy = Models(lm, tok, rm, tok), {}
    for lr in lrs:
        for threshold in (0.0, median, base.grad_norm_threshold):
            cfg = replace(base, lr=lr, grad_norm_threshold=threshold)
            accuracy[lr, threshold] = run_nabla(f"validation: lr {lr:g}, threshold {threshold:g}", n, cfg, problems,
                                                models, seed)["accuracy"][0]
    lr, threshold = max(accuracy, key=accuracy.get)
    return replace(base, lr=lr, grad_norm_threshold=threshold), dict(
        accuracy={f"lr {k[0]:g}, threshold {k[1]:g}": v for k, v in accuracy.items()}, problems=len(problems),
        median_threshold=median, uncertain_share=float(unsure.float().mean()),
        share_uncertain_above_paper_threshold=float(
            (tokens["norm"][unsure] >= base.grad_norm_threshold).float().mean()))


# ----------------------------------------------------------------------------------------------
# The bracket, the claims and the curve


def verdict(value: float, se: float) -> str:
    """A claim that predicts a positive difference: it holds when the difference is over two standard errors."""
    if value != value or se != se:
        return "not measured"
    return "holds" if value > 2 * se else "reversed" if value < -2 * se else "not shown (within 2 SE)"


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Accuracy of a minus accuracy of b on the same problems, with the paired standard error."""
    return mean_se(x - y for x, y in zip(a["correct"], b["correct"]))


def claim_rows(res: dict, d: dict) -> list[dict]:
    """The paper's claims one at a time: each a measured difference that should be positive, and a verdict."""
    top = max(res["nabla"])
    nab, bon, sc = res["nabla"][top], res["bon", top], res["sc", top]
    rows = []

    def row(claim: str, measured: str, value: float, se: float, fmt: str = "+.1%"):
        rows.append(dict(claim=claim, measured=measured, value=value, se=se, verdict=verdict(value, se),
                         text=f"{value:{fmt}} ± {se:{fmt[1:]}}"))
    r0, r1 = res["no_dto"]["rejection_rate"], nab["rejection_rate"]
    row("Table 2: DTO lowers the rejection rate of revisions",
        f"rejection without DTO {r0[0]:.1%} -> with DTO {r1[0]:.1%} (same thresholds, N={top})",
        *paired_ratio_difference(res["no_dto"]["rejected"], nab["rejected"]))
    if "nabla_big_lr" in res:
        r2 = res["nabla_big_lr"]["rejection_rate"]
        row("... the same with DTO at lr 1 (not tuned), where DTO moves the logits",
            f"rejection without DTO {r0[0]:.1%} -> with DTO at lr 1 {r2[0]:.1%}",
            *paired_ratio_difference(res["no_dto"]["rejected"], res["nabla_big_lr"]["rejected"]))
    row("DTO makes ∇-Reasoner more accurate than redrawing from the LLM's logits",
        f"N={top}: {nab['accuracy'][0]:.1%} with DTO vs {res['no_dto']['accuracy'][0]:.1%} without",
        *paired(nab, res["no_dto"]))
    p = d["p_right"]
    row("DTO raises p(right token) at the first wrong token",
        f"first wrong token of {d['wrong_drafts']} wrong test drafts: p(right) {p['before'][0]:.3f} -> DTO "
        f"{p['dto'][0]:.3f} (sharpening by the same KL: {p['sharpened'][0]:.3f})", *d["dto_minus_before"],
        fmt="+.4f")
    row("DTO moves p(right token) more than sharpening by the same KL", "the same tokens",
        *d["dto_minus_sharpened"], fmt="+.4f")
    for key, where in (("where_argmax_wrong", "wrong (sharpening cannot win there)"),
                       ("where_argmax_right", "right (sharpening cannot lose there)")):
        w = d[key]
        row(f"... at those where the LLM's argmax is {where}",
            f"{w['sites']} of the {d['wrong_drafts']} first wrong tokens", *w["dto_minus_sharpened"], fmt="+.4f")
    row("DTO moves p(right token) more than a likelihood-only DTO (λ = 0)",
        f"likelihood-only {p['likelihood_only'][0]:.3f}", *d["dto_minus_likelihood_only"], fmt="+.4f")
    row(f"... the same at lr {d['big_lr']:g} (not tuned), where DTO moves the logits",
        f"p(right) -> DTO {d['p_right_big_lr'][0]:.3f}, "
        f"sharpened by the same KL {d['p_right_big_lr_sharpened'][0]:.3f}",
        *d["big_lr_minus_sharpened"], fmt="+.4f")
    for key, what in (("mistake_reachable", "token selection can reach the first wrong token"),
                      ("gradient_prefers_right", "∂L/∂one-hot prefers the right token to the drafted"),
                      ("reward_prefers_swap", "the reward is higher with the right token swapped in")):
        row(f"(why) {what}", "share of those first wrong tokens", d[key][0] - 0.5, d[key][1])
        rows[-1].update(text=f"{d[key][0]:.1%} ± {d[key][1]:.1%}", verdict="(diagnostic)")
    for key, what in (("skipped_confident", "confidence (top p > 0.97)"), ("skipped_flat_gradient", "gradient norm"),
                      ("skipped_low_entropy", f"entropy < {d['entropy_threshold']} nats (not used)"),
                      ("skipped_confident_or_flat", "confidence or gradient (the rule used)")):
        share, se = d[key]  # the paper's claim is that most tokens are skipped: more than half
        row(f"Skipping: draft tokens skipped by {what}", f"{d['tokens']} tokens of {d['drafts']} test drafts",
            share - 0.5, se)
        rows[-1].update(text=f"{share:.1%} ± {se:.1%}", verdict="(one criterion)" if "rule used" not in what
                        else rows[-1]["verdict"])
    saved = d["passes_without_cache"] - d["passes_with_cache_and_reuse"][0]
    row("Gradient caching and selection reuse save full passes",
        f"passes per optimized token at {d['selected_sites']} selected test tokens: {d['passes_without_cache']:.0f} "
        f"without caching, {d['passes_with_cache'][0]:.2f} with caching, {d['passes_with_cache_and_reuse'][0]:.2f} "
        f"with caching and reuse", saved, d["passes_with_cache_and_reuse"][1], fmt="+.2f")
    for name, other in (("best-of-N", bon), ("self-consistency", sc), ("greedy", res["greedy"])):
        row(f"Table 1: ∇-Reasoner is more accurate than {name}",
            f"N={top}: {nab['accuracy'][0]:.1%} ({nab['model_calls']:.0f} calls) vs {other['accuracy'][0]:.1%} "
            f"({other['model_calls']:.0f} calls)", *paired(nab, other))
    # Figure 4: at a matched budget, ∇-Reasoner (N=top) against the largest best-of-N that costs no more.
    for key, unit in (("model_calls", "model calls"), ("forward_tokens", "forward-token-equivalents")):
        cheaper = [res["bon", n] for n in sorted(res["nabla"]) if res["bon", n][key] <= nab[key]]
        if cheaper:
            other = cheaper[-1]
            row(f"Figure 4: ∇-Reasoner beats best-of-N at equal {unit}",
                f"∇-Reasoner N={top} {nab['accuracy'][0]:.1%} ({nab[key]:.0f}) vs best-of-{other['n']} "
                f"{other['accuracy'][0]:.1%} ({other[key]:.0f}), the largest N that costs no more", *paired(nab, other))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'method':<44}{'N':>3}{'accuracy':>16}{'model calls':>13}"
          f"{'fwd-token-eq':>14}{'proposed':>10}{'rejection':>16}")
    for r in rows:
        acc, rej = r["accuracy"], r["rejection_rate"]
        rejection = "-" if rej[0] != rej[0] else f"{rej[0]:.1%} ± {rej[1]:.1%}"
        proposed = "-" if r["method"] != "nabla" else f"{r['revisions_proposed']:.2f}"
        print(f"{r['label']:<44}{r['n']:>3}{acc[0]:>9.1%} ± {acc[1]:.1%}"
              f"{r['model_calls']:>13.1f}{r['forward_tokens']:>14.0f}"
              f"{proposed:>10}{rejection:>16}")


def print_claims(rows: list[dict]) -> None:
    print(f"\n{'claim':<72}{'difference':>18}  verdict")
    for r in rows:
        print(f"{r['claim']:<72}{r['text']:>18}  {r['verdict']}\n      {r['measured']}")


def print_bracket(res: dict, ns: tuple) -> None:
    top = max(ns)
    g, p, b, s = res["greedy"]["accuracy"], res["pass", top], res["bon", top]["accuracy"], res["sc", 1]["accuracy"]
    print(f"\nthe bracket on {res['greedy']['problems']} test problems, before ∇-Reasoner runs:"
          f"\n  one sampled draft (temperature 0.6)     {s[0]:6.1%} ± {s[1]:.1%}"
          f"\n  greedy                                  {g[0]:6.1%} ± {g[1]:.1%}"
          f"\n  best-of-{top} with the reward model          {b[0]:6.1%} ± {b[1]:.1%}"
          f"\n  pass@{top}: some sample right (a perfect selector) {p[0]:6.1%} ± {p[1]:.1%}"
          f"\n  (the paper's objective cannot be maximized by enumeration here: chains have up to 37 characters)")


def curves(results: dict, ns: tuple) -> dict:
    """Each method's results at every N in ns, from the results as the report keeps them ("sc_4", "nabla", ...)."""
    return {"self-consistency": [results[f"sc_{n}"] for n in ns], "best-of-N": [results[f"bon_{n}"] for n in ns],
            "∇-Reasoner": [results["nabla"][n] for n in ns]}


def print_curve(results: dict, ns: tuple) -> None:
    rows = curves(results, ns)
    print("\naccuracy ± standard error (mean model calls; mean forward-token-equivalents) against N:"
          "\nN samples for self-consistency and best-of-N, the rollout budget for ∇-Reasoner")
    print(f"{'N':>3}" + "".join(f"{name:>32}" for name in rows) + f"{'pass@N':>10}")
    for i, n in enumerate(ns):
        cells = [f"{r['accuracy'][0]:.1%}±{r['accuracy'][1]:.1%} ({r['model_calls']:.0f}; {r['forward_tokens']:.0f})"
                 for r in (c[i] for c in rows.values())]
        print(f"{n:>3}" + "".join(f"{c:>32}" for c in cells) + f"{results[f'pass_{n}'][0]:>10.1%}")


def draw_curve(report: dict, path: Path) -> None:
    """The curve as a figure of two panels: accuracy against mean model calls and against forward-token-equivalents.

    Drawn from the report as main returns it or as --output saved it, and only when matplotlib is
    installed (it is not a requirement). pass@N is drawn at the cost of its N samples, self-consistency's.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        print("the curve is not drawn: matplotlib is not installed")
        return
    results = dict(report["results"], nabla={int(n): r for n, r in report["results"]["nabla"].items()})
    ns = tuple(sorted(results["nabla"]))
    rows, greedy, s = curves(results, ns), results["greedy"], report["training"]["settings"]
    style = {"self-consistency": dict(color="tab:blue", marker="o"),
             "best-of-N": dict(color="tab:orange", marker="s"), "∇-Reasoner": dict(color="tab:green", marker="D")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    for ax, key, unit, note in ((axes[0], "model_calls", "model calls", ""),
                                (axes[1], "forward_tokens", "forward-token-equivalents",
                                 " (a token of a differentiated pass counts 3)")):
        for name, series in rows.items():
            ax.errorbar([r[key] for r in series], [100 * r["accuracy"][0] for r in series],
                        yerr=[100 * r["accuracy"][1] for r in series], capsize=3, label=name, **style[name])
        ax.errorbar([greedy[key]], [100 * greedy["accuracy"][0]], yerr=[100 * greedy["accuracy"][1]], color="black",
                    marker="*", markersize=12, capsize=3, ls="none", label="greedy")
        ax.errorbar([r[key] for r in rows["self-consistency"]], [100 * results[f"pass_{n}"][0] for n in ns],
                    color="gray", ls="--", marker="o", mfc="none",
                    label="pass@N: some sample right (a perfect selector)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"mean {unit} per problem")
        ax.set_title(f"cost in {unit}{note}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(loc="upper left", fontsize=9)
    fig.suptitle(f"∇-Reasoner in miniature: {report['problems']} held-out multi-step arithmetic problems, a "
                 f"{s['layers']}-layer character-level policy and a {s['layers'] + s['rm_extra_layers']}-layer "
                 f"process-supervised reward model (width {s['hidden']})\npoints from left to right: N = "
                 f"{', '.join(map(str, ns))} (samples for self-consistency and best-of-N, the rollout budget for "
                 f"∇-Reasoner); bars: ± one standard error", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"curve drawn in {path}")


def by_length(res: dict, problems: list[Problem], n: int) -> dict:
    """The ∇-Reasoner-minus-best-of-N accuracy gap for chains of 2 and of 3 steps (paired, same problems)."""
    steps = [p.prompt.count("+") + p.prompt.count("-") + p.prompt.count("*") for p in problems]
    out = {}
    for k in sorted(set(steps)):
        idx = [i for i, s in enumerate(steps) if s == k]
        pick = lambda r: [r["correct"][i] for i in idx]
        out[k] = dict(problems=len(idx), nabla=statistics.mean(pick(res["nabla"][n])),
                      bon=statistics.mean(pick(res["bon", n])),
                      greedy=statistics.mean(pick(res["greedy"])),
                      gap=mean_se(a - b for a, b in zip(pick(res["nabla"][n]), pick(res["bon", n]))))
    print(f"\n∇-Reasoner minus best-of-{n} by chain length (paired):")
    for k, r in out.items():
        print(f"  {k} steps ({r['problems']} problems): greedy {r['greedy']:.1%}, best-of-{n} {r['bon']:.1%}, "
              f"∇-Reasoner {r['nabla']:.1%}, gap {r['gap'][0]:+.1%} ± {r['gap'][1]:.1%}")
    return out


# ----------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny step counts and 4 problems: a smoke test")
    p.add_argument("--models",
                   help="folder of the trained models (default miniature/models/; --quick: a temporary one)")
    p.add_argument("--retrain", action="store_true", help="train the models again even if they are cached")
    p.add_argument("--problems", type=int, help="held-out test problems (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="results/toy_arith.json", help="everything measured, as JSON")
    p.add_argument("--curve", default=Path(__file__).parent / "curve.png",
                   help="the curve's figure, drawn when matplotlib is installed "
                        "(default miniature/curve.png; --quick: none)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the models are tiny; one thread is as fast and leaves the other core alone
    start = time.perf_counter()
    settings = QUICK if args.quick else TrainSettings()
    n_test = args.problems or (4 if args.quick else 500)
    ns, n_tune = ((1, 2), 4) if args.quick else ((1, 2, 4, 8), 100)
    test, val = held_out_problems(args.seed, n_test, settings.val_problems)
    held_out = {q.prompt for q in test + val}
    scratch = tempfile.mkdtemp(prefix="toy_arith_") if args.quick and not args.models else None
    folder = Path(args.models or scratch or Path(__file__).parent / "models")
    try:
        tok, lm, rm, meta, trained = load_or_train(folder, settings, args.seed, val, held_out, args.retrain)
        train_seconds = time.perf_counter() - start
        quality = reward_quality(rm, tok, lm, val, args.seed)
        print(f"policy: {meta['policy']['steps']} steps, validation greedy accuracy "
              f"{meta['policy']['log'][-1]['val_greedy']:.1%}\nreward model on {len(val)} validation problems: "
              f"gold above a one-step corruption {quality['gold_vs_corrupted']} (target 0.95); a right above a wrong "
              f"sample of the same problem {quality['right_vs_wrong']} ± {quality['right_vs_wrong_se']} (target "
              f"0.90); top-scored of 8 samples right when some is {quality['top_is_right']}")

        # The paper's settings but the length limit: chains here have at most 37 characters (the untrained
        # models of --quick babble until the limit, so there it is shorter).
        paper = NablaConfig(max_new_tokens=16 if args.quick else 48)
        print(f"\nchoosing ∇-Reasoner's lr and grad_norm_threshold on {n_tune} validation problems (N={ns[-1]}):")
        tuned, tuning = tune(lm, rm, tok, val[:n_tune], paper, ns[-1], args.seed)
        print(f"chosen: lr {tuned.lr:g}, grad_norm_threshold {tuned.grad_norm_threshold:g} (the median at uncertain "
              f"tokens is {tuning['median_threshold']:g}; the paper's {paper.grad_norm_threshold:g} passes "
              f"{tuning['share_uncertain_above_paper_threshold']:.0%} of the uncertain tokens)")

        from eval_math import Models
        models = Models(lm, tok, rm, tok)
        print(f"\nevaluating on {len(test)} held-out test problems (seed {args.seed}):", flush=True)
        res = run_samplers(test, models, paper, ns, args.seed)
        print_bracket(res, ns)
        res["nabla"] = {n: run_nabla("∇-Reasoner", n, tuned, test, models, args.seed) for n in ns}
        res["no_dto"] = run_nabla("∇-Reasoner without DTO", ns[-1], without_dto(tuned), test, models, args.seed)
        res["nabla_big_lr"] = run_nabla("∇-Reasoner, lr 1 (not tuned)", ns[-1], replace(tuned, lr=1.0), test, models,
                                        args.seed)
        res["paper"] = run_nabla("∇-Reasoner, the paper's lr and threshold", ns[-1], paper, test, models, args.seed)
        print_table([res["greedy"], res["sc", ns[-1]], res["bon", ns[-1]], res["nabla"][ns[-1]], res["no_dto"],
                     res["nabla_big_lr"], res["paper"]])
        d = dto_claims(lm, rm, tok, test, tuned, args.seed)
        claims = claim_rows(res, d)
        print_claims(claims)
        results = {("_".join(map(str, k)) if isinstance(k, tuple) else k): v for k, v in res.items()}
        print_curve(results, ns)
        lengths = by_length(res, test, ns[-1])
        wall = time.perf_counter() - start
        print(f"\nwall time {wall:.0f}s (models {'trained' if trained else 'loaded'} in "
              f"{train_seconds:.0f}s); torch {torch.__version__}, {torch.get_num_threads()} thread")
        report = dict(seed=args.seed, problems=len(test), training=meta, reward_quality=quality, tuning=tuning,
                      tuned=asdict(tuned), paper=asdict(paper), claims=claims, dto_claims=d, by_length=lengths,
                      results=results, wall_seconds=round(wall, 1), train_seconds=round(train_seconds, 1))
        if not args.quick:
            output = Path(args.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=1, default=str))
            print(f"everything measured: {output}")
            draw_curve(report, Path(args.curve))
        return report
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
