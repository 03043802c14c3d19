"""``python -m open_clip_train.main`` with two compatibility fixes, for ``benchmarks/peer_open_clip.py``.

1. open_clip_train 3.3.0 groups webdataset members with its own ``group_by_keys_nothrow``, which
   reads ``sample["fname"]`` of every item; webdataset 1.0's ``tar_file_expander`` yields an
   empty dict at the end of each shard (``eof_value={}``), so open_clip stops with
   ``KeyError: 'fname'`` on any webdataset shards under the webdataset pinned here. This passes
   ``eof_value=None`` (no marker: open_clip's grouping already starts a new sample when the key
   prefix changes).
2. With several processes it wraps the model in ``DistributedDataParallel(model,
   device_ids=[device])`` even on the CPU, which torch refuses ("device_ids ... only work with
   ... GPU modules"); on the CPU the wrapper drops ``device_ids``, as torch asks for CPU modules.

Then it runs open_clip's own ``main`` unchanged, with the same arguments.

    python benchmarks/open_clip_main.py --model local-dir:FOLDER --train-data ... (open_clip's flags)
"""

from __future__ import annotations

import functools
import runpy
import sys

import open_clip_train.data
import torch
from webdataset.tariterators import tar_file_expander


class CpuFriendlyDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that leaves ``device_ids`` out for a module on the CPU."""

    def __init__(self, module: torch.nn.Module, device_ids: list | None = None, **kwargs: object) -> None:
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


if __name__ == "__main__":
    open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP
    sys.argv[0] = "open_clip_train.main"
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
