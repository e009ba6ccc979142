"""qtraj.joblog: one writer per job log (llm-compressor's loguru records included), and progress lines at a readable
rate. The logging cases run in a fresh process each, as a workflow job does."""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qtraj import evaluation
from qtraj.joblog import Progress, format_duration, remaining_seconds

# A job that logs through both loggers at once (llm-compressor's loguru and Python's logging, from two threads) and
# runs a tiny real oneshot; argv: log file, tiny model folder, "before" to import llm-compressor before job_logging
# (a worker forked from the job server has it imported already) or "inside".
JOB = """
import logging, sys, threading
log_file, model_dir, when = sys.argv[1:]
if when == "before":
    import llmcompressor  # noqa: F401
from qtraj.joblog import Progress, job_logging

print("job starts", flush=True)  # llm-compressor's import, before, prints its own line to stdout
with job_logging(log_file) as job_log:
    import torch
    from llmcompressor import logger, oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    oneshot(model=AutoModelForCausalLM.from_pretrained(model_dir),
            recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    long = "/a/path/that/is/long/" * 20

    def loguru_lines():
        for number in range(300):
            logger.info(f"loguru line {number} {long}")

    thread = threading.Thread(target=loguru_lines)
    thread.start()
    for number in range(300):
        job_log.info("logging line %d %s", number, long)
    thread.join()
    for _ in range(3):
        logger.bind(log_once=True).warning("a warning llm-compressor gives once")
    logger.debug("a debug line")
    logger.log("METRIC", "a metric line")
    progress = Progress(job_log, "scoring", 4, "items", min_interval_s=0.0)
    for _ in range(4):
        progress.advance()
"""
LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL|METRIC) [\w.]+: ")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("imported", ["inside", "before"])
def test_a_job_log_has_one_writer_and_every_message_once(tmp_path, tiny_model_dir, imported):
    log_file = tmp_path / "job.log"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(JOB), str(log_file), str(tiny_model_dir), imported],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    # llm-compressor printed its log to stdout (Snakemake's console)
    assert result.stdout.split("job starts\n")[1] == ""
    assert "loguru line" not in result.stderr and "Compression lifecycle" not in result.stderr
    # no progress bar on the console either, also those whose caller passes disable=False (compressed-tensors')
    assert "Applying quantization config" not in result.stderr and "it/s]" not in result.stderr
    lines = log_file.read_text().splitlines()
    assert not [line for line in lines if line.startswith("{")]  # no JSON: one format, one writer
    assert [line for line in lines if not LINE_START.match(line)] == []  # no line starts mid-line of another
    text = "\n".join(lines)
    for number in (0, 150, 299):
        assert text.count(f"loguru line {number} /a/path") == 1
        assert text.count(f"logging line {number} /a/path") == 1
    # llm-compressor's own records, named by their module, each once (its DEBUG file sink repeated them)
    assert len(re.findall(r"INFO llmcompressor\.[\w.]+: Compression lifecycle initialized", text)) == 1
    assert text.count("a warning llm-compressor gives once") == 1
    assert "a debug line" not in text  # the job log's level, INFO, applies to them too
    assert "METRIC __main__: a metric line" in text  # loguru's own levels keep their name
    assert text.count("INFO qtraj: scoring: ") == 4  # progress lines: in the log, not on the console


def fake_clock(step_s: float):
    """A clock that advances `step_s` seconds at every reading."""
    now = [0.0]

    def read() -> float:
        now[0] += step_s
        return now[0]

    return read


def progress_lines(caplog, total: int, step_s: float, **options) -> list[str]:
    logger = logging.getLogger("qtraj.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        caplog.clear()
        progress = Progress(logger, "scoring", total, "items", clock=fake_clock(step_s), **options)
        for _ in range(total):
            progress.advance()
    return [record.getMessage() for record in caplog.records]


def test_a_loop_shorter_than_the_minimum_interval_says_nothing(caplog):
    assert progress_lines(caplog, 100, 0.05) == []


def test_progress_lines_come_every_tenth_of_the_work_with_rate_and_time_left(caplog):
    lines = progress_lines(caplog, 100, 1.0)  # one item a second: 10% every 10 s
    assert len(lines) == 10
    assert lines[0] == "scoring: 10/100 items (10%), 1 items/s, 1 min 30 s left"
    assert lines[8] == "scoring: 90/100 items (90%), 1 items/s, 10 s left"
    assert lines[-1] == "scoring: 100 items in 1 min 40 s (1 items/s)"


def test_a_tenth_that_comes_too_soon_waits_for_the_minimum_interval(caplog):
    lines = progress_lines(caplog, 100, 0.25)  # 10% every 2.5 s: a line every 10 s (40 items) instead
    assert [line.split(" (")[0] for line in lines] == ["scoring: 40/100 items", "scoring: 80/100 items",
                                                        "scoring: 100 items in 25 s"]


def test_a_slow_loop_still_reports_every_max_interval(caplog):
    lines = progress_lines(caplog, 1000, 30.0)  # 10% would take 50 min: a line every minute instead
    assert lines[0] == "scoring: 2/1,000 items (0%), 0.033 items/s, 8 h 19 min left"
    assert len(lines) == 1000 // 2 - 1 + 1  # every second item but the last, then the final line


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(seconds) for seconds in (0.4, 42, 200, 7500, float("inf"))] == [
        "0 s", "42 s", "3 min 20 s", "2 h 05 min", "unknown time"]
    assert remaining_seconds(30.0, 25, 100) == pytest.approx(90.0)
    assert remaining_seconds(0.0, 0, 100) == float("inf")


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return type("Output", (), {"logits": self.embedding(input_ids)})


def test_validation_loss_logs_the_tokens_it_has_scored(caplog, monkeypatch):
    monkeypatch.setattr(evaluation, "Progress", functools.partial(Progress, clock=fake_clock(10.0)))
    blocks = np.random.default_rng(0).integers(0, 16, size=(8, 5))
    with caplog.at_level(logging.INFO, logger="qtraj.evaluation"):
        result = evaluation.cross_entropy(TinyLM(), blocks, batch_size=2)
    assert result.tokens == 32
    lines = [record.getMessage() for record in caplog.records  # INFO: the progress, not the full-logits warning
             if record.name == "qtraj.evaluation" and record.levelno == logging.INFO]
    assert lines[0].startswith("validation loss: 8/32 tokens (25%)")
    assert lines[-1].startswith("validation loss: 32 tokens in ")
