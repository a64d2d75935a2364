"""The miniature's two models, trained from scratch on the task: the policy and a reward model that checks steps.

The policy is a character-level Qwen2ForCausalLM, trained on gold chains and stopped as soon as its
greedy accuracy on validation problems reaches a target, so that greedy decoding stays clearly
imperfect. The reward model, a Qwen2ForSequenceClassification started from the policy's layers, is
trained with process supervision: every token is labelled "is the chain still right so far?".
reward_quality measures it on held-out pairs; load_or_train loads both models from a folder when they
were trained there with the same settings, and otherwise trains and saves them.
"""
import copy
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from nabla import chat_prompt_ids, reward_ids, reward_template
from task import Problem, boxed, corrupt, greedy_accuracy, ids_of, make_tokenizer, sample, training_problems


@dataclass
class TrainSettings:
    hidden: int = 128
    layers: int = 3
    policy_batch: int = 64
    policy_lr: float = 3e-3
    policy_max_steps: int = 1500
    check_every: int = 50            # validation greedy accuracy is measured this often ...
    target_accuracy: float = 0.45    # ... and training stops once it reaches this
    rm_prompts: int = 3000           # training prompts whose policy samples the reward model reads
    rm_samples: int = 4              # samples per prompt (temperature 0.6, as at test time)
    rm_extra_layers: int = 2         # fresh layers on top of the policy's (see new_reward_model)
    rm_lm_weight: float = 1.0        # weight of the next-token loss on gold chains (see train_reward_model)
    rm_batch: int = 48               # chains per step: a third gold, a third corrupted, a third the policy's
    rm_lr: float = 2e-3
    rm_steps: int = 3000
    val_problems: int = 200


QUICK = TrainSettings(hidden=32, layers=1, policy_batch=16, policy_max_steps=6, check_every=3, rm_prompts=8,
                      rm_samples=2, rm_batch=8, rm_steps=4, val_problems=8)


def model_config(tok, hidden: int, layers: int, **extra) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, attn_implementation="eager", **extra)


def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), fill)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


# ----------------------------------------------------------------------------------------------
# The policy


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


# ----------------------------------------------------------------------------------------------
# The reward model


def policy_pool(lm, tok, problems: list[Problem], samples: int, seed: int) -> list[tuple[Problem, str]]:
    """(problem, sample) for `samples` policy samples per problem at temperature 0.6, right and wrong alike.

    The policy's own chains are what the reward model reads at test time, so they are a third of its
    training data; their mistakes are the hard negatives that synthetic corruptions miss.
    """
    texts = sample(lm, tok, [p.prompt for p in problems], 0.6, n=samples, seed=seed)
    return [(p, texts[i * samples + j]) for i, p in enumerate(problems) for j in range(samples)]


def step_labels(tok, response_ids: list[int], gold: str) -> list[float]:
    """Process supervision: per token, 1 while the response so far is a prefix of the gold chain.

    The chain is written in one canonical order, so "still a prefix of the gold chain" is exactly "no
    step has gone wrong yet": the label falls to 0 at the first wrong character and stays there.
    """
    labels, text = [], ""
    for t in response_ids:
        text += tok.decode([t])
        labels.append(float(gold.startswith(text) and (not labels or labels[-1] == 1.0)))
    return labels


def rm_example(tok, problem: Problem, response: str) -> tuple[list[int], list[float]]:
    """The conversation as nabla.score shows it to the reward model, and a label per token.

    Prompt tokens: -1 (no label). Response tokens: step_labels. The chat template's closing tokens:
    1 only for a complete, correct chain. The reward is read at the last of them, so it is trained to
    answer "is every step right and the chain finished?", and each earlier position to answer "is every
    step so far right?", a dense signal that makes the model check each step.
    """
    before, after = reward_template(tok, problem.prompt)
    response_ids = ids_of(tok, response)
    done = float(response == problem.chain)
    return (before + response_ids + after,
            [-1.0] * len(before) + step_labels(tok, response_ids, problem.chain) + [done] * len(after))


def rm_scores(rm, tok, pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the first and the second chain of each (prompt, chain, chain), in one padded batch."""
    rows = [reward_ids(tok, p, a) for p, a, _ in pairs] + [reward_ids(tok, p, b) for p, _, b in pairs]
    ids = padded(rows, tok.pad_token_id)
    rewards = rm(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
    return rewards[:len(pairs)], rewards[len(pairs):]


def new_reward_model(lm, tok, s: TrainSettings) -> Qwen2ForSequenceClassification:
    """The policy's layers plus s.rm_extra_layers fresh ones on top, with a fresh one-output head.

    Starting from the policy gives the reward model the policy's arithmetic; training then makes it
    better at arithmetic than the policy (it is trained far longer), which is what lets it catch the
    policy's mistakes. The fresh top layers give each position room to compare its token with what the
    previous position computed and to gather the verdicts of all earlier steps.
    """
    rm = Qwen2ForSequenceClassification(model_config(tok, s.hidden, s.layers + s.rm_extra_layers, num_labels=1))
    backbone = {k: v for k, v in lm.model.state_dict().items() if not k.startswith("norm.")}
    rm.model.load_state_dict(backbone, strict=False)  # the new top layers and the final norm keep their init
    return rm


def train_reward_model(lm, tok, held_out: set[str], s: TrainSettings, seed: int) -> tuple:
    """Process-supervised training: a logistic loss on every position's label (see rm_example).

    Each batch is a third gold chains and a third one-step corruptions of fresh problems (they cost
    nothing, so none is seen twice), and a third of the policy's own samples drawn beforehand. The
    loss averages the per-token losses of the response and, with equal weight, the final verdict.
    """
    rng, start = random.Random(f"reward {seed}"), time.perf_counter()
    pool = policy_pool(lm, tok, training_problems(rng, held_out, s.rm_prompts), s.rm_samples, seed)
    sampling_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    rm = new_reward_model(lm, tok, s)
    # The policy's next-token head, read off the reward model's copy of the policy's layers and trained on
    # gold chains alongside: it keeps improving the arithmetic that the layers above compare each token with.
    # Used in training only; it is not saved.
    head = torch.nn.Sequential(copy.deepcopy(lm.model.norm), copy.deepcopy(lm.lm_head))
    opt = torch.optim.AdamW([*rm.parameters(), *head.parameters()], lr=s.rm_lr, weight_decay=0.01)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    losses = []
    for step in range(s.rm_steps):
        for group in opt.param_groups:  # short warm-up, cosine decay
            group["lr"] = s.rm_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / s.rm_steps))
        k = s.rm_batch // 3
        fresh = training_problems(rng, held_out, 2 * k)
        batch = ([(p, p.chain) for p in fresh[:k]] + [(p, corrupt(p, rng)) for p in fresh[k:]]
                 + [rng.choice(pool) for _ in range(s.rm_batch - 2 * k)])
        rows, labels = zip(*(rm_example(tok, p, r) for p, r in batch))
        ids, labels = padded(rows, tok.pad_token_id), padded(labels, -1.0).float()
        ends = torch.tensor([len(r) - 1 for r in rows])
        rm.train()
        out = rm.model(input_ids=ids, attention_mask=(torch.arange(ids.shape[1]) < ends[:, None] + 1).long(),
                       output_hidden_states=True)
        logits = rm.score(out.last_hidden_state)[..., 0]
        gold_rows = ids[:k]
        targets = torch.where(labels[:k, 1:] >= 0, gold_rows[:, 1:], -100)
        next_token = head(out.hidden_states[s.layers][:k, :-1])
        steps = labels >= 0
        steps[torch.arange(len(rows)), ends] = False
        final = logits[torch.arange(len(rows)), ends]
        loss = bce(logits[steps], labels[steps]) + bce(final, labels[torch.arange(len(rows)), ends])
        if s.rm_lm_weight:
            loss = loss + s.rm_lm_weight * torch.nn.functional.cross_entropy(
                next_token.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == s.rm_steps:
            print(f"  reward step {step + 1:5d}  loss {statistics.mean(losses[-200:]):.3f}"
                  f"  ({time.perf_counter() - start:.0f}s)", flush=True)
    rm.eval()
    return rm, dict(policy_samples=len(pool), examples_seen=s.rm_steps * s.rm_batch,
                    sampling_seconds=round(sampling_seconds, 1), final_loss=round(statistics.mean(losses[-200:]), 4),
                    seconds=round(time.perf_counter() - start, 1))


# ----------------------------------------------------------------------------------------------
# How well it verifies, and the models saved and loaded


def ratio_se(num: list[float], den: list[float]) -> tuple[float, float]:
    """Σnum/Σden over problems, with the delta-method standard error (problems are the independent units)."""
    total = sum(den)
    if not total:
        return float("nan"), float("nan")
    r = sum(num) / total
    return r, math.sqrt(sum((a - r * b) ** 2 for a, b in zip(num, den))) / total


@torch.no_grad()
def reward_quality(rm, tok, lm, problems: list[Problem], seed: int, samples: int = 8) -> dict:
    """The reward model on held-out problems, the three numbers the method rests on.

    gold_vs_corrupted: the gold chain scored above a one-step corruption (3 per problem);
    right_vs_wrong: a right policy sample scored above a wrong one of the same problem (every such pair
    among `samples` samples at temperature 0.6; a tie counts half), with its standard error over problems
    (the pairs of a problem are not independent: they share its samples);
    top_is_right: among problems where some sample is right, how often the top-scored sample is.
    """
    rng = random.Random(f"pairs {seed}")
    corrupted = [(p.prompt, p.chain, corrupt(p, rng)) for p in problems for _ in range(3)]
    good, bad = rm_scores(rm, tok, corrupted)
    texts = sample(lm, tok, [p.prompt for p in problems], 0.6, n=samples, seed=seed + 1)
    rewards = rm_scores(rm, tok, [(p.prompt, t, t) for p, t in zip(
        [p for p in problems for _ in range(samples)], texts)])[0].view(len(problems), samples)
    wins, pairs, top, some = [], [], 0, 0  # wins and pairs per problem
    for i, p in enumerate(problems):
        right = torch.tensor([boxed(t) == p.answer for t in texts[i * samples:(i + 1) * samples]])
        r = rewards[i]
        if right.any():
            some += 1
            top += bool(right[r.argmax()])
        wins.append(sum((a > b).item() + 0.5 * (a == b).item() for a in r[right] for b in r[~right]))
        pairs.append(int(right.sum()) * int((~right).sum()))
    rate = lambda k, n: round(k / n, 4) if n else None
    return dict(gold_vs_corrupted=rate((good > bad).sum().item() + 0.5 * (good == bad).sum().item(), len(corrupted)),
                right_vs_wrong=rate(sum(wins), sum(pairs)), right_vs_wrong_se=round(ratio_se(wins, pairs)[1], 4),
                top_is_right=rate(top, some), pairs=dict(corrupted=len(corrupted), right_vs_wrong=sum(pairs),
                                                         problems_with_both=sum(n > 0 for n in pairs),
                                                         problems_with_a_right_sample=some))


def load_or_train(folder: Path, s: TrainSettings, seed: int, val: list[Problem], held_out: set[str],
                  retrain: bool) -> tuple:
    """The cached models when they were trained with these settings, otherwise train and save them."""
    meta_path = folder / "meta.json"
    wanted = dict(seed=seed, settings=asdict(s))
    if not retrain and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            if meta.get("held_out", 0) < len(held_out):  # the problems past those would be training problems
                raise SystemExit(f"{folder} holds models trained with {meta.get('held_out', 0)} problems held out, "
                                 f"fewer than the {len(held_out)} asked for; --retrain trains them again")
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
    meta = dict(wanted, held_out=len(held_out), policy=policy_log, reward=reward_log)
    for model, name in ((lm, "policy"), (rm, "reward")):
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    meta_path.write_text(json.dumps(meta, indent=1))
    return tok, lm, rm, json.loads(meta_path.read_text()), True
