"""Model-state memory per GPU under DeepSpeed ZeRO: parameters, gradients, optimizer states.

Only the trained parameters enter the DeepSpeed engine. AdamW with 16-bit mixed precision keeps,
per trained parameter (N = data-parallel GPUs):

    16-bit parameters 2 bytes     replicated under ZeRO-1/2, 2/N under ZeRO-3
    16-bit gradients  2 bytes     replicated under ZeRO-1, 2/N under ZeRO-2/3
    fp32 gradient partition 4/N   the flat fp32 copy of this rank's gradients DeepSpeed makes
                                  for the optimizer step (stage_1_and_2.py / stage3.py)
    fp32 master + 2 moments 12/N  the "12" of the ZeRO paper's 2 + 2 + 12

which is DeepSpeed's own count (its estimators' "18 = 2 grads16 + 4 grads32 + 4 params32 + 8").
In fp32 the parameters and gradients take 4 bytes, the moments 8; DeepSpeed's ZeRO-1/2 still
clone this rank's partition as the "master" (4/N), ZeRO-3 updates the partition in place, and
fp32 ZeRO-2 steps on its flat gradient partition without a copy. ZeRO-3 also holds the gathered
parameters and gradients of the largest layer (DeepSpeed's ``4 * largest_layer_params`` in
16-bit). CPU offload moves the fp32 gradient buffer, master and moments (and under ZeRO-3
optionally the 16-bit parameter partition) to host memory. Locked towers are not in the engine:
their parameters sit on every GPU in the compute dtype, with nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tritower.model import count_parameters


@dataclass(frozen=True)
class ZeroPolicy:
    """One way to run the engine: a ZeRO stage, what is offloaded, and its policy file."""

    label: str
    """Short name for tables."""
    stage: int
    """ZeRO stage 1, 2 or 3."""
    offload_optimizer: bool
    """fp32 master weights, moments and fp32 gradients live in CPU memory."""
    offload_params: bool
    """ZeRO-3 only: the 16-bit parameter partition lives in CPU memory too."""
    zero_file: str
    """Policy file under ``zero_configs/``; "" if the project ships none (write your own)."""


POLICIES = (
    ZeroPolicy("ZeRO-1", 1, False, False, "zero_configs/z1.json"),
    ZeroPolicy("ZeRO-2", 2, False, False, "zero_configs/z2.json"),
    ZeroPolicy("ZeRO-3", 3, False, False, "zero_configs/z3.json"),
    ZeroPolicy("Z2+off(opt)", 2, True, False, ""),
    ZeroPolicy("Z3+off(opt)", 3, True, False, ""),
    ZeroPolicy("Z3+off(all)", 3, True, True, "zero_configs/z3_offload.json"),
)

# Bucket size (elements) of the shipped policy files: reduce_bucket_size (and, for ZeRO-3,
# stage3_prefetch_bucket_size) are 5e7 in every zero_configs/*.json.
BUCKET_ELEMENTS = 50_000_000


@functools.cache
def largest_layer_parameters(name: str, vocab_size: int | None = None, image_size: int = 0) -> int:
    """Parameters of the module holding the most direct parameters (DeepSpeed's
    ``model_to_params`` rule), built on the meta device (image towers at ``image_size``, 0: theirs)."""
    import torch

    from tritower.model import build_image_tower, build_text_tower, image_tower_spec

    with torch.device("meta"):
        try:
            image_tower_spec(name)
            tower = build_image_tower(name, image_size)
        except ValueError:
            tower = build_text_tower(name, vocab_size=vocab_size)
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in tower.modules())


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes on one GPU (and, with offload, in host memory per GPU)."""

    params: float
    """Trained parameters in the engine (16-bit, or fp32 for fp32 training)."""
    grads: float
    """Their gradients in the same dtype."""
    grad_fp32: float
    """DeepSpeed's fp32 gradient partition at the optimizer step (mixed precision and fp32)."""
    optimizer: float
    """fp32 master weights (or DeepSpeed's partition clone) and the two AdamW moments."""
    gathered: float
    """ZeRO-3: the gathered parameters and gradients of the largest layer."""
    buckets: float
    """Communication buckets of the policy files (not in DeepSpeed's estimate)."""
    locked: float
    """Locked towers: parameters only, compute dtype, replicated (not in the engine)."""
    cpu: float
    """Host memory per GPU for offloaded states."""

    @property
    def engine(self) -> float:
        """What DeepSpeed's estimators count: the engine's states on the GPU."""
        return self.params + self.grads + self.grad_fp32 + self.optimizer + self.gathered

    @property
    def total(self) -> float:
        """Everything on the GPU that does not scale with the batch."""
        return self.engine + self.buckets + self.locked


def model_states(
    trained: int,
    locked: int,
    largest_layer: int,
    gpus: int,
    policy: ZeroPolicy,
    precision: str = "bf16",
    bucket_elements: int = BUCKET_ELEMENTS,
) -> ModelStates:
    """Per-GPU model states for ``trained`` engine parameters and ``locked`` outside it."""
    n = gpus
    elem = 4 if precision == "fp32" else 2
    stage = policy.stage
    params = elem * trained / (n if stage == 3 else 1)
    grads = elem * trained / (1 if stage == 1 else n)
    # fp32 ZeRO-2 steps on its flat gradient partition as is (``.to(fp32)`` is a no-op);
    # every other case flattens or up-casts into a new fp32 buffer.
    grad_fp32 = 0 if (precision == "fp32" and stage == 2) else 4 * trained / n
    # Mixed precision: fp32 master 4 + moments 8. fp32: ZeRO-1/2 clone the partition (4), ZeRO-3
    # steps the partition itself; the moments are 8 either way.
    master = 0 if (precision == "fp32" and stage == 3) else 4
    optimizer = (master + 8) * trained / n
    gathered = 2 * elem * largest_layer if stage == 3 else 0
    # Gradient buckets as DeepSpeed allocates them with overlap_comm: ZeRO-1 two fp32 staging
    # buffers, ZeRO-2 two in the gradient dtype, ZeRO-3 one reduce bucket plus the prefetch
    # bucket of parameters gathered ahead of use.
    buckets = bucket_elements * 2 * (4 if stage == 1 else elem)
    cpu = 0.0
    if policy.offload_optimizer:
        # Reduced gradients are copied straight into an fp32 host buffer (no 16-bit partition
        # stays on the GPU); master weights and moments live next to it.
        cpu += 4 * trained / n + optimizer
        grads = grad_fp32 = optimizer = 0.0
    if policy.offload_params:
        cpu += params
        params = 0.0
    return ModelStates(params, grads, grad_fp32, optimizer, gathered, buckets, elem * locked, cpu)


def deepspeed_estimate(
    trained: int, largest_layer: int, gpus: int, gpus_per_node: int, policy: ZeroPolicy
) -> tuple[float, float]:
    """DeepSpeed's own (cpu, gpu) bytes for the same engine, from the functions its
    ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print (buffer factor 1: the 1.5
    default only pads the host figure). ZeRO-1 has no estimator; DeepSpeed's ZeRO-2 one is
    returned for it (it lacks ZeRO-1's replicated gradients)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = max(1, gpus // gpus_per_node)
    per_node = min(gpus, gpus_per_node)
    if policy.stage < 3:
        return estimate_zero2_model_states_mem_needs(
            trained,
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=policy.offload_optimizer,
            additional_buffer_factor=1.0,
        )
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        trained,
        largest_layer,
        num_gpus_per_node=per_node,
        num_nodes=nodes,
        cpu_offload=policy.offload_optimizer,
        cpu_offload_params=policy.offload_params,
        zero_init=True,
        additional_buffer_factor=1.0,
    )
    return cpu, gpu


def comparable_engine_bytes(states: ModelStates, trained: int, gpus: int, policy: ZeroPolicy) -> float:
    """Our GPU engine figure counted as DeepSpeed's estimators count it.

    Two deliberate differences are taken out: DeepSpeed's ZeRO-3 figure without offload
    (18 bytes / N) leaves out the 16-bit parameter partition that ZeRO-3 keeps on the GPU (2 / N;
    its optimizer-offload figure does count it), and its ZeRO-2 figure
    stands in for ZeRO-1, whose 16-bit gradients are not partitioned (2 - 2 / N more)."""
    engine = states.engine
    if policy.stage == 3 and not policy.offload_optimizer:
        engine -= 2 * trained / gpus
    if policy.stage == 1:
        engine -= 2 * trained - 2 * trained / gpus
    return engine


@functools.cache
def tower_parameters(name: str, kind: str, vocab_size: int | None = None, image_size: int = 0) -> int:
    """Parameters of an image or text tower; ``vocab_size`` applies to text towers only,
    ``image_size`` to image towers only."""
    if kind == "text":
        return count_parameters(name, vocab_size)
    return count_parameters(name, image_size=image_size)
