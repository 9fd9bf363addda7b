"""compress.training: training the models, and the commands that do it.

- ``loop``: the one training loop (``fit``) every objective runs in: schedule, AMP, EMA, distributed runs;
- ``losses``: DynamicViT's distillation loss and the logit distillation of ToCom;
- ``masking``: masked fine-tuning's forward (random patches removed from the sequence);
- ``train``: DynamicViT distillation, dense and masked fine-tuning (``python -m compress.train``,
  ``python -m compress.masked_ft``);
- ``tocom_train``: Token Compensator training (``python -m compress.tocom_train``);
- ``demo``: the built-in demo model's recipe (``python -m compress.demo``).

The commands keep their names: ``compress/train.py``, ``compress/masked_ft.py``, ``compress/tocom_train.py`` and
``compress/demo.py`` are their entry points.
"""
from compress.training.loop import fit  # noqa: F401  (the documented entry point of the loop)
