"""``make bench``: the CPU statistics benchmark here; the GPU benchmark prints how to run it on a GPU machine."""

from __future__ import annotations

import runpy
import sys


def main() -> int:
    sys.argv = ["bench.stats_bench", *sys.argv[1:]]
    runpy.run_module("bench.stats_bench", run_name="__main__")
    print("GPU benchmark (needs a CUDA GPU): python -m bench.gpu_bench --out bench/results --shape qwen7b")
    return 0


if __name__ == "__main__":
    sys.exit(main())
