"""One trainer's run measured as a whole process tree: a step line timestamped as it arrives
(steady samples/s and time to the first step, the same way for any trainer), and the peak resident
memory of every process in the tree, the launcher's processes apart."""

from __future__ import annotations

import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
TRITOWER_STEP = re.compile(r"\bstep (\d+)/(\d+) \|")
OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")
LAUNCHER = re.compile(r"bin/deepspeed\b|deepspeed\.launcher\.launch|bin/torchrun\b")
"""Processes that only start and watch the ranks: DeepSpeed's two launcher levels, torchrun."""
THREADS_LINE = re.compile(r"multiplies float32 matrices at [\d.]+ GFLOP/s \((\d+) thread")


@dataclass
class RunResult:
    trainer: str
    ranks: int
    setting: str
    pair: int
    returncode: int
    steps: int = 0
    steady_samples_per_s: float = math.nan
    first_step_s: float = math.nan
    wall_s: float = math.nan
    peak_total_rss_mib: float = 0.0
    launcher_rss_mib: float = 0.0
    processes: list[dict] = field(default_factory=list)
    threads_per_rank: int | None = None
    tail: str = ""


def _label(process: psutil.Process) -> str:  # noqa: F821 - psutil imported where used
    try:
        words = process.cmdline()
    except Exception:  # noqa: BLE001 - a process may end between listing and reading it
        return "?"
    short = [Path(words[0]).name] + [w if len(w) < 40 else "..." + w[-30:] for w in words[1:4]]
    return " ".join(short)


def run_one(command: list[str], env: dict, timeout_s: float, step_pattern: re.Pattern, batch: int, cwd: Path) -> dict:
    """Runs ``command`` in its own session; returns step lines' arrival times, RSS peaks, output."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    arrivals: list[tuple[int, float]] = []
    lines: list[str] = []
    threads: list[int] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            now = time.perf_counter() - start
            lines.append(line)
            match = step_pattern.search(line)
            if match:
                value = int(match.group(1))
                # open_clip logs samples seen on rank 0 (its batch x ranks); tritower logs the step
                arrivals.append((value if step_pattern is TRITOWER_STEP else value // batch, now))
            found = THREADS_LINE.search(line)
            if found:
                threads.append(int(found.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks: dict[int, tuple[str, int]] = {}
    peak_total = 0
    root = psutil.Process(process.pid)
    while process.poll() is None:
        if time.perf_counter() - start > timeout_s:
            os.killpg(process.pid, 9)
            break
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for member in tree:
            try:
                rss = member.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if rss > peaks.get(member.pid, ("", 0))[1]:
                peaks[member.pid] = (_label(member), rss)
        peak_total = max(peak_total, total)
        time.sleep(0.2)
    returncode = process.wait()
    reader.join(timeout=10)
    return {
        "returncode": returncode,
        "wall_s": time.perf_counter() - start,
        "arrivals": arrivals,
        "peaks": peaks,
        "peak_total": peak_total,
        "threads": threads[0] if threads else None,
        "tail": "".join(lines[-15:]),
    }


def summarise_run(raw: dict, trainer: str, ranks: int, setting: str, pair: int, skip: int, batch: int) -> RunResult:
    result = RunResult(trainer, ranks, setting, pair, raw["returncode"], wall_s=round(raw["wall_s"], 2))
    result.peak_total_rss_mib = round(raw["peak_total"] / MIB, 1)
    result.processes = [
        {"pid": pid, "command": label, "peak_rss_mib": round(rss / MIB, 1)}
        for pid, (label, rss) in sorted(raw["peaks"].items())
    ]
    result.launcher_rss_mib = round(sum(rss for label, rss in raw["peaks"].values() if LAUNCHER.search(label)) / MIB, 1)
    result.threads_per_rank = raw["threads"]
    arrivals = raw["arrivals"]
    if arrivals:
        result.steps = arrivals[-1][0]
        result.first_step_s = round(arrivals[0][1], 2)
        steady = [(step, t) for step, t in arrivals if step >= skip]
        if len(steady) >= 2 and steady[-1][1] > steady[0][1]:
            (s0, t0), (s1, t1) = steady[0], steady[-1]
            result.steady_samples_per_s = round(batch * (s1 - s0) / (t1 - t0), 2)
    if raw["returncode"] != 0 or not arrivals:
        result.tail = raw["tail"]
    return result
