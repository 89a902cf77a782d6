"""The progress bar and the console log share one terminal: log lines print on their own lines, above the bar."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator

from resnet_repro.tracking import Progress


@contextlib.contextmanager
def console_handler() -> Iterator[logging.Handler]:
    """A stream handler on the terminal at the root logger, as Hydra's console handler is (made inside the test, so
    that its stream is the one capsys captures)."""
    root = logging.getLogger()
    handler, level = logging.StreamHandler(sys.stderr), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_log_lines_print_above_the_bar_not_into_its_line(capsys):
    log = logging.getLogger("resnet_repro.engine")
    with console_handler():
        progress = Progress(total=4, start=0, enabled=True, description="resnet-20")
        for iteration in range(1, 5):
            progress.update(iteration, loss="1.000")
            log.info("iter %d logged", iteration)
        progress.close()
        log.info("after the bar")
    pieces = re.split(r"[\r\n]", capsys.readouterr().err)
    for iteration in range(1, 5):
        assert f"iter {iteration} logged" in pieces  # a line of its own: no bar text before it
    assert "after the bar" in pieces
    assert any(piece.startswith("resnet-20") and "4/4" in piece for piece in pieces)  # the bar still shows


def test_closing_the_bar_gives_the_console_its_handler_back(capsys):
    with console_handler() as console:
        before = list(logging.getLogger().handlers)
        progress = Progress(total=2, start=0, enabled=True, description="resnet-20")
        assert console not in logging.getLogger().handlers  # replaced by one that writes above the bar
        progress.close()
        assert logging.getLogger().handlers == before
