"""A stand-in for `runtime.engines.zygote` (no vLLM): the real zygote's forking and guarding
(`serve`), with a preload that spins SPARE_DOUBLE_SPIN CPU seconds (an import's CPU time), then
sleeps SPARE_DOUBLE_DELAY seconds (exits 3 at once when SPARE_DOUBLE_FAIL is set: an import that
fails), and spares that take the command's niceness, write the command line and their niceness to
its `log` and stay up until killed (as a serving engine would)."""

import json
import os
import sys
import time

from runtime.engines.zygote import serve


def preload() -> None:
    if os.environ.get("SPARE_DOUBLE_FAIL"):
        sys.exit(3)
    spin = float(os.environ.get("SPARE_DOUBLE_SPIN", "0"))
    while time.process_time() < spin:
        pass
    time.sleep(float(os.environ.get("SPARE_DOUBLE_DELAY", "0")))


def become(cmd: dict) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, int(cmd.get("nice", 0)))
    except PermissionError:
        pass
    with open(cmd["log"], "a") as f:
        f.write(json.dumps({"argv": cmd["argv"], "nice": os.getpriority(os.PRIO_PROCESS, 0),
                            "pid": os.getpid()}) + "\n")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(serve(preload, become))
