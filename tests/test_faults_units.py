"""Faults and bad input found without starting a process: what evaluation does with the features
of a diverged model, the checks ``validate`` makes, what a resume compares, the health rule of
the divergence guard, and the run-folder lock under a race.

Each test reproduces one failure a probe of 2-rank runs found; the launches that need real ranks
are in ``test_faults.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tritower.evaluation import ProbeOptions, metrics_of, retrieval_metrics, topk_accuracy
from tritower.evaluation.features import SetFeatures
from tritower.evaluation.linear_probe import fewshot_metrics, logistic_probe_metrics

# ---- NaN features are not scored -------------------------------------------------------------


def _features(n: int = 12, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return image, text


def test_nan_features_score_nan_not_one() -> None:
    """A diverged model's features are NaN: every comparison with NaN is false, which made each
    query a certain hit (top-1 1.000, every R@k 1.000)."""
    image, text = _features()
    nan = torch.full_like(image, float("nan"))
    for name, value in retrieval_metrics(nan, nan, torch.arange(len(nan))).items():
        assert math.isnan(value), (name, value)
    labels = torch.arange(len(image)) % 3
    classifier = torch.full((3, image.shape[1]), float("nan"))
    for name, value in topk_accuracy(nan, classifier, labels).items():
        if name != "zeroshot_unlabelled":
            assert math.isnan(value), (name, value)
    assert all(math.isnan(v) for v in fewshot_metrics(nan, labels, (1, 2)).values())
    assert math.isnan(logistic_probe_metrics(nan, labels)["linear_probe_top1"])
    # One NaN image among finite ones: that image's queries are not scored, so the mean is NaN too.
    image[3, 0] = float("nan")
    assert math.isnan(retrieval_metrics(image, text, torch.arange(len(image)))["image_to_text_R@1"])


def test_metrics_count_the_nonfinite_feature_rows() -> None:
    image, text = _features()
    image[[1, 5]] = float("inf")
    text[2, 0] = float("nan")
    labels = torch.arange(len(image)) % 3
    classifier = torch.nn.functional.normalize(torch.randn(3, image.shape[1]), dim=1)
    features = SetFeatures(image=image, labels=labels, text=text, caption_to_image=torch.arange(len(image)))
    metrics = metrics_of(features, ("zeroshot", "retrieval"), classifier, ProbeOptions())
    assert metrics["eval_nonfinite"] == 3
    assert math.isnan(metrics["zeroshot_top1"]) and math.isnan(metrics["text_to_image_R@5"])
    finite = SetFeatures(image=_features()[0], labels=labels, text=_features()[1], caption_to_image=torch.arange(12))
    clean = metrics_of(finite, ("retrieval",), None, ProbeOptions())
    assert clean["eval_nonfinite"] == 0 and 0 <= clean["image_to_text_R@1"] <= 1


# ---- values validate() refuses, before anything is built -------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("--optim.lr=nan", "optim.lr"),
        ("--optim.lr=inf", "optim.lr"),
        ("--optim.beta2=1.5", "optim.beta2"),
        ("--optim.beta1=-0.1", "optim.beta1"),
        ("--optim.eps=nan", "optim.eps"),
        ("--checkpoint.every_steps=-1", "checkpoint.every_steps"),
        ("--checkpoint.keep_last=-1", "checkpoint.keep_last"),
        ("--checkpoint.every_minutes=-5", "checkpoint.every_minutes"),
        ("--train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row"),
        ("--train.run_name=../x", "train.run_name"),
        ("--train.run_name=a/b", "train.run_name"),
        ("--train.run_name=..", "train.run_name"),
    ],
)
def test_values_torch_or_the_checkpointer_would_misuse_are_refused(override: str, named: str) -> None:
    from tritower.launch.cli import load_config
    from tritower.launch.config import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config(["--experiment=clip_test", override])
    assert named in str(error.value) and "\n" not in str(error.value)


def test_duplicate_class_names_are_refused_except_clips_own_imagenet_list() -> None:
    from tritower.data.eval_formats import imagenet_classnames
    from tritower.evaluation import EvalSetError, plan_kinds

    sets = dict(has_captions=False, has_labels=True, templates=["a photo of a {}."])
    with pytest.raises(EvalSetError, match="'cat' appear more than once"):
        plan_kinds("pets", None, classnames=["cat", "dog", "cat"], **sets)
    assert plan_kinds("in1k", None, classnames=imagenet_classnames(), **sets).kinds == ("zeroshot",)


# ---- a resume with other training settings is refused from the manifest -------------------------


def test_resume_with_another_zero_stage_optimizer_precision_or_batch_is_refused(tmp_path) -> None:  # noqa: ANN001
    from tritower.launch.checkpoint.manifest import check_manifest, training_identity
    from tritower.launch.experiments import get_experiment

    config = get_experiment("clip_test").to_dict()
    manifest = {"world_size": 2, "model": {}, "training": training_identity(config, 2)}
    check_manifest(manifest, "tag", world_size=2, model={}, training=training_identity(config, 2))
    changes = {
        "zero_stage=2 there, 3 here": (config, 3),
        "optim.name='adamw' there, 'lamb' here": ({**config, "optim": {**config["optim"], "name": "lamb"}}, 2),
        "deepspeed.precision='fp32' there, 'bf16' here": (
            {**config, "deepspeed": {**config["deepspeed"], "precision": "bf16"}}, 2
        ),
        "data.batch_size=32 there, 64 here": ({**config, "data": {**config["data"], "batch_size": 64}}, 2),
    }  # fmt: skip
    for marker, (changed, stage) in changes.items():
        with pytest.raises(ValueError, match="was trained with other settings") as error:
            check_manifest(manifest, "tag", world_size=2, model={}, training=training_identity(changed, stage))
        assert marker in str(error.value)


# ---- minor: a missing latest tag, a cut file on export, early input checks, --help=SECTION ------


def _fake_tag(checkpoints, step: int):  # noqa: ANN001, ANN202
    from tritower.launch.checkpoint.manifest import write_manifest

    tag = checkpoints / f"step{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    write_manifest(tag, {"step": step, "world_size": 2, "model": {}})
    return tag


def test_resume_auto_warns_when_the_tag_latest_names_was_deleted(tmp_path) -> None:  # noqa: ANN001
    from tritower.launch.checkpoint.manifest import pick_resume

    checkpoints = tmp_path / "checkpoints"
    _fake_tag(checkpoints, 2)
    (checkpoints / "latest").write_text("step00000004")  # its folder deleted by hand
    target, _, warnings = pick_resume("auto", checkpoints)
    assert target == (checkpoints, "step00000002")
    assert any("names step00000004, which is missing" in w for w in warnings), warnings
    assert any("resuming from the newest complete checkpoint" in w for w in warnings), warnings


def test_export_of_a_tag_with_a_cut_file_names_the_file(tmp_path) -> None:  # noqa: ANN001
    from tritower.launch.tools.export import ExportError, export

    tag = _fake_tag(tmp_path / "checkpoints", 2)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)  # cut short
    with pytest.raises(ExportError, match="mp_rank_00_model_states.pt has 10 bytes, its manifest says 100"):
        export(tag, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inputs_that_fail_are_found_before_the_towers_are_built(tmp_path) -> None:  # noqa: ANN001
    from tritower.launch.config import ConfigError
    from tritower.launch.experiments import get_experiment
    from tritower.launch.loop.run_setup import DataSources, check_inputs

    cfg = get_experiment("clip_test")
    sources = DataSources(train_shards=str(tmp_path / "missing-{000..003}.tar"), eval_shards=[], vocab="v.txt")
    cfg.data.train_shards = sources.train_shards
    with pytest.raises(FileNotFoundError, match="none of the 4 local shards exists"):
        check_inputs(cfg, sources)
    cfg.data.train_shards, sources.train_shards = "builtin", "builtin"
    cfg.eval.sets = f"gone={tmp_path / 'no-such-set'}"
    with pytest.raises(ConfigError, match="eval.sets gone"):
        check_inputs(cfg, sources)
    cfg.eval.sets = ""
    if not torch.cuda.is_available():
        cfg.deepspeed.precision = "fp16"
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            check_inputs(cfg, sources)


def test_help_in_the_equals_form_prints_the_help(capsys) -> None:  # noqa: ANN001
    from tritower.launch.cli import load_config

    with pytest.raises(SystemExit) as stop:
        load_config(["--help=train"])
    assert stop.value.code in (0, None)
    assert "--train.max_nonfinite_in_row" in capsys.readouterr().out


# ---- the health rule: a loss stuck at ln(batch) or a collapsed logit scale is not good ----------


def test_a_collapsed_step_never_proves_a_checkpoint_good_and_is_warned_about() -> None:
    from tritower.launch.loop.divergence import DivergenceGuard, chance_loss

    chance = chance_loss("softmax", False, 32)
    assert chance == pytest.approx(3.4657359, abs=1e-6)  # ln 32
    assert chance_loss("sigmoid", False, 32) is None and chance_loss("softmax", True, 32) is None
    guard = DivergenceGuard(5, chance, collapse_warn_steps=3)
    assert guard.finite("step00000002", 3.53, 14.3, 3) is None  # clip_test's first loss: 0.06 above ln 32
    assert guard.verified_tag == "step00000002"
    # Stuck at ln 32 exactly (precomputed embeddings x 1e30), then a logit scale near 0: collapsed.
    lines = [guard.finite("step00000004", math.log(32), 14.3, 5), guard.finite("step00000004", 3.0, 0.0, 6)]
    lines.append(guard.finite("step00000006", math.log(32) + 5e-4, 5.0, 7))
    assert guard.verified_tag == "step00000002"  # the last good checkpoint stays the one before
    assert guard.collapsed_total == 3 and lines[:2] == [None, None]
    assert "stayed at" in lines[2] and "ln(batch) = 3.4657" in lines[2] and "step00000002" in lines[2]
    assert guard.finite("step00000008", 2.9, 15.0, 9) is None and guard.verified_tag == "step00000008"


def test_the_watchdog_names_the_stale_the_waiting_for_data_or_the_behind_rank(tmp_path) -> None:  # noqa: ANN001
    from tritower.launch.lifecycle.watchdog import HangWatchdog

    dog = HangWatchdog(tmp_path, rank=0, world_size=3, timeout_s=8)  # beats every 2 s, stale after 6 s
    now = 1000.0

    def beat(step: int, age: float, phase: str = "step") -> dict:
        return {"step": step, "phase": phase, "beat_at": now - age, "progress_at": now - 9}

    ranks, why = dog.stuck({0: beat(7, 1), 1: beat(7, 30), 2: beat(7, 1)}, now)  # rank 1 SIGSTOPped
    assert ranks == [1] and "its process has stopped (rank 1: no heartbeat for 30 s)" in why
    assert dog.stuck({0: beat(7, 1), 2: beat(7, 1)}, now)[0] == [1]  # no heartbeat at all
    ranks, why = dog.stuck({0: beat(7, 1), 1: beat(7, 1, "data"), 2: beat(7, 1)}, now)
    assert ranks == [1] and "drawing the batch of step 8" in why
    ranks, why = dog.stuck({0: beat(7, 1), 1: beat(7, 1), 2: beat(6, 1)}, now)
    assert ranks == [2] and "at step 6, the others at step 7" in why


def test_a_streak_of_non_finite_inputs_names_them_not_the_learning_rate(tmp_path) -> None:  # noqa: ANN001
    """NaN in a locked tower's outputs or in precomputed embeddings is not a divergence: the stop
    names the inputs and does not advise a lower learning rate; a NaN loss from finite inputs does."""
    from types import SimpleNamespace

    import torch

    from tritower.launch.loop.divergence import DivergenceGuard
    from tritower.launch.loop.trainer import nonfinite_inputs

    finite = {"image_embeddings": torch.ones(2, 4), "text_ids": torch.ones(2, 3)}
    nan = {"image_embeddings": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}
    assert nonfinite_inputs([finite], torch.device("cpu")) == ()
    assert nonfinite_inputs([finite, nan], torch.device("cpu")) == ("image_embeddings",)  # any micro-batch
    folder = SimpleNamespace(folder=tmp_path)  # stop() reads only the folder when nothing was saved
    bad = DivergenceGuard(2)
    assert "non-finite inputs: image_embeddings" in bad.nonfinite(3, math.nan, ("image_embeddings",))
    bad.nonfinite(4, math.nan, ("image_embeddings",))
    record, line = bad.stop(4, folder, True, 1e-3)
    assert record["cause"] == "non-finite inputs" and "inputs were not finite (image_embeddings" in line
    assert "lower learning rate:" not in line and "cannot help" in line
    plain = DivergenceGuard(2)
    plain.nonfinite(3, math.nan)
    plain.nonfinite(4, math.nan)
    record, line = plain.stop(4, folder, True, 1e-3)
    assert record["cause"] == "non-finite loss from finite inputs" and "--optim.lr=0.0001" in line
    # A finite step ends the streak and forgets its inputs.
    bad.finite(None, 3.0, 14.0)
    assert not bad.bad_inputs
