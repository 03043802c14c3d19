"""``python -m open_clip_train.main`` with one compatibility fix, for ``benchmarks/peer_open_clip.py``.

open_clip_train 3.3.0 groups webdataset members with its own ``group_by_keys_nothrow``, which
reads ``sample["fname"]`` of every item; webdataset 1.0's ``tar_file_expander`` yields an empty
dict at the end of each shard (``eof_value={}``), so open_clip stops with ``KeyError: 'fname'`` on
any webdataset shards under the webdataset pinned here. This passes ``eof_value=None`` (no marker:
open_clip's grouping already starts a new sample when the key prefix changes) and then runs
open_clip's own ``main`` unchanged, with the same arguments.

    python benchmarks/open_clip_main.py --model local-dir:FOLDER --train-data ... (open_clip's flags)
"""

from __future__ import annotations

import functools
import runpy
import sys

import open_clip_train.data
from webdataset.tariterators import tar_file_expander

if __name__ == "__main__":
    open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    sys.argv[0] = "open_clip_train.main"
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
