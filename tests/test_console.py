"""The console: training's step lines, the stages' progress lines, and Ray's INFO lines kept out unless --verbose."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from athanor.cluster.console import StepConsole
from athanor.console import Progress, hms, stage_line

STEP_LINE = re.compile(r"^train: step (\d+)/300  loss \d+\.\d{4}(  val_loss \d+\.\d{4})?  lr \d\.\de[-+]\d\d  "
                       r"[\d,]+ tok/s  elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$")


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_hms_and_stage_line():
    assert hms(0) == "0:00:00" and hms(62.4) == "0:01:02" and hms(3 * 3600 + 250) == "3:04:10"
    assert hms(None) == "?" and hms(float("inf")) == "?"
    assert stage_line("filter", 3144, 1232, 31.0) == "filter: 3,144 in, 1,232 kept (39.2%), 101 docs/s, 31.0 s"
    assert stage_line("dedup", 0, 0, 0.0) == "dedup: 0 in, 0 kept, 0.0 s"
    assert stage_line("quality", 80, 40, None) == "quality: 80 in, 40 kept (50.0%), done earlier"


def test_progress_prints_at_most_once_per_interval_with_an_eta():
    clock, lines = Clock(), []
    p = Progress("tokenize", 1000, every_s=10, clock=clock, out=lines.append, enabled=True)
    clock.t += 5
    p.update(100)  # too soon
    clock.t += 5
    p.update(200)  # 200 docs in 10 s: 800 left at 20/s
    clock.t += 3
    p.update(300)
    assert lines == ["tokenize: 200/1,000 docs, 20 docs/s, ETA 0:00:40"]
    shards = Progress("filter", 40, what="shards committed", rate=False, every_s=1, clock=clock,
                      out=lines.append, enabled=True)
    clock.t += 10
    shards.update(10)
    assert lines[-1] == "filter: 10/40 shards committed, ETA 0:00:30"
    quiet = Progress("x", 10, every_s=0, clock=clock, out=lines.append, enabled=False)  # on a terminal
    quiet.update(5)
    assert len(lines) == 2


def test_step_console_throttles_lines_and_estimates_the_time_left():
    clock = Clock()
    c = StepConsole("pretrain", max_steps=100, log_every=1, tokens_per_step=1000, flops_per_step=1e12,
                    peak_flops=None, started=clock.t - 30, every_s=5, clock=clock)
    metrics = {"loss": 5.12345, "lr": 3e-4}
    lines = {}
    for step in range(1, 101):
        clock.t += 1.0  # a step a second, 0.5 s of it the step's own compute
        line = c.step(step, 0.5, metrics, force=step == 50)
        if line:
            lines[step] = line
    assert sorted(lines) == [1, 6, 11, 16, 21, 26, 31, 36, 41, 46, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100]
    assert lines[1] == "train: step 1/100  loss 5.1235  lr 3.0e-04  2,000 tok/s  elapsed 0:00:31  ETA 0:00:50"
    assert lines[50].endswith("elapsed 0:01:20  ETA 0:00:50")
    assert "MFU" not in lines[50] and lines[100].endswith("ETA 0:00:00")
    assert c.start_line(41, 2, {"setup_s": 3.21, "restore_s": 0.4}) == \
        "train: 2 workers, resumed at step 40 of 100 (setup 3.2 s, restore 0.4 s)"
    assert c.start_line(1, 1, {"setup_s": 8.0, "restore_s": 0.0}) == "train: 1 worker, from step 0 of 100 (setup 8.0 s)"


def test_step_console_mfu_on_gpu_and_dpo_names():
    clock = Clock()
    c = StepConsole("dpo", max_steps=20, log_every=10, tokens_per_step=1000, flops_per_step=4e12, peak_flops=1e13,
                    started=clock.t, clock=clock)
    dpo = {"loss": 0.6931, "lr": 5e-3, "rewards/accuracies": 0.625, "rewards/margins": 0.0123,
           "val_reward_accuracy": 0.75}
    clock.t += 2
    line = c.step(1, 2.0, dpo)
    assert line.startswith("dpo: step 1/20  dpo_loss 0.6931  acc 0.62  margin 0.012  val_acc 0.7500  lr 5.0e-03  "
                           "500 tok/s  MFU 20.0%  elapsed 0:00:02  ETA 0:00:38")
    assert c.step(2, 2.0, dpo) is None  # not a multiple of log_every


def test_verbose_brings_back_ray_data_info_lines():
    """quiet_ray_data hides the console INFO lines of the `ray.data` loggers (execution plans), keeps warnings, and
    lets INFO through again when verbose."""
    script = (
        "import logging\n"
        "from athanor.console import quiet_ray_data\n"
        "log = logging.getLogger('ray.data._internal.execution.streaming_executor')\n"
        "quiet_ray_data()\n"
        "log.info('Execution plan of Dataset quiet'); log.warning('a warning stays')\n"
        "quiet_ray_data(quiet=False)\n"
        "log.info('Execution plan of Dataset verbose')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_DATA_LOG", "ATHANOR_"))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    logged = out.stdout + out.stderr
    assert "a warning stays" in logged and "Execution plan of Dataset verbose" in logged
    assert "Execution plan of Dataset quiet" not in logged


@pytest.mark.slow
def test_run_prints_stage_progress_and_training_lines_without_ray_info(smoke_run):
    _, out = smoke_run
    lines = out.splitlines()
    for stage in ("filter", "dedup", "quality", "tokenize"):
        assert any(re.match(rf"^{stage}: [\d,]+ in, [\d,]+ kept \(\d+\.\d%\), [\d,]+ docs/s, \d+\.\d s$", line)
                   for line in lines), (stage, out[-3000:])
    assert any(re.match(r"^tokenizer: \w+, vocab 1,024, trained on [\d,]+ sampled documents", line) for line in lines)
    assert any(re.match(r"^train: 2 workers, from step 0 of 300 \(setup \d+\.\d s\)$", line) for line in lines)
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
    assert steps[0] == 1 and steps[-1] == 300 and steps == sorted(steps), out[-3000:]
    assert 100 in steps and 200 in steps  # evaluation steps always get a line
    assert "val_loss" in next(line for line in lines if line.startswith("train: step 100/"))
    assert len(steps) < 150  # not one per step: log_every is 1, lines keep 5 s apart
    logged = out + smoke_run.stderr
    for ray_info in ("Execution plan of", "Starting execution of", "Started a local Ray instance",
                     "Started training worker group", "Checkpoint successfully created", "Reporting training result"):
        assert ray_info not in logged, ray_info
