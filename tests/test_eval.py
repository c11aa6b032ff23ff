import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl
from transformers import AutoModelForCausalLM

from sftmix import evaluation as ev
from sftmix.config import EvalConfig
from sftmix.data import build_dataset
from sftmix.errors import InputError
from sftmix.recipes.evaluate import evaluate

ALPACA_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "alpaca-7b.jsonl"


def test_response_perplexity_matches_independent_computation(tiny_model_dir, tiny_data, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset, _ = build_dataset(tiny_data[0], tokenizer, max_length=64)
    result = ev.response_perplexity(model, dataset, tokenizer.pad_token_id, max_tokens=90)
    total_nll, total_tokens = 0.0, 0
    for index, row in enumerate(dataset):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        nll = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count = int((targets != -100).sum())
        assert result["per_example"][index]["nll"] == pytest.approx(nll / count, rel=1e-4)
        total_nll, total_tokens = total_nll + nll, total_tokens + count
    assert result["nll"] == pytest.approx(total_nll / total_tokens, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    assert result["num_tokens"] == total_tokens


@pytest.mark.skipif(not ALPACA_EVAL.exists(), reason="needs ../shared/data/alpaca_eval beside the checkout")
def test_eval_command_outputs_formats(tiny_model_dir, tiny_data, tmp_path):
    alpaca_rows = [json.loads(line) for line in ALPACA_EVAL.read_text().splitlines()[:3]]
    alpaca = write_jsonl(tmp_path / "alpaca_eval.jsonl", alpaca_rows)
    questions = write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["tell me about the cat", "why"]},
        {"question_id": 82, "category": "writing", "turns": ["one two"]},
    ])
    metrics = evaluate(EvalConfig(model=str(tiny_model_dir), dataset=[str(tiny_data[0]), str(alpaca)],
                                  prompts=str(questions), confidence_dataset=str(tiny_data[0]),
                                  output_dir=str(tmp_path / "ev"), max_new_tokens=5, max_length=4096, use_cpu=True))
    assert set(metrics["likelihood"]) == {"data", "alpaca_eval"}
    assert metrics["likelihood"]["alpaca_eval"]["num_examples"] == 3
    assert metrics["confidence"]["confidence_std"] > 0
    outputs = json.loads((tmp_path / "ev" / "model_outputs.json").read_text())
    assert [set(row) for row in outputs] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert outputs[0]["instruction"] == "tell me about the cat"
    answers = [json.loads(line) for line in (tmp_path / "ev" / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82]
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 1]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics
    per_example = (tmp_path / "ev" / "nll-alpaca_eval.jsonl").read_text().splitlines()
    assert json.loads(per_example[0])["id"] == "alpaca_eval-0"


def test_generation_is_greedy_and_batch_independent(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    conversations = [["tell me"], ["why is the sky blue and the sea green"], ["one"]]
    batched = ev.generate_answers(model, tokenizer, conversations, max_new_tokens=6, batch_size=3)
    single = [ev.generate_answers(model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in conversations]
    assert batched == single  # left padding does not change greedy answers


# --------------------------------------------------------------------------- judge against a local server


class ScriptedJudge(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions from a script of behaviours, one per request."""

    script: list[str] = []
    seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScriptedJudge.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        behaviour = ScriptedJudge.script.pop(0) if ScriptedJudge.script else "A"
        if behaviour == "500":
            self.send_error(500)
            return
        if behaviour == "401":
            self.send_error(401)
            return
        if behaviour == "timeout":
            time.sleep(0.6)
        if behaviour == "malformed":
            payload = b'{"choices": []}'
        elif behaviour == "garbage":
            payload = b"<html>not json"
        else:
            content = {"A": "Verdict: A", "B": "Reasoning...\nVerdict: B", "tie": "verdict: TIE", "none": "maybe"}
            message = {"role": "assistant", "content": content[behaviour]}
            payload = json.dumps({"choices": [{"message": message}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)
        except BrokenPipeError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ScriptedJudge.script, ScriptedJudge.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def client(url, **kwargs):
    return ev.JudgeClient(url, "judge-model", api_key_env="TEST_JUDGE_KEY", timeout_s=0.3, backoff_s=0.01, **kwargs)


def test_judge_retries_transient_failures_then_succeeds(judge_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret")
    ScriptedJudge.script = ["500", "timeout", "malformed", "garbage", "B"]
    assert client(judge_server, max_retries=4).verdict("q", "x", "y") == "B"
    assert len(ScriptedJudge.seen) == 5
    assert ScriptedJudge.seen[0]["path"] == "/v1/chat/completions"
    assert ScriptedJudge.seen[0]["auth"] == "Bearer sk-secret"
    assert ScriptedJudge.seen[0]["body"]["model"] == "judge-model"


def test_judge_gives_up_and_reports(judge_server):
    ScriptedJudge.script = ["500"] * 3
    with pytest.raises(ev.JudgeError, match="HTTP 500"):
        client(judge_server, max_retries=2).verdict("q", "x", "y")
    ScriptedJudge.script = ["401"]
    with pytest.raises(ev.JudgeError, match="HTTP 401"):
        client(judge_server, max_retries=5).verdict("q", "x", "y")
    assert len(ScriptedJudge.seen) == 4  # a 401 is not retried


def test_pairwise_counts_only_judged_pairs(judge_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret")
    # pair 0: x wins as A and as B; pair 1: never a verdict; pair 2: tie then x loses as B
    ScriptedJudge.script = ["A", "B", "none", "none", "tie", "A"]
    result = ev.pairwise_judge(client(judge_server, max_retries=1), ["p0", "p1", "p2"], ["x0", "x1", "x2"],
                               ["y0", "y1", "y2"])
    assert result["judged"] == 2
    assert result["failed"] == [{"index": 1, "error": "reply has no 'Verdict: A|B|tie' line"}]
    assert result["wins"] == {"sftmix": 1.0 + 0.25, "ntp": 0.25 + 0.5}
    assert result["sftmix_win_rate"] == pytest.approx(1.25 / 2)
    assert "sk-secret" not in json.dumps(result)


# --------------------------------------------------------------------------- official AlpacaEval scorer (faked)

FAKE_ALPACA_EVAL = """#!{python}
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
Path(os.environ["FAKE_ALPACA_EVAL_LOG"]).write_text(json.dumps({{
    "argv": args, "base": os.environ.get("OPENAI_API_BASE"), "key": os.environ.get("OPENAI_API_KEY")}}))
if os.environ.get("FAKE_ALPACA_EVAL_FAIL"):
    print("openai.AuthenticationError: 401", file=sys.stderr)
    sys.exit(3)
options = dict(zip(args[1::2], args[2::2]))
outputs = json.loads(Path(options["--model_outputs"]).read_text())
target = Path(options["--output_path"]) / options["--annotators_config"]
target.mkdir(parents=True, exist_ok=True)
(target / "leaderboard.csv").write_text(
    ",length_controlled_winrate,win_rate,standard_error,n_total,avg_length,lc_standard_error\\n"
    "gpt4_turbo,50.0,50.0,0.0,805,2049,0.0\\n"
    + options["--name"] + f",12.5,10.0,1.5,{{len(outputs)}},321,0.7\\n")
"""


@pytest.fixture
def alpaca_eval_prompts(tmp_path):
    return write_jsonl(tmp_path / "alpaca_eval.jsonl", [
        {"instruction": "tell me about the cat", "output": "a cat", "dataset": "helpful_base"},
        {"instruction": "why is the sky blue", "output": "light", "dataset": "helpful_base"},
    ])


def fake_alpaca_eval(tmp_path, monkeypatch) -> Path:
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "alpaca_eval"
    script.write_text(FAKE_ALPACA_EVAL.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))  # nothing else: a real alpaca_eval must not be found
    monkeypatch.setenv("FAKE_ALPACA_EVAL_LOG", str(tmp_path / "call.json"))
    return tmp_path / "call.json"


def test_official_alpaca_eval_scorer_is_called_with_the_judge_in_its_environment(
    tiny_model_dir, tmp_path, monkeypatch, alpaca_eval_prompts
):
    call_log = fake_alpaca_eval(tmp_path, monkeypatch)
    monkeypatch.setenv("SFTMIX_JUDGE_API_KEY", "sk-test-secret")
    out = tmp_path / "ev"
    metrics = evaluate(EvalConfig(model=str(tiny_model_dir), prompts=str(alpaca_eval_prompts), output_dir=str(out),
                                  max_new_tokens=3, use_cpu=True, generator="tiny-sftmix",
                                  judge_base_url="http://judge.invalid/v1"))  # alpaca_eval_scorer: auto
    call = json.loads(call_log.read_text())
    assert call["argv"][0] == "evaluate"
    options = dict(zip(call["argv"][1::2], call["argv"][2::2]))
    assert options["--model_outputs"] == str(out / "model_outputs.json")
    assert options["--annotators_config"] == "weighted_alpaca_eval_gpt4_turbo"
    assert options["--name"] == "tiny-sftmix" and options["--is_cache_leaderboard"] == "False"
    assert call["base"] == "http://judge.invalid/v1" and call["key"] == "sk-test-secret"
    assert "sk-test-secret" not in " ".join(call["argv"]) and "sk-test-secret" not in (out / "metrics.json").read_text()
    assert metrics["alpaca_eval"] == {"annotator": "weighted_alpaca_eval_gpt4_turbo", "length_controlled_winrate": 12.5,
                                      "lc_standard_error": 0.7, "win_rate": 10.0, "standard_error": 1.5,
                                      "n_total": 2.0, "avg_length": 321.0}
    assert json.loads((out / "metrics.json").read_text()) == metrics

    monkeypatch.setenv("FAKE_ALPACA_EVAL_FAIL", "1")
    with pytest.raises(InputError, match=r"alpaca_eval failed \(exit 3\).*401.*answers are kept"):
        evaluate(EvalConfig(model=str(tiny_model_dir), prompts=str(alpaca_eval_prompts), output_dir=str(out),
                            max_new_tokens=3, use_cpu=True, judge_base_url="http://judge.invalid/v1"))
    assert json.loads((out / "metrics.json").read_text())["generation"]["prompts"] == 2  # kept, not lost


def test_alpaca_eval_scorer_not_installed(tiny_model_dir, tmp_path, monkeypatch, alpaca_eval_prompts):
    monkeypatch.setenv("PATH", str(tmp_path))  # no alpaca_eval command anywhere
    monkeypatch.setenv("SFTMIX_JUDGE_API_KEY", "sk-test-secret")
    settings = dict(model=str(tiny_model_dir), prompts=str(alpaca_eval_prompts), max_new_tokens=3, use_cpu=True,
                    judge_base_url="http://judge.invalid/v1")
    with pytest.raises(InputError, match=r"--alpaca_eval_scorer on needs the `alpaca_eval` command \(pip install "
                                         r"alpaca-eval\)"):
        evaluate(EvalConfig(**settings, output_dir=str(tmp_path / "on"), alpaca_eval_scorer="on"))
    assert not (tmp_path / "on" / "model_outputs.json").exists()  # refused before generating anything
    metrics = evaluate(EvalConfig(**settings, output_dir=str(tmp_path / "auto")))  # auto: answers only
    assert "alpaca_eval" not in metrics and (tmp_path / "auto" / "model_outputs.json").exists()
    monkeypatch.delenv("SFTMIX_JUDGE_API_KEY")
    with pytest.raises(InputError, match=r"a judge endpoint \(--judge_base_url with its key in \$SFTMIX_JUDGE_API_KEY"):
        evaluate(EvalConfig(**settings, output_dir=str(tmp_path / "on"), alpaca_eval_scorer="on"))


def test_mt_bench_questions_are_answered_beside_alpaca_eval(tiny_model_dir, tmp_path, alpaca_eval_prompts):
    questions = write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["tell me about the cat", "why"]},
        {"question_id": 82, "category": "math", "turns": ["one two"]},
    ])
    out = tmp_path / "ev"
    metrics = evaluate(EvalConfig(model=str(tiny_model_dir), prompts=str(alpaca_eval_prompts), output_dir=str(out),
                                  mt_bench_questions=str(questions), max_new_tokens=3, use_cpu=True,
                                  alpaca_eval_scorer="off"))
    assert metrics["mt_bench"] == {"questions": 2, "turns": 3}
    answers = [json.loads(line) for line in (out / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82]
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 1]
    assert len(json.loads((out / "model_outputs.json").read_text())) == 2
    with pytest.raises(InputError, match="no such file"):
        evaluate(EvalConfig(model=str(tiny_model_dir), output_dir=str(out),
                            mt_bench_questions=str(tmp_path / "x.jsonl")))
