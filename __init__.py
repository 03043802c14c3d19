"""tritower: contrastive image-text training (CLIP, LiT, Three Towers) on DeepSpeed.

The repository root is the ``tritower`` package (see ``setup.py``): its folders import as
``tritower.launch``, ``tritower.model``, ``tritower.data``, ``tritower.losses`` and
``tritower.evaluation``.
"""

__version__ = "0.1.0"
