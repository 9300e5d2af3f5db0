"""The command-line frame every script shares: one-line errors, Ctrl-C and SIGTERM with what was kept, and
the summary line every long step ends with."""

import os
import signal
import threading

import pytest
import typer

from inversion.core import console
from inversion.core.errors import UserError


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    def command():
        raise UserError("data.path: /nowhere.zip does not exist")
    with pytest.raises(typer.Exit) as exit_:
        console.run(command)()
    assert exit_.value.exit_code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: data.path: /nowhere.zip does not exist"]


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_exit_with_128_plus_the_signal_saying_what_was_kept(capsys, sig, code, name):
    assert threading.current_thread() is threading.main_thread()  # where Python delivers signals

    before = signal.getsignal(sig)

    def command():
        try:
            os.kill(os.getpid(), sig)  # the handler runs as soon as the call returns
        except KeyboardInterrupt:
            raise console.Interrupted("kept 3 batches") from None
    with pytest.raises(typer.Exit) as exit_:
        console.run(command)()
    assert exit_.value.exit_code == code
    assert f"interrupted by {name}: kept 3 batches; re-run the same command to continue" in capsys.readouterr().err
    assert signal.getsignal(sig) is before and not console.interrupt_requested()  # the handlers restored


def test_a_deferred_signal_waits_for_the_step_boundary_and_is_raised_after_the_block():
    steps = []
    with console.interruptible(), pytest.raises(KeyboardInterrupt):
        with console.deferred_interrupts():
            for step in range(3):
                if step == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                steps.append((step, console.interrupt_requested()))
    assert steps == [(0, False), (1, True), (2, True)]  # noted, not raised: the loop finished its steps


def test_the_summary_line_names_items_seconds_and_rate(capsys):
    console.summary("extracted", 1234, 2.0, "images", "into cache/")
    assert capsys.readouterr().err.strip() == "extracted: 1,234 images in 2.0 s (617.0 images/s), into cache/"
    assert console.rate_text(10, 4.0, "samples") == "2.5 samples/s" and console.rate_text(1, 0, "x") == ""


def test_a_timer_counts_inside_its_block_and_keeps_the_block_s_duration_after_it():
    import time
    with console.Timer() as timer:
        time.sleep(0.02)
        inside = timer.seconds
    after = timer.seconds
    time.sleep(0.05)
    assert 0.02 <= inside <= after < 0.05 and timer.seconds == after
