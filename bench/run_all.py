"""`make bench`: every benchmark with its default size, one after another.

They run in sequence because each one measures the API server's ceiling and
its own figures on the same 2 cores: two at once would measure each other.
Results land in bench/results/ (JSON plus a markdown table with machine facts).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

BENCHMARKS = ("bench_operations.py", "bench_scheduledtasks.py", "bench_gateway.py")


def main() -> int:
    here = pathlib.Path(__file__).resolve().parent
    for script in BENCHMARKS:
        print(f"=== {script}", flush=True)
        result = subprocess.run([sys.executable, str(here / script), *sys.argv[1:]], check=False)
        if result.returncode != 0:
            print(f"{script} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
