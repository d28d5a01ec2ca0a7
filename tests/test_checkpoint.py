"""Which checkpoint a resume picks: only complete tags count, so a save cut short by a crash is skipped."""

import json

import pytest

from wenlan.parallel.checkpoint import COMPLETE, complete_tags, prune, resolve_resume


def make_tag(root, step, complete=True):
    tag = root / f"step{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"partial" if not complete else b"ok")
    if complete:
        (tag / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 3, "data_streams": 8}))
    return tag


def test_resume_auto_skips_a_save_cut_short(tmp_path):
    ckpts = tmp_path / "checkpoints"
    make_tag(ckpts, 2)
    make_tag(ckpts, 10)
    make_tag(ckpts, 12, complete=False)  # killed while writing: no complete.json
    (ckpts / "latest").write_text("step00000012")  # even if a stale pointer names it
    assert complete_tags(ckpts) == ["step00000002", "step00000010"]
    assert resolve_resume("auto", ckpts) == (ckpts, "step00000010")
    assert resolve_resume(str(ckpts), ckpts) == (ckpts, "step00000010")
    assert resolve_resume("none", ckpts) is None
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_resume(str(ckpts / "step00000012"), ckpts)
    assert resolve_resume("auto", tmp_path / "nothing-yet") is None
    with pytest.raises(ValueError, match="neither a checkpoints directory"):
        resolve_resume(str(tmp_path / "nothing-yet"), ckpts)


@pytest.mark.parametrize("keep, left", [(1, [10, 12, 14]), (2, [8, 10, 12, 14]), (5, [2, 6, 8, 10, 12, 14])])
def test_prune_keeps_the_saved_tag_and_the_newest_older_complete_ones(tmp_path, keep, left):
    """Step 10 was just saved; 12 (complete) and 14 (incomplete) are left from an attempt that got
    further, 4 is a save cut short. Older complete tags beyond ``keep - 1`` go, and so does 4."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 6, 8, 10, 12):
        make_tag(ckpts, step)
    for step in (4, 14):
        make_tag(ckpts, step, complete=False)
    prune(ckpts, 10, keep)
    assert sorted(int(p.name[4:]) for p in ckpts.iterdir()) == left
    assert resolve_resume("auto", ckpts) == (ckpts, "step00000012")
