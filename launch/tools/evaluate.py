"""Evaluate an exported model on the run's eval sets or on named ones: zero-shot classification,
image-text retrieval and linear probes, streamed in batches.

    python -m tritower.launch.tools.evaluate --export exports/clip_tiny
    python -m tritower.launch.tools.evaluate --checkpoint runs/clip_tiny/checkpoints   # any run, directly
    python -m tritower.launch.tools.evaluate --export exports/clip_tiny \\
        --eval-shards '/data/eval/{000..003}.tar' --out metrics.json
    python -m tritower.launch.tools.evaluate --export exports/clip_tiny --no-default \\
        --set imagenet=/data/imagenet_wds:zeroshot+linear_probe --set coco=/data/coco_wds:retrieval \\
        --out-dir results/

Without ``--eval-shards`` the default set is the held-out data the run was evaluated on: the
built-in scenes' eval split (regenerated from the run's saved data config if not cached, with
``ensure_builtin_data``) or the run's ``data.eval_shards``; the run's ``eval.sets`` are evaluated
too unless ``--set`` names others. Formats, kinds and metric names are those of training
(docs/evaluation.md): the default set's metrics keep their plain names, named sets' are
``<set>/<metric>``. Prints a table and one JSON line, writes ``--out`` (all sets, one object) and
``--out-dir/<set>.json`` (one per set; the default set is ``default.json``).

Same code as the trainer's evaluation (``tritower.evaluation.evaluate_batches``, the same batch size,
sample cap and probe settings as the run's ``eval`` section by default), so an fp32 export
reproduces the run's final metrics.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tritower.data import DataConfig, ensure_builtin_data, expand_shards, tokenize
from tritower.data.atomic import strict_json, write_json_atomic
from tritower.data.eval_formats import expected_samples, open_eval_source
from tritower.data.eval_set import iter_eval_batches
from tritower.data.samples import BadDataStats
from tritower.data.scenes import builtin_eval_split, builtin_set_styles
from tritower.evaluation import COUNTS, EvalSetError, ProbeOptions, evaluate_batches, plan_kinds
from tritower.evaluation.config import EvalConfig, parse_kinds
from tritower.evaluation.features import ProgressReporter
from tritower.evaluation.runner import counts_as_int
from tritower.inference import ExportedModel, load_export
from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError

COMMAND = "python -m tritower.launch.tools.evaluate"


def _training_data(exported: ExportedModel, cache_dir: str | None) -> DataConfig:
    """The data config the exported run trained with (``cache_dir`` overriding its cache folder)."""
    saved = dict((exported.config.get("training") or {}).get("data") or {})
    if not saved:
        raise SystemExit("the export records no training data config: pass --eval-shards")
    if cache_dir:
        saved["cache_dir"] = cache_dir
    return DataConfig(**saved)


def named_set_path(exported: ExportedModel, path: str, cache_dir: str | None) -> list[str] | str:
    """A named set's path; ``builtin:STYLES`` is the run's built-in held-out split in those styles."""
    styles = builtin_set_styles(path)
    return path if styles is None else builtin_eval_split(_training_data(exported, cache_dir), styles)


def eval_shards_for(exported: ExportedModel, spec: str | None, cache_dir: str | None) -> list[str] | str:
    """``spec`` (a shard pattern or a set folder), or the run's own held-out shards (see the module)."""
    if spec:
        return spec
    data_cfg = _training_data(exported, cache_dir)
    if data_cfg.uses_builtin:
        return ensure_builtin_data(data_cfg).eval_shards
    if not data_cfg.eval_shards:
        raise SystemExit("the run had no data.eval_shards: pass --eval-shards")
    return expand_shards(data_cfg.eval_shards)


def run_evaluation(
    exported: ExportedModel,
    shards: list[str] | str,
    *,
    batch_size: int,
    max_samples: int,
    caption_key: str = "txt",
    label_key: str = "json:label",
    kinds: tuple[str, ...] | None = None,
    name: str = "",
    split: str = "test",
    probe: ProbeOptions | None = None,
) -> dict[str, float]:
    """The metrics of ``kinds`` (None: auto) of ``exported`` on one set (shards or a set folder),
    keyed as in training; a kind the set cannot give is skipped with a note on stderr (auto) or
    fails naming the fix."""
    prep = exported.config["image_preprocessing"]
    source = open_eval_source(shards, caption_key=caption_key, label_key=label_key, split=split)
    plan = plan_kinds(
        name,
        kinds,
        has_captions=source.has_captions,
        has_labels=source.has_labels,
        classnames=source.classnames,
        templates=source.templates,
    )
    for kind, reason in plan.skipped.items():
        print(f"note: eval set {name or 'default'}: {kind} skipped: {reason}", file=sys.stderr)
    stats = BadDataStats()
    batches = iter_eval_batches(
        source,
        exported.tokenizer,
        prep["image_size"],
        prep["mean"],
        prep["std"],
        exported.context_length,
        batch_size=batch_size,
        stats=stats,
        max_samples=max_samples,
        interpolation=prep.get("interpolation", "bicubic"),  # exports before it was recorded: bicubic
    )
    metrics = evaluate_batches(
        exported.model,
        batches,
        lambda prompts: tokenize(exported.tokenizer, prompts, exported.context_length),
        kinds=plan.kinds,
        classnames=source.classnames,
        templates=source.templates,
        image_shape=(3, prep["image_size"], prep["image_size"]),
        context_length=exported.context_length,
        device=exported.device,
        dtype=exported.dtype,
        stats=stats,
        probe=probe,
        progress=_progress_lines(name or "default", expected_samples(source, max_samples)),
    )
    if stats.total_bad:
        print(f"note: eval set {name or 'default'}: unreadable samples by kind {dict(stats.bad)}", file=sys.stderr)
    prefix = f"{name}/" if name else ""
    return {prefix + key: value for key, value in metrics.items()}


def _progress_lines(name: str, total: int | None) -> ProgressReporter:
    """Progress of a set's encoding on stderr every few seconds (stdout keeps the table and JSON)."""
    return ProgressReporter(lambda report: print(report.line(), file=sys.stderr, flush=True), name=name, total=total)


@dataclass
class EvaluateOptions:
    """Options of the evaluate command: ``--export FOLDER`` or ``--checkpoint FOLDER``, then the sets."""

    export: str | None = None
    """Folder written by ``tritower.launch.tools.export``."""
    checkpoint: str | None = None
    """Instead of ``--export``: a run's checkpoints folder or one tag folder in it, exported (fp32)
    into a temporary folder first."""
    tag: str | None = None
    """With ``--checkpoint``: the tag; None: the folder's ``latest``."""
    eval_shards: str | None = None
    """The default set: shards (brace pattern, ``.txt`` list) or a set folder; None: the run's."""
    kinds: str | None = None
    """The default set's kinds: ``auto`` or e.g. ``zeroshot+retrieval``; None: the run's."""
    set: list[str] = field(default_factory=list)
    """A named set ``NAME=PATH[:KINDS]`` (as ``eval.sets``); given, it replaces the run's sets."""
    no_default: bool = False
    """Evaluate only the ``--set`` sets, not the default one."""
    split: str | None = None
    """clip_benchmark split folder; None: the run's, else ``test``."""
    cache_dir: str | None = None
    """Built-in data cache; None: the run's."""
    batch_size: int | None = None
    """Images per batch; None: the run's ``eval.batch_size``."""
    max_samples: int | None = None
    """Samples per set at most; None: the run's ``eval.max_samples``."""
    caption_key: str | None = None
    """Caption field of the samples; None: the run's ``data.caption_key``, else ``txt``."""
    label_key: str | None = None
    """Label field of the samples; None: the run's ``data.label_key``, else ``json:label``."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where the model runs."""
    out: str | None = None
    """Also write all metrics as one JSON object here."""
    out_dir: str | None = None
    """Also write one JSON per set here (``<set>.json``; the default set is ``default.json``)."""


def _evaluate_checkpoint(options: EvaluateOptions) -> int:
    """``--checkpoint``: the same consolidation as ``export`` into a temporary folder, then the
    same evaluation as ``--export`` on it (so the numbers are those of the exported weights)."""
    import tempfile

    from tritower.launch.tools.export import ExportError, export

    with tempfile.TemporaryDirectory(prefix="tritower-eval-") as folder:
        try:
            export(options.checkpoint, folder, tag=options.tag)
        except (ExportError, FileNotFoundError, ValueError) as error:
            print(f"tritower.evaluate: {error}", file=sys.stderr)
            return 2
        return evaluate_export(dataclasses.replace(options, export=folder, checkpoint=None))


def parse_args(argv: list[str] | None) -> EvaluateOptions:
    """The command line -> EvaluateOptions; ConfigError (one line) on a usage mistake."""
    options = parse_options(
        EvaluateOptions,
        argv,
        command=COMMAND,
        example="--export exports/clip_tiny",
    )
    if options.export and options.checkpoint:
        raise ConfigError("give --export FOLDER or --checkpoint FOLDER, not both")
    if not (options.export or options.checkpoint):
        raise ConfigError(
            f"missing --export FOLDER (or --checkpoint FOLDER): e.g. {COMMAND} --export exports/clip_tiny"
        )
    if options.tag and not options.checkpoint:
        raise ConfigError("--tag applies to --checkpoint only (an export holds one tag)")
    return options


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 evaluated, 2 a usage error or a checkpoint that cannot be exported (one line)."""
    try:
        options = parse_args(argv)
    except ConfigError as error:
        print(f"tritower.evaluate: error: {error}", file=sys.stderr)
        return 2
    return _evaluate_checkpoint(options) if options.checkpoint else evaluate_export(options)


def evaluate_export(options: EvaluateOptions) -> int:
    """Evaluate ``options.export`` on its sets: print the table and the JSON line, write the files."""
    try:
        exported = load_export(options.export, device=options.device)
    except FileNotFoundError as error:
        print(f"tritower.evaluate: error: --export {options.export}: {error}", file=sys.stderr)
        return 2
    training = exported.config.get("training") or {}
    saved_eval = {k: v for k, v in (training.get("eval") or {}).items() if k in EvalConfig.__dataclass_fields__}
    run_eval = EvalConfig(**saved_eval)
    run_data = training.get("data") or {}
    batch_size = options.batch_size or run_eval.batch_size
    max_samples = options.max_samples if options.max_samples is not None else run_eval.max_samples
    keys = dict(
        caption_key=options.caption_key or run_data.get("caption_key", "txt"),
        label_key=options.label_key if options.label_key is not None else run_data.get("label_key", "json:label"),
        split=options.split or run_eval.split,
    )
    probe = ProbeOptions(
        shots=run_eval.shot_values(),
        l2=run_eval.fewshot_l2,
        C=run_eval.probe_C,
        train_fraction=run_eval.probe_train_fraction,
        seed=int((training.get("train") or {}).get("seed", 0)),
    )
    try:
        named = EvalConfig(sets=";".join(options.set)).set_specs() if options.set else run_eval.set_specs()
        sets: list[tuple[str, list[str] | str, tuple[str, ...] | None]] = []
        if not options.no_default:
            default_kinds = parse_kinds(options.kinds, "--kinds") if options.kinds else run_eval.legacy_kinds()
            sets.append(("", eval_shards_for(exported, options.eval_shards, options.cache_dir), default_kinds))
        sets += [(spec.name, named_set_path(exported, spec.path, options.cache_dir), spec.kinds) for spec in named]
        if not sets:
            raise SystemExit("nothing to evaluate: --no-default without --set")
        per_set = {
            name: run_evaluation(
                exported, path, batch_size=batch_size, max_samples=max_samples, kinds=kinds, name=name, probe=probe,
                **keys,
            )
            for name, path, kinds in sets
        }  # fmt: skip
    except (EvalSetError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    metrics = {key: value for result in per_set.values() for key, value in result.items()}
    source = exported.config.get("source", {})
    print(f"export {options.export} (step {source.get('step')}), sets: {', '.join(n or 'default' for n in per_set)}")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(
            f"  {key:<{width}}  {value:.4f}"
            if key.rsplit("/", 1)[-1] not in COUNTS
            else f"  {key:<{width}}  {value:.0f}"
        )
    head = {"export": str(options.export), "step": source.get("step")}
    line = head | counts_as_int(metrics)
    print(json.dumps(strict_json(line)), flush=True)
    if options.out:
        write_json_atomic(Path(options.out), line)
    if options.out_dir:
        for name, result in per_set.items():
            prefix = f"{name}/" if name else ""
            plain = {key.removeprefix(prefix): value for key, value in result.items()}
            write_json_atomic(
                Path(options.out_dir) / f"{name or 'default'}.json",
                head | {"set": name or "default"} | counts_as_int(plain),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
