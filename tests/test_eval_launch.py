"""Named eval sets in a real 2-rank training run (streamed and split across ranks, gathered as
features, rank 0's progress lines counting both ranks' images), and ``launch/tools/evaluate.py``
reproducing those in-loop numbers on the export in one process. Sets are written by
clip_benchmark's converter and webdataset's ShardWriter.

Run: ``pytest tests/test_eval_launch.py`` (1 DeepSpeed launch of 2 CPU ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from launching import launch_train
from test_eval_formats import clip_benchmark_sets, picture, png


@pytest.mark.launch
def test_named_sets_in_training_and_evaluate_tool_agree(tmp_path: Path, data_cache: Path) -> None:
    from tritower.launch.tools.evaluate import main as evaluate_main
    from tritower.launch.tools.export import export

    cls, ret = clip_benchmark_sets(tmp_path / "sets", n=15)  # 15: the ranks get 8 and 7 samples
    plain = tmp_path / "sets" / "plain"  # image + cls only, no class names: nothing to evaluate
    plain.mkdir()
    with wds.ShardWriter(str(plain / "%03d.tar"), maxcount=100) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:04d}", "png": png(picture(i % 3, i)), "cls": i % 3})
    sets = f"cls={cls}:zeroshot+linear_probe;ret={ret};plain={plain}"
    run = launch_train(
        [
            "--zero", "zero_configs/z3.json", "--experiment", "clip_test", f"--data.cache_dir={data_cache}",
            f"--train.output_dir={tmp_path / 'runs'}", "--train.steps=2", "--optim.warmup_steps=1",
            "--wandb.mode=disabled", "--eval.every_steps=0", f"--eval.sets={sets}", "--eval.fewshot_shots=1,2",
            "--eval.batch_size=4", "--eval.progress_every_s=0",
        ],
        ranks=2,
    )  # fmt: skip
    final = run.metrics
    for key in ("zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@10", "eval_samples"):
        assert key in final, key  # the run's own set keeps its plain names
    assert final["cls/eval_samples"] == 15 and final["ret/eval_samples"] == 15  # both ranks' shares gathered
    assert {"cls/zeroshot_top1", "cls/zeroshot_mean_per_class_recall", "cls/fewshot_2shot_top1"} <= set(final)
    assert "cls/linear_probe_top1" in final and "ret/image_to_text_R@5" in final
    assert not any(key.startswith("plain/") for key in final) and "cls/image_to_text_R@1" not in final
    assert "eval set plain: zeroshot skipped: no class names" in run.output
    assert "eval set ret: zeroshot skipped" in run.output
    (logged,) = [record["metrics"] for record in run.events() if record["event"] == "eval"]  # report draws it
    assert "cls/zeroshot_top1" in logged and all(final[key] == value for key, value in logged.items())
    # Progress after every batch of 4 (progress_every_s=0), counted over both ranks: after the
    # first step 8 (rank 0 alone had 4), at the end all 15.
    assert "eval set cls: 8 images encoded, " in run.output
    assert "eval set cls: 15 images encoded in " in run.output and "eval set ret: 15 images encoded in " in run.output

    exported = export(run.run_dir / "checkpoints", tmp_path / "export")
    assert exported
    out_dir = tmp_path / "per-set"
    assert evaluate_main(["--export", str(tmp_path / "export"), "--out-dir", str(out_dir)]) == 0
    per_set = {name: json.loads((out_dir / f"{name}.json").read_text()) for name in ("default", "cls", "ret")}
    for name, result in per_set.items():
        prefix = "" if name == "default" else f"{name}/"
        samples = final[f"{prefix}eval_samples"]
        for key, value in result.items():
            if key in ("export", "step", "set"):
                continue
            in_loop = final[prefix + key]
            # One process against two ranks' gathered features: equal up to float noise; a metric
            # may move by one sample where a near tie resolves differently.
            assert abs(value - in_loop) * samples <= 1 + 1e-6, (name, key, value, in_loop)
    # Straight from the checkpoint (exported to a temporary folder by the tool itself): the same numbers.
    direct = tmp_path / "direct"
    assert evaluate_main(["--checkpoint", str(run.run_dir / "checkpoints"), "--out-dir", str(direct)]) == 0
    for name in ("default", "cls", "ret"):
        again = json.loads((direct / f"{name}.json").read_text())
        assert {k: v for k, v in again.items() if k != "export"} == {
            k: v for k, v in per_set[name].items() if k != "export"
        }, name
