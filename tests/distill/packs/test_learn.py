"""memstore learn's guarantees: only the pack changes, detaching gives the student back bit for bit,
one seed gives one pack, a killed run resumes to the same pack, bad packs are refused in one line."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memstore_gpt2.errors import PackError
from memstore_gpt2.packs.learn import LearnOptions, learn_pack
from memstore_gpt2.packs.storage import read_pack
from memstore_gpt2.student import load_student

sys.path.insert(0, str(Path(__file__).parent))
from pack_helpers import TINY, copy_student, logits  # noqa: E402


def student_rows(student: Path) -> dict[str, bytes]:
    """Every row of the student's own collections (ids, keys, values), as bytes."""
    from memstore import Store

    with Store(f"sqlite:///{student / 'memory.db'}", create=False) as store:
        out = {}
        for collection in store.list_collections():
            if collection.name.startswith("pack."):
                continue
            rows = collection.export_rows()
            fields = (rows.ids, rows.keys, rows.values, rows.crf, rows.hits, rows.last_tick)
            out[collection.name] = b"".join(f.tobytes() for f in fields)
        return out


def files(student: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in student.iterdir()
        if p.is_file() and not p.name.startswith("memory.db")
    }


def pack_state(student: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(dense parts, rows per collection) of a stored pack."""
    from memstore import Store

    with Store(f"sqlite:///{student / 'memory.db'}", create=False) as store:
        record = read_pack(store, name)
        rows = {c: store.collection(c).export_rows().values for c in record.collections}
        return {k: v.clone() for k, v in record.parts.items()}, rows


def test_learn_changes_only_the_pack_and_detach_is_bit_identical(student, domain_text):
    before = logits(student)
    own_rows, own_files = student_rows(student), files(student)
    # "half" is also an nn.Module method: a pack name is data, never an attribute
    summary = learn_pack(student, [domain_text], "half", TINY)
    assert summary["steps"] == TINY.steps and summary["trainable_parameters"] > 0
    assert student_rows(student) == own_rows  # the student's rows: not one byte changed
    assert files(student) == own_files  # nor its files (dense.pt, manifest, tokenizer)
    attached = logits(student, ("half",))
    assert not torch.equal(attached, before)  # the pack does something
    assert torch.equal(logits(student), before)  # and the bare student is bit for bit the same


def test_one_seed_one_pack(tmp_path, student, domain_text):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(student, twin)
    learn_pack(student, [domain_text], "python", TINY)
    learn_pack(twin, [domain_text], "python", TINY)
    parts_a, rows_a = pack_state(student, "python")
    parts_b, rows_b = pack_state(twin, "python")
    assert parts_a.keys() == parts_b.keys()
    assert all(torch.equal(parts_a[k], parts_b[k]) for k in parts_a)
    assert {c: r.tobytes() for c, r in rows_a.items()} == {
        c: r.tobytes() for c, r in rows_b.items()
    }


class Killed(Exception):
    """Stands for a kill: raised mid-run, after a checkpoint and one more step."""


def test_an_interrupted_learn_resumes_to_the_same_pack(tmp_path, student, domain_text):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(student, twin)
    learn_pack(student, [domain_text], "python", TINY)

    def kill_at_step_5(step, steps, loss):
        if step == 5:  # step 4 was checkpointed; step 5 is lost with the process
            raise Killed

    with pytest.raises(Killed):
        learn_pack(twin, [domain_text], "python", TINY, progress=kill_at_step_5)
    with pytest.raises(PackError, match="has not finished learning"):
        load_student(twin, packs=("python",))
    with pytest.raises(PackError, match="is unfinished"):
        learn_pack(twin, [domain_text], "python", TINY)  # without --resume: refused
    summary = learn_pack(twin, [domain_text], "python", TINY, resume=True)
    assert summary["steps_this_run"] == 2
    parts_a, rows_a = pack_state(student, "python")
    parts_b, rows_b = pack_state(twin, "python")
    assert all(torch.equal(parts_a[k], parts_b[k]) for k in parts_a)
    assert {c: r.tobytes() for c, r in rows_a.items()} == {
        c: r.tobytes() for c, r in rows_b.items()
    }
    assert torch.equal(logits(student, ("python",)), logits(twin, ("python",)))


def test_resume_with_other_options_is_refused(student, domain_text):
    with pytest.raises(Killed):
        learn_pack(student, [domain_text], "python", TINY, progress=_kill_at(3))
    other = LearnOptions(**{**TINY.__dict__, "rows": 256})
    with pytest.raises(PackError, match="other rows"):
        learn_pack(student, [domain_text], "python", other, resume=True)


def _kill_at(at: int):
    def progress(step, steps, loss):
        if step == at:
            raise Killed

    return progress


def test_unknown_pack_is_one_line(student):
    with pytest.raises(PackError, match="no pack named 'nope'") as info:
        load_student(student, packs=("nope",))
    assert "\n" not in str(info.value)


def test_existing_pack_is_not_overwritten(student, domain_text):
    learn_pack(student, [domain_text], "python", TINY)
    with pytest.raises(PackError, match="already exists"):
        learn_pack(student, [domain_text], "python", TINY)


def test_kept_background_states_mix_as_the_attached_forward(student, domain_text):
    """``learn`` keeps the frozen student's states on its background text and mixes the pack in
    from them; that is the attached model's forward on the same ids."""
    from memstore_gpt2.packs.attach import attach, attached_packs, record_student_states

    learn_pack(student, [domain_text], "p", TINY)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12], [8, 8, 1, 2, 3, 4, 5, 6]])
    with_pack = load_student(student, packs=("p",))
    bare = load_student(student)
    try:
        pack = attached_packs(with_pack.model)["p"]
        with torch.no_grad():
            expected = with_pack.model(input_ids=ids).logits
        inputs, residual, _ = record_student_states(bare.model, ids, pack.layers)
        attachment = attach(bare.model, [pack])
        with torch.no_grad():
            mixed = attachment.mix_states(inputs, residual, ids)
        assert torch.allclose(mixed, expected, atol=1e-5, rtol=0)
        with pytest.raises(PackError, match="no packs attached"):
            record_student_states(bare.model, ids, pack.layers)
    finally:
        with_pack.close()
        bare.close()


def test_kept_background_states_learn_the_pack_a_forward_per_step_learns(
    tmp_path, monkeypatch, student, domain_text
):
    from memstore_gpt2.packs import learn as learn_module

    other = copy_student(student, tmp_path / "other")
    learn_pack(student, [domain_text], "p", TINY)
    monkeypatch.setattr(learn_module, "BACKGROUND_STATES_BYTES", 0)  # a forward every step
    learn_pack(other, [domain_text], "p", TINY)
    (kept, kept_rows), (ran, ran_rows) = pack_state(student, "p"), pack_state(other, "p")
    assert kept.keys() == ran.keys()
    for key in kept:
        assert torch.allclose(kept[key].float(), ran[key].float(), atol=1e-4), key
    for key in kept_rows:
        assert np.allclose(kept_rows[key], ran_rows[key], atol=1e-4), key


def test_the_vocabulary_delta_gradient_is_the_same_every_time():
    """Its rows' gradient sums each token's repeats in one order whatever the threads do (the
    backward of ``delta_in[slots]`` did not, so a seeded learn differed between runs)."""
    from memstore_gpt2.packs.modules import VocabularyDelta

    generator = torch.Generator().manual_seed(0)
    delta = VocabularyDelta(2048, 128, torch.arange(0, 2048, 2))
    ids = torch.randint(0, 2048, (16, 64), generator=generator)
    grad_out = torch.randn(16, 64, 128, generator=generator)

    def gradient() -> torch.Tensor:
        (grad,) = torch.autograd.grad(delta.embed(ids), delta.delta_in, grad_out)
        return grad

    first = gradient()
    assert all(torch.equal(first, gradient()) for _ in range(20))


def test_background_sampled_with_the_cache_draws_as_the_loop_without_it(base_student_dir,
                                                                        monkeypatch):  # fmt: skip
    """The student's own background text: decoded with the KV cache, the same tokens as
    re-running the blocks at every position (one batch: the same draws in the same order); in
    several batches, the same blocks for the same seed."""
    from memstore_gpt2.packs import learn

    loaded = load_student(base_student_dir)
    try:
        model, tokenizer = loaded.model, loaded.tokenizer
        start = tokenizer.eos_token_id
        sampled = learn.sample_background(model, tokenizer, 6, 12, seed=3)
        reference = learn._sample_without_cache(model, start, 6, 12,
                                                torch.Generator().manual_seed(3))  # fmt: skip
        assert sampled.shape == (6, 12) and (sampled[:, 0] == start).all()
        np.testing.assert_array_equal(sampled, reference)
        monkeypatch.setattr(learn, "SAMPLE_BATCH", 4)  # batches of 4 and 2
        chunked = learn.sample_background(model, tokenizer, 6, 12, seed=3)
        assert chunked.shape == (6, 12)
        np.testing.assert_array_equal(chunked, learn.sample_background(model, tokenizer, 6, 12, 3))
        assert not np.array_equal(chunked, learn.sample_background(model, tokenizer, 6, 12, 4))
    finally:
        loaded.close()
