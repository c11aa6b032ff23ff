"""Hostile-input battery, evaluation: a misbehaving judge server, colliding set names, bad prompt
files, diverged or mismatched models. Nothing here may abort a run without a clear error, or
count a failed judgement."""

import json
import socketserver
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import model_variant, write_jsonl

from sftmix import evaluation as ev
from sftmix import report
from sftmix.config import EvalConfig
from sftmix.data import load_prompts
from sftmix.errors import InputError
from sftmix.recipes.evaluate import evaluate

VERDICT_BODY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Verdict: A"}}]}).encode()


class HostileJudge(socketserver.StreamRequestHandler):
    """A raw TCP server playing one scripted behaviour per connection (so it can break HTTP itself)."""

    script: list[str] = []

    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # request line and headers
            pass
        behaviour = HostileJudge.script.pop(0) if HostileJudge.script else "ok"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        try:
            if behaviour == "ok":
                self.wfile.write(head % len(VERDICT_BODY) + VERDICT_BODY)
            elif behaviour == "truncated":  # promises 139 bytes, sends 20, closes
                self.wfile.write(head % len(VERDICT_BODY) + VERDICT_BODY[:20])
            elif behaviour == "not_http":
                self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            elif behaviour == "hang_up":
                pass  # closes without a reply
            elif behaviour == "null_content":
                body = b'{"choices": [{"message": {"content": null}}]}'
                self.wfile.write(head % len(body) + body)
            elif behaviour == "drip":  # a byte every 0.1 s: no single read ever times out
                self.wfile.write(head % len(VERDICT_BODY))
                for byte in VERDICT_BODY:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
        except OSError:
            pass


@pytest.fixture
def hostile_judge():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), HostileJudge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    HostileJudge.script = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def judge(url, **kwargs):
    settings = {"timeout_s": 1.0, "backoff_s": 0.01, "max_retries": 0} | kwargs
    return ev.JudgeClient(url, "judge-model", **settings)


# --------------------------------------------------------------------------- 10. the judge client


@pytest.mark.parametrize("behaviour", ["truncated", "not_http", "hang_up", "null_content"])
def test_judge_transport_failures_become_judge_errors(hostile_judge, behaviour):
    HostileJudge.script = [behaviour]
    with pytest.raises(ev.JudgeError):
        judge(hostile_judge).verdict("q", "x", "y")


def test_judge_retries_after_a_broken_reply(hostile_judge):
    HostileJudge.script = ["truncated", "not_http", "ok"]
    assert judge(hostile_judge, max_retries=2).verdict("q", "x", "y") == "A"


def test_judge_deadline_covers_the_whole_request_not_each_read(hostile_judge):
    HostileJudge.script = ["drip"]  # the complete reply would take ~14 s
    started = time.monotonic()
    with pytest.raises(ev.JudgeError, match="no complete reply within 1.0 s"):
        judge(hostile_judge).verdict("q", "x", "y")
    assert time.monotonic() - started < 5


def test_broken_replies_land_under_failed_and_the_report_says_how_many(hostile_judge, tmp_path):
    HostileJudge.script = ["ok", "ok", "truncated", "ok", "ok"]  # pair 1: no verdict (no retry here)
    result = ev.pairwise_judge(judge(hostile_judge), ["p0", "p1", "p2"], ["x0", "x1", "x2"], ["y0", "y1", "y2"])
    assert result["judged"] == 2 and [failure["index"] for failure in result["failed"]] == [1]
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "seed5.json").write_text(json.dumps(result))
    summary = report.judge_summary(tmp_path, [5])
    assert summary == {"seed5": {"judged": 2, "failed": 1, "sftmix_win_rate": result["sftmix_win_rate"]}}
    config = SimpleNamespace(model_name_or_path="m", dataset_path="d", max_length=64,
                             loss_type="sftmix", mixup_weight=0.2, mixup_alpha=0.5, seeds=[5])
    metrics = {"data": {"train": 8, "heldout": 2}, "table": [], "judge": summary,
               "split": {"confident": {"count": 4}, "unconfident": {"count": 4}, "all": {"median": -3.0}}}
    text = report.render(tmp_path, config, metrics)
    assert "1 of 3 pairs failed" in text and "2 of 3 pairs judged" in text


# --------------------------------------------------------------------------- 12. two sets with one name


def test_eval_keeps_both_sets_with_the_same_file_name(tiny_model_dir, tmp_path):
    rows = [{"id": f"q{i}", "instruction": "tell me", "output": "blue sky " * (i + 1)} for i in range(5)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_jsonl(tmp_path / "a" / "heldout.jsonl", rows[:2])
    second = write_jsonl(tmp_path / "b" / "heldout.jsonl", rows[2:])
    metrics = evaluate(EvalConfig(model=str(tiny_model_dir), dataset=[str(first), str(second)], use_cpu=True,
                                  output_dir=str(tmp_path / "ev"), max_length=64))
    assert {name: result["num_examples"] for name, result in metrics["likelihood"].items()} == {
        "heldout": 2, "b-heldout": 3}
    assert (tmp_path / "ev" / "nll-heldout.jsonl").exists() and (tmp_path / "ev" / "nll-b-heldout.jsonl").exists()


def test_set_names_stay_unique_in_every_case():
    names = ev.set_names(["a/x.jsonl", "b/x.jsonl", "b/x.json", "a/x.jsonl", "y.parquet"])
    assert len(set(names)) == 5 and names[0] == "x" and names[-1] == "y"


# --------------------------------------------------------------------------- 13. prompt files


def test_mt_bench_question_with_no_turns_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 1, "turns": ["hi"]},
                                                     {"question_id": 2, "turns": []}])
    with pytest.raises(InputError, match=r"question\.jsonl:2: 'turns' must be a non-empty list"):
        load_prompts(str(path))


def test_empty_prompts_file_is_an_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match=r"prompts\.jsonl: no prompts"):
        load_prompts(str(path))


# --------------------------------------------------------------------------- 6 / 13. diverged or mismatched models


def test_eval_of_a_diverged_model_is_refused_not_written_as_nan(tiny_model_dir, tiny_data, tmp_path):
    def nan_head(model):
        model.lm_head.weight.fill_(float("nan"))

    broken = model_variant(tiny_model_dir, tmp_path / "nan-model", nan_head)
    with pytest.raises(InputError, match="NaN, inf or too large"):
        evaluate(EvalConfig(model=str(broken), dataset=[str(tiny_data[0])], use_cpu=True,
                            output_dir=str(tmp_path / "ev"), max_length=64))
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_eval_of_an_overflowing_model_is_refused(tiny_model_dir, tiny_data, tmp_path):
    def huge_head(model):
        torch.manual_seed(0)
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 1e5)

    diverged = model_variant(tiny_model_dir, tmp_path / "huge-model", huge_head)
    with pytest.raises(InputError, match="NaN, inf or too large"):
        evaluate(EvalConfig(model=str(diverged), dataset=[str(tiny_data[0])], use_cpu=True,
                            output_dir=str(tmp_path / "ev"), max_length=64))


def test_eval_of_a_model_with_fewer_embeddings_than_tokens_is_refused(tiny_model_dir, tiny_data, tmp_path):
    small = model_variant(tiny_model_dir, tmp_path / "small-vocab", vocab_size=200)
    with pytest.raises(InputError, match=r"small-vocab: the model has 200 token embeddings but the tokenizer has"):
        evaluate(EvalConfig(model=str(small), dataset=[str(tiny_data[0])], use_cpu=True,
                            output_dir=str(tmp_path / "ev"), max_length=64))


def test_eval_of_a_missing_model_directory_names_the_path(tiny_data, tmp_path):
    with pytest.raises(InputError, match=r"no-such-model: no such directory"):
        evaluate(EvalConfig(model=str(tmp_path / "no-such-model"), dataset=[str(tiny_data[0])], use_cpu=True,
                            output_dir=str(tmp_path / "ev")))


def test_eval_of_a_training_cut_before_its_tokenizer_is_one_line_naming_model(tiny_model_dir, tiny_data, tmp_path):
    """A folder with only config.json, or with the weights but not yet the tokenizer (a training killed as it saved):
    the message names --model (eval's option) and what is missing."""
    import shutil

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_model_dir / "config.json", partial)
    for stage in ("config only", "weights, no tokenizer"):
        if stage == "weights, no tokenizer":
            shutil.copy(tiny_model_dir / "model.safetensors", partial)
        with pytest.raises(InputError, match=r"--model .*partial: the directory holds no tokenizer"):
            evaluate(EvalConfig(model=str(partial), dataset=[str(tiny_data[0])], use_cpu=True,
                                output_dir=str(tmp_path / "ev")))


def test_eval_takes_the_chat_template_its_advice_names(tiny_model_dir, tiny_data, tmp_path):
    from conftest import CHATML, model_variant

    bare = model_variant(tiny_model_dir, tmp_path / "bare")
    config_file = bare / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "chat_template"}))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(InputError, match="set one with --chat_template_path"):
        evaluate(EvalConfig(model=str(bare), dataset=[str(tiny_data[0])], use_cpu=True, output_dir=str(tmp_path / "a")))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    metrics = evaluate(EvalConfig(model=str(bare), dataset=[str(tiny_data[0])], use_cpu=True, max_length=64,
                                  output_dir=str(tmp_path / "b"), chat_template_path=str(tmp_path / "chatml.jinja")))
    assert metrics["likelihood"]["data"]["num_examples"] == 16
