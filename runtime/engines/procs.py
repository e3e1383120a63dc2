"""The engines' process helpers, standard library only (the guard and the spare child import them
and must start in milliseconds): the parent-death signal, autogroup niceness, and process groups read
from /proc, a whole process tree frozen to be killed (`freeze_tree`), and what processes hold in
memory (`pss_bytes`, `host_memory_bytes`)."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def set_pdeathsig() -> None:
    """SIGTERM this process when its parent dies (engine children between fork and exec, the
    planner worker at start)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def set_autogroup_nice(nice: int) -> None:
    """Give this process's autogroup the niceness `nice`. With CONFIG_SCHED_AUTOGROUP (on by default
    in most distributions) every session is its own scheduling group, and a process's niceness only
    weighs against processes of the same session: an engine started with start_new_session=True
    (setsid runs before preexec_fn) at nice 5 still gets a full share against the gateway's session.
    The group's own niceness is what weighs across sessions. Only a session leader touches it (in
    any other process the autogroup is its parent's, the gateway's); no-op without the kernel option."""
    if os.getsid(0) != os.getpid():
        return
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass


def _proc_stat_fields() -> list[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after "pid (comm) ": [0] is state) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out.append((int(entry), stat[stat.rindex(")") + 2:].split()))
    return out


def proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    return [(pid, f[0], int(f[1]), int(f[2])) for pid, f in _proc_stat_fields()]


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) the live processes of process group `pgid` have used, from /proc."""
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _proc_stat_fields() if int(f[2]) == pgid)
    return ticks / os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc."""
    return [pid for pid, state, _, group in proc_stats() if state != "Z" and group == pgid]


def tree_pids(root: int) -> list[int]:
    """`root` and its live descendants (followed by parent pid, whatever group or session they
    made for themselves), from /proc."""
    children: dict[int, list[int]] = {}
    alive = set()
    for pid, state, ppid, _ in proc_stats():
        if state != "Z":
            alive.add(pid)
            children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in alive:
            out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def freeze_tree(root: int) -> list[int]:
    """SIGSTOP `root` and each of its descendants until no new one appears, and return them all: a
    stopped process forks no more, so what is then killed leaves no child behind (a child killed
    after its parent would be re-parented to init and out of reach)."""
    frozen: set[int] = set()
    while True:
        new = [pid for pid in tree_pids(root) if pid not in frozen]
        if not new:
            return sorted(frozen)
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen.update(new)


def live_pids(pids: list[int]) -> list[int]:
    """Those of `pids` that are still running (not gone, not zombies)."""
    wanted = set(pids)
    return [pid for pid, state, _, _ in proc_stats() if pid in wanted and state != "Z"]


def pss_bytes(pids: list[int]) -> int:
    """Memory `pids` hold together, by proportional set size (a page shared by n processes counts
    1/n to each: engines forked from one zygote share its pages), from /proc/<pid>/smaps_rollup;
    processes gone count 0."""
    total_kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total_kib += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total_kib * 1024


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
