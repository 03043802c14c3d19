"""Evaluate an exported model on zero-shot classification and image-text retrieval.

    python -m tritower.launch.tools.evaluate --export exports/clip_tiny
    python -m tritower.launch.tools.evaluate --export exports/clip_tiny \\
        --eval-shards '/data/eval/{000..003}.tar' --out metrics.json

Without ``--eval-shards`` it uses the held-out data the run was evaluated on: the built-in scenes'
eval split (regenerated from the run's saved data config if not cached, with
``ensure_builtin_data``) or the run's ``data.eval_shards``. Class names and prompt templates come
from ``classnames.txt`` / ``templates.txt`` next to the shards. Prints a table and one JSON line
(the same keys as the training run's final line), and writes ``--out`` if given.

Same code as the trainer's evaluation (``tritower.evaluation.evaluate``, same batch size and sample
cap as the run's ``eval`` section by default), so an fp32 export reproduces the run's final
``zeroshot_top1``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tritower.data import DataConfig, ensure_builtin_data, expand_shards, load_eval_set, tokenize
from tritower.evaluation import evaluate, recall_at_k
from tritower.inference import ExportedModel, load_export
from tritower.launch.run_io import write_json_atomic


def eval_shards_for(exported: ExportedModel, spec: str | None, cache_dir: str | None) -> list[str]:
    """``spec`` expanded, or the run's own held-out shards (see the module docstring)."""
    if spec:
        return expand_shards(spec)
    saved = dict((exported.config.get("training") or {}).get("data") or {})
    if not saved:
        raise SystemExit("the export records no training data config: pass --eval-shards")
    if cache_dir:
        saved["cache_dir"] = cache_dir
    data_cfg = DataConfig(**saved)
    if data_cfg.uses_builtin:
        return ensure_builtin_data(data_cfg).eval_shards
    if not data_cfg.eval_shards:
        raise SystemExit("the run had no data.eval_shards: pass --eval-shards")
    return expand_shards(data_cfg.eval_shards)


def run_evaluation(
    exported: ExportedModel, shards: list[str], *, batch_size: int, max_samples: int, caption_key: str = "txt"
) -> dict[str, float]:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 of ``exported`` on ``shards``."""
    prep = exported.config["image_preprocessing"]
    eval_set = load_eval_set(
        shards,
        exported.tokenizer,
        prep["image_size"],
        prep["mean"],
        prep["std"],
        exported.context_length,
        caption_key=caption_key,
        max_samples=max_samples,
    )
    count = len(eval_set.labels) if max_samples <= 0 else min(max_samples, len(eval_set.labels))
    if not eval_set.classnames or not eval_set.templates:
        # A retrieval-only set (no classnames.txt/templates.txt beside the shards).
        print("note: no classnames.txt/templates.txt next to the shards: zero-shot is skipped", file=sys.stderr)
        image_features = exported.encode_image(eval_set.images[:count], batch_size)
        with torch.no_grad():
            text_features = torch.cat(
                [
                    exported.model.encode_text(
                        eval_set.input_ids[i : i + batch_size].to(exported.device),
                        eval_set.attention_mask[i : i + batch_size].to(exported.device),
                    )
                    .float()
                    .cpu()
                    for i in range(0, count, batch_size)
                ]
            )
        return recall_at_k(image_features, text_features) | {"eval_samples": count}
    return evaluate(
        exported.model,
        eval_set,
        lambda prompts: tokenize(exported.tokenizer, prompts, exported.context_length),
        device=exported.device,
        dtype=exported.dtype,
        batch_size=batch_size,
        max_samples=max_samples,
    ) | {"eval_samples": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tritower.launch.tools.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--export", required=True, help="folder written by tritower.launch.tools.export")
    parser.add_argument("--eval-shards", default=None, help="held-out shards (brace pattern or .txt list)")
    parser.add_argument("--cache-dir", default=None, help="built-in data cache (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    parser.add_argument("--max-samples", type=int, default=None, help="default: the run's eval.max_samples")
    parser.add_argument("--caption-key", default="txt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the metrics JSON here")
    options = parser.parse_args(argv)

    exported = load_export(options.export, device=options.device)
    run_eval = (exported.config.get("training") or {}).get("eval") or {}
    batch_size = options.batch_size or int(run_eval.get("batch_size", 256))
    max_samples = options.max_samples if options.max_samples is not None else int(run_eval.get("max_samples", 0))
    shards = eval_shards_for(exported, options.eval_shards, options.cache_dir)
    metrics = run_evaluation(
        exported, shards, batch_size=batch_size, max_samples=max_samples, caption_key=options.caption_key
    )
    source = exported.config.get("source", {})
    print(
        f"export {options.export} (step {source.get('step')}), {metrics['eval_samples']} held-out samples "
        f"from {len(shards)} shards"
    )
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    line = {"export": str(options.export), "step": source.get("step"), **metrics}
    print(json.dumps(line), flush=True)
    if options.out:
        write_json_atomic(Path(options.out), line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
