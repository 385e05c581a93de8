"""A task module for the warm-start tests: reports what it was given, then ends the way its argument says."""

import json
import os
import sys
import time

if __name__ == "__main__":
    import torch

    how = sys.argv[1]
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                      "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(),
                      "session_leader": os.getsid(0) == os.getpid(), "torch_was_warm": "torch" in sys.modules}))
    if how == "exit2":
        sys.exit(2)
    if how == "raise":
        raise RuntimeError("the probe failed on purpose")
    if how == "sleep":
        time.sleep(600)
