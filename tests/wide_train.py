"""``wenlan/train.py`` on the tiny preset with a wider, deeper text encoder (~35M online parameters, a
~0.5 GB ZeRO-3 checkpoint): launched like train.py by tests whose subject is the size of a checkpoint
(the converter's memory), where the tiny preset's few MB would vanish under Python's own footprint."""

import dataclasses

from wenlan.models import presets

tiny = presets.PRESETS["tiny"]
presets.PRESETS["tiny"] = dataclasses.replace(
    tiny, text=dataclasses.replace(tiny.text, vocab_size=16384, hidden=512, bert_layers=8, bert_heads=8, bert_ffn=2048))

if __name__ == "__main__":
    from wenlan.train import main

    main()
