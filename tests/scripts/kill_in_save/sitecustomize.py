"""Put on ``PYTHONPATH`` by ``tests/test_resume.py``: every rank then dies like a preempted node
(SIGKILL) right after DeepSpeed wrote its part of the checkpoint of step
``$KILL_IN_SAVE_STEP``, before the trainer makes the tag visible. The trainer itself has no hook
for it."""

import os

_STEP = os.environ.get("KILL_IN_SAVE_STEP")
if _STEP:
    from deepspeed.runtime.engine import DeepSpeedEngine

    _save = DeepSpeedEngine.save_checkpoint

    def _save_then_die(self, save_dir, tag=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        result = _save(self, save_dir, tag, *args, **kwargs)
        if str(tag).startswith(f"step{int(_STEP):08d}"):
            os.kill(os.getpid(), 9)
        return result

    DeepSpeedEngine.save_checkpoint = _save_then_die
