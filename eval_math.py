"""Evaluate ∇-Reasoner and its baselines on MATH-500 (or AIME / AMC), on one GPU or many.

    python eval_math.py                                     # ∇-Reasoner, the paper's models, MATH-500
    python eval_math.py --method greedy,sc,bon,nabla        # the paper's comparison table
    torchrun --nproc-per-node 8 eval_math.py --method greedy,sc,bon,nabla   # the same on 8 GPUs

Methods, all with the same length limit and the paper's sampling (temperature 0.6, top-p 0.95, top-k 20):
greedy (one greedy answer); sc, self-consistency (N samples, majority vote over answers the grader judges
equivalent); bon, best-of-N (the sample the reward model scores highest); nabla, ∇-Reasoner (rollout budget N).

The file reads: data, grading (math-verify), methods, loading models, records and the settings manifest,
summary and merging of shards, the run, the command line. Bad input ends the run with a one-line message and
exit status 2; Ctrl-C, with status 130. A problem that fails while running (e.g. CUDA out of memory) is recorded
with its error; re-running the same command retries it and skips what is done. The first run (or shard) on an
output writes its settings to a manifest beside it; any later run or shard of other settings is refused at once,
leaving every file as it found it, and so is a run on a results file that another run is still writing.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

try:
    import fcntl
except ImportError:  # native Windows: results files are not locked (exclusive_lock warns)
    fcntl = None

import torch
from math_verify import parse, verify
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from nabla import NablaConfig, NablaReasoner, chat_prompt_ids, draft_sampling, reward_head, reward_ids

METHODS = ("greedy", "sc", "bon", "nabla")
NEEDS_REWARD_MODEL = ("bon", "nabla")
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_REWARD_MODEL = "Skywork/Skywork-Reward-V2-Qwen3-8B"
MATH500_HUB = ("HuggingFaceH4/MATH-500", "test.jsonl")  # dataset repository, file
PAPER_MATH500 = {"greedy": 71.2, "sc": 76.6, "bon": 77.8, "nabla": 80.4}  # Qwen2.5-7B-Instruct, 8B RM, N = 8

COUNTING_RULE = (
    "model calls = 1 per generated token of every sample or rollout (the prefill pass yields the first token) "
    "+ 1 per reward-model scoring (bon: N; nabla: every draft it scores) + for nabla 4 per gradient pass (LM "
    "forward, RM forward, LM backward, RM backward), the passes that select tokens included. Tokens of a sample "
    "are counted up to and including its end-of-sequence token.")
FTE_RULE = (
    "forward-token-equivalents = 1 per token position a forward pass runs (each sample's prompt prefill, every "
    "generated token but the last, every token a reward model scores) + 3 per token position of a pass with a "
    "backward (nabla's gradient passes). Policy and reward model count alike.")
ACCURACY_RULE = "correct answers / problems; a problem that failed with an error counts as wrong"


class InputError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_text(path: Path, errors: str = "strict") -> str | None:
    """A file's text, None if there is no such file, a one-line error if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {first_line(e)}") from None


# Data ----------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    index: int    # position in the data file: seeds and shards depend on it, not on the run's options
    id: str       # MATH `unique_id` or the array's `id`: the key that resuming goes by
    problem: str
    answer: str


def load_problems(path: Path) -> list[Problem]:
    """Read MATH-500 JSON Lines (`problem`, `answer`, `unique_id`) or a JSON array of `{prompt, answer, id}`."""
    if (text := read_text(path)) is None:
        raise InputError(f"data file not found: {path}")
    array = text.lstrip().startswith("[")
    # Lines end at "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() would split at.
    chunks = [(1, text)] if array else [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    rows, problems = [], {}
    for lineno, chunk in chunks:
        try:
            value = json.loads(chunk)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {lineno + e.lineno - 1}: malformed JSON ({e.msg})") from None
        rows += ([(row, f"{path} entry {i}") for i, row in enumerate(value)] if array
                 else [(value, f"{path} line {lineno}")])
    for index, (row, where) in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        text, answer = row.get("problem", row.get("prompt")), row.get("answer")
        key = str(row.get("unique_id", row.get("id", index)))
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: no 'problem' (or 'prompt') text")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)  # AIME and AMC answers are numbers
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"{where}: no 'answer'")
        if key in problems:
            raise InputError(f"{where}: id {key!r} appears twice (results are matched to problems by id)")
        problems[key] = Problem(index, key, text, answer)
    if not problems:
        raise InputError(f"{path}: no problems in the file")
    return list(problems.values())


def math500_from_hub() -> Path:
    """MATH-500 from the Hugging Face hub (or its local cache)."""
    from huggingface_hub import hf_hub_download

    repo, filename = MATH500_HUB
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as e:  # offline, hub down, no such file: all mean "give me the file yourself"
        raise InputError(f"cannot get {repo}/{filename} from the Hugging Face hub ({first_line(e)}); "
                         f"download it once while online or pass a local file with --data PATH") from None


# Grading with math-verify --------------------------------------------------------------------------------
# math-verify times itself out with signals, so every call stays in the main thread.
def _answer_string(parsed: list) -> str | None:
    """The answer as written in the text (math-verify gives the parsed value, then the matched string)."""
    return next((item for item in parsed if isinstance(item, str)), str(parsed[0]) if parsed else None)


def _normalise(answer: str) -> str:
    """A plain-string form of an answer, for the cases math-verify cannot parse (text answers, odd LaTeX)."""
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", answer)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\\left|\\right|\\[,;:! ]|\$|\s", "", s)
    return s.rstrip(".").lower()


def _parse(text: str) -> list:
    """math-verify's reading, after removing thin spaces between digit groups (it reads 1\\,000 as 1 · 000) and
    writing degrees as ^\\circ (it reads neither ° nor \\degree)."""
    grouped = r"(?<![\^_\d])\d{1,3}(?:\\[,;: ]\d{3})+(?!\d)"  # not an exponent's or a subscript's digits
    text = re.sub(r"(?:\^\s*)?(?:°|\\degree(?![A-Za-z]))", r"^\\circ", text)
    return parse(re.sub(grouped, lambda number: re.sub(r"\\[,;: ]", "", number[0]), text))


def _equivalent(reference: list, candidate: list) -> bool:
    """math-verify's judgement (the reference plays the gold), else equal normalised strings."""
    if not reference or not candidate:
        return False
    return (verify(reference, candidate)
            or _normalise(_answer_string(reference)) == _normalise(_answer_string(candidate)))


def extract_answer(text: str) -> str | None:
    """The final answer of a response, as written; None if it has none. math-verify's reading: the \\boxed{}
    answer (several are read together, as when a model boxes each root), else a "final answer is" expression,
    else the last expression in math mode."""
    return _answer_string(_parse(text))


def is_correct(text: str, gold: str) -> bool:
    """Whether the response's final answer equals the gold answer (math-verify, then a string fallback)."""
    # Without the $...$ math-verify looks for an answer inside the gold string and may read only part of it.
    return _equivalent(_parse(f"${gold}$"), _parse(text))


def _vote(parsed: list[list]) -> tuple[int, list[list[int]]]:
    """Self-consistency over parsed answers: (the sample to return, the groups of equivalent samples). Samples
    without an answer do not vote; the largest group wins, of equal ones the one formed first (max() keeps the
    first maximum); with no answer at all, the first sample is returned."""
    groups: list[list[int]] = []
    for i, answer in enumerate(parsed):
        if answer:
            group = next((g for g in groups if _equivalent(parsed[g[0]], answer)), None)
            if group:
                group.append(i)
            else:
                groups.append([i])
    return (max(groups, key=len)[0], groups) if groups else (0, [])


def vote(texts: list[str]) -> tuple[int, list[list[int]]]:
    """Majority vote over the answers of `texts`: (index of the returned sample, groups of sample indices)."""
    return _vote([_parse(t) for t in texts])


# Methods -------------------------------------------------------------------------------------------------
@dataclass
class Models:
    lm: object                   # causal LM (the policy)
    lm_tokenizer: object
    rm: object = None            # sequence-classification reward model with one output; bon and nabla need it
    rm_tokenizer: object = None
    reasoners: dict = field(default_factory=dict, repr=False)

    def reasoner(self, config: NablaConfig) -> NablaReasoner:
        """∇-Reasoner on these models, built once per config: building one aligns two vocabularies."""
        if config not in self.reasoners:  # a frozen dataclass: a key of its own
            self.reasoners[config] = NablaReasoner(self.lm, self.lm_tokenizer, self.rm, self.rm_tokenizer, config)
        return self.reasoners[config]


@dataclass
class Sample:
    text: str           # the response, special tokens dropped: what is graded
    tokens: int         # generated tokens, end-of-sequence included: one forward pass each
    prompt_tokens: int  # the prefill this sample cost
    scored_text: str    # the response with any special tokens it wrote: what the reward model reads, as in nabla


def sample(models: Models, prompts: list[str], n: int, seed: int, config: NablaConfig) -> list[list[Sample]]:
    """N responses to each prompt from one `generate` call (num_return_sequences=N), seeded locally. Several
    prompts are left-padded into one batch; greedy answers are the same as one at a time in fp32 (in bf16 the
    padded shapes round differently, and an answer may change)."""
    lm, tokenizer = models.lm, models.lm_tokenizer
    sampling = draft_sampling(lm, tokenizer, config)  # rollout_temperature=0: greedy
    eos = set(sampling["eos_token_id"] or ())
    generation = GenerationConfig(**sampling, num_return_sequences=n, max_new_tokens=config.max_new_tokens,
                                  cache_implementation="static" if config.fast_rollout else None)
    rows = [chat_prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[sampling["pad_token_id"]] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    with torch.no_grad(), torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # as nabla's generate
        torch.manual_seed(seed)  # seeded locally: the caller's random state stays as it was, on every device
        out = lm.generate(ids, attention_mask=mask, generation_config=generation)
    samples = []
    for i, row in enumerate(out[:, width:].tolist()):
        # Shorter samples are padded to the longest; a sample ends at its first end-of-sequence token.
        length = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        response = [t for t in row[:length] if t not in eos]
        samples.append(Sample(tokenizer.decode(response, skip_special_tokens=True), length, len(rows[i // n]),
                              tokenizer.decode(response)))
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def score_batch(models: Models, pairs: list[tuple[str, str]], batch: int = 16) -> tuple[list[float], list[int]]:
    """r(x, y) for (prompt, response) pairs, `batch` at a time, read as nabla.score reads it (the last token, an
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
        rewards += reward_head(rm, hidden[torch.arange(len(chunk), device=rm.device), mask.sum(-1) - 1]).tolist()
    return rewards, [len(r) for r in rows]


def solve(method: str, prompts: list[str], models: Models, n: int = 8, seed: int = 0,
          config: NablaConfig | None = None) -> list[dict]:
    """Answer prompts with one method, as {"response", "model_calls", "forward_token_equivalents",
    "generated_tokens", "wall_time_s", "stats"} each. n: samples for sc and bon, rollout budget (max_rollouts) for
    nabla; greedy ignores it. config: every method's length limit and sampling, and ∇-Reasoner's settings. greedy,
    sc and bon sample all prompts in one batch seeded with `seed` (so sc and bon draw differently than one at a
    time; greedy only in bf16); nabla answers them one after another."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if method == "bon" and models.rm is None:
        raise ValueError("best-of-N needs a reward model")
    config = config or NablaConfig()
    if method in ("sc", "bon") and config.rollout_temperature <= 0 and n > 1:
        raise ValueError(f"{method} with n > 1 needs sampling (rollout_temperature > 0): greedy samples are all alike")
    if method == "nabla":
        reasoner = models.reasoner(replace(config, max_rollouts=n))
        outs = [reasoner.generate(prompt, seed=seed) for prompt in prompts]
        return [{"response": out.text, "stats": out.stats, **{k: out.stats[k] for k in (
            "model_calls", "forward_token_equivalents", "generated_tokens", "wall_time_s")}} for out in outs]
    start = time.perf_counter()
    if method == "greedy":
        config, n = replace(config, rollout_temperature=0), 1
    batches = sample(models, prompts, n, seed, config)
    if method == "bon":
        rewards, rm_tokens = score_batch(models, [(p, s.scored_text) for p, ss in zip(prompts, batches) for s in ss])
    results = []
    for i, samples in enumerate(batches):
        tokens = calls = sum(s.tokens for s in samples)
        fte = sum(s.prompt_tokens + max(s.tokens - 1, 0) for s in samples)
        stats, chosen = {"sample_tokens": [s.tokens for s in samples]}, 0
        if method == "sc":  # the first sample whose answer won
            parsed = [_parse(s.text) for s in samples]
            chosen, groups = _vote(parsed)
            stats.update(answers=[_answer_string(p) for p in parsed], groups=groups)
        elif method == "bon":
            mine = rewards[i * n:(i + 1) * n]
            calls, fte = calls + len(mine), fte + sum(rm_tokens[i * n:(i + 1) * n])
            chosen = max(range(len(mine)), key=mine.__getitem__)  # the first of equal rewards
            stats.update(rewards=mine)
        results.append({"response": samples[chosen].text, "model_calls": calls, "forward_token_equivalents": fte,
                        "generated_tokens": tokens, "stats": {**stats, "chosen": chosen}})
    seconds = (time.perf_counter() - start) / len(results)  # one batch: its time is shared out evenly
    return [{**r, "wall_time_s": seconds} for r in results]


def problem_seed(base_seed: int, index: int) -> int:
    """A seed per problem from --seed and the problem's place in the file: the same whatever the sharding."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{index}".encode()).digest()[:4], "little")


# Loading models ------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """auto and cuda mean GPU LOCAL_RANK: torchrun and accelerate launch start a process per GPU and set it."""
    gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        device = torch.device({"auto": gpu if torch.cuda.is_available() else "cpu", "cuda": gpu}.get(name, name))
    except RuntimeError:
        raise InputError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index >= (count := torch.cuda.device_count()):
        raise InputError(f"--device {name}: no GPU {device} here (this machine has {count}; LOCAL_RANK picks one)")
    return device


def _load(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if Path(name).is_dir():
            why = f"the folder does not hold a loadable model ({first_line(e)})"
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            why = "there is no such folder (download a model into one with: hf download REPO --local-dir PATH)"
        else:
            why = (f"it is not in the local Hugging Face cache and could not be fetched from the hub (offline, no "
                   f"network, or no such repository: {first_line(e)}); it must be downloaded first (hf download "
                   f"{name}) or given as a local path")
        raise InputError(f"cannot load model {name!r}: {why}") from None


def _load_model(loader, name: str, device: torch.device, dtype: torch.dtype):
    """A model in `dtype`, in eval mode, without weight gradients, on `device`. With the accelerate package
    installed, the weights go straight to the GPU; without it they pass through host memory first. A checkpoint
    that lacks weights the loader needs (a reward model given as the policy) is refused, not filled at random."""
    try:
        import accelerate  # noqa: F401  (transformers needs it for device_map)
        placement = {"device_map": str(device)} if device.type == "cuda" else {}
    except ImportError:
        placement = {}
    model, info = _load(loader, name, dtype=dtype, output_loading_info=True, **placement)
    if missing := sorted(info["missing_keys"]):
        raise InputError(f"model {name!r} lacks weights {loader.__name__} needs ({', '.join(missing[:3])}): a "
                         f"checkpoint of another kind, e.g. a reward model given as the policy or the other way round?")
    return model.to(device).eval().requires_grad_(False)


def load_models(model: str, reward_model: str | None, device: torch.device, dtype: torch.dtype) -> Models:
    """Policy and (if asked for) reward model with their tokenizers, which must have chat templates."""
    tqdm.write(f"loading {model}" + (f" and {reward_model}" if reward_model else "") + f" on {device} ({dtype})",
               file=sys.stderr)
    lm_tokenizer = _load_tokenizer(model, "policy")
    lm = _load_model(AutoModelForCausalLM, model, device, dtype)
    rm = rm_tokenizer = None
    if reward_model:
        rm_tokenizer = _load_tokenizer(reward_model, "reward model")
        rm = _load_model(AutoModelForSequenceClassification, reward_model, device, dtype)
        if rm.config.num_labels != 1:
            raise InputError(f"reward model {reward_model!r} has {rm.config.num_labels} outputs; it needs one score")
    return Models(lm, lm_tokenizer, rm, rm_tokenizer)


def _load_tokenizer(name: str, role: str):
    """The model's tokenizer, which must have a chat template: every method puts the problem in its user turn."""
    tokenizer = _load(AutoTokenizer, name)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{role} {name!r}: its tokenizer has no chat template, whose user turn the problem goes in; "
                         f"set chat_template in the folder's tokenizer_config.json")
    return tokenizer


# Records: one JSON line per problem and method, one file per shard, and the settings manifest ------------
def rank_files(output: Path) -> list[Path]:
    """The shard files beside `output` (<stem>.rank<i><suffix>), whatever the number of shards, in rank order."""
    pattern = re.compile(re.escape(output.stem) + r"\.rank(\d+)" + re.escape(output.suffix))
    ranked = [(int(m.group(1)), p) for p in output.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(ranked)]


def beside(output: Path, what: str) -> Path:
    """results/math500.jsonl.summary.json, results/math500.jsonl.manifest.json."""
    return output.with_name(f"{output.name}.{what}.json")


def read_records(path: Path) -> tuple[list[dict], bool]:
    """The records of an output file, and whether it ends cleanly. A kill while a record was being written
    leaves a cut-off last line: that record is dropped (and done again); any other bad line is an error."""
    # A kill may cut the last line inside a character too: bytes that are not UTF-8 stay lone surrogates here,
    # which encode() refuses, so such a line is bad like any other (and dropped only if it is the cut-off one).
    text = read_text(path, errors="surrogateescape") or ""
    lines, clean, records = text.split("\n"), text == "" or text.endswith("\n"), []
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line.encode()) if line.strip() else None
            if record is not None and not (isinstance(record, dict) and isinstance(record.get("id"), str)
                                           and record.get("method") in METHODS
                                           and isinstance(record.get("settings") or {}, dict)):
                raise ValueError("not a result record")
        except ValueError:
            if lineno == len(lines) and not clean:
                continue
            raise InputError(f"{path} line {lineno}: not a result record of this script; "
                             f"move the file away or pick another --output") from None
        records += [record] if record is not None else []
    return records, clean


def best_records(records: list[dict]) -> dict[tuple[str, str], dict]:
    """One record per (id, method): a later one replaces an earlier one, but an error never replaces a result."""
    best: dict[tuple[str, str], dict] = {}
    for record in records:
        old = best.get(key := (record["id"], record["method"]))
        if old is None or record.get("error") is None or old.get("error") is not None:
            best[key] = record
    return best


def finished_records(path: Path) -> tuple[dict[tuple[str, str], dict], bool]:
    """The finished results in `path` by (id, method), and whether the file needs tidying (failed problems,
    to be retried, or a line cut off by a kill). Reading never changes the file."""
    records, clean = read_records(path)
    finished = {k: r for k, r in best_records(records).items() if r.get("error") is None}
    return finished, not clean or len(finished) != len(records)


def _to_json(record: dict) -> str:
    # Stats may hold tensors or numpy numbers: store their values rather than fail after the work is done.
    return json.dumps(record, ensure_ascii=False, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


def write_atomically(path: Path, text: str, exclusive: bool = False) -> None:
    """Write a whole file so that a reader, a kill or a power cut never leaves half of it. exclusive: raise
    FileExistsError if the file exists (a hard link, unlike a rename, never replaces a file). Where there are
    no hard links (exFAT, some SMB or FUSE mounts) that is a plain exclusive create, which a reader or a kill
    can catch half-written: read_manifest then says to delete the file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across processes and machines
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here: exclusive, though not atomic
                with path.open("x", encoding="utf-8") as f:
                    f.write(text)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_records(path: Path, records) -> None:
    write_atomically(path, "".join(_to_json(r) + "\n" for r in records))


class Busy(InputError):
    """Another run holds the lock of a results file."""


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold `path` while this run reads and writes it, or refuse if another run holds it: two runs appending to
    one file would do the work twice, and one's tidying (or a merge) could replace the file under the other,
    whose later results would be lost. The lock file stays: removing it would let a run that opened it just
    before lock a file that the next run cannot see."""
    try:
        handle = path.with_name(f".{path.name}.lock").open("a")
    except OSError as e:
        raise InputError(f"{path}: cannot open its lock file ({first_line(e)})") from None
    with handle:
        try:
            if fcntl is None:
                raise OSError("no file locks on this platform")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes, even on a kill
        except BlockingIOError:
            raise Busy(f"{path}: another run is writing it now; wait for it or pick another --output") from None
        except OSError as e:  # a file system without locks (some Lustre, FUSE or SMB mounts), or Windows: unguarded
            tqdm.write(f"cannot lock {path} ({first_line(e)}): never start two runs on it at once", file=sys.stderr)
        yield


def method_settings(method: str, args, config: NablaConfig, dtype: torch.dtype, device: torch.device,
                    data_hash: str) -> dict:
    """Everything a result of this method depends on besides its problem: what records and the manifest hold."""
    settings = {"data_sha256": data_hash, "model": args.model, "max_new_tokens": args.max_new_tokens,
                "base_seed": args.seed, "prompt_suffix": args.prompt_suffix, "dtype": str(dtype)[len("torch."):],
                # GPUs 0..7 of one machine are one kind; an H100 and an H200 are two.
                "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type}
    if method != "greedy":
        settings.update(n=args.n, temperature=config.rollout_temperature, top_p=config.rollout_top_p,
                        top_k=config.rollout_top_k)
    if method in NEEDS_REWARD_MODEL:
        settings["reward_model"] = args.reward_model
    if method == "nabla":
        settings.update({f"nabla.{k}": v for k, v in asdict(replace(config, max_rollouts=args.n)).items()})
    else:  # not the batch size: like the shard layout, it is how the work is split, and each record names its batch
        settings["compile"] = args.compile
    return settings


def conflict(found: dict, expected: dict) -> tuple | None:
    """(field, found value, expected value) for the first field, in sorted order, whose values differ. The batch
    size, which outputs of older versions hold among the settings, is not one: it is how the work was split."""
    fields = (found.keys() | expected.keys()) - {"batch_size"}
    key = next((k for k in sorted(fields) if found.get(k) != expected.get(k)), None)
    return None if key is None else (key, found.get(key), expected.get(key))


def read_manifest(path: Path) -> tuple[dict, list[str]] | None:
    """Every method's settings, as the manifest holds them, and the methods its writer ran (all, in a manifest
    from before it said); None if there is no manifest."""
    if (text := read_text(path)) is None:
        return None
    try:
        manifest = json.loads(text)
        settings, ran = manifest["settings"], manifest.get("ran", list(METHODS))
        if not all(isinstance(settings.get(m), dict) for m in METHODS):
            raise ValueError(f"no settings for each of {', '.join(METHODS)}")
        if not (isinstance(ran, list) and set(ran) <= set(METHODS)):
            raise ValueError("'ran' is not a list of methods")
        return settings, ran
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON is a ValueError
        raise InputError(f"{path}: not a settings manifest of this script ({first_line(e)}); delete it and it is "
                         f"written again from the results' own records") from None


def settings_on_record(output: Path, files: list[Path], refusal: str) -> tuple[dict, list[dict]]:
    """Each method's settings on record for `output` and the file that holds them (the manifest or, for an output
    from before manifests, the method's first record in `files`), and the records of `files`, each checked
    against those settings: a record of other settings is a one-line error that ends with `refusal`."""
    manifest = beside(output, "manifest")
    reference = {method: (found, manifest) for method, found in (read_manifest(manifest) or ({}, []))[0].items()}
    records = []
    for path in files:
        for record in read_records(path)[0]:
            found = record.get("settings") or {}
            expected, where = reference.setdefault(record["method"], (found, path))
            if c := conflict(found, expected):
                raise InputError(f"{path} holds {record['method']} results of another run than {where} ({c[0]}: "
                                 f"{c[1]!r} vs {c[2]!r}); {refusal}")
            records.append(record)
    return reference, records


def agree_on_settings(output: Path, settings: dict, methods: list[str], write: bool) -> list[dict]:
    """Refuse, changing nothing, unless this run's settings are those on record for `output`; else return the
    records of `output` and its shard files. The first run (or shard) writes every method's settings to the
    manifest, and the methods it ran, so that a method added later is checked too (an output from before
    manifests keeps its records' settings there; settings of a method nobody ran are refused with a way to
    change them). Of shards started at once exactly one creates it (exclusively); the others compare."""
    path = beside(output, "manifest")
    for attempt in range(2):  # a second look when another shard wrote the manifest while this one looked
        reference, records = settings_on_record(output, [output, *rank_files(output)], "pick another --output")
        for method in [m for m in methods if m in reference]:
            if not (c := conflict(reference[method][0], settings[method])):
                continue
            ran = (read_manifest(path) or ({}, METHODS))[1] if reference[method][1] == path else METHODS
            if method not in ran and not any(r["method"] == method for r in records):  # nobody ran it with them
                raise InputError(f"{path} holds the {method} settings of the first run on this output, which ran no "
                                 f"{method} ({c[0]}: {c[1]!r} there, {c[2]!r} now); to run {method} with the options "
                                 f"now given, delete it (it is written again from the results) or pick another "
                                 f"--output")
            raise InputError(f"{reference[method][1]} was written by a run with other settings ({c[0]}: "
                             f"{c[1]!r} in the file, {c[2]!r} now); pick another --output or use the same options")
        if not write or any(where == path for _, where in reference.values()):
            return records
        manifest = {**settings, **{method: found for method, (found, _) in reference.items()}}
        ran = [m for m in METHODS if m in methods or any(r["method"] == m for r in records)]
        with contextlib.suppress(FileExistsError):  # another shard may get there first: compare with its manifest
            write_atomically(path, json.dumps({"settings": manifest, "ran": ran}, indent=1) + "\n", exclusive=True)
            return records
    raise InputError(f"{path}: exists but cannot be read (a broken link?); remove it")


# Summary and merging -------------------------------------------------------------------------------------
def write_summary(output: Path, records: list[dict], config: dict, on_record: dict) -> dict:
    """Accuracy, means per problem and peak memory per method, to <output>.summary.json and as a table; the
    config names the settings on record of every method summarised."""
    mean = lambda values: round(sum(values) / len(values), 3) if values else None  # noqa: E731
    methods = {}
    for method in [m for m in METHODS if any(r["method"] == m for r in records)]:
        rows = [r for r in records if r["method"] == method]
        ok = [r for r in rows if r.get("error") is None]
        stats, correct = [r["stats"] or {} for r in ok], sum(bool(r.get("correct")) for r in rows)
        peaks = [r["peak_gpu_memory_gib"] for r in rows if r.get("peak_gpu_memory_gib") is not None]
        methods[method] = {
            "problems": len(rows), "correct": correct, "accuracy_pct": round(100 * correct / len(rows), 2),
            "errors": len(rows) - len(ok), **{f"mean_{k}": mean([r[k] for r in ok]) for k in (
                "model_calls", "forward_token_equivalents", "generated_tokens")},
            "mean_grad_passes": mean([s.get("grad_steps", 0) for s in stats]),
            # bon scores its samples; nabla its first draft and every proposal
            "mean_reward_scores": mean([len(s.get("rewards", [])) if method == "bon" else s.get("rollouts", 0)
                                        for s in stats]),
            "mean_seconds": mean([r["wall_time_s"] for r in ok]),
            "peak_gpu_memory_gib": round(max(peaks), 2) if peaks else None}
    summary = {"methods": methods, "accuracy_rule": ACCURACY_RULE, "counting_rule": COUNTING_RULE,
               "fte_rule": FTE_RULE, "paper_math500_qwen2.5_7b_instruct_pct": PAPER_MATH500,
               "config": {**config, "problems": len({r["id"] for r in records}),
                          "settings": {m: on_record[m] for m in methods}}}
    write_atomically(beside(output, "summary"), json.dumps(summary, indent=2) + "\n")
    columns = [("mean_model_calls", "model calls", ".1f"), ("mean_forward_token_equivalents", "fwd-tok-eq", ".0f"),
               ("mean_generated_tokens", "tokens", ".1f"), ("mean_seconds", "seconds", ".2f"),
               ("peak_gpu_memory_gib", "peak GPU GiB", ".2f")]
    print(f"{'method':<8}{'problems':>9}{'accuracy':>10}{'errors':>8}" + "".join(f"{h:>14}" for _, h, _ in columns))
    for method, row in methods.items():
        cells = ("-" if row[k] is None else format(row[k], spec) for k, _, spec in columns)
        print(f"{method:<8}{row['problems']:>9}{row['accuracy_pct']:>9.1f}%{row['errors']:>8}"
              + "".join(f"{c:>14}" for c in cells))
    print(f"results: {output}   summary: {beside(output, 'summary')}")
    return summary


def merge(output: Path, ranks: list[Path], config: dict | None = None, ids: set | None = None) -> dict:
    """Combine the shards' files (and what `output` holds) into `output` and its summary, if every record has
    the settings on record; otherwise change nothing. With `ids`, the summary covers those problems only."""
    settings_on_record(output, [output, *ranks], "nothing was merged")  # refuse before even a lock file exists
    with exclusive_lock(output):  # then read again, with no other run writing `output`
        reference, records = settings_on_record(output, [output, *ranks], "nothing was merged")
        combined = sorted(best_records(records).values(), key=lambda r: (r.get("index", 0), METHODS.index(r["method"])))
        write_records(output, combined)
    for method in METHODS:  # problems are run from the top of the data file: a gap is a shard that has not run
        seen = {r.get("index", 0) for r in combined if r["method"] == method}
        if seen and (gap := max(seen) + 1 - len(seen)):
            tqdm.write(f"{output}: {gap} of the first {max(seen) + 1} problems have no {method} result (a shard that "
                       f"has not run?)", file=sys.stderr)
    config = {**(config or {}), "shard": None, "merged_from": [str(p) for p in ranks]}
    return write_summary(output, [r for r in combined if ids is None or r["id"] in ids], config,
                         {m: found for m, (found, _) in reference.items()})


# The run -------------------------------------------------------------------------------------------------
def evaluate(args) -> int:
    methods = parse_methods(args.method)
    shard, shards = resolve_shard(args.shard, os.environ)
    for option in ("n", "limit", "max_new_tokens", "batch_size"):
        if (value := getattr(args, option)) is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be at least 1, not {value}")
    if not math.isfinite(args.grad_norm_threshold):  # NaN would never equal itself when resuming
        raise InputError(f"--grad-norm-threshold must be a finite number, not {args.grad_norm_threshold}")
    if args.grad_norm_threshold < 0:
        raise InputError(f"--grad-norm-threshold must not be negative, not {args.grad_norm_threshold}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be 0 (none) or more, not {args.top_k}")
    # One folder, one setting: "lm/" and "./lm" are the model "lm" was.
    args.model, args.reward_model = (os.path.normpath(m) if m and os.path.isdir(m) else m
                                     for m in (args.model, args.reward_model))
    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    data = Path(args.data) if args.data else math500_from_hub()
    problems = load_problems(data)[: args.limit]
    output, data_hash = Path(args.output), hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    prepare_output(output)
    config = NablaConfig(max_new_tokens=args.max_new_tokens, grad_norm_threshold=args.grad_norm_threshold,
                         rollout_top_k=args.top_k, resample_top_k=args.top_k, fast_rollout=args.compile)
    settings = {m: method_settings(m, args, config, dtype, device, data_hash) for m in METHODS}
    ranks = [output.with_name(f"{output.stem}.rank{s}{output.suffix}") for s in range(shards)]  # when sharded
    path = output if shards == 1 else ranks[shard]  # results/math500.jsonl or results/math500.rank3.jsonl

    # Refuse before anything is loaded or changed. The manifest is written once the models have loaded, so
    # that a typo in --model leaves none behind; agreeing again compares with a shard that wrote it meanwhile.
    records = agree_on_settings(output, settings, methods, write=False)
    with exclusive_lock(path):
        done, untidy = finished_records(path)
        mine = [p for p in problems if p.index % shards == shard]
        keys = {(p.id, m) for p in mine for m in methods}
        # Results of this shard in the output's other files (a merge, a run of another shard count) are copied.
        found = {k: r for k, r in best_records(records).items() if k in keys and k not in done and not r.get("error")}
        if found:
            done, untidy = {**done, **found}, True
            tqdm.write(f"{path}: {len(found)} results taken from the output's other files", file=sys.stderr)
        todo = [(p, m) for p in mine for m in methods if (p.id, m) not in done]
        models = None
        if todo:
            models = load_models(args.model, args.reward_model if set(methods) & set(NEEDS_REWARD_MODEL) else None,
                                 device, dtype)
            if "nabla" in methods:  # fail now, not on every problem, if ∇-Reasoner cannot use these models
                try:
                    models.reasoner(replace(config, max_rollouts=args.n))
                except ValueError as e:
                    raise InputError(f"∇-Reasoner cannot use these models: {first_line(e)}") from None
        agree_on_settings(output, settings, methods, write=True)
        if untidy:
            write_records(path, done.values())  # only the finished results, so that appending keeps it clean
        label = output.stem + (f" shard {shard}/{shards}" if shards > 1 else "")
        run_all(todo, [r for k, r in done.items() if k in keys], methods, models, args, config, settings, path, label)

    # The summary covers this run's problems, with every method's results the file holds for them.
    run_config = {"data": str(data), "limit": args.limit, "methods": methods, "shard": f"{shard}/{shards}",
                  "batch_size": args.batch_size}
    ids = {p.id for p in mine}
    write_summary(path, [r for r in best_records(read_records(path)[0]).values() if r["id"] in ids], run_config,
                  read_manifest(beside(output, "manifest"))[0])
    if shards > 1:  # the shard that finishes last writes the combined results
        everything = {(p.id, m) for p in problems for m in methods}
        if everything <= {k for rank in ranks for k in best_records(read_records(rank)[0])}:
            try:
                merge(output, ranks, run_config, {p.id for p in problems})
            except Busy as e:  # most likely another shard that finished at the same moment, merging
                tqdm.write(f"not merged: {e}", file=sys.stderr)
        else:
            tqdm.write(f"not every shard has finished; the last to finish (or --merge {output.parent} --output "
                       f"{output.name}) writes {output}", file=sys.stderr)
    return 0


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


def batches(todo: list[tuple[Problem, str]], batch_size: int) -> list[tuple[list[Problem], str]]:
    """The work in calls of solve: baselines batch_size problems at a time, method by method (a batch holds
    one method); ∇-Reasoner one problem at a time. With batches of one, in the order of `todo`."""
    out: list[tuple[list[Problem], str]] = []
    order = todo if batch_size == 1 else sorted(todo, key=lambda pm: (METHODS.index(pm[1]), pm[0].index))
    for problem, method in order:
        if out and out[-1][1] == method != "nabla" and len(out[-1][0]) < batch_size:
            out[-1][0].append(problem)
        else:
            out.append(([problem], method))
    return out


def run_batch(problems: list[Problem], method: str, models: Models, args, config: NablaConfig,
              settings: dict) -> list[dict]:
    """Problems solved with one method, as result records. A failure becomes each record's error."""
    records = [{"id": p.id, "index": p.index, "method": method, "settings": settings,
                "prompt": f"{p.problem}\n{args.prompt_suffix}" if args.prompt_suffix else p.problem,
                "seed": problem_seed(args.seed, p.index), "response": None, "prediction": None, "answer": p.answer,
                "correct": False, "model_calls": None, "forward_token_equivalents": None, "generated_tokens": None,
                "wall_time_s": None, "peak_gpu_memory_gib": None, "stats": None, "error": None} for p in problems]
    cuda, start = models.lm.device.type == "cuda", time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(models.lm.device)
    try:
        results = solve(method, [r["prompt"] for r in records], models, n=args.n, seed=records[0]["seed"],
                        config=config)
    except Exception as e:  # e.g. CUDA out of memory on one long problem: record it, go on with the rest
        for record in records:
            record.update(error=f"{type(e).__name__}: {first_line(e)}",
                          wall_time_s=(time.perf_counter() - start) / len(records))
        if cuda:
            torch.cuda.empty_cache()
    else:
        for record, result in zip(records, results):
            record.update(result, prediction=extract_answer(result["response"]),
                          correct=is_correct(result["response"], record["answer"]))
            if len(records) > 1:  # the batch was drawn as one: say with which seed and beside which problems
                record["batch"] = {"seed": records[0]["seed"], "ids": [r["id"] for r in records]}
    for record in records if cuda else []:
        record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(models.lm.device) / 2**30
    return records


def run_all(todo, done: list[dict], methods, models, args, config, settings, path: Path, label: str) -> None:
    """Solve what is left, appending each result as soon as it is graded; a bar shows running accuracy."""
    if not todo:
        return tqdm.write(f"{path}: all {len(done)} results already there", file=sys.stderr)
    bar = tqdm(total=len(todo) + len(done), initial=len(done), desc=label, dynamic_ncols=True)
    with bar, path.open("a", encoding="utf-8") as handle:
        for problems, method in batches(todo, args.batch_size):
            for record in run_batch(problems, method, models, args, config, settings[method]):
                handle.write(_to_json(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())  # a result reported done survives a crash or a power cut
                if record["error"]:
                    tqdm.write(f"{record['id']} {method}: {record['error']}", file=sys.stderr)
                done.append(record)
                accuracy = {m: [r["correct"] for r in done if r["method"] == m] for m in methods}
                bar.set_postfix_str("  ".join(f"{m} {100 * sum(c) / len(c):.1f}%" for m, c in accuracy.items() if c))
                bar.update(1)


# Command line --------------------------------------------------------------------------------------------
def parse_methods(text: str) -> list[str]:
    methods = list(dict.fromkeys(m.strip() for m in text.split(",")))  # in order, without repeats
    if unknown := [m for m in methods if m not in METHODS]:
        raise InputError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)} (comma-separated)")
    return methods


def resolve_shard(text: str | None, env) -> tuple[int, int]:
    """--shard I/N (0 <= I < N), else RANK/WORLD_SIZE as torchrun and accelerate launch set them, else 0/1."""
    source = "--shard"
    if text is None:
        if "WORLD_SIZE" not in env:
            return 0, 1
        text, source = f"{env.get('RANK', '0')}/{env['WORLD_SIZE']}", "RANK/WORLD_SIZE"
    if not (match := re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)):
        raise InputError(f"{source} {text!r}: expected I/N, e.g. 0/8")
    shard, shards = int(match.group(1)), int(match.group(2))
    if shards < 1 or not 0 <= shard < shards:
        raise InputError(f"{source} {text}: out of range, I must be in 0..N-1 and N at least 1")
    return shard, shards


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise InputError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Evaluate ∇-Reasoner and its baselines on MATH-500 (or AIME / AMC).")
    p.add_argument("--method", default="nabla", help="one or more of greedy, sc, bon, nabla, comma-separated")
    p.add_argument("--model", default=DEFAULT_MODEL, help="policy: hub name or local folder")
    p.add_argument("--reward-model", default=DEFAULT_REWARD_MODEL, help="reward model for bon and nabla")
    p.add_argument("--data", help="local MATH-500 JSONL or {prompt, answer, id} JSON array (default: the hub's)")
    p.add_argument("--limit", type=int, help="only the first N problems of the file")
    p.add_argument("--n", "--N", type=int, default=8, help="samples for sc and bon, rollout budget for nabla "
                   "(--N under torchrun, which reads --n as one of its own options)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="length limit of every response (AIME: 3072)")
    p.add_argument("--grad-norm-threshold", type=float, default=4.0,
                   help="∇-Reasoner optimizes a token only if its gradient norm reaches this (AIME: 8)")
    p.add_argument("--top-k", type=int, default=20, help="top-k of every sample, rollout and redraw (0: none); 20 "
                   "is Qwen2.5-7B-Instruct's generation config, which the authors' runs fell back to")
    p.add_argument("--batch-size", type=int, default=1, help="greedy, sc and bon: problems per generate call, "
                   "left-padded; sc and bon seed a batch as one and bf16 rounds padded shapes differently, so "
                   "answers depend on the batching (greedy ones in fp32 do not); a run may resume with another "
                   "batch size (e.g. smaller after running out of GPU memory): each record names its batch")
    p.add_argument("--compile", action="store_true",
                   help="a static KV cache for every generate call, which transformers compiles on a GPU")
    p.add_argument("--output", default="results/math500.jsonl", help="JSON Lines results; re-running resumes")
    p.add_argument("--seed", type=int, default=0, help="base seed; each problem's seed derives from it")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--prompt-suffix", default="", help="instruction appended to each problem on a new line")
    p.add_argument("--shard", help="I/N: problems I, I+N, I+2N, ... (default: RANK/WORLD_SIZE, as torchrun sets)")
    p.add_argument("--merge", metavar="DIR", help="combine DIR/<output name>.rank*.jsonl into DIR/<output name>")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not args.merge:
            return evaluate(args)
        directory = Path(args.merge)  # --merge DIR: DIR/<stem>.rank*.jsonl into DIR/<stem>.jsonl and its summary
        if not directory.is_dir():
            raise InputError(f"--merge {directory}: no such folder")
        if not (ranks := rank_files(output := directory / Path(args.output).name)):
            raise InputError(f"--merge {directory}: no {output.stem}.rank*{output.suffix} files there")
        merge(output, ranks)
        return 0
    except InputError as e:
        print(f"eval_math.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval_math.py: interrupted; the results written so far are kept, the same command resumes",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
