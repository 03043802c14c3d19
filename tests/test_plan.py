"""The memory planner (launch/plan/planner.py) against DeepSpeed's estimators and measured CPU runs.

    pytest -q tests/test_plan.py

Two measurements run in fresh subprocesses, side by side (one thread each), started together
and checked by the module's last two tests (marked ``launch``): a tiny CLIP's forward+backward
in plain PyTorch with and without activation checkpointing, and a whole fp32 step through a
1-rank DeepSpeed ZeRO-2 engine. Peak resident memory is read from the kernel (see
launch/plan/measure.py); a planner 2x off fails.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tritower.launch import plan as planner
from tritower.launch.plan.activations import layer_saved_bytes, tower_shape
from tritower.launch.plan.measure import finish, start_measurement
from tritower.launch.plan.states import (
    POLICIES,
    comparable_engine_bytes,
    deepspeed_estimate,
    largest_layer_parameters,
    model_states,
    tower_parameters,
)
from tritower.model.setting import SETTINGS

TOLERANCE_DEEPSPEED = 0.05
TOLERANCE_MEASURED = 0.20
# The measurement resets and reads the kernel's peak resident set: Linux only.
CAN_MEASURE = os.path.exists("/proc/self/clear_refs")
needs_proc = pytest.mark.skipif(not CAN_MEASURE, reason="needs Linux /proc/self/clear_refs")


@pytest.fixture(scope="module")
def started() -> dict:
    """Both CPU measurements, started side by side by the first test that needs them; about 25 s
    on an idle 2-core machine."""
    if not CAN_MEASURE:
        yield {}
        return
    processes = {
        "activations": start_measurement("vit_scene_tiny", "bert_scene_tiny", 256, "off,on"),
        # A 200k-row token table (26M parameters) makes the model states ~40% of the total.
        "deepspeed": start_measurement(
            "vit_scene_tiny", "bert_scene_tiny", 256, "off", deepspeed_stage=2, vocab=200_000
        ),
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def measurements(started: dict) -> dict[str, list[dict]]:
    return {name: finish(process) for name, process in started.items()}


def _engine(image: str, text: str) -> tuple[int, int]:
    trained = tower_parameters(image, "image") + tower_parameters(text, "text")
    largest = max(largest_layer_parameters(image), largest_layer_parameters(text))
    return trained, largest


@pytest.mark.parametrize("image,text", [("vit_base_patch16_224", "bert_base"), ("vit_giant_patch14_224", "bert_large")])
@pytest.mark.parametrize("gpus", [4, 64, 256])
def test_model_states_match_deepspeed_estimators(image: str, text: str, gpus: int) -> None:
    trained, largest = _engine(image, text)
    for policy in POLICIES:
        if policy.stage == 1:
            continue  # DeepSpeed has no ZeRO-1 estimator
        ours = model_states(trained, 0, largest, gpus, policy, "bf16")
        cpu, gpu = deepspeed_estimate(trained, largest, gpus, 8, policy)
        comparable = comparable_engine_bytes(ours, trained, gpus, policy)
        assert comparable == pytest.approx(gpu, rel=TOLERANCE_DEEPSPEED), policy.label
        # Host memory: DeepSpeed's figure is per node; ZeRO-2's includes each process's full
        # fp32 copy at start-up (4 bytes x total GPUs), so it only compares up to 4 GPUs.
        if policy.offload_optimizer and (policy.stage == 3 or gpus <= 4):
            assert ours.cpu * min(gpus, 8) == pytest.approx(cpu, rel=TOLERANCE_DEEPSPEED)


def test_printed_estimates_agree(capsys: pytest.CaptureFixture) -> None:
    """The ``*_all_cold`` functions themselves (they print GB with two decimals)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    trained, largest = _engine("vit_giant_patch14_224", "bert_large")
    estimate_zero2_model_states_mem_needs_all_cold(trained, num_gpus_per_node=8, num_nodes=4)
    estimate_zero3_model_states_mem_needs_all_cold(trained, largest, num_gpus_per_node=8, num_nodes=4)
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"\s*[\d.]+GB \|\s*([\d.]+)GB \| (.*)", line)
        if match:
            options = match.group(2).replace(" ", "").replace("OffloadDeviceEnum.", "")
            printed[options] = float(match.group(1)) * 2**30
    policies = {p.label: p for p in POLICIES}
    expected = {
        "offload_optimizer=none": "ZeRO-2",
        "offload_optimizer=cpu": "Z2+off(opt)",
        "offload_param=none,offload_optimizer=none,zero_init=1": "ZeRO-3",
        "offload_param=none,offload_optimizer=cpu,zero_init=1": "Z3+off(opt)",
        "offload_param=cpu,offload_optimizer=cpu,zero_init=1": "Z3+off(all)",
    }
    for options, label in expected.items():
        ours = model_states(trained, 0, largest, 32, policies[label], "bf16")
        comparable = comparable_engine_bytes(ours, trained, 32, policies[label])
        assert comparable == pytest.approx(printed[options], rel=TOLERANCE_DEEPSPEED), label


def _saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, parameters excluded, each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize("image,text", [("vit_scene_tiny", "bert_scene_tiny")])
def test_layer_formula_counts_saved_tensors(image: str, text: str) -> None:
    """The per-layer formula equals what autograd keeps for one ViT block and one BERT layer."""
    from tritower.model import ModelConfig, TowerConfig, build_clip

    model = build_clip(
        ModelConfig(image=TowerConfig(tower=image), text=TowerConfig(tower=text)), vocab_size=100
    ).train()
    batch = 16
    for layer, name in [(model.image_tower.vit.blocks[0], image), (model.text_tower.bert.encoder.layer[0], text)]:
        shape = tower_shape(name)
        x = torch.randn(batch, shape.tokens, shape.width, requires_grad=True)
        measured = _saved_activation_bytes(layer, x)
        # The layer's own input is a leaf here, so autograd keeps it: in a tower it is the
        # previous layer's output, counted once in the formula's 8h.
        assert batch * layer_saved_bytes(shape, 4) == pytest.approx(measured, rel=0.02), name


def test_cli_plan_vitg_bert_large(capsys: pytest.CaptureFixture) -> None:
    argv = [
        "--image",
        "vit_giant_patch14_224",
        "--text",
        "bert_large",
        "--setting",
        "Uu",
        "--global-batch",
        "32768",
        "--gpus",
        "256",
        "--gpu-memory",
        "40",
        "--json",
    ]
    assert planner.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    best = result["recommendation"]
    assert best["total"] <= result["budget"] == pytest.approx(40 * 2**30 * 0.9)
    assert 128 % best["micro_batch"] == 0
    # 128 ViT-g samples need ~57 GiB of activations: 40 GiB forces checkpointing or GradCache.
    assert best["micro_batches"] > 1 or any(best["checkpointing"].values())
    assert f"--train.micro_batch_size={best['micro_batch']}" in result["flags"]
    assert planner.main(argv[:-1]) == 0
    assert "Recommendation:" in capsys.readouterr().out


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_lock_the_right_towers(setting: str) -> None:
    request = planner.PlanRequest("vit_base_patch16_224", "bert_base", 4096, 32, 80, setting)
    towers = {t.role: t for t in planner.build_towers(request)}
    letters = "Uu" if setting == "3T" else setting
    assert towers["image"].trained == (letters[0] != "L")
    assert towers["text"].trained == (letters[1] != "L")
    assert ("third" in towers) == (setting == "3T")
    result = planner.plan(request)
    locked = sum(t.params for t in towers.values() if not t.trained)
    for states in result["states"].values():
        assert states.locked == 2 * locked  # bf16 parameters only, replicated


def test_precomputed_locked_and_fp32() -> None:
    base = dict(image="vit_base_patch16_224", text="bert_base", global_batch=4096, gpus=32, gpu_memory=80)
    lit = planner.plan(planner.PlanRequest(setting="Lu", **base))
    pre = planner.plan(planner.PlanRequest(setting="Lu", precomputed_locked=True, **base))
    assert lit["states"]["ZeRO-1"].locked > 0 == pre["states"]["ZeRO-1"].locked
    fp32 = planner.plan(planner.PlanRequest(setting="uu", precision="fp32", **base))
    bf16 = planner.plan(planner.PlanRequest(setting="uu", **base))
    assert fp32["states"]["ZeRO-3"].params == pytest.approx(2 * bf16["states"]["ZeRO-3"].params)
    with pytest.raises(ValueError, match="divisible"):
        planner.PlanRequest(setting="uu", **dict(base, gpus=3))


@pytest.mark.launch
@needs_proc
def test_activations_match_cpu_measurement(measurements: dict) -> None:
    by_mode = {r["checkpointing"]: r for r in measurements["activations"]}
    for mode, result in by_mode.items():
        ratio = result["predicted"] / result["measured"]
        assert abs(ratio - 1) < TOLERANCE_MEASURED, (mode, result)
    # Checkpointing really ran: it keeps a fraction of the activations.
    assert by_mode[True]["measured"] < 0.5 * by_mode[False]["measured"]


@pytest.mark.launch
@needs_proc
def test_total_matches_deepspeed_step(measurements: dict) -> None:
    (result,) = measurements["deepspeed"]
    ratio = result["predicted"] / result["measured"]
    assert abs(ratio - 1) < TOLERANCE_MEASURED, result
    assert result["predicted_parts"]["states"] > 0.3 * result["predicted"]


def test_every_registered_image_tower_gets_states_and_honest_activations() -> None:
    """Every image tower the trainer accepts plans without a crash; towers the activation model
    does not describe (not ViTs) are reported as not modelled, never as a made-up number."""
    import timm

    from tritower.launch.plan.command import main as plan_main
    from tritower.launch.plan.planner import PlanRequest, plan, to_json
    from tritower.model import image_tower_spec, list_towers

    for name in list_towers("image"):
        spec = image_tower_spec(name)
        result = to_json(plan(PlanRequest(name, "bert_test", 256, 2, 80.0, "Uu")))
        image = result["towers"][0]
        assert image["params"] > 0, name
        assert (name in result["activations_not_modelled"]) == (spec.arch != "timm_vit"), name
        if spec.arch == "timm" and not spec.timm_args and not spec.timm_class:
            with torch.device("meta"):
                reference = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
            assert image["params"] == sum(p.numel() for p in reference.parameters()), name
    assert (
        plan_main(
            [
                "--image",
                "resnet50",
                "--text",
                "bert_base",
                "--setting",
                "Lu",
                "--global-batch",
                "1024",
                "--gpus",
                "8",
                "--gpu-memory",
                "80",
            ]
        )
        == 0
    )


def test_image_size_changes_tokens_parameters_and_flags(capsys: pytest.CaptureFixture) -> None:
    """--image-size plans the run that --model.image.image_size trains: ViT-B/16 at 384 px is
    timm's own vit_base_patch16_384 (577 tokens, its position table), and its activations grow
    by the token ratio; a size the patches do not divide is refused with the fix."""
    import timm

    from tritower.launch.plan.command import main as plan_main
    from tritower.launch.plan.planner import PlanRequest, plan, to_json

    at = {
        size: to_json(plan(PlanRequest("vit_base_patch16_224", "bert_test", 256, 2, 80.0, "Uu", image_size=size)))
        for size in (0, 384)
    }
    with torch.device("meta"):
        reference = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0)
    assert at[384]["towers"][0]["params"] == sum(p.numel() for p in reference.parameters())
    assert tower_shape("vit_base_patch16_224", 384).tokens == (384 // 16) ** 2 + 1 == 577
    assert tower_shape("vit_base_patch16_224").tokens == 197
    shape = tower_shape("vit_base_patch16_224", 384)
    assert layer_saved_bytes(shape, 2) > 577 / 197 * layer_saved_bytes(tower_shape("vit_base_patch16_224"), 2) * 0.99
    assert "--model.image.image_size=384" in at[384]["flags"]
    assert "image_size" not in at[0]["flags"]
    args = ["--image", "vit_base_patch16_224", "--text", "bert_test", "--global-batch", "256", "--gpus", "2"]
    assert plan_main([*args, "--gpu-memory", "80", "--image-size", "390"]) == 2
    assert "not a multiple of the 16 px patches" in capsys.readouterr().err
