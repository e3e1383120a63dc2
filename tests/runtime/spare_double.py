"""A stand-in for `runtime.engines.spare_child` (no vLLM): says "ready" after SPARE_DOUBLE_DELAY seconds,
then writes the command line it receives to its `log` and stays up until killed (as a serving
engine would). Exits at once when SPARE_DOUBLE_FAIL is set (an import that fails); with
SPARE_DOUBLE_SPIN it first spins that many CPU seconds (an import's CPU time)."""

import json
import os
import sys
import time

if __name__ == "__main__":
    if os.environ.get("SPARE_DOUBLE_FAIL"):
        sys.exit(3)
    spin = float(os.environ.get("SPARE_DOUBLE_SPIN", "0"))
    while time.process_time() < spin:
        pass
    time.sleep(float(os.environ.get("SPARE_DOUBLE_DELAY", "0")))
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        sys.exit(0)
    cmd = json.loads(line)
    with open(cmd["log"], "a") as f:
        f.write(json.dumps({"argv": cmd["argv"], "nice": os.getpriority(os.PRIO_PROCESS, 0)}) + "\n")
    while True:
        time.sleep(1)
