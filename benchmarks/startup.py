"""Benchmark: start-up, what ``convolutionalize --help`` and ``import convolutionalize`` cost.

Each command runs in a fresh interpreter: the median wall time of ``--runs`` runs, then
``--runs`` runs with ``-X importtime`` for the number of modules it imported and the median of
their summed import time (the self times of all of them). The bare interpreter (``python -c pass``) is the
floor. ``tests/test_startup.py`` checks which modules are (not) imported; this measures.

Run with ``.venv/bin/python benchmarks/startup.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PYTHON = sys.executable
SCRIPT = Path(PYTHON).with_name("convolutionalize")  # the console script beside this interpreter
COMMANDS = {
    "convolutionalize --help": [str(SCRIPT), "--help"],
    "python -c pass": [PYTHON, "-c", "pass"],
    "python -c 'import convolutionalize'": [PYTHON, "-c", "import convolutionalize"],
    "python -c 'import convolutionalize.api'": [PYTHON, "-c", "import convolutionalize.api"],
}


def wall(command: list[str], runs: int) -> float:
    """The median wall time of ``command`` over ``runs`` runs, in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_totals(command: list[str]) -> tuple[int, int]:
    """The modules ``command`` imports and their summed self import time (µs), by -X importtime
    (``PYTHONPROFILEIMPORTTIME``, which the console script honours too)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    fields = [line.removeprefix("import time:").split("|")[0].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")]
    selves = [int(field) for field in fields if field.isdigit()]  # not the header
    return len(selves), sum(selves)


def median_import_totals(command: list[str], runs: int) -> tuple[int, float]:
    """The modules ``command`` imports and the median of their summed import time (µs)."""
    totals = [import_totals(command) for _ in range(runs)]
    return totals[-1][0], statistics.median(micros for _, micros in totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not SCRIPT.exists():
        COMMANDS["convolutionalize --help"] = [PYTHON, "-m", "convolutionalize", "--help"]
    print(f"medians of {args.runs} runs each; imports: the summed self times of -X importtime")
    print(f"{'command':42} {'wall (ms)':>10} {'modules':>8} {'imports (ms)':>13}")
    for label, command in COMMANDS.items():
        seconds = wall(command, args.runs)
        modules, micros = median_import_totals(command, args.runs)
        print(f"{label:42} {seconds * 1e3:10.0f} {modules:8d} {micros / 1e3:13.0f}")


if __name__ == "__main__":
    main()
