"""Text tokenizer: any Hugging Face tokenizer directory (the demo's is `data/demo/tokenizer`)."""

from __future__ import annotations

import os


def load_tokenizer(path: str, vocab_size: int | None = None):
    """Load the tokenizer given by `--tokenizer` with `transformers.AutoTokenizer`; with `vocab_size`
    (a text tower built from config, not from a pretrained encoder) check that its ids fit.

    A local path that does not exist fails here with a message naming the flag, rather than
    as a confusing Hub lookup error deep inside transformers.
    """
    from transformers import AutoTokenizer

    if not path:
        raise FileNotFoundError("--tokenizer: no tokenizer directory given (e.g. data/demo/tokenizer)")
    looks_local = os.path.isabs(path) or path.startswith(".") or os.sep in path
    if looks_local and not os.path.isdir(path):
        hint = " (run `make demo` or data_tools/make_demo_data.py to create the demo one)" if "demo" in path else ""
        raise FileNotFoundError(f"--tokenizer: directory {path!r} does not exist{hint}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--tokenizer: cannot load a tokenizer from {path!r}: {e}") from e
    if tok.pad_token is None:
        raise ValueError(f"--tokenizer: {path!r} has no pad token; batches are padded to max_text_len")
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(f"--tokenizer has {len(tok)} tokens but the preset's text.vocab_size is {vocab_size}; "
                         "use a smaller vocabulary or a larger preset")
    return tok
