import os
import signal
import time

import pytest

from vqmae.isolate import isolated_map


def square_or_die(x):
    if x == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == "hang":
        time.sleep(60)
    if x == "raise":
        raise ValueError("bad item")
    return x * x


def by_index(outcomes):
    return {o.index: o for o in outcomes}


@pytest.mark.parametrize("workers", [0, 2])
def test_results_and_exceptions(workers):
    out = by_index(isolated_map(square_or_die, [1, 2, "raise", 4], workers=workers, context="fork"))
    assert [out[i].value for i in (0, 1, 3)] == [1, 4, 16]
    assert not out[2].ok and out[2].error == "bad item" and isinstance(out[2].exception, ValueError)
    assert not out[2].crashed


def test_crash_fails_only_that_item_and_run_continues():
    items = [1, "segv", 3, 4, "segv", 6]
    out = by_index(isolated_map(square_or_die, items, workers=2, context="fork"))
    assert sorted(out) == list(range(6))
    for i in (1, 4):
        assert not out[i].ok and out[i].crashed
        assert out[i].error == "worker crashed: killed by SIGSEGV"
    assert [out[i].value for i in (0, 2, 3, 5)] == [1, 9, 16, 36]


def test_timeout_kills_hung_worker():
    t0 = time.monotonic()
    out = by_index(isolated_map(square_or_die, ["hang", 2, 3], workers=1, timeout=1.0, context="fork"))
    assert time.monotonic() - t0 < 30
    assert out[0].error == "timed out after 1 s" and out[0].crashed
    assert out[1].value == 4 and out[2].value == 9


def test_timeout_per_item():
    """A time limit given per item: the hanging item fails after its own limit, the others have none."""
    limits = {"hang": 1.0}
    out = by_index(isolated_map(square_or_die, [2, "hang", 3], workers=1, context="fork",
                                timeout=lambda item: limits.get(item)))
    assert out[1].crashed and out[1].error == "timed out after 1 s"
    assert out[0].value == 4 and out[2].value == 9


def steps(x):
    """`x` steps of 0.4 s, each reported as progress; a negative `x` reports once, then stalls."""
    from vqmae.isolate import progress

    for k in range(abs(x)):
        time.sleep(0.4)
        progress(k + 1, abs(x))
        if x < 0:
            time.sleep(60)
    return x


@pytest.mark.parametrize("workers", [0, 1])
def test_progress_reaches_the_parent_and_restarts_the_timeout(workers):
    """An item that keeps reporting progress runs past its timeout (1 s; it takes 2.4 s); every report
    reaches on_progress with its item, in order."""
    seen = []
    out = by_index(isolated_map(steps, [6, 2], workers=workers, timeout=1.0, context="fork",
                                on_progress=lambda item, done, total: seen.append((item, done, total))))
    assert out[0].ok and out[0].value == 6 and out[1].ok
    assert [d for i, d, t in seen if i == 6] == [1, 2, 3, 4, 5, 6] and (2, 2, 2) in seen


def test_stalled_progress_times_out():
    out = by_index(isolated_map(steps, [-3, 2], workers=1, timeout=1.0, context="fork"))
    assert out[0].crashed and out[0].error == "timed out: no progress for 1 s"
    assert out[1].ok


def test_slow_consumer_never_turns_a_finished_item_into_a_timeout():
    got = {}
    for o in isolated_map(time.sleep, [0.3, 1.0], workers=2, timeout=2.0, context="fork"):
        got[o.index] = o
        if o.index == 0:
            time.sleep(3)  # the other item finishes meanwhile, well inside its timeout
    assert got[0].ok and got[1].ok, got[1].error


def native_noise(x):
    """Writes to fd 2 below Python (as FFmpeg inside decord does), and to sys.stderr, then acts."""
    import sys

    os.write(2, f"[mov @ 0x1] native line for {x}\n".encode())
    print(f"python line for {x}", file=sys.stderr)
    return square_or_die(x)


def test_native_stderr_is_captured_per_item_and_python_stderr_still_shows(capfd):
    out = by_index(isolated_map(native_noise, [2, "raise", "segv", 5], workers=1, context="fork"))
    assert out[0].value == 4 and out[3].value == 25
    assert out[1].log == "[mov @ 0x1] native line for raise\n"  # this item's lines only
    assert out[2].crashed and "native line for segv" in out[2].log
    err = capfd.readouterr().err
    assert "native line" not in err  # not on the terminal
    assert "python line for 2" in err and "python line for raise" in err
