"""Shared fixtures: real ``deepspeed`` launches on CPU ranks (gloo), each on its own free port.

Helpers that tests import live in ``launching.py``; nothing imports from this file.

Two speeds: a test that starts a process (a ``subprocess`` command, the ``deepspeed`` launcher, a
``tests/scripts`` probe, ``torch.multiprocessing.spawn`` ranks, a ``pipe:`` shard's command:
anything that execs a program) is marked ``@pytest.mark.launch``; ``pytest -m "not launch" tests``
is the quick loop, ``pytest -m launch tests`` the rest. ``forbid_unmarked_launches`` enforces the
marker. Forked workers (DataLoader workers, a fork ``Pool``) are not launches: they exec nothing.
"""

from __future__ import annotations

import multiprocessing.popen_forkserver
import multiprocessing.popen_spawn_posix
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from launching import Run, launch_train

UNMARKED_LAUNCH = "this test starts a process: mark it @pytest.mark.launch"

# DeepSpeed compiles its CPU shared-memory all-reduce on first use into torch's extensions folder
# (~/.cache/torch_extensions by default) and recompiles (20 s to 3 min) whenever the include paths
# differ from the last build there: two checkouts (a CI dry run in /tmp, a worktree) sharing the
# folder would rebuild it at each other's every launch. One folder per environment builds it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@contextmanager
def forbid_unmarked_launches(item: pytest.Item):
    """A test not marked ``launch`` may not start a process: the marker stays complete by itself.

    The refusal fails the test even where the code under test catches the error (a ``pipe:``
    shard that fails is counted as a bad shard, not raised), and even in a forked DataLoader
    worker: refusals are written to a file, which the forks share."""
    if item.get_closest_marker("launch"):
        yield
        return
    handle, name = tempfile.mkstemp(prefix="tritower-refused-launches-")
    os.close(handle)
    refused = Path(name)

    original = subprocess.Popen.__init__

    def refuse(self, what=None, *args, **kwargs):
        if isinstance(self, subprocess.Popen) and _library_lookup(what):
            return original(self, what, *args, **kwargs)
        with open(refused, "a") as out:
            out.write(repr(what)[:300].replace("\n", " ") + "\n")
        raise RuntimeError(f"{UNMARKED_LAUNCH} ({item.nodeid})")

    def check() -> None:
        attempts = refused.read_text().splitlines()
        refused.unlink()
        if attempts:
            pytest.fail(f"{item.nodeid}: {UNMARKED_LAUNCH}; it tried to start {attempts[0]}", pytrace=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse)
        for popen in (multiprocessing.popen_spawn_posix.Popen, multiprocessing.popen_forkserver.Popen):
            patch.setattr(popen, "__init__", refuse)
        try:
            yield
        except BaseException:  # a failure, or a skip
            check()
            raise
    check()


def _library_lookup(what: object) -> bool:
    """``ctypes.util.find_library``'s ``ldconfig -p`` (some libraries run it when first imported):
    a lookup of installed shared libraries, not a launch of anything of this project's."""
    argv = what if isinstance(what, (list, tuple)) else [what]
    return bool(argv) and Path(str(argv[0])).name == "ldconfig" and list(argv[1:]) == ["-p"]


# Hooks rather than an autouse fixture: a test's setup also builds the module- and session-scoped
# fixtures it is the first to need, and pytest builds those before any function-scoped fixture.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with forbid_unmarked_launches(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with forbid_unmarked_launches(item):
        return (yield)


@pytest.fixture(autouse=True)
def remove_leftover_shm_buffers():
    """A rank killed by a test cannot unlink its DeepSpeed CPU all-reduce buffer (RAM in /dev/shm).
    Only buffers no live process maps are removed: another session's ranks (a second pytest on the
    machine) create theirs at any moment and wait forever for a peer's buffer removed under them."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before - _mapped_shm_buffers():
        path.unlink(missing_ok=True)


def _mapped_shm_buffers() -> set[Path]:
    """The DeepSpeed all-reduce buffers some live process has mapped (from /proc/*/maps)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        mapped |= {
            Path(line.split(maxsplit=5)[-1]) for line in text.splitlines() if "deepspeed_allreduce_buffer_" in line
        }
    return mapped


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One built-in data cache for the whole session: scenes are generated once, then reused."""
    return tmp_path_factory.mktemp("tritower-cache")


@pytest.fixture
def train(tmp_path: Path, data_cache: Path):
    """Launch ``launch/train.py`` on N CPU ranks with test-sized defaults; returns a ``Run``: its
    console output, and what this launch wrote to ``tmp_path/runs/<run name>`` (log records, metrics)."""

    def run(
        *overrides: str,
        ranks: int = 2,
        zero: str = "zero_configs/z3.json",
        experiment: str = "clip_test",
        command: bool = False,
    ) -> Run:
        args = [
            "--zero",
            zero,
            "--experiment",
            experiment,
            f"--data.cache_dir={data_cache}",
            f"--train.output_dir={tmp_path / 'runs'}",
            *overrides,
        ]
        return launch_train(args, ranks=ranks, command=command)

    return run


@pytest.fixture
def usage_error(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Calls a command-line parse that must refuse its arguments (exit 2, as tyro does) and
    returns the message it printed, box drawing and line wrapping removed."""
    monkeypatch.setenv("COLUMNS", "1000")  # tyro's console wraps at the terminal's width

    def run(call: object, *args: object) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            call(*args)
        assert stop.value.code == 2
        printed = capsys.readouterr()
        text = re.sub(r"[│╭╮╰╯─|]|\+?-{3,}\+?", " ", printed.err + printed.out)  # rich's boxes, unicode or ASCII
        return " ".join(text.split())

    return run
