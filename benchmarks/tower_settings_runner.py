"""One tower setting of ``benchmarks/tower_settings.py``, built as the trainer builds it and
stepped (``Runner``), its cost in the FLOP model (``Setting``), and the memory one step adds
(``step_extra_bytes``: CUDA's allocator peak, or on the CPU the growth of the peak RSS after
``malloc_trim``; ``benchmarks/gradcache_comm.py`` measures its step the same way).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tritower.data.config import DataConfig
from tritower.launch.config import TrainConfig
from tritower.launch.engine.config import DeepSpeedConfig
from tritower.launch.towers.model_setup import TowerInputs, build_towers
from tritower.losses import LossConfig, build_objective
from tritower.model import ModelConfig, TowerConfig, image_tower_spec, parse_setting

if TYPE_CHECKING:
    from tritower.benchmarks.tower_settings import TowerSettingsOptions

# data.embeddings only has to be non-empty for build_towers to leave the tower out.
PRECOMPUTED_SOURCE = "benchmark: fixed random tensor"


@dataclass(frozen=True)
class Setting:
    """One benchmarked configuration and its cost in the FLOP model."""

    name: str
    """Key in the results (``Uu``, ``Lu``, ``Lu_precomputed``, ``3T``, ``3T_precomputed``)."""
    setting: str
    """``model.setting``."""
    precomputed: bool
    """The locked image tower (Lu) or third tower (3T) comes as precomputed embeddings."""
    trained: tuple[str, ...]
    """Towers that train: 3 forward passes each."""
    locked: tuple[str, ...]
    """Towers run locked, under inference mode: 1 forward pass each."""

    def model_cost(self, forward: dict[str, float]) -> float:
        """The FLOP model's cost of one step from each tower's forward cost (seconds or FLOPs):
        3 per trained tower, 1 per locked one, 0 per precomputed one."""
        return 3 * sum(forward[t] for t in self.trained) + sum(forward[t] for t in self.locked)


SETTINGS = {
    s.name: s
    for s in (
        Setting("Uu", "Uu", False, ("image", "text"), ()),
        Setting("Lu", "Lu", False, ("text",), ("image",)),
        Setting("Lu_precomputed", "Lu", True, ("text",), ()),
        Setting("3T", "3T", False, ("image", "text"), ("third",)),
        Setting("3T_precomputed", "3T", True, ("image", "text"), ()),
    )
}
REFERENCE = "Uu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    _sync(device)
    return time.perf_counter()


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Runner:
    """One setting's model, locked towers, optimizer and batch; ``step`` is one training step."""

    def __init__(
        self,
        setting: Setting,
        opts: TowerSettingsOptions,
        weights: dict[str, str],
        shared_batch: dict[str, torch.Tensor],
        device: torch.device,
    ) -> None:
        self.setting, self.device = setting, device
        parsed = parse_setting(setting.setting)
        image_weights = weights[opts.image_tower] if parsed.pretrained("image") else ""
        third = TowerConfig(opts.third_tower, weights[opts.third_tower]) if parsed.three_towers else TowerConfig()
        model_cfg = ModelConfig(
            image=TowerConfig(opts.image_tower, image_weights),
            text=TowerConfig(opts.text_tower),
            third=third,
            embed_dim=opts.embed_dim,
            setting=setting.setting,
        )
        self.cfg = TrainConfig(
            model=model_cfg,
            data=DataConfig(embeddings=PRECOMPUTED_SOURCE if setting.precomputed else ""),
            deepspeed=DeepSpeedConfig(precision=opts.precision),
            loss=LossConfig(),
        )
        torch.manual_seed(opts.seed)
        towers = build_towers(self.cfg, vocab_size=opts.vocab_size)
        self.towers, self.model = towers, towers.model.to(device).train()
        towers.locked.to(device)
        optim = self.cfg.optim
        self.optimizer = torch.optim.AdamW(towers.groups, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        # Parameters stay fp32 (no DeepSpeed to cast them); bf16 is autocast on the trainable
        # forward here and inside LockedTower.encode (build_towers sets it from the precision).
        self.inputs = TowerInputs(self.cfg, towers, self.model, device, torch.float32)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if opts.precision == "bf16" else contextlib.nullcontext()
        )
        self.objective = build_objective(self.cfg.loss, three_towers=self.cfg.model.parsed.three_towers)
        self.batch = dict(shared_batch)
        if setting.precomputed:
            tower = opts.third_tower if parsed.three_towers else opts.image_tower
            generator = torch.Generator().manual_seed(opts.seed + 1)
            self.batch["embedding"] = torch.randn(opts.batch, image_tower_spec(tower).width, generator=generator).to(
                device
            )
        self.index = 0
        self.loss = float("nan")

    def step(self) -> dict[str, float]:
        """One training step; seconds of its phases (locked towers, forward + loss, backward,
        optimizer) and ``total``."""
        marks = [clock(self.device)]
        kwargs = self.inputs(self.batch, self.index)  # the locked towers run here
        marks.append(clock(self.device))
        with self.autocast:
            out = self.model(**kwargs)
        # fp32 loss whatever the towers' precision, as the trainer's compute_loss.
        out = {key: value.float() for key, value in out.items()}
        loss = self.objective(out)["loss"]
        marks.append(clock(self.device))
        loss.backward()
        marks.append(clock(self.device))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(clock(self.device))
        self.index += 1
        self.loss = float(loss.detach())
        phases = ("locked", "forward", "backward", "optimizer")
        times = {phase: b - a for phase, a, b in zip(phases, marks, marks[1:])}
        times["total"] = marks[-1] - marks[0]
        return times

    def state_bytes(self) -> int:
        """Parameters, buffers and optimizer state of the model and its locked towers."""
        modules = [self.model, *self.towers.locked.modules().values()]
        state = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        state += [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return _tensor_bytes(state)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, locked) parameters; a precomputed tower counts as neither."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        locked = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        locked += sum(p.numel() for m in self.towers.locked.modules().values() for p in m.parameters())
        return trainable, locked


# -- memory ------------------------------------------------------------------------------------
def status_kb(field: str) -> int:
    """One ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_heap() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc's ``malloc_trim``), so a step's
    new pages show in the peak RSS instead of reusing freed ones."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_extra_bytes(runner: Runner) -> int:
    """Memory one step adds on top of what exists before it (see the module docstring)."""
    device = runner.device
    if device.type == "cuda":
        gc.collect()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.step()
        return torch.cuda.max_memory_allocated(device) - before
    release_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = status_kb("VmRSS") * 1024
    runner.step()
    return status_kb("VmHWM") * 1024 - before
