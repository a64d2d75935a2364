"""The miniature's task: multi-step integer arithmetic with a short worked chain, and its data.

The prompt "3+4*2-5=" is answered "4*2=8 3+8=11 11-5=6 \\boxed{6}": 3 or 4 one-digit operands, +, - and
*, the usual precedence, one step per operation. Here are the problems (held-out ones for testing and
validation, fresh ones for training, one-step corruptions of their chains), the character-level
tokenizer both models share, sampling from the policy, and its greedy accuracy.
"""
import random
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from nabla import chat_prompt_ids, eos_token_ids
from tiny import char_tokenizer

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
# The tokenizer and sampling

ROLES = ["user", "assistant"]  # one token each, so the chat template costs 9 tokens per example
CHARS = list("0123456789+-*= \\boxed{}\n")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The task's characters, and one token per chat role name."""
    return char_tokenizer(sorted(set(CHARS)), words=ROLES)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


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
    eos = set(eos_token_ids(lm, tok))
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
