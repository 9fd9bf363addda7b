"""``compress.checkpoint``: the checkpoint loader under the name earlier releases documented; the code lives in
``compress.models.checkpoint``."""
from compress.models.checkpoint import load_dynamicvit, save_dynamicvit  # noqa: F401  (re-exported)
