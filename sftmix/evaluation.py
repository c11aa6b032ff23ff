"""Evaluation: held-out response NLL, generations in AlpacaEval / MT-Bench formats, pairwise judging.

    response_perplexity(model, dataset)   per-example and overall NLL / perplexity (response tokens only)
    generate_answers(model, tokenizer, conversations)   batched greedy generation, multi-turn aware
    alpaca_eval_outputs(...) / mt_bench_answers(...)    the two public answer formats
    JudgeClient                          pairwise A-vs-B judging over an OpenAI-compatible endpoint
    confidence_spread(model, dataset)    the paper's diagnostic: std of per-example confidence
    run_alpaca_eval(model_outputs, ...)  the official AlpacaEval 2 length-controlled scorer (`alpaca-eval` package)
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .errors import InputError
from .scoring import check_finite_nll, score_model

# --------------------------------------------------------------------------- likelihood

EVAL_DIVERGED = "the model diverged; evaluate another checkpoint"  # a NaN/inf NLL is refused, never written


def response_perplexity(model, dataset, pad_id: int, max_tokens: int = 16384, desc: str = "NLL",
                        sharded: bool = False) -> dict[str, Any]:
    """Mean response-token NLL and perplexity, overall (token-weighted) and per example."""
    nll_sum, num_tokens = score_model(model, dataset, max_tokens, pad_id, desc=desc, sharded=sharded)
    check_finite_nll(dataset["id"], nll_sum, num_tokens, desc, EVAL_DIVERGED)
    total_tokens = sum(num_tokens)
    mean_nll = sum(nll_sum) / max(total_tokens, 1)
    per_example = [
        {"id": example_id, "nll": nll / max(count, 1), "perplexity": math.exp(nll / max(count, 1)), "num_tokens": count}
        for example_id, nll, count in zip(dataset["id"], nll_sum, num_tokens)
    ]
    return {"nll": mean_nll, "perplexity": math.exp(mean_nll), "num_tokens": total_tokens,
            "num_examples": len(per_example), "per_example": per_example}


def confidence_spread(model, dataset, pad_id: int, max_tokens: int = 16384, sharded: bool = False) -> dict[str, Any]:
    """The paper's diagnostic: std (and mean) of per-example confidence (= -perplexity) under one model.

    `per_example` ({id, confidence, num_tokens} in dataset order) lets the report bootstrap the std.
    """
    nll_sum, num_tokens = score_model(model, dataset, max_tokens, pad_id, desc="Confidence", sharded=sharded)
    check_finite_nll(dataset["id"], nll_sum, num_tokens, "confidence spread", EVAL_DIVERGED)
    values = [-math.exp(nll / max(count, 1)) for nll, count in zip(nll_sum, num_tokens)]
    confidences = torch.tensor(values, dtype=torch.float64)
    return {"confidence_std": confidences.std().item(), "confidence_mean": confidences.mean().item(),
            "num_examples": len(values),
            "per_example": [{"id": example_id, "confidence": value, "num_tokens": count}
                            for example_id, value, count in zip(dataset["id"], values, num_tokens)]}


def set_names(paths: list[str]) -> list[str]:
    """One distinct name per scored set: the file stem, qualified by its folder (then numbered) when taken.

    `a/heldout.jsonl b/heldout.jsonl` -> heldout, b-heldout: both sets keep their results.
    """
    names: list[str] = []
    for path in paths:
        stem = Path(path).stem
        candidates = [stem, f"{Path(path).parent.name}-{stem}"] + [f"{stem}-{k}" for k in range(2, len(paths) + 2)]
        names.append(next(name for name in candidates if name not in names))
    return names


# --------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_answers(
    model, tokenizer, conversations: list[list[str]], max_new_tokens: int = 256, batch_size: int = 8,
    desc: str = "Generating", sharded: bool = False,
) -> list[list[str]]:
    """Greedy answers to each conversation's user turns, turn by turn (MT-Bench style for several turns).

    conversations: one list of user messages per prompt -> one list of answers per prompt.
    `sharded`: the parameters are partitioned over the ranks, so every forward is a collective: the ranks generate
    in step (transformers' synced_gpus) and one with fewer batches runs spare ones (answers discarded).
    """
    model.eval()
    device = next(model.parameters()).device
    mine = list(distributed.shard(len(conversations)))  # under a launcher each rank answers its share
    answers: dict[int, list[str]] = {index: [] for index in mine}
    calls = []  # (turn, the prompts of one generate call), turn by turn: a turn's prompt holds the earlier answers
    for turn in range(max(len(turns) for turns in conversations)):
        pending = [index for index in mine if len(conversations[index]) > turn]
        calls += [(turn, pending[start : start + batch_size]) for start in range(0, len(pending), batch_size)]
    # Sharded: every rank makes as many generate calls as the busiest one (counted before any rank generates: a
    # collective while another rank generates would hang).
    busiest = max(distributed.gather(len(calls))) if sharded else len(calls)
    progress = tqdm(total=sum(len(chunk) for _, chunk in calls), desc=desc, unit="answer",
                    disable=not distributed.is_main())
    for turn, chunk in calls:
        prompts = [_chat_prompt(tokenizer, conversations[index][: turn + 1], answers[index]) for index in chunk]
        for index, text in zip(chunk, _generate(model, tokenizer, prompts, max_new_tokens, device, sharded)):
            answers[index].append(text)
        progress.update(len(chunk))
    for _ in range(busiest - len(calls)):
        _generate(model, tokenizer, [_chat_prompt(tokenizer, conversations[0][:1], [])], max_new_tokens, device,
                  sharded)
    progress.close()
    everyone = {index: texts for share in distributed.gather(answers) for index, texts in share.items()}
    return [everyone[index] for index in range(len(conversations))]


def _chat_prompt(tokenizer, user_turns: list[str], previous_answers: list[str]) -> str:
    messages = []
    for position, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        if position < len(previous_answers):
            messages.append({"role": "assistant", "content": previous_answers[position]})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device, sharded: bool = False) -> list[str]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, synced_gpus=sharded,
    )
    new_tokens = output[:, batch["input_ids"].size(1) :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def alpaca_eval_outputs(prompts: list[dict], answers: list[list[str]], generator: str) -> list[dict]:
    """AlpacaEval `model_outputs.json` rows: instruction, output, generator, dataset."""
    return [
        {"instruction": prompt["instruction"], "output": answer[0], "generator": generator,
         "dataset": prompt.get("dataset", "custom")}
        for prompt, answer in zip(prompts, answers)
    ]


def mt_bench_answers(questions: list[dict], answers: list[list[str]], model_id: str) -> list[dict]:
    """FastChat MT-Bench answer rows (model_answer/<model_id>.jsonl)."""
    return [
        {"question_id": question["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
         "choices": [{"index": 0, "turns": answer}], "tstamp": time.time()}
        for question, answer in zip(questions, answers)
    ]


# --------------------------------------------------------------------------- judging

JUDGE_PROMPT = """You are comparing two AI assistants' answers to the same user instruction.

[Instruction]
{instruction}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer is more helpful, correct and well written?
Reply with exactly one line: "Verdict: A", "Verdict: B" or "Verdict: tie"."""

VERDICT = re.compile(r"verdict\s*:\s*(a|b|tie)\b", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge gave no usable verdict after every retry."""


@dataclass
class JudgeClient:
    """Pairwise judge over an OpenAI-compatible `/chat/completions` endpoint.

    The API key is read from the environment variable `api_key_env` at call time and
    is never logged or stored. `timeout_s` is the deadline of one whole request (connect,
    send, complete reply), not of each socket read. Timeouts, connection failures, bodies
    cut short, non-HTTP replies, HTTP 429/5xx and malformed replies are retried with
    exponential back-off; after `max_retries` the comparison is reported as failed.
    """

    base_url: str
    model: str
    api_key_env: str = "SFTMIX_JUDGE_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0

    def verdict(self, instruction: str, answer_a: str, answer_b: str) -> str:
        """'A', 'B' or 'tie'; raises JudgeError after the retries (never another error for a bad server)."""
        prompt = JUDGE_PROMPT.format(instruction=instruction, answer_a=answer_a, answer_b=answer_b)
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                match = VERDICT.search(self._complete(prompt))
                if match:
                    return {"a": "A", "b": "B", "tie": "tie"}[match.group(1).lower()]
                last_error = "reply has no 'Verdict: A|B|tie' line"
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}"
                if err.code < 500 and err.code != 429:
                    break  # 4xx other than rate limiting will not heal on retry
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                # refused or reset connections, timeouts, a body cut short, a reply that is not HTTP at all
                last_error = f"connection: {type(err).__name__}: {getattr(err, 'reason', err)}"
            except (KeyError, IndexError, TypeError, ValueError) as err:  # not JSON, not UTF-8, another shape
                last_error = f"malformed reply ({type(err).__name__})"
        raise JudgeError(last_error)

    def _complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.base_url.rstrip('/')}/chat/completions", body, headers)
        with _Deadline(self.timeout_s) as deadline:
            opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
            try:
                with opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except (OSError, http.client.HTTPException):
                if deadline.expired:
                    raise TimeoutError(f"no complete reply within {self.timeout_s} s") from None
                raise
            if deadline.expired:
                raise TimeoutError(f"no complete reply within {self.timeout_s} s")
        reply = json.loads(raw)
        return reply["choices"][0]["message"]["content"]


class _Deadline:
    """Shuts a request's sockets when its overall deadline passes.

    urllib's `timeout` bounds each socket operation, so a server sending a byte every few
    seconds could hold a request (and the whole run) forever.
    """

    def __init__(self, seconds: float):
        self.seconds, self.expired, self.sockets = seconds, False, []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()

    def watch(self, sock) -> None:
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read, unlike close()
    except OSError:
        pass


def _watched(connection_class, deadline: _Deadline):
    class Watched(connection_class):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    return Watched


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self._context)


def pairwise_judge(client: JudgeClient, instructions: list[str], candidate_answers: list[str],
                   baseline_answers: list[str], names: tuple[str, str] = ("sftmix", "ntp")) -> dict[str, Any]:
    """Judge the candidate's answer against the baseline's on every instruction, each pair in both orders
    (position bias cancels); `names` are (candidate, baseline), the win rate is the candidate's.

    A pair whose judging failed is reported in `failed`, never counted as a win, loss or tie.
    """
    wins = {names[0]: 0.0, names[1]: 0.0}
    failed: list[dict[str, Any]] = []
    judged = 0
    pairs = list(zip(instructions, candidate_answers, baseline_answers))
    for index, (instruction, candidate, baseline) in enumerate(tqdm(pairs, desc="Judging")):
        try:
            first = client.verdict(instruction, candidate, baseline)  # the candidate is A
            second = client.verdict(instruction, baseline, candidate)  # the candidate is B
        except JudgeError as err:
            failed.append({"index": index, "error": str(err)})
            continue
        judged += 1
        for verdict, candidate_label in ((first, "A"), (second, "B")):
            if verdict == "tie":
                wins[names[0]] += 0.25
                wins[names[1]] += 0.25
            else:
                wins[names[0] if verdict == candidate_label else names[1]] += 0.5
    win_rate = wins[names[0]] / judged if judged else None
    return {"judged": judged, "failed": failed, "wins": wins, f"{names[0]}_win_rate": win_rate}


# --------------------------------------------------------------------------- official AlpacaEval 2 scorer

ALPACA_EVAL_NUMBERS = ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error", "n_total",
                       "avg_length")


def run_alpaca_eval(
    model_outputs: str | os.PathLike, output_dir: str | os.PathLike, name: str, annotator: str,
    reference_outputs: str | None = None, judge_base_url: str | None = None, api_key_env: str = "SFTMIX_JUDGE_API_KEY",
) -> dict[str, Any]:
    """Run `alpaca_eval evaluate` on a model_outputs.json and return this model's leaderboard row.

    The judge endpoint reaches alpaca_eval's OpenAI client through its environment (OPENAI_API_BASE and
    OPENAI_API_KEY, the latter copied from `api_key_env`), never the command line; an
    OPENAI_CLIENT_CONFIG_PATH of the user's is left as it is. The shared leaderboard inside the package
    is not modified (--is_cache_leaderboard False). Whether to run it at all is the config's decision
    (`alpaca_eval_scorer`, see config._official_scorer_wanted).
    """
    output_dir = Path(output_dir)
    command = ["alpaca_eval", "evaluate", "--model_outputs", str(model_outputs), "--annotators_config", annotator,
               "--output_path", str(output_dir), "--name", name, "--is_cache_leaderboard", "False"]
    if reference_outputs:
        command += ["--reference_outputs", str(reference_outputs)]
    environment = dict(os.environ)
    if judge_base_url:
        environment["OPENAI_API_BASE"] = judge_base_url
    if os.environ.get(api_key_env):
        environment["OPENAI_API_KEY"] = os.environ[api_key_env]
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise InputError(f"alpaca_eval failed (exit {done.returncode}) on {model_outputs}: {' | '.join(tail)}. The "
                         f"answers are kept in {model_outputs}; check the judge endpoint and key, or score them by "
                         f"hand: {' '.join(command)}")
    # alpaca_eval puts results under <output_path>/<annotator>/ when the annotator is a config name
    candidates = [output_dir / annotator / "leaderboard.csv", output_dir / "leaderboard.csv"]
    leaderboard = next((path for path in candidates if path.exists()), None)
    if leaderboard is None:
        raise InputError(f"alpaca_eval exited 0 but wrote no leaderboard.csv under {output_dir}")
    return {"annotator": annotator, **_leaderboard_row(leaderboard, name)}


def _leaderboard_row(path, name: str) -> dict[str, float]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    for row in rows[1:]:
        if row and row[0] == name:
            values = dict(zip(header[1:], row[1:]))
            return {key: float(values[key]) for key in ALPACA_EVAL_NUMBERS if values.get(key, "") != ""}
    raise InputError(f"{path}: no row for {name!r}")
