"""advfast: fast adversarial contrastive self-supervised pre-training.

Nothing here downloads or compiles at import time; the compiled extension ``advfast._C`` is
loaded lazily by :mod:`advfast._ext` the first time an op asks for the ``cpp``/``cuda`` backend.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # advfast.load_published(path, fmt): the published-checkpoint importer, lazily (importing advfast stays
    # free of torch). It lives in advfast.interop; advfast.models is the ground floor and may not import
    # interop (tests/test_layering.py), so the short name is here rather than in advfast.models.
    if name == "load_published":
        from advfast.interop import load_published

        return load_published
    raise AttributeError(f"module 'advfast' has no attribute {name!r}")
