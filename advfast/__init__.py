"""advfast: fast adversarial contrastive self-supervised pre-training.

Nothing here downloads or compiles at import time; the compiled extension ``advfast._C`` is
loaded lazily by :mod:`advfast._ext` the first time an op asks for the ``cpp``/``cuda`` backend.
"""

__version__ = "0.1.0"
