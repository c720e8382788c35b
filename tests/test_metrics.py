"""Metrics: JSONL + TensorBoard records, resume truncation, progress line, plot."""

import io

import numpy as np
import pytest

from polyjax import metrics as mx


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_writer_records_and_truncates_on_resume(tmp_path):
    w = mx.Writer(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"loss": np.float32(step), "expert_load": np.full((2, 4), 0.25)})
    w.close()
    records = mx.read_jsonl(tmp_path / mx.JSONL)
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0]
    assert records[0]["expert_load"] == [[0.25] * 4] * 2
    assert any((tmp_path / "tensorboard").iterdir())
    mx.Writer(tmp_path, resume_step=2).close()  # a resume from step 2 forgets step 3
    assert [r["step"] for r in mx.read_jsonl(tmp_path / mx.JSONL)] == [1, 2]


def test_progress_plain_and_tty():
    plain = io.StringIO()
    p = mx.Progress(10, stream=plain)
    p.update(5, 2.5, 1000.0)
    p.update(10, 2.0, 1000.0)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 5/10  loss 2.5000  1,000 tok/s")
    tty = Tty()
    p = mx.Progress(10, stream=tty)
    p.update(5, 2.5, 1000.0)
    p.update(10, 2.0, 1000.0)
    p.message("done")
    text = tty.getvalue()
    assert text.count("\r") == 2 and text.endswith("\ndone\n")


def test_plot_and_summary(tmp_path):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "val_loss": 2.5}]
    mx.plot_losses(records, tmp_path / "loss.png", baseline=4.0)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = mx.summary(records, {"unigram_loss": 4.0})
    assert "val_loss      2.5" in text and "unigram_loss  4" in text


def test_peak_flops_by_device_kind():
    assert mx.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mx.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mx.peak_flops("TPU v5 lite") == 197e12
    assert mx.peak_flops("cpu") is None
    assert mx.peak_flops("cpu", configured=1e12) == 1e12


def test_throughput_and_mfu_leave_out_paused_time(monkeypatch):
    clock = iter([10.0, 12.0, 13.0, 18.0])  # start, pause in, pause out, measure
    monkeypatch.setattr(mx.time, "perf_counter", lambda: next(clock))
    meter = mx.Throughput(tokens_per_step=100, flops_per_step=6e6, peak=1e9)
    assert meter.measure(5) == {}  # before start: nothing to say
    meter.start(1)
    with meter.paused():  # one second of evaluation
        pass
    got = meter.measure(9)  # 8 steps of 100 tokens in 8 - 1 = 7 seconds of training
    assert got["tokens_per_s"] == pytest.approx(800 / 7, rel=1e-12)
    assert got["mfu"] == pytest.approx((8 / 7) * 6e6 / 1e9, rel=1e-12)


def test_throughput_mean_is_all_timed_tokens_over_their_time(monkeypatch):
    # start, measure, pause in, pause out, measure
    clock = iter([0.0, 2.0, 3.0, 4.0, 7.0])
    monkeypatch.setattr(mx.time, "perf_counter", lambda: next(clock))
    meter = mx.Throughput(tokens_per_step=100, flops_per_step=6e6, peak=1e9)
    meter.start(1)
    assert meter.mean() == {}  # nothing timed yet
    assert meter.measure(5)["tokens_per_s"] == pytest.approx(400 / 2)  # 4 steps in 2 s
    with meter.paused():
        pass
    assert meter.measure(6)["tokens_per_s"] == pytest.approx(100 / 4)  # 1 step in 5 - 1 s
    mean = meter.mean()  # 5 steps in 6 s, not the mean of 200 and 25 (112.5)
    assert mean["tokens_per_s_mean"] == pytest.approx(500 / 6, rel=1e-12)
    assert mean["mfu_mean"] == pytest.approx((5 / 6) * 6e6 / 1e9, rel=1e-12)
    assert mean["timed_steps"] == 5
    text = mx.summary([{"step": 6, "loss": 2.0, "tokens_per_s": 25.0}], mean)
    assert "tokens_per_s       25" in text and "tokens_per_s_mean  83.33" in text


def test_finish_keeps_the_mean_of_a_launch_that_trained_nothing(tmp_path):
    """A finished run launched again trains no step: its summary keeps the mean."""
    mx.Writer(tmp_path).close()
    progress = mx.Progress(2, stream=io.StringIO())
    first = mx.finish(tmp_path, 4.0, progress, {"tokens_per_s_mean": 123.0, "timed_steps": 3})
    again = mx.finish(tmp_path, 4.0, progress, {})
    assert first["tokens_per_s_mean"] == again["tokens_per_s_mean"] == 123.0
