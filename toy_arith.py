"""A CPU-sized proof that ∇-Reasoner works: tiny models, a synthetic arithmetic task, the paper's table.

    python toy_arith.py            # train (or load from toy_models/), diagnose DTO, evaluate, print tables
    python toy_arith.py --quick    # the same pipeline with tiny step counts: a smoke test (toy_test.py)

The paper's experiment in miniature, with nothing downloaded:

  task      multi-step integer arithmetic with a short worked chain, e.g. the prompt "3+4*2-5=" is answered
            "4*2=8 3+8=11 11-5=6 \\boxed{6}" (3 or 4 one-digit operands, +, -, *, usual precedence);
            answers are graded by eval_math's math-verify grader, as on MATH-500.
  policy    a character-level Qwen2ForCausalLM (3 layers, width 128), trained from scratch with a fixed
            seed and stopped as soon as its greedy accuracy on validation problems reaches 45%, so
            that greedy decoding is clearly imperfect and test-time scaling has room to help.
  reward    a Qwen2ForSequenceClassification (num_labels=1) over the same tokenizer, started from the
            policy's weights (as RLHF reward models are) and trained with a pairwise Bradley-Terry loss
            to score correct chains above wrong ones: chains with one corrupted step or answer, and the
            policy's own wrong samples, the mistakes a reward model meets at test time.
  DTO       a look at what DTO does on these models (gradient norms, how often the optimized argmax
            flips, whether it flips toward the right token) with the paper's settings and tuned ones.
  eval      held-out problems solved by eval_math.solve: greedy, self-consistency, best-of-N,
            ∇-Reasoner and ∇-Reasoner without DTO, with model calls counted as eval_math counts them;
            the paper-style table and the accuracy-vs-model-calls curve for N in 1, 2, 4, 8.

Trained models are saved to --models (default toy_models/) with save_pretrained and loaded from
there on later runs; --retrain trains them again. Everything is seeded by --seed.
"""
import argparse
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2ForSequenceClassification)

from nabla import (NablaConfig, Prefix, ahead_loss_and_grads, align_vocab, chat_prompt_ids, dto, onehot_grads,
                   reward_template, score)
from tiny import char_tokenizer

# ----------------------------------------------------------------------------------------------
# The task: arithmetic with a worked chain

MAX_ABS = 99  # every intermediate value has at most two digits, so each step is a times-table or 2-digit sum


@dataclass
class Problem:
    prompt: str   # "3+4*2-5="
    chain: str    # "4*2=8 3+8=11 11-5=6 \boxed{6}"
    answer: str   # "6"


def worked_steps(nums: list[int], ops: list[str], replaced: tuple[int, tuple] | None = None) -> list[tuple] | None:
    """The steps (a, op, b, a op b) in the usual order: products first, then sums left to right.

    None when a value would leave ±MAX_ABS. `replaced` = (k, step) writes step k as given and carries
    its value forward (corrupt uses it to make a chain that is consistent after one mistake).
    """
    nums, ops, steps = list(nums), list(ops), []
    for phase in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] not in phase:
                i += 1
                continue
            if replaced and len(steps) == replaced[0]:
                a, op, b, value = replaced[1]
            else:
                a, op, b = nums[i], ops[i], nums[i + 1]
                value = a * b if op == "*" else a + b if op == "+" else a - b
                if abs(value) > MAX_ABS and not replaced:
                    return None
            steps.append((a, op, b, value))
            nums[i:i + 2], ops[i:i + 1] = [value], []
    return steps


def write_chain(steps) -> str:
    return " ".join(f"{a}{op}{b}={v}" for a, op, b, v in steps) + f" \\boxed{{{steps[-1][3]}}}"


def random_problem(rng: random.Random) -> Problem:
    while True:
        nums = [rng.randint(1, 9) for _ in range(rng.choice((3, 4)))]
        ops = [rng.choice("+-*") for _ in range(len(nums) - 1)]
        steps = worked_steps(nums, ops)
        if steps is not None:
            prompt = "".join(f"{n}{o}" for n, o in zip(nums, ops)) + f"{nums[-1]}="
            return Problem(prompt, write_chain(steps), str(steps[-1][3]))


def held_out_problems(seed: int, n_test: int, n_val: int) -> tuple[list[Problem], list[Problem]]:
    """Distinct test and validation problems; training never sees their prompts."""
    rng, seen, out = random.Random(f"held-out {seed}"), set(), []
    while len(out) < n_test + n_val:
        p = random_problem(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out[:n_test], out[n_test:]


def training_problems(rng: random.Random, held_out: set[str], k: int) -> list[Problem]:
    out = []
    while len(out) < k:
        p = random_problem(rng)
        if p.prompt not in held_out:
            out.append(p)
    return out


def corrupt(problem: Problem, rng: random.Random) -> str:
    """A wrong chain for the problem: one step's result (or operand, or the boxed answer) changed.

    Half the time the later steps are recomputed from the wrong value, so the chain is consistent
    after the mistake and only checking that one step reveals it; otherwise the error is left alone.
    """
    nums, ops = [int(c) for c in problem.prompt[:-1:2]], list(problem.prompt[1:-1:2])
    steps = worked_steps(nums, ops)
    kind = rng.random()
    if kind < 0.2:  # only the boxed answer is wrong
        text = write_chain(steps)
        return text[: text.rindex("{") + 1] + str(int(problem.answer) + rng.choice((-10, -2, -1, 1, 2, 10))) + "}"
    k = rng.randrange(len(steps))
    a, op, b, value = steps[k]
    if kind < 0.35:  # a wrong operand copied into the step, computed right from there
        if rng.random() < 0.5:
            a += rng.choice((-2, -1, 1, 2))
        else:
            b += rng.choice((-2, -1, 1, 2))
        value = a * b if op == "*" else a + b if op == "+" else a - b
    else:  # a wrong result
        value += rng.choice((-10, -3, -2, -1, 1, 2, 3, 10))
    if rng.random() < 0.5:  # later steps use the wrong value correctly
        return write_chain(worked_steps(nums, ops, replaced=(k, (a, op, b, value))))
    return write_chain(steps[:k] + [(a, op, b, value)] + steps[k + 1:])


# ----------------------------------------------------------------------------------------------
# Tokenizer and models

ROLES = ["user", "assistant"]  # one token each, so the chat template costs 9 tokens per example
CHARS = list("0123456789+-*= \\boxed{}\n")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The task's characters, and one token per chat role name."""
    return char_tokenizer(sorted(set(CHARS)), words=ROLES)


def model_config(tok, hidden: int, layers: int, **extra) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, attn_implementation="eager", **extra)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), fill)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


@torch.no_grad()
def sample(lm, tok, prompts: list[str], temperature: float, n: int = 1, max_new_tokens: int = 40,
           seed: int = 0) -> list[str]:
    """n responses per prompt, many prompts at once (grouped by prompt length, so nothing is padded).

    Seeded here, so that a run on cached models draws the same samples as the run that trained them.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _sample(lm, tok, prompts, temperature, n, max_new_tokens)


def _sample(lm, tok, prompts, temperature, n, max_new_tokens) -> list[str]:
    eos = set(lm.generation_config.eos_token_id)
    out, groups = [None] * (len(prompts) * n), {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for idx in groups.values():
        ids = torch.tensor([chat_prompt_ids(tok, prompts[i]) for i in idx])
        config = GenerationConfig(do_sample=temperature > 0, temperature=temperature or 1.0,
                                  top_p=0.95 if temperature else 1.0, top_k=0 if temperature else 50,
                                  num_return_sequences=n, max_new_tokens=max_new_tokens,
                                  eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)
        rows = lm.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[:, ids.shape[1]:]
        for r, row in enumerate(rows.tolist()):
            end = next((j for j, t in enumerate(row) if t in eos), len(row))
            out[idx[r // n] * n + r % n] = tok.decode(row[:end], skip_special_tokens=True)
    return out


def boxed(text: str) -> str | None:
    """The boxed integer, for grading during training (the evaluation uses eval_math's grader)."""
    start = text.rfind("\\boxed{")
    end = text.find("}", start)
    return text[start + 7:end] if start >= 0 and end > 0 else None


def greedy_accuracy(lm, tok, problems: list[Problem]) -> float:
    outs = sample(lm, tok, [p.prompt for p in problems], 0.0)
    return sum(boxed(o) == p.answer for o, p in zip(outs, problems)) / len(problems)


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainSettings:
    hidden: int = 128
    layers: int = 3
    policy_batch: int = 64
    policy_lr: float = 3e-3
    policy_max_steps: int = 1500
    check_every: int = 50            # validation greedy accuracy is measured this often ...
    target_accuracy: float = 0.45    # ... and training stops once it reaches this
    rm_prompts: int = 3000           # training prompts whose policy samples become reward-model negatives
    rm_samples: int = 4              # samples per prompt (temperature 0.6, as at test time)
    rm_extra_layers: int = 1         # fresh layers on top of the policy's (see new_reward_model)
    rm_batch: int = 32               # pairs per step
    rm_lr: float = 1e-3
    rm_steps: int = 600
    val_problems: int = 200


QUICK = TrainSettings(hidden=32, layers=1, policy_batch=16, policy_max_steps=6, check_every=3, rm_prompts=8,
                      rm_samples=2, rm_batch=8, rm_steps=4, val_problems=8)


def sft_batch(tok, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-template prompt + chain + end-of-sequence; the loss covers the response only."""
    rows, labels = [], []
    for p in problems:
        prompt, response = chat_prompt_ids(tok, p.prompt), ids_of(tok, p.chain) + [tok.eos_token_id]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    return padded(rows, tok.pad_token_id), padded(labels, -100)


def train_policy(tok, val: list[Problem], held_out: set[str], s: TrainSettings, seed: int) -> tuple:
    """Next-token training on fresh problems, stopped at the first check where greedy accuracy ≥ target."""
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(model_config(tok, s.hidden, s.layers))
    lm.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    lm.generation_config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(lm.parameters(), lr=s.policy_lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng, log, start = random.Random(f"policy {seed}"), [], time.perf_counter()
    for step in range(1, s.policy_max_steps + 1):
        for group in opt.param_groups:  # short warm-up, then a constant rate, so any stopping step is fine
            group["lr"] = s.policy_lr * min(1.0, step / 50)
        lm.train()
        ids, labels = sft_batch(tok, training_problems(rng, held_out, s.policy_batch))
        loss = lm(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % s.check_every == 0 or step == s.policy_max_steps:
            lm.eval()
            acc = greedy_accuracy(lm, tok, val)
            log.append(dict(step=step, loss=round(loss.item(), 4), val_greedy=acc))
            print(f"  policy step {step:4d}  loss {loss.item():.3f}  validation greedy accuracy {acc:.1%}"
                  f"  ({time.perf_counter() - start:.0f}s)", flush=True)
            if acc >= s.target_accuracy:
                break
    lm.eval()
    return lm, dict(steps=step, seconds=round(time.perf_counter() - start, 1), log=log)


def policy_negatives(lm, tok, problems: list[Problem], samples: int, seed: int) -> list[tuple]:
    """(prompt, gold chain, wrong sample) for every wrong answer among the policy's samples.

    The policy's own mistakes are what the reward model has to recognise at test time; they are sampled
    at temperature 0.6, the temperature of every draft at test time.
    """
    texts = sample(lm, tok, [p.prompt for p in problems], 0.6, n=samples, seed=seed)
    return [(p.prompt, p.chain, t) for i, p in enumerate(problems)
            for t in texts[i * samples:(i + 1) * samples] if boxed(t) != p.answer]


def rm_inputs(tok, prompt: str, response: str) -> list[int]:
    """The conversation as nabla.score shows it to the reward model (the same chat template)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return ids_of(tok, tok.apply_chat_template(messages, tokenize=False))


def rm_scores(rm, tok, pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the correct and the wrong chain of each (prompt, correct, wrong), in one padded batch."""
    rows = [rm_inputs(tok, p, good) for p, good, _ in pairs] + [rm_inputs(tok, p, bad) for p, _, bad in pairs]
    ids = padded(rows, tok.pad_token_id)
    rewards = rm(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
    return rewards[:len(pairs)], rewards[len(pairs):]


def new_reward_model(lm, tok, s: TrainSettings) -> Qwen2ForSequenceClassification:
    """The policy's layers plus s.rm_extra_layers fresh ones on top, with a fresh one-output head.

    Starting from the policy gives the reward model the policy's arithmetic. The fresh top layer is
    there because the reward is read at the last token: to notice a wrong digit, a position has to
    compare its token with what the previous position predicted, which the policy computes only in its
    last layer, and then pass the verdict on to the end. (In short trials it helped a little, a few
    points of held-out pairwise accuracy; the reward model stays the weak part of this miniature.)
    """
    rm = Qwen2ForSequenceClassification(model_config(tok, s.hidden, s.layers + s.rm_extra_layers, num_labels=1))
    backbone = {k: v for k, v in lm.model.state_dict().items() if not k.startswith("norm.")}
    rm.model.load_state_dict(backbone, strict=False)  # the new top layers and the final norm keep their init
    return rm


def train_reward_model(lm, tok, held_out: set[str], s: TrainSettings, seed: int) -> tuple:
    """Pairwise Bradley-Terry training, loss -log σ(r(correct) - r(wrong)), over a fixed set of pairs.

    The gold chain of a training prompt is paired with each of the policy's wrong samples for it and
    with two corrupted chains (one step, operand or answer changed), which add mistakes the policy
    happens not to make yet. (Fresh corruptions every batch instead of a fixed set were tried: worse.)
    """
    rng, start = random.Random(f"reward {seed}"), time.perf_counter()
    problems = training_problems(rng, held_out, s.rm_prompts)
    pairs = policy_negatives(lm, tok, problems, s.rm_samples, seed)
    from_policy = len(pairs)
    pairs += [(p.prompt, p.chain, corrupt(p, rng)) for p in problems for _ in range(2)]
    rng.shuffle(pairs)
    sampling_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    rm = new_reward_model(lm, tok, s)
    opt = torch.optim.AdamW(rm.parameters(), lr=s.rm_lr, weight_decay=0.01)
    losses = []
    for step in range(s.rm_steps):
        for group in opt.param_groups:  # short warm-up, cosine decay
            group["lr"] = s.rm_lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / s.rm_steps))
        rm.train()
        good, bad = rm_scores(rm, tok, [pairs[(step * s.rm_batch + j) % len(pairs)] for j in range(s.rm_batch)])
        loss = -torch.nn.functional.logsigmoid(good - bad).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == s.rm_steps:
            print(f"  reward step {step + 1:4d}  pairwise loss {statistics.mean(losses[-100:]):.3f}"
                  f"  ({time.perf_counter() - start:.0f}s)", flush=True)
    rm.eval()
    return rm, dict(pairs=len(pairs), from_policy_samples=from_policy,
                    epochs=round(s.rm_steps * s.rm_batch / len(pairs), 2), sampling_seconds=round(sampling_seconds, 1),
                    final_loss=round(statistics.mean(losses[-100:]), 4), seconds=round(time.perf_counter() - start, 1))


@torch.no_grad()
def pairwise_accuracy(rm, tok, lm, problems: list[Problem], seed: int, samples: int = 4) -> dict:
    """On held-out prompts: how often the reward model ranks a correct chain above a wrong one.

    Three kinds of pairs: gold vs the policy's own wrong samples; the policy's correct vs wrong samples
    of the same prompt (what best-of-N and the acceptance test have to get right); gold vs corrupted.
    """
    rng = random.Random(f"pairs {seed}")
    texts = sample(lm, tok, [p.prompt for p in problems], 0.6, n=samples, seed=seed + 1)
    policy, sample_pairs, synthetic = [], [], []
    for i, p in enumerate(problems):
        mine = texts[i * samples:(i + 1) * samples]
        right = [t for t in mine if boxed(t) == p.answer]
        wrong = [t for t in mine if boxed(t) != p.answer]
        policy += [(p.prompt, p.chain, w) for w in wrong]
        sample_pairs += [(p.prompt, r, w) for r in right for w in wrong]
        synthetic.append((p.prompt, p.chain, corrupt(p, rng)))

    def acc(pairs):
        if not pairs:
            return None
        good, bad = rm_scores(rm, tok, pairs)
        return round((good > bad).float().mean().item(), 4)
    return dict(gold_vs_policy_wrong=acc(policy), policy_right_vs_wrong=acc(sample_pairs),
                gold_vs_corrupted=acc(synthetic), pairs=dict(policy=len(policy), samples=len(sample_pairs),
                                                               corrupted=len(synthetic)))


def load_or_train(folder: Path, s: TrainSettings, seed: int, val: list[Problem], held_out: set[str],
                  retrain: bool) -> tuple:
    """The cached models when they were trained with these settings, otherwise train and save them."""
    meta_path = folder / "meta.json"
    wanted = dict(seed=seed, settings=asdict(s))
    if not retrain and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            # Not AutoTokenizer: in transformers 5 it reads model_type from config.json and builds a
            # Qwen2Tokenizer, whose byte-level pre-tokenizer drops this vocabulary's spaces and newlines.
            tok = PreTrainedTokenizerFast.from_pretrained(folder / "policy")
            lm = Qwen2ForCausalLM.from_pretrained(folder / "policy").eval()
            rm = Qwen2ForSequenceClassification.from_pretrained(folder / "reward").eval()
            print(f"loaded the models trained earlier from {folder}/ (--retrain trains them again)")
            return tok, lm, rm, meta, False
    tok = make_tokenizer()
    print(f"training the policy (seed {seed}) ...", flush=True)
    lm, policy_log = train_policy(tok, val, held_out, s, seed)
    print("training the reward model ...", flush=True)
    rm, reward_log = train_reward_model(lm, tok, held_out, s, seed)
    meta = dict(wanted, policy=policy_log, reward=reward_log)
    for model, name in ((lm, "policy"), (rm, "reward")):
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    meta_path.write_text(json.dumps(meta, indent=1))
    return tok, lm, rm, json.loads(meta_path.read_text()), True


# ----------------------------------------------------------------------------------------------
# What DTO does on these models


def without_dto(config: NablaConfig) -> NablaConfig:
    """∇-Reasoner without DTO: the redraw uses the LLM's own logits; token selection and rejection sampling stay."""
    return replace(config, dto_iters=0)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def dto_diagnostics(lm, rm, tok, problems: list[Problem], lrs: list[float], base: NablaConfig, seed: int) -> dict:
    """Gradient norms, and what DTO does to the token where a draft goes wrong, for several learning rates.

    One draft per problem at the rollout temperature, as ∇-Reasoner's first rollout. Over the whole
    draft: each token's top probability and ‖∂L/∂one-hot‖₂ (what token selection compares with its two
    thresholds). In a wrong draft, at its first mistake (the first character that differs from the
    gold chain, which an oracle knows and ∇-Reasoner does not): does the gradient prefer the right
    token, and after DTO does the redraw (temperature 0.5) pick the right token more often? In a correct
    draft, at its first uncertain token: does DTO push the redraw away from the (right) drafted token?
    """
    vocab_map = align_vocab(tok, tok, lm.get_input_embeddings().weight.shape[0])
    eos = set(lm.generation_config.eos_token_id)
    texts = sample(lm, tok, [p.prompt for p in problems], base.rollout_temperature, max_new_tokens=base.max_new_tokens,
                   seed=seed + 2)
    uncertain_norms, confident_norms, mistake_norms, cases = [], [], [], []
    n_tokens = n_uncertain = 0
    for p, text in zip(problems, texts):
        draft = ids_of(tok, text) + [tok.eos_token_id]
        prompt_ids, (rm_before, rm_after) = chat_prompt_ids(tok, p.prompt), reward_template(tok, p.prompt)
        step = ahead_loss_and_grads(lm, rm, vocab_map, Prefix(prompt_ids, rm_before, rm_after), draft, base, eos)
        top = step.logp.max(-1).values.exp()
        norms = onehot_grads(step, torch.arange(len(draft)), lm, rm, vocab_map, base).norm(dim=-1)
        unsure = top <= base.confidence_threshold
        n_tokens, n_uncertain = n_tokens + len(draft), n_uncertain + int(unsure.sum())
        uncertain_norms += norms[unsure].tolist()
        confident_norms += norms[~unsure].tolist()
        if text != p.chain:
            s = next((i for i, (a, b) in enumerate(zip(text, p.chain)) if a != b), None)
            if s is None:  # one is a prefix of the other: the mistake is where the shorter one ends
                s = min(len(text), len(p.chain))
            right = ids_of(tok, p.chain[s]) [0] if s < len(p.chain) else tok.eos_token_id
            mistake_norms.append(float(norms[s]))
            kind = "mistake"
        elif unsure.any():
            s = int(unsure.nonzero()[0])
            right, kind = draft[s], "correct"
        else:
            continue
        grad = onehot_grads(step, torch.tensor([s]), lm, rm, vocab_map, base)[0]
        case = dict(kind=kind, uncertain=bool(unsure[s]), norm=float(norms[s]),
                    prefers_right=bool(grad[right] < grad[draft[s]]) if right != draft[s] else None, lr={})
        if right != draft[s]:  # the reward itself, not its linearisation: swap the right token in, keep the rest
            swapped = tok.decode([t for t in draft[:s] + [right] + draft[s + 1:] if t not in eos])
            case["reward_prefers_swap"] = score(rm, tok, p.prompt, swapped) > score(rm, tok, p.prompt, text)
        prefix = Prefix(prompt_ids + draft[:s], rm_before + draft[:s], rm_after)  # same tokenizer: ids map 1:1
        local = ahead_loss_and_grads(lm, rm, vocab_map, prefix, draft[s:], base, eos)
        first = (draft[s], onehot_grads(local, torch.tensor([0]), lm, rm, vocab_map, base)[0])

        def full_grad(token: int, prefix=prefix, rest=draft[s + 1:]) -> torch.Tensor:
            again = ahead_loss_and_grads(lm, rm, vocab_map, prefix, [token] + rest, base, eos)
            return onehot_grads(again, torch.tensor([0]), lm, rm, vocab_map, base)[0]
        before = (local.logp[0] / base.resample_temperature).softmax(-1)[right].item()
        for lr in lrs:
            z, n_full, _ = dto(local.logp[0], full_grad, replace(base, lr=lr), first=first)
            after = (z / base.resample_temperature).softmax(-1)[right].item()
            case["lr"][lr] = dict(flipped=int(z.argmax()) != int(local.logp[0].argmax()),
                                  to_right=int(z.argmax()) == right != int(local.logp[0].argmax()),
                                  p_before=before, p_after=after, full_passes=n_full)
        cases.append(case)
    mistakes = [c for c in cases if c["kind"] == "mistake"]
    correct = [c for c in cases if c["kind"] == "correct"]
    by_lr = {}
    for lr in lrs:
        def mean(rows, key):
            return statistics.mean(r["lr"][lr][key] for r in rows) if rows else float("nan")
        gain_wrong = mean(mistakes, "p_after") - mean(mistakes, "p_before")
        gain_right = mean(correct, "p_after") - mean(correct, "p_before")
        by_lr[lr] = dict(
            flip_rate_at_mistakes=mean(mistakes, "flipped"), flips_to_right=mean(mistakes, "to_right"),
            p_right_at_mistakes=(mean(mistakes, "p_before"), mean(mistakes, "p_after")),
            flip_rate_on_correct=mean(correct, "flipped"),
            p_drafted_on_correct=(mean(correct, "p_before"), mean(correct, "p_after")),
            full_passes=mean(cases, "full_passes"),
            # the change in the chance that the redraw picks the right token, over all examined positions
            net_gain=(gain_wrong * len(mistakes) + gain_right * len(correct)) / max(len(cases), 1))
    prefers = [c["prefers_right"] for c in mistakes if c["prefers_right"] is not None]
    swaps = [c["reward_prefers_swap"] for c in mistakes if "reward_prefers_swap" in c]
    above = sum(x >= base.grad_norm_threshold for x in uncertain_norms) / max(len(uncertain_norms), 1)
    return dict(drafts=len(problems), tokens=n_tokens, uncertain_fraction=n_uncertain / max(n_tokens, 1),
                share_uncertain_above_paper_threshold=above,
                norm_uncertain=[_percentile(uncertain_norms, q) for q in (0.1, 0.5, 0.9, 1.0)],
                norm_confident=[_percentile(confident_norms, q) for q in (0.1, 0.5, 0.9, 1.0)],
                wrong_drafts=len(mistakes), mistake_uncertain=statistics.mean(c["uncertain"] for c in mistakes)
                if mistakes else float("nan"),
                norm_mistake=[_percentile(mistake_norms, q) for q in (0.1, 0.5, 0.9, 1.0)],
                gradient_prefers_right=statistics.mean(prefers) if prefers else float("nan"),
                reward_prefers_swap=statistics.mean(swaps) if swaps else float("nan"),
                correct_drafts_examined=len(correct), by_lr=by_lr)


def print_diagnostics(d: dict, base: NablaConfig) -> None:
    fmt = lambda q: "  ".join(f"{x:.3g}" for x in q)
    print(f"\nDTO on {d['drafts']} validation drafts (temperature {base.rollout_temperature}):")
    print(f"  tokens with top probability <= {base.confidence_threshold}: "
          f"{d['uncertain_fraction']:.1%} of {d['tokens']}")
    print(f"  ‖∂L/∂one-hot‖₂ percentiles 10/50/90/100:  uncertain tokens {fmt(d['norm_uncertain'])}"
          f"  | confident {fmt(d['norm_confident'])}  | first mistakes {fmt(d['norm_mistake'])}"
          f"   (paper's threshold: {base.grad_norm_threshold:g})")
    print(f"  wrong drafts: {d['wrong_drafts']}; first mistake at an uncertain token: {d['mistake_uncertain']:.0%};"
          f" there the gradient prefers the right token {d['gradient_prefers_right']:.0%} of the time;"
          f" the reward model scores the draft higher with the right token swapped in {d['reward_prefers_swap']:.0%}")
    print(f"  {'lr':>6}  {'argmax flips':>12}  {'to right':>8}  {'P(right) redraw':>16}  "
          f"{'flips on correct':>16}  {'P(drafted) on correct':>21}  {'full passes':>11}  {'net gain':>8}")
    for lr, r in d["by_lr"].items():
        a, b = r["p_right_at_mistakes"]
        c, e = r["p_drafted_on_correct"]
        print(f"  {lr:>6g}  {r['flip_rate_at_mistakes']:>12.0%}  {r['flips_to_right']:>8.0%}  {a:>7.3f} -> {b:<6.3f}  "
              f"{r['flip_rate_on_correct']:>16.0%}  {c:>10.3f} -> {e:<8.3f}  {r['full_passes']:>11.1f}  "
              f"{r['net_gain']:>+8.4f}")


def tuned_config(d: dict, base: NablaConfig) -> tuple[NablaConfig, str]:
    """Settings for these tiny models, chosen on validation drafts (never on the test problems)."""
    lr = max(d["by_lr"], key=lambda k: d["by_lr"][k]["net_gain"])
    if not d["by_lr"][lr]["net_gain"] > 0:  # (also when it is NaN: no position to judge by)
        lr = base.lr
    threshold = round(d["norm_uncertain"][1], 4)
    share = d["share_uncertain_above_paper_threshold"]
    reason = (f"grad_norm_threshold {threshold:g} = the median ‖∂L/∂one-hot‖₂ at uncertain tokens, so DTO looks "
              f"at the half of them the loss is most sensitive to (the paper's {base.grad_norm_threshold:g} passes "
              f"only {share:.0%} of them); ")
    if d["by_lr"][lr]["net_gain"] > 0:
        reason += f"lr {lr:g} = the rate whose DTO most raised the redraw's chance of the right token on validation drafts"
    else:
        reason += (f"lr kept at the paper's {base.lr:g}: no learning rate raised the redraw's chance of the right "
                   f"token on validation drafts")
    return replace(base, lr=lr, grad_norm_threshold=threshold), reason


# ----------------------------------------------------------------------------------------------
# Evaluation with eval_math's methods


def run_method(label: str, method: str, n: int, config: NablaConfig, problems: list[Problem], models, seed: int) -> dict:
    """One method on every problem through eval_math.solve; accuracy, model calls, rejection rate."""
    from eval_math import is_correct, problem_seed, solve

    start, rows = time.perf_counter(), []
    for i, p in enumerate(problems):
        r = solve(method, p.prompt, models, n=n, seed=problem_seed(seed, i), config=config)
        rows.append(dict(correct=is_correct(r["response"], p.answer), calls=r["model_calls"],
                         tokens=r["generated_tokens"], proposed=r["stats"].get("revisions_proposed", 0),
                         accepted=r["stats"].get("revisions_accepted", 0),
                         # self-consistency reports every sample's answer: is any of them right?
                         any_right=any(is_correct(f"\\boxed{{{a}}}", p.answer) for a in r["stats"].get("answers", [])
                                       if a)))
    proposed = sum(r["proposed"] for r in rows)
    result = dict(label=label, method=method, n=n, problems=len(rows),
                  accuracy=statistics.mean(r["correct"] for r in rows),
                  model_calls=statistics.mean(r["calls"] for r in rows),
                  generated_tokens=statistics.mean(r["tokens"] for r in rows),
                  revisions_proposed=proposed / len(rows),
                  rejection_rate=1 - sum(r["accepted"] for r in rows) / proposed if proposed else None,
                  pass_at_n=statistics.mean(r["any_right"] for r in rows) if method == "sc" else None,
                  seconds=round(time.perf_counter() - start, 1))
    print(f"  {label:<34} N={n}  accuracy {result['accuracy']:6.1%}  model calls {result['model_calls']:6.1f}"
          f"  ({result['seconds']:.0f}s)", flush=True)
    return result


def print_table(results: list[dict]) -> None:
    print(f"\n{'method':<36}{'N':>3}{'accuracy':>10}{'model calls':>13}{'proposed':>10}{'rejection rate':>16}{'seconds':>9}")
    for r in results:
        rejection = "-" if r["rejection_rate"] is None else f"{r['rejection_rate']:.1%}"
        proposed = "-" if r["method"] != "nabla" else f"{r['revisions_proposed']:.2f}"
        print(f"{r['label']:<36}{r['n']:>3}{r['accuracy']:>10.1%}{r['model_calls']:>13.1f}{proposed:>10}"
              f"{rejection:>16}{r['seconds']:>9.0f}")


def print_curve(curve: dict[str, list[dict]], path: Path | None) -> None:
    ns = sorted({r["n"] for rows in curve.values() for r in rows})
    print("\naccuracy (mean model calls) against N: N samples for sc and bon, max_rollouts = N for ∇-Reasoner")
    print(f"{'N':>3}" + "".join(f"{name:>24}" for name in curve))
    for n in ns:
        cells = []
        for rows in curve.values():
            r = next((r for r in rows if r["n"] == n), None)
            cells.append(f"{r['accuracy']:.1%} ({r['model_calls']:.0f})" if r else "-")
        print(f"{n:>3}" + "".join(f"{c:>24}" for c in cells))
    ceiling = "  ".join(f"N={r['n']}: {r['pass_at_n']:.1%}" for r in curve["self-consistency"])
    print(f"some sample right (pass@N; best-of-N with a perfect reward model would score this): {ceiling}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if path is not None:
        for name, rows in curve.items():
            plt.plot([r["model_calls"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=name)
        plt.xlabel("mean model calls per problem")
        plt.ylabel("accuracy (%)")
        plt.xscale("log")
        plt.legend()
        plt.savefig(path, dpi=120)
        print(f"curve plotted in {path}")


# ----------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny step counts and 4 problems: a smoke test")
    p.add_argument("--models", help="folder of the trained models (default toy_models/, --quick: a temporary one)")
    p.add_argument("--retrain", action="store_true", help="train the models again even if they are cached")
    p.add_argument("--problems", type=int, help="held-out test problems (default 200)")
    p.add_argument("--rm-steps", type=int, help="reward-model training steps (default 600; more: a better reward model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="results/toy_arith.json", help="everything measured, as JSON")
    args = p.parse_args(argv)
    # Two threads for training on the 2-core machine; --quick's models are so small that one is as fast,
    # and one thread does not slow to a crawl when other processes busy the cores (OpenMP spin-waits).
    torch.set_num_threads(1 if args.quick else min(2, torch.get_num_threads()))
    start = time.perf_counter()
    settings = QUICK if args.quick else TrainSettings()
    if args.rm_steps:
        settings = replace(settings, rm_steps=args.rm_steps)
    n_test = args.problems or (4 if args.quick else 200)
    ns, lrs, n_diag = ((1, 2), [0.01, 1.0], 2) if args.quick else ((1, 2, 4, 8), [0.01, 0.1, 0.3, 1.0, 3.0], 100)
    test, val = held_out_problems(args.seed, n_test, settings.val_problems)
    held_out = {q.prompt for q in test + val}
    scratch = tempfile.mkdtemp(prefix="toy_arith_") if args.quick and not args.models else None
    folder = Path(args.models or scratch or "toy_models")
    try:
        tok, lm, rm, meta, trained = load_or_train(folder, settings, args.seed, val, held_out, args.retrain)
        train_seconds = time.perf_counter() - start
        quality = pairwise_accuracy(rm, tok, lm, val, args.seed)
        print(f"policy: {meta['policy']['steps']} steps, validation greedy accuracy "
              f"{meta['policy']['log'][-1]['val_greedy']:.1%}; reward model pairwise accuracy on held-out pairs: "
              f"gold vs the policy's wrong samples {quality['gold_vs_policy_wrong']}, the policy's right vs wrong "
              f"samples {quality['policy_right_vs_wrong']}, gold vs corrupted {quality['gold_vs_corrupted']}")

        # The paper's settings but the length limit: chains here have at most 31 characters (the untrained
        # models of --quick babble until the limit, so there it is shorter).
        paper = NablaConfig(max_new_tokens=16 if args.quick else 48)
        diag = dto_diagnostics(lm, rm, tok, val[:n_diag], lrs, paper, args.seed)
        print_diagnostics(diag, paper)
        tuned, reason = tuned_config(diag, paper)
        print(f"tuned settings: {reason}")

        from eval_math import Models
        models = Models(lm, tok, rm, tok)
        print(f"\nevaluating on {len(test)} held-out problems (seed {args.seed}):", flush=True)
        go = lambda *a: run_method(*a, test, models, args.seed)
        top = ns[-1]
        curve = {"self-consistency": [], "best-of-N": [], "∇-Reasoner": []}
        greedy = go("greedy", "greedy", 1, paper)
        for n in ns:
            curve["self-consistency"].append(go("self-consistency", "sc", n, paper))
            curve["best-of-N"].append(go("best-of-N (reward model)", "bon", n, paper))
            curve["∇-Reasoner"].append(go("∇-Reasoner (tuned)", "nabla", n, tuned))
        table = [greedy, curve["self-consistency"][-1], curve["best-of-N"][-1], curve["∇-Reasoner"][-1],
                 go("∇-Reasoner without DTO (tuned)", "nabla", top, without_dto(tuned))]
        if tuned != paper:
            table += [go("∇-Reasoner (paper settings)", "nabla", top, paper),
                      go("∇-Reasoner without DTO (paper)", "nabla", top, without_dto(paper))]
        print_table(table)
        output = Path(args.output)
        print_curve(curve, None if args.quick else output.with_suffix(".png"))
        wall = time.perf_counter() - start
        print(f"\nwall time {wall:.0f}s (models {'trained' if trained else 'loaded'} in "
              f"{train_seconds:.0f}s); torch {torch.__version__}, {torch.get_num_threads()} threads")
        report = dict(seed=args.seed, problems=len(test), training=meta, reward_model_pairwise_accuracy=quality,
                      dto_diagnostics=diag, tuned=asdict(tuned), tuned_reason=reason, paper=asdict(paper),
                      table=table, curve=curve, wall_seconds=round(wall, 1), train_seconds=round(train_seconds, 1))
        if not args.quick:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=1, default=str))
            print(f"everything measured: {output}")
        return report
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
