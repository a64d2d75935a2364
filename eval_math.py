"""Evaluate ∇-Reasoner and its baselines on MATH-500 (or AIME / AMC), one GPU or many.

    python eval_math.py                                     # ∇-Reasoner, the paper's models, MATH-500
    python eval_math.py --method greedy,sc,bon,nabla        # the paper's comparison table
    torchrun --nproc-per-node 8 eval_math.py --method greedy,sc,bon,nabla   # the same on 8 GPUs

Methods, all with the same length limit and the paper's sampling (temperature 0.6, top-p 0.95, top-k 20):
  greedy  one greedy answer
  sc      self-consistency: N samples, majority vote over answers that the grader judges equivalent
  bon     best-of-N: N samples, the one the reward model scores highest
  nabla   ∇-Reasoner (nabla.NablaReasoner with the paper's defaults, rollout budget N)

The file reads top to bottom:
  data         MATH-500 JSONL or {prompt, answer, id} JSON arrays; bad files are reported by line
  grading      extract_answer, is_correct and the self-consistency vote, on math-verify
  methods      Models, solve(): one problem with one method, with its model calls counted
  output       one JSON line per problem and method, appended as soon as it is done; resume; shards
  summary      accuracy, model calls, tokens, seconds and GPU memory per method
  command line main()

Bad input (a missing or malformed data file, an unknown method, a model that cannot be loaded,
a shard out of range, an output path that cannot be written) ends the run with a one-line message
and exit status 2. A problem that fails while running (e.g. CUDA out of memory) is recorded with its
error and the run goes on; re-running the same command retries it and skips everything already done.
Every record carries the settings it was made with; resuming or merging refuses to mix settings, and
a run that refuses leaves every file as it was.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from math_verify import parse, verify
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from nabla import NablaConfig, NablaReasoner, chat_prompt_ids, eos_token_ids, reward_head, reward_ids

METHODS = ("greedy", "sc", "bon", "nabla")
NEEDS_REWARD_MODEL = ("bon", "nabla")
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_REWARD_MODEL = "Skywork/Skywork-Reward-V2-Qwen3-8B"
MATH500_HUB = ("HuggingFaceH4/MATH-500", "test.jsonl")  # dataset repository, file

COUNTING_RULE = (
    "model calls = 1 per generated token of every sample or rollout (the prefill pass yields the first "
    "token and is not counted again) + 1 per reward-model scoring (bon: N; nabla: every draft it scores) "
    "+ for nabla 4 per gradient pass (LM forward, RM forward, LM backward, RM backward), the passes that "
    "select tokens included, as counted by NablaReasoner in stats['model_calls']. greedy and sc make no "
    "reward-model calls. Tokens of a sample are counted up to and including its end-of-sequence token."
)
FTE_RULE = (
    "forward-token-equivalents = 1 per token position a forward pass runs (each sample's prompt prefill, every "
    "generated token but the last, every token a reward model scores) + 3 per token position of a pass with "
    "a backward (nabla's gradient passes: a backward costs about two forwards). Policy and reward model count "
    "alike. Model calls hide that one gradient pass covers the whole ahead span; this count does not."
)
ACCURACY_RULE = "correct answers / problems; a problem that failed with an error counts as wrong"
PAPER_MATH500 = {  # Qwen2.5-7B-Instruct, Skywork-Reward-V2-Qwen3-8B, N = 8 (PAPER.md)
    "greedy": 71.2, "sc": 76.6, "bon": 77.8, "nabla": 80.4,
}


class InputError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Problem:
    index: int    # position in the data file: seeds and shards depend on it, not on the run's options
    id: str       # MATH `unique_id` or the array's `id`: the key that resuming goes by
    problem: str
    answer: str


def load_problems(path: Path) -> list[Problem]:
    """Read MATH-500 JSON Lines (`problem`, `answer`, `unique_id`) or a JSON array of `{prompt, answer, id}`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read data file {path}: {first_line(e)}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
        located = [(row, f"{path} entry {i}") for i, row in enumerate(rows)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((json.loads(line), f"{path} line {lineno}"))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: malformed JSON ({e.msg})") from None
    problems, seen = [], set()
    for index, (row, where) in enumerate(located):
        problem = _to_problem(row, index, where)
        if problem.id in seen:
            raise InputError(f"{where}: id {problem.id!r} appears twice (results are matched to problems by id)")
        seen.add(problem.id)
        problems.append(problem)
    if not problems:
        raise InputError(f"{path}: no problems in the file")
    return problems


def _to_problem(row, index: int, where: str) -> Problem:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = row.get("problem", row.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: no 'problem' (or 'prompt') text")
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"{where}: no 'answer'")
    problem_id = row.get("unique_id", row.get("id", index))
    return Problem(index, str(problem_id), text, answer)


def math500_from_hub() -> Path:
    """MATH-500 from the Hugging Face hub (or its local cache)."""
    from huggingface_hub import hf_hub_download

    repo, filename = MATH500_HUB
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as e:  # offline, hub down, no such file: all mean "give me the file yourself"
        raise InputError(f"cannot get {repo}/{filename} from the Hugging Face hub ({first_line(e)}); "
                         f"download it once while online or pass a local file with --data PATH") from None


def build_prompt(problem: str, suffix: str) -> str:
    """The problem as is (as the authors did), or followed by an instruction on a new line."""
    return f"{problem}\n{suffix}" if suffix else problem


# ----------------------------------------------------------------------------------------------
# Grading with math-verify. It times itself out with signals, so every call stays in the main thread.


def _parse_gold(gold: str) -> list:
    # Without the $...$ math-verify looks for an answer inside the gold string and may read only part of it.
    return parse(f"${gold}$")


def _answer_string(parsed: list) -> str | None:
    """The answer as written in the text (math-verify gives the parsed value, then the matched string)."""
    for item in parsed:
        if isinstance(item, str):
            return item
    return str(parsed[0]) if parsed else None


def _normalise(answer: str) -> str:
    """A plain-string form of an answer, for the cases math-verify cannot parse (text answers, odd LaTeX)."""
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", answer)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\\left|\\right|\\[,;:! ]|\$|\s", "", s)
    return s.rstrip(".").lower()


def _equivalent(reference: list, candidate: list) -> bool:
    """math-verify's judgement (the reference plays the gold), else equal normalised strings."""
    if not reference or not candidate:
        return False
    if verify(reference, candidate):
        return True
    return _normalise(_answer_string(reference)) == _normalise(_answer_string(candidate))


def extract_answer(text: str) -> str | None:
    """The final answer of a response, as written; None if it has none.

    math-verify's reading: the \\boxed{} answer (several boxed answers are read together, as when a model
    boxes each root), else a "final answer is" expression, else the last expression in math mode.
    """
    return _answer_string(parse(text))


def is_correct(text: str, gold: str) -> bool:
    """Whether the response's final answer equals the gold answer (math-verify, then a string fallback)."""
    return _equivalent(_parse_gold(gold), parse(text))


def _vote(parsed: list[list]) -> tuple[int, list[list[int]]]:
    """Self-consistency over parsed answers: (the sample to return, the groups of equivalent samples).

    Samples without an answer do not vote. The largest group wins; among equal groups the one whose
    first sample came first (groups are made in sample order and max() keeps the first maximum).
    With no answer at all, the first sample is returned.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(parsed):
        if not answer:
            continue
        for group in groups:
            if _equivalent(parsed[group[0]], answer):
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return 0, []
    return max(groups, key=len)[0], groups


def vote(texts: list[str]) -> tuple[int, list[list[int]]]:
    """Majority vote over the answers of `texts`: (index of the returned sample, groups of sample indices)."""
    return _vote([parse(t) for t in texts])


# ----------------------------------------------------------------------------------------------
# Methods


@dataclass
class Models:
    lm: object                   # causal LM (the policy)
    lm_tokenizer: object
    rm: object = None            # sequence-classification reward model with one output; bon and nabla need it
    rm_tokenizer: object = None


@dataclass
class Sample:
    text: str           # the response, special tokens dropped: what is graded
    tokens: int         # generated tokens, end-of-sequence included: one forward pass each
    prompt_tokens: int  # the prefill this sample cost
    scored_text: str    # the response with any special tokens it wrote: what the reward model reads, as in nabla


def _pad_id(tokenizer, eos: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]


def sample_batch(models: Models, prompts: list[str], n: int, seed: int, config: NablaConfig,
                 greedy: bool = False) -> list[list[Sample]]:
    """N responses to each prompt from one `generate` call (num_return_sequences=N), seeded locally.

    Several prompts are left-padded into one batch; greedy answers are the same as one at a time.
    """
    lm, tokenizer = models.lm, models.lm_tokenizer
    eos = eos_token_ids(lm)
    pad = _pad_id(tokenizer, eos)
    if greedy or config.rollout_temperature <= 0:
        # The global defaults, which greedy decoding ignores: left unset, the model's own sampling
        # defaults would be filled in and trigger "flag ignored" warnings.
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    else:
        # Every knob explicit: unset fields are filled from the model's generation_config (e.g. Qwen's
        # repetition_penalty=1.05), which would silently change the sampling.
        sampling = dict(do_sample=True, temperature=config.rollout_temperature, top_p=config.rollout_top_p,
                        top_k=config.rollout_top_k)
    generation = GenerationConfig(**sampling, repetition_penalty=1.0, num_return_sequences=n,
                                  max_new_tokens=config.max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                                  cache_implementation="static" if config.fast_rollout else None)
    rows = [chat_prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # leave the caller's random state alone
        torch.manual_seed(seed)
        out = lm.generate(ids, attention_mask=mask, generation_config=generation)
    eos_set, samples = set(eos), []
    for i, row in enumerate(out[:, width:].tolist()):
        # Shorter samples are padded to the longest; a sample ends at its first end-of-sequence token.
        length = next((k + 1 for k, t in enumerate(row) if t in eos_set), len(row))
        response = [t for t in row[:length] if t not in eos_set]
        samples.append(Sample(tokenizer.decode(response, skip_special_tokens=True), length, len(rows[i // n]),
                              tokenizer.decode(response)))
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


def sample_responses(models: Models, prompt: str, n: int, seed: int, config: NablaConfig,
                     greedy: bool = False) -> list[Sample]:
    """N responses to one prompt."""
    return sample_batch(models, [prompt], n, seed, config, greedy)[0]


@torch.no_grad()
def score_batch(models: Models, pairs: list[tuple[str, str]], batch: int = 16) -> tuple[list[float], list[int]]:
    """r(x, y) for (prompt, response) pairs, `batch` at a time, as nabla.score reads it (the last token, an
    fp32 head); right padding leaves the real tokens' states as they are. Returns the rewards and how many
    tokens the reward model ran for each."""
    rm, tokenizer = models.rm, models.rm_tokenizer
    rows = [reward_ids(tokenizer, prompt, response) for prompt, response in pairs]
    # Any id of the reward model's own vocabulary will do: padded positions are masked and never read.
    pad = next((p for p in (tokenizer.pad_token_id, rm.config.pad_token_id) if p is not None), 0)
    rewards = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=rm.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=rm.device)
        hidden = rm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(chunk), device=rm.device), mask.sum(-1) - 1]
        rewards += reward_head(rm, last).tolist()
    return rewards, [len(r) for r in rows]


_reasoner_cache: list = []  # [(lm, rm, config, reasoner)]: building one aligns two vocabularies, so reuse it


def get_reasoner(models: Models, config: NablaConfig) -> NablaReasoner:
    if _reasoner_cache:
        lm, rm, cached_config, reasoner = _reasoner_cache[0]
        if lm is models.lm and rm is models.rm and cached_config == config:
            return reasoner
    reasoner = NablaReasoner(models.lm, models.lm_tokenizer, models.rm, models.rm_tokenizer, config)
    _reasoner_cache[:] = [(models.lm, models.rm, dataclasses.replace(config), reasoner)]
    return reasoner


def solve(method: str, prompt: str, models: Models, n: int = 8, seed: int = 0,
          config: NablaConfig | None = None) -> dict:
    """Answer one prompt with one method.

    n: samples for sc and bon, rollout budget (max_rollouts) for nabla; greedy ignores it.
    config: max_new_tokens and the sampling settings for every method, all of ∇-Reasoner's settings.
    Returns {"response", "model_calls", "forward_token_equivalents", "generated_tokens", "wall_time_s",
    "stats"}; for sc the response is the first sample whose answer won the vote.
    """
    return solve_batch(method, [prompt], models, n, seed, config)[0]


def solve_batch(method: str, prompts: list[str], models: Models, n: int = 8, seed: int = 0,
                config: NablaConfig | None = None) -> list[dict]:
    """solve() for several prompts. greedy, sc and bon sample them in one batch seeded with `seed` (so sc and
    bon draw differently than one at a time; greedy does not); ∇-Reasoner runs them one after another."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if method == "bon" and models.rm is None:
        raise ValueError("best-of-N needs a reward model")
    config = config or NablaConfig()
    if method in ("sc", "bon") and config.rollout_temperature <= 0 and n > 1:
        raise ValueError(f"{method} with n > 1 needs sampling (rollout_temperature > 0): greedy samples are all alike")
    start = time.perf_counter()
    if method == "nabla":
        reasoner = get_reasoner(models, dataclasses.replace(config, max_rollouts=n))
        results = []
        for prompt in prompts:
            out = reasoner.generate(prompt, seed=seed)
            st = out.stats
            results.append({"response": out.text, "model_calls": st["model_calls"],
                            "forward_token_equivalents": st["forward_token_equivalents"],
                            "generated_tokens": st["generated_tokens"], "wall_time_s": st["wall_time_s"], "stats": st})
        return results
    batches = sample_batch(models, prompts, 1 if method == "greedy" else n, seed, config, greedy=method == "greedy")
    if method == "bon":
        pairs = [(prompt, s.scored_text) for prompt, samples in zip(prompts, batches) for s in samples]
        rewards, rm_tokens = score_batch(models, pairs)
    results = []
    for i, (prompt, samples) in enumerate(zip(prompts, batches)):
        tokens = calls = sum(s.tokens for s in samples)
        fte = sum(s.prompt_tokens + max(s.tokens - 1, 0) for s in samples)
        stats, chosen = {"sample_tokens": [s.tokens for s in samples]}, 0
        if method == "sc":
            parsed = [parse(s.text) for s in samples]
            chosen, groups = _vote(parsed)
            stats.update(answers=[_answer_string(p) for p in parsed], groups=groups)
        elif method == "bon":
            mine = rewards[i * n:(i + 1) * n]
            calls += len(mine)
            fte += sum(rm_tokens[i * n:(i + 1) * n])
            chosen = max(range(len(mine)), key=mine.__getitem__)  # the first of equal rewards
            stats.update(rewards=mine)
        stats["chosen"] = chosen
        results.append({"response": samples[chosen].text, "model_calls": calls, "forward_token_equivalents": fte,
                        "generated_tokens": tokens, "stats": stats})
    for r in results:  # one batch: its time is shared out evenly
        r["wall_time_s"] = (time.perf_counter() - start) / len(results)
    return results


def problem_seed(base_seed: int, index: int) -> int:
    """A seed per problem from --seed and the problem's place in the file: the same whatever the sharding."""
    digest = hashlib.sha256(f"{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ----------------------------------------------------------------------------------------------
# Loading models


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # torchrun and accelerate launch start one process per GPU and say which in LOCAL_RANK.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _load(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        hint = "hf download REPO --local-dir PATH"
        if Path(name).is_dir():
            where = f"the folder does not hold a loadable model ({first_line(e)})"
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            where = "there is no such local folder"
        else:
            where = (f"it is not in the local Hugging Face cache and could not be fetched from the hub "
                     f"(offline, no network, or no such repository: {first_line(e)})")
            hint = f"hf download {name}"
        raise InputError(f"cannot load model {name!r}: {where}; it must be downloaded first ({hint}) "
                         f"or given as a local path") from None


def _load_model(loader, name: str, device: torch.device, dtype: torch.dtype):
    """A model in `dtype`, in eval mode, without weight gradients, on `device`. With the accelerate package
    installed, the weights go straight to the GPU; without it they pass through host memory first."""
    try:
        import accelerate  # noqa: F401  (transformers needs it for device_map)
    except ImportError:
        return _load(loader, name, dtype=dtype).to(device).eval().requires_grad_(False)
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    return _load(loader, name, dtype=dtype, **placement).to(device).eval().requires_grad_(False)


def load_models(model: str, reward_model: str | None, device: torch.device, dtype: torch.dtype) -> Models:
    """Policy and (if asked for) reward model, in eval mode, without weight gradients, on `device`."""
    tqdm.write(f"loading {model}" + (f" and {reward_model}" if reward_model else "") + f" on {device} ({dtype})",
               file=sys.stderr)
    lm_tokenizer = _load(AutoTokenizer, model)
    _check_chat_template(lm_tokenizer, model)
    lm = _load_model(AutoModelForCausalLM, model, device, dtype)
    rm = rm_tokenizer = None
    if reward_model:
        rm_tokenizer = _load(AutoTokenizer, reward_model)
        _check_chat_template(rm_tokenizer, reward_model)
        rm = _load_model(AutoModelForSequenceClassification, reward_model, device, dtype)
        if rm.config.num_labels != 1:
            raise InputError(f"reward model {reward_model!r} has {rm.config.num_labels} outputs; it needs one score")
    return Models(lm, lm_tokenizer, rm, rm_tokenizer)


def _check_chat_template(tokenizer, name: str) -> None:
    try:
        chat_prompt_ids(tokenizer, "1 + 1")
    except ValueError as e:
        raise InputError(f"model {name!r}: {first_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# Output: one JSON line per problem and method, resumable, one file per shard


def shard_path(output: Path, shard: int, shards: int) -> Path:
    """results/math500.jsonl, or results/math500.rank3.jsonl for shard 3 of several."""
    return output if shards == 1 else output.with_name(f"{output.stem}.rank{shard}{output.suffix}")


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def read_records(path: Path) -> tuple[list[dict], bool]:
    """The records of an output file, and whether the file ends cleanly with a newline.

    A kill while a record was being written leaves an unterminated last line: if it is cut off, that
    record is dropped (it is done again). Any other unreadable line is an error.
    """
    if not path.exists():
        return [], True
    text = path.read_text(encoding="utf-8")
    lines, clean = text.split("\n"), text == "" or text.endswith("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record or "method" not in record:
                raise ValueError("not a result record")
        except ValueError:
            if lineno == len(lines) and not clean:
                continue
            raise InputError(f"{path} line {lineno}: not a result record of this script; "
                             f"move the file away or pick another --output") from None
        records.append(record)
    return records, clean


def best_records(records: list[dict]) -> dict[tuple[str, str], dict]:
    """One record per (id, method): a later one replaces an earlier one, but an error never replaces a result."""
    best: dict[tuple[str, str], dict] = {}
    for record in records:
        key = (record["id"], record["method"])
        old = best.get(key)
        if old is None or record.get("error") is None or old.get("error") is not None:
            best[key] = record
    return best


def write_atomically(path: Path, text: str) -> None:
    """Write a whole file so that a reader or a kill never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _to_json(record: dict) -> str:
    # Stats may hold tensors or numpy numbers: store their values rather than fail after the work is done.
    def plain(value):
        return value.tolist() if hasattr(value, "tolist") else str(value)

    return json.dumps(record, ensure_ascii=False, default=plain)


def _jsonl(records) -> str:
    return "".join(_to_json(r) + "\n" for r in records)


def finished_records(path: Path) -> tuple[dict[tuple[str, str], dict], bool]:
    """The finished results in `path`, keyed by (id, method), and whether the file needs tidying (records
    of failed problems, to be retried, or a line cut off by a kill). Reading never changes the file."""
    records, clean = read_records(path)
    finished = {k: r for k, r in best_records(records).items() if r.get("error") is None}
    return finished, not clean or len(finished) != len(records)


def tidy_for_resume(path: Path, finished: dict) -> None:
    """Keep only the finished results, so appending keeps the file clean. Called once the run is known
    to be the same run: a run that refuses leaves the file as it found it."""
    write_atomically(path, _jsonl(finished.values()))


def append_record(handle, record: dict) -> None:
    handle.write(_to_json(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())  # a record that was reported done survives a crash or a power cut


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(records: list[dict], config: dict) -> dict:
    config = {**config, "problems": len({r["id"] for r in records})}
    methods = {}
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        ok = [r for r in rows if r.get("error") is None]
        peaks = [r["peak_gpu_memory_gib"] for r in rows if r.get("peak_gpu_memory_gib") is not None]
        methods[method] = {
            "problems": len(rows),
            "correct": sum(bool(r.get("correct")) for r in rows),
            "accuracy_pct": round(100 * sum(bool(r.get("correct")) for r in rows) / len(rows), 2),
            "errors": len(rows) - len(ok),
            "mean_model_calls": _mean(r["model_calls"] for r in ok),
            "mean_forward_token_equivalents": _mean(r["forward_token_equivalents"] for r in ok),
            "mean_generated_tokens": _mean(r["generated_tokens"] for r in ok),
            "mean_grad_passes": _mean((r["stats"] or {}).get("grad_steps", 0) for r in ok),
            "mean_reward_scores": _mean(_reward_scores(r) for r in ok),
            "mean_seconds": _mean(r["wall_time_s"] for r in ok),
            "peak_gpu_memory_gib": round(max(peaks), 2) if peaks else None,
        }
    return {"methods": methods, "accuracy_rule": ACCURACY_RULE, "counting_rule": COUNTING_RULE, "fte_rule": FTE_RULE,
            "paper_math500_qwen2.5_7b_instruct_pct": PAPER_MATH500, "config": config}


def _reward_scores(record: dict) -> int:
    """How many drafts the reward model scored: bon's samples, or nabla's first draft and proposals."""
    stats = record["stats"] or {}
    return len(stats.get("rewards", [])) if record["method"] == "bon" else stats.get("rollouts", 0)


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 3) if values else None


def format_table(summary: dict) -> str:
    header = f"{'method':<8}{'problems':>9}{'accuracy':>10}{'errors':>8}{'model calls':>13}" \
             f"{'fwd-tok-eq':>12}{'tokens':>10}{'seconds':>10}{'peak GPU GiB':>14}"
    lines = [header]
    for method, row in summary["methods"].items():
        cells = [_cell(row["mean_model_calls"], ".1f"), _cell(row["mean_forward_token_equivalents"], ".0f"),
                 _cell(row["mean_generated_tokens"], ".1f"), _cell(row["mean_seconds"], ".2f"),
                 _cell(row["peak_gpu_memory_gib"], ".2f")]
        lines.append(f"{method:<8}{row['problems']:>9}{row['accuracy_pct']:>9.1f}%{row['errors']:>8}"
                     f"{cells[0]:>13}{cells[1]:>12}{cells[2]:>10}{cells[3]:>10}{cells[4]:>14}")
    return "\n".join(lines)


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_summary(output: Path, records: list[dict], config: dict) -> dict:
    summary = summarize(records, config)
    write_atomically(summary_path(output), json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"results: {output}   summary: {summary_path(output)}")
    return summary


def _method_order(record: dict) -> tuple:
    return record.get("index", 0), METHODS.index(record["method"]) if record["method"] in METHODS else 99


def first_difference(old: dict, new: dict) -> str | None:
    """The first field, in sorted order, whose value differs between two records' settings."""
    return next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), None)


def check_same_settings(sources: list[tuple[Path, list[dict]]]) -> None:
    """Records of one method must all come from the same settings, whichever file holds them."""
    seen: dict[str, tuple[dict, Path]] = {}
    for path, records in sources:
        for record in records:
            settings = record.get("settings") or {}
            first = seen.setdefault(record["method"], (settings, path))
            field = first_difference(first[0], settings)
            if field is not None:
                raise InputError(f"{path} and {first[1]} hold {record['method']} results of different runs ({field}: "
                                 f"{settings.get(field)!r} vs {first[0].get(field)!r}); nothing was merged")


def merge(output: Path, rank_files: list[Path], config: dict | None = None, keys: set | None = None) -> dict:
    """Combine the shards' files (and what `output` already holds) into `output` and its summary.
    Refuses, changing nothing, when the files hold results of different settings. With `keys`, the
    summary covers those (id, method) results only; the file keeps every result."""
    sources = [(p, read_records(p)[0]) for p in [output, *rank_files]]
    check_same_settings(sources)
    combined = sorted(best_records([r for _, records in sources for r in records]).values(), key=_method_order)
    write_atomically(output, _jsonl(combined))
    if config is None:  # --merge: the run's settings come from a shard's summary, when there is one
        summaries = [summary_path(p) for p in rank_files if summary_path(p).exists()]
        config = json.loads(summaries[0].read_text())["config"] if summaries else {}
    config = {**config, "shard": None, "merged_from": [str(p) for p in rank_files]}
    if keys is not None:
        combined = [r for r in combined if (r["id"], r["method"]) in keys]
    return write_summary(output, combined, config)


def merge_dir(directory: Path, output_name: str) -> int:
    """`--merge DIR`: DIR/<stem>.rank*.jsonl into DIR/<stem>.jsonl and DIR/<stem>.jsonl.summary.json."""
    if not directory.is_dir():
        raise InputError(f"--merge {directory}: no such folder")
    output = directory / output_name
    pattern = re.compile(re.escape(output.stem) + r"\.rank(\d+)" + re.escape(output.suffix))
    ranked = [(int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))]
    rank_files = [p for _, p in sorted(ranked)]
    if not rank_files:
        raise InputError(f"--merge {directory}: no {output.stem}.rank*{output.suffix} files there")
    merge(output, rank_files)
    return 0


# ----------------------------------------------------------------------------------------------
# The run


def parse_methods(text: str) -> list[str]:
    methods = []
    for name in (m.strip() for m in text.split(",")):
        if name not in METHODS:
            raise InputError(f"unknown method {name!r}: choose from {', '.join(METHODS)} (comma-separated)")
        if name not in methods:
            methods.append(name)
    return methods


def resolve_shard(text: str | None, env) -> tuple[int, int]:
    """--shard I/N (0 <= I < N), else RANK/WORLD_SIZE as torchrun and accelerate launch set them, else 0/1."""
    if text is None:
        if "WORLD_SIZE" not in env:
            return 0, 1
        text, source = f"{env.get('RANK', '0')}/{env['WORLD_SIZE']}", "RANK/WORLD_SIZE"
    else:
        source = "--shard"
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"{source} {text!r}: expected I/N, e.g. 0/8")
    shard, shards = int(match.group(1)), int(match.group(2))
    if shards < 1 or not 0 <= shard < shards:
        raise InputError(f"{source} {text}: out of range, I must be in 0..N-1 and N at least 1")
    return shard, shards


def run_batch(problems: list[Problem], method: str, models: Models, args, config: NablaConfig,
              settings: dict) -> list[dict]:
    """Problems solved with one method, as result records. A failure becomes each record's error."""
    records = [{"id": p.id, "index": p.index, "method": method, **run_fields(p, args), "settings": settings,
                "response": None, "prediction": None, "answer": p.answer, "correct": False, "model_calls": None,
                "forward_token_equivalents": None, "generated_tokens": None, "wall_time_s": None,
                "peak_gpu_memory_gib": None, "stats": None, "error": None} for p in problems]
    device = models.lm.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        results = solve_batch(method, [r["prompt"] for r in records], models, n=args.n, seed=records[0]["seed"],
                              config=config)
        if len(records) > 1:  # the batch was drawn as one: say with which seed and beside which problems
            for record in records:
                record["batch"] = {"seed": records[0]["seed"], "ids": [r["id"] for r in records]}
    except Exception as e:  # e.g. CUDA out of memory on one long problem: record it, go on with the rest
        for record in records:
            record.update(error=f"{type(e).__name__}: {first_line(e)}",
                          wall_time_s=(time.perf_counter() - start) / len(records))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        for record, result, problem in zip(records, results, problems):
            record.update(response=result["response"], prediction=extract_answer(result["response"]),
                          correct=is_correct(result["response"], problem.answer),
                          **{k: result[k] for k in ("model_calls", "forward_token_equivalents", "generated_tokens",
                                                    "wall_time_s", "stats")})
    if device.type == "cuda":
        for record in records:
            record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return records


def run_fields(problem: Problem, args) -> dict:
    """What a result depends on from its problem: the prompt and the problem's seed."""
    return {"prompt": build_prompt(problem.problem, args.prompt_suffix), "seed": problem_seed(args.seed, problem.index)}


def method_settings(method: str, args, config: NablaConfig, dtype: torch.dtype, device: torch.device,
                    data_hash: str) -> dict:
    """Everything else a result of this method depends on. Resuming and merging compare it field by field."""
    settings = {"data_sha256": data_hash, "model": args.model, "max_new_tokens": args.max_new_tokens,
                "base_seed": args.seed, "prompt_suffix": args.prompt_suffix,
                "dtype": str(dtype).removeprefix("torch."), "device": device_kind(device)}
    if method != "greedy":
        settings.update(n=args.n, temperature=config.rollout_temperature, top_p=config.rollout_top_p,
                        top_k=config.rollout_top_k)
    if method in NEEDS_REWARD_MODEL:
        settings["reward_model"] = args.reward_model
    if method == "nabla":
        nabla = dataclasses.asdict(dataclasses.replace(config, max_rollouts=args.n))
        settings.update({f"nabla.{k}": v for k, v in nabla.items()})
    else:  # a batch is padded and (for sc and bon) seeded as one
        settings.update(batch_size=args.batch_size, compile=args.compile)
    return settings


def device_kind(device: torch.device) -> str:
    """cpu, or cuda and the GPU's name: shards on GPUs 0..7 of one machine are the same kind."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def check_same_run(done: dict, expected: dict, path: Path) -> None:
    """Resuming must not mix runs: a finished record has to come from the same settings as this run."""
    for key, record in done.items():
        if key not in expected:
            continue
        want = expected[key]
        old = {"prompt": record.get("prompt"), "seed": record.get("seed"), **(record.get("settings") or {})}
        new = {"prompt": want["prompt"], "seed": want["seed"], **want["settings"]}
        field = first_difference(old, new)
        if field is not None:
            raise InputError(f"{path} holds results of another run ({field}: {old.get(field)!r} in the file, "
                             f"{new.get(field)!r} now, for {key[0]} {key[1]}); pick another --output or use the "
                             f"same options")


def prepare_output(output: Path) -> None:
    """The output's folder, created if needed: a one-line error if that cannot be."""
    if output.is_dir():
        raise InputError(f"--output {output}: is a folder; give a file name, e.g. {output / 'math500.jsonl'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--output {output}: cannot create the folder {output.parent} ({first_line(e)})") from None
    if not os.access(output.parent, os.W_OK):
        raise InputError(f"--output {output}: the folder {output.parent} is not writable")


def evaluate(args) -> int:
    methods = parse_methods(args.method)
    shard, shards = resolve_shard(args.shard, os.environ)
    for option in ("n", "limit", "max_new_tokens", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be at least 1, not {value}")
    if args.grad_norm_threshold < 0:
        raise InputError(f"--grad-norm-threshold must not be negative, not {args.grad_norm_threshold}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be 0 (none) or more, not {args.top_k}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    data = Path(args.data) if args.data else math500_from_hub()
    problems = load_problems(data)[: args.limit]
    data_hash = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    mine = [p for p in problems if p.index % shards == shard]
    output = Path(args.output)
    prepare_output(output)
    path = shard_path(output, shard, shards)
    config = NablaConfig(max_new_tokens=args.max_new_tokens, grad_norm_threshold=args.grad_norm_threshold,
                         rollout_top_k=args.top_k, resample_top_k=args.top_k, fast_rollout=args.compile)
    settings = {m: method_settings(m, args, config, dtype, device, data_hash) for m in methods}

    # Everything is checked before any file is changed.
    done, untidy = finished_records(path)
    expected = {(p.id, m): {**run_fields(p, args), "settings": settings[m]} for p in mine for m in methods}
    check_same_run(done, expected, path)
    if shards > 1:  # the merge at the end must not find another run's results
        others = [output] + [shard_path(output, s, shards) for s in range(shards) if s != shard]
        check_same_settings([(path, [{"method": m, "settings": settings[m]} for m in methods])]
                            + [(p, [r for r in read_records(p)[0] if r["method"] in methods]) for p in others])
    if untidy:
        tidy_for_resume(path, done)
    done = {key: record for key, record in done.items() if key in expected}  # e.g. beyond this run's --limit
    todo = [(p, m) for p in mine for m in methods if (p.id, m) not in done]
    run_config = {"model": args.model, "reward_model": args.reward_model, "methods": methods, "n": args.n,
                  "data": str(data), "data_sha256": data_hash, "problems": len(problems), "limit": args.limit,
                  "seed": args.seed, "prompt_suffix": args.prompt_suffix, "top_k": args.top_k,
                  "batch_size": args.batch_size, "compile": args.compile, "nabla_config": dataclasses.asdict(config),
                  "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "dtype": str(dtype).removeprefix("torch."), "shard": f"{shard}/{shards}"}

    if todo:
        needs_rm = any(m in NEEDS_REWARD_MODEL for m in methods)
        models = load_models(args.model, args.reward_model if needs_rm else None, device, dtype)
        if "nabla" in methods:  # fail now, not on every problem, if ∇-Reasoner cannot use these models
            try:
                get_reasoner(models, dataclasses.replace(config, max_rollouts=args.n))
            except ValueError as e:
                raise InputError(f"∇-Reasoner cannot use these models: {first_line(e)}") from None
        label = output.stem + (f" shard {shard}/{shards}" if shards > 1 else "")
        run_all(todo, done, methods, models, args, config, settings, path, label)
    else:
        tqdm.write(f"{path}: all {len(expected)} results already there", file=sys.stderr)

    mine_records = [r for k, r in best_records(read_records(path)[0]).items() if k in expected]
    write_summary(path, sorted(mine_records, key=_method_order), run_config)
    if shards > 1:
        merge_if_complete(output, problems, methods, shards, run_config)
    return 0


def batches(todo: list[tuple[Problem, str]], batch_size: int) -> list[tuple[list[Problem], str]]:
    """The work in calls of solve_batch: baselines batch_size problems at a time, ∇-Reasoner one at a time.
    With batches, the baselines go method by method, so that a batch holds one method."""
    if batch_size == 1:
        return [([p], m) for p, m in todo]
    order = sorted(todo, key=lambda pm: (METHODS.index(pm[1]), pm[0].index))
    out: list[tuple[list[Problem], str]] = []
    for problem, method in order:
        if out and out[-1][1] == method != "nabla" and len(out[-1][0]) < batch_size:
            out[-1][0].append(problem)
        else:
            out.append(([problem], method))
    return out


def run_all(todo, done, methods, models, args, config, settings, path: Path, label: str) -> None:
    """Solve what is left, appending each result as soon as it is graded; a bar shows running accuracy."""
    correct = {m: sum(bool(r.get("correct")) for (_, m2), r in done.items() if m2 == m) for m in methods}
    counted = {m: sum(1 for (_, m2) in done if m2 == m) for m in methods}
    bar = tqdm(total=len(todo) + len(done), initial=len(done), desc=label, dynamic_ncols=True)
    with bar, path.open("a", encoding="utf-8") as handle:
        for problems, method in batches(todo, args.batch_size):
            for record in run_batch(problems, method, models, args, config, settings[method]):
                append_record(handle, record)
                correct[method] += bool(record["correct"])
                counted[method] += 1
                if record["error"]:
                    tqdm.write(f"{record['id']} {method}: {record['error']}", file=sys.stderr)
                bar.set_postfix_str("  ".join(f"{m} {100 * correct[m] / counted[m]:.1f}%" for m in methods
                                              if counted[m]))
                bar.update(1)


def merge_if_complete(output: Path, problems: list[Problem], methods: list[str], shards: int,
                      config: dict) -> None:
    """The shard that finishes last finds every shard's file complete and writes the combined summary."""
    rank_files = [shard_path(output, s, shards) for s in range(shards)]
    for s, path in enumerate(rank_files):
        have = best_records(read_records(path)[0])
        missing = [p for p in problems if p.index % shards == s for m in methods if (p.id, m) not in have]
        if missing:
            tqdm.write(f"shard {s} is not finished yet; the last shard to finish (or --merge "
                       f"{output.parent}) writes {output}", file=sys.stderr)
            return
    merge(output, rank_files, config, keys={(p.id, m) for p in problems for m in methods})


# ----------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise InputError(f"{message} (see --help)")


def finite_float(text: str) -> float:
    """A number, and not nan or inf: NaN would reach the results and never equal itself on resuming."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Evaluate ∇-Reasoner and its baselines on MATH-500 (or AIME / AMC).")
    p.add_argument("--method", default="nabla",
                   help="one or more of greedy, sc, bon, nabla, comma-separated (default: nabla)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="policy: hub name or local folder")
    p.add_argument("--reward-model", default=DEFAULT_REWARD_MODEL,
                   help="reward model for bon and nabla: hub name or local folder")
    p.add_argument("--data", help="local data file: MATH-500 JSONL or a {prompt, answer, id} JSON array "
                                  "(default: HuggingFaceH4/MATH-500 test.jsonl from the hub)")
    p.add_argument("--limit", type=int, help="only the first N problems of the file")
    p.add_argument("--n", type=int, default=8, help="samples for sc and bon, rollout budget for nabla (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="length limit of every response (default 1024, the paper's MATH-500 setting; AIME: 3072)")
    p.add_argument("--grad-norm-threshold", type=finite_float, default=4.0,
                   help="∇-Reasoner optimizes a token only if its gradient norm reaches this (default 4, the "
                        "paper's MATH-500 setting; AIME: 8)")
    p.add_argument("--top-k", type=int, default=20,
                   help="top-k of every sample, rollout and redraw (default 20: Qwen2.5-7B-Instruct's generation "
                        "config, which the authors' runs fell back to; 0: none)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="greedy, sc and bon: problems per generate call, left-padded (default 1). Greedy answers "
                        "do not change; sc and bon seed a batch as one, so their draws depend on the batching")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache for every generate call, which transformers compiles on a GPU "
                        "(NablaConfig.fast_rollout); off by default until measured on a GPU")
    p.add_argument("--output", default="results/math500.jsonl", help="JSON Lines results; re-running resumes")
    p.add_argument("--seed", type=int, default=0, help="base seed; each problem's seed derives from it")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--prompt-suffix", default="", help="instruction appended to each problem on a new line")
    p.add_argument("--shard", help="I/N: evaluate problems I, I+N, I+2N, ... (0 <= I < N); "
                                   "default: RANK/WORLD_SIZE when set by torchrun or accelerate launch")
    p.add_argument("--merge", metavar="DIR",
                   help="combine DIR/<output name>.rank*.jsonl into DIR/<output name> and its summary, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.merge:
            return merge_dir(Path(args.merge), Path(args.output).name)
        return evaluate(args)
    except InputError as e:
        print(f"eval_math.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
