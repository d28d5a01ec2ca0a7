"""WenLan / BriVL pre-training stack."""


def load(path):
    """Load an exported model: ``wenlan.load(FILE).encode_image(images)`` / ``.encode_text(texts)``."""
    from wenlan.export import load as _load

    return _load(path)
