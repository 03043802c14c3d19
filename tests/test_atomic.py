"""Atomic writes keep the mode every other file of the run gets (the umask's), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tritower.data.atomic import process_umask, write_json_atomic, write_text_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_plain_open_gets(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        assert process_umask() == umask
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # the reference: what the OS gives a new file under this umask
        write_text_atomic(tmp_path / "latest", "step00000004")
        write_json_atomic(tmp_path / "metrics.json", {"step": 4})
        expected = stat.S_IMODE(plain.stat().st_mode)
        assert expected == 0o666 & ~umask
        for name in ("latest", "metrics.json"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    finally:
        os.umask(previous)


def test_json_files_are_strict_json_with_null_for_non_finite(tmp_path: Path) -> None:
    import json
    import math

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    write_json_atomic(tmp_path / "metrics.json", {"loss": math.nan, "x": [math.inf, 1.5], "n": {"y": -math.inf}})
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text, parse_constant=refuse) == {"loss": None, "x": [None, 1.5], "n": {"y": None}}
