"""What the ``kgrec`` script prints around progress bars."""
from __future__ import annotations

import re
import subprocess
import sys

FAKE_COMMAND = """
import logging, sys, time
from tqdm.auto import tqdm
import kgrec.cli as cli

def fake():
    bar = tqdm(range(3), desc="work", file=sys.stderr)
    for k in bar:
        logging.getLogger("kgrec.test").info("step %d done", k)
    bar.close()
    raise SystemExit(3)

cli.app = fake
cli.main()
"""


def test_log_lines_print_above_a_running_bar_not_glued_onto_it() -> None:
    run = subprocess.run([sys.executable, "-c", FAKE_COMMAND], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3  # the command's exit code passes through
    segments = [s for s in re.split(r"[\r\n]", run.stderr) if s.strip()]
    logged = [s for s in segments if "INFO kgrec.test" in s]
    assert len(logged) == 3
    assert all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO kgrec\.test: step \d done$", s) for s in logged), logged
