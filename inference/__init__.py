"""Inference on an exported model: load an export, preprocess images, tokenise captions, encode.

This is where the model and the data layers meet for users (``model/`` and ``data/`` never import
each other). No DeepSpeed, no checkpoint, no pretrained files: only the export folder.

    from tritower.inference import load_export
"""

from tritower.inference.exported import ExportedModel, load_export

__all__ = ["ExportedModel", "load_export"]
