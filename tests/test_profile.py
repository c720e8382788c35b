"""train.profile_steps: a jax.profiler trace of a window of steps in the workdir, where
TensorBoard's profile plugin reads it, and the run's losses as without it."""

import pathlib
import socket

import pytest

from polyjax import metrics as mx
from polyjax import profile
from polyjax.config import TrainConfig


def _fields(message: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a protobuf message: enough of the wire format
    to read an XSpace without its generated module."""

    def varint(i):
        value = shift = 0
        while True:
            byte = message[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    out, i = [], 0
    while i < len(message):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            size, i = varint(i)
            value, i = message[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = message[i : i + size], i + size
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, wire, value))
    return out


def plane_names(xplane: bytes) -> list[str]:
    """The planes of an XSpace (tsl/profiler/protobuf/xplane.proto: XSpace.planes = 1,
    XPlane.name = 2): "/host:CPU", "/device:GPU:0", "/device:TPU:0", ..."""
    planes = [v for n, w, v in _fields(xplane) if n == 1 and w == 2]
    return [v.decode() for p in planes for n, w, v in _fields(p) if n == 2 and w == 2]


def test_a_trace_of_two_steps_in_the_workdir_and_the_losses_unchanged(
    tmp_path, tiny, trained, launch_py
):
    """Steps 3 and 4 of the shared 6-step run traced (the field given on the command
    line): the session folder TensorBoard's profile plugin lists, an XSpace with the
    host's plane holding the train step, and the losses of the run without a trace."""
    workdir = tmp_path / "run"
    argv = [*tiny.argv(**trained.run), f"--workdir={workdir}"]
    result = launch_py(*argv, "--config.train.profile_steps=(3,5)")
    assert result.code == 0, result.err
    plugin = workdir / "tensorboard" / "plugins" / "profile"
    assert f"profile of steps 3-4: {plugin} " in result.out
    (session,) = plugin.iterdir()  # one trace session, named by its start time
    xplane = session / f"{socket.gethostname()}.xplane.pb"
    assert xplane.is_file(), sorted(p.name for p in session.iterdir())
    data = xplane.read_bytes()
    assert "/host:CPU" in plane_names(data) and b"train_step" in data
    assert any(p.name.startswith("events") for p in (workdir / "tensorboard").iterdir())
    read = lambda path: [(r["step"], r["loss"]) for r in mx.read_jsonl(path / mx.JSONL)]
    assert read(workdir) == read(trained.path)


@pytest.mark.parametrize(
    "steps,resumed,expected",
    [
        ((3, 6), 0, [("start", 2), ("stop", 5)]),  # after step 2 has finished
        ((1, 3), 0, [("start", 0), ("stop", 2)]),  # before the first step
        ((3, 6), 4, [("start", 4), ("stop", 5)]),  # resumed inside: what is left
        ((3, 6), 6, []),  # resumed past it
        ((0, 0), 0, []),
    ],
)
def test_the_window_starts_and_stops_around_its_steps(steps, resumed, expected, monkeypatch):
    """``after(step)`` is called once each step is dispatched: the trace starts after
    step start-1 (or before the run's first step) and stops after step stop-1."""
    calls, now = [], [resumed]
    monkeypatch.setattr(
        profile.jax.profiler, "start_trace", lambda d: calls.append(("start", now[0]))
    )
    monkeypatch.setattr(profile.jax.profiler, "stop_trace", lambda: calls.append(("stop", now[0])))
    with profile.Window(pathlib.Path("w"), steps, resumed, say=lambda s: None) as window:
        for step in range(resumed + 1, 7):
            now[0] = step
            window.after(step, None)
    assert calls == expected


def test_a_run_that_stops_inside_the_window_ends_the_trace(monkeypatch):
    calls = []
    monkeypatch.setattr(profile.jax.profiler, "start_trace", lambda d: calls.append("start"))
    monkeypatch.setattr(profile.jax.profiler, "stop_trace", lambda: calls.append("stop"))
    with (
        pytest.raises(KeyboardInterrupt),
        profile.Window(pathlib.Path("w"), (1, 5), 0, print) as window,
    ):
        window.after(1, None)
        raise KeyboardInterrupt
    assert calls == ["start", "stop"]


def test_profile_steps_are_checked(tiny, launch_py):
    assert TrainConfig().profile_steps == (0, 0)
    assert TrainConfig(steps=6, profile_steps=[3, 7]).profile_steps == (3, 7)  # from JSON
    for bad in [(3, 3), (5, 3), (0, 2), (3, 8), (3,), (3.0, 5)]:
        with pytest.raises(ValueError, match=r"train\.profile_steps"):
            TrainConfig(steps=6, profile_steps=bad)
    argv = [*tiny.argv(**{"train.steps": 6}), "--config.train.profile_steps=(4,9)"]
    launch_py(*argv).error("train.profile_steps=(4, 9)", "train.steps + 1 = 7")
