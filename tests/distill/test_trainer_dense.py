"""The trainer on dense students: loss goes down, and a resumed run replays the uninterrupted one."""

from __future__ import annotations

import torch

from memstore_gpt2.lm_training import batch_for_step, lm_logits
from memstore_gpt2.surgery import clone_with_mlps, reinit_mlps
from memstore_gpt2.trainer import CHECKPOINT_FILE, DistillConfig, Distiller, kd_loss


def _kl_on(student, teacher, ids):
    with torch.no_grad():
        return float(kd_loss(lm_logits(student, ids), lm_logits(teacher, ids), ids, 0.5, 2.0)[1])


def test_distillation_lowers_the_kd_loss_of_a_random_student(teacher, blocks):
    from transformers import GPT2LMHeadModel

    model, _ = teacher
    train, held = blocks
    student = GPT2LMHeadModel(model.config)  # random init: far from the teacher
    probe = torch.from_numpy(held[:8])
    before = _kl_on(student.eval(), model, probe)
    config = DistillConfig(steps=15, batch_size=8, lr=3e-3, warmup=2, eval_blocks=8)
    summary = Distiller(student, model, train, held, config, tensorboard=False).run()
    after = _kl_on(student.eval(), model, probe)
    assert after < 0.7 * before
    assert summary["steps"] == 15 and summary["student_ppl"] < summary["student_init_ppl"]


def test_resume_continues_the_same_run(teacher, blocks, tmp_path):
    model, _ = teacher
    train, held = blocks
    config = DistillConfig(steps=6, batch_size=4, lr=2e-3, warmup=2, eval_blocks=4,
                           checkpoint_every=0)  # fmt: skip

    def fresh_student():
        return clone_with_mlps(model, [0, 1], reinit_mlps(7))

    straight = Distiller(fresh_student(), model, train, held, config, tmp_path / "a")
    straight.run()
    expected = [h["train_loss"] for h in straight.state.history]

    first = Distiller(fresh_student(), model, train, held, config, tmp_path / "b")
    first.run(stop_at=3)
    assert (tmp_path / "b" / CHECKPOINT_FILE).is_file()
    resumed = Distiller(fresh_student(), model, train, held, config, tmp_path / "b")
    resumed.load_checkpoint()
    assert resumed.state.step == 3
    resumed.run()
    got = [h["train_loss"] for h in resumed.state.history]
    assert len(got) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(straight.student.state_dict().items(),
                            resumed.student.state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_tensorboard_logs_train_loss(teacher, blocks, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _ = teacher
    train, held = blocks
    config = DistillConfig(steps=2, batch_size=2, eval_blocks=2)
    Distiller(clone_with_mlps(model, [0], reinit_mlps(0)), model, train, held, config,
              tmp_path).run()  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train_loss" in tags and "eval/teacher_ppl" in tags
    assert len(events.Scalars("train_loss")) == 2


def test_batches_do_not_depend_on_the_model(blocks):
    train, _ = blocks
    assert torch.equal(batch_for_step(train, 5, 4, 0), batch_for_step(train, 5, 4, 0))


def test_periodic_evaluation_records_student_perplexity(teacher, blocks):
    model, _ = teacher
    train, held = blocks
    config = DistillConfig(steps=4, batch_size=2, eval_every=2, eval_blocks=2)
    distiller = Distiller(clone_with_mlps(model, [0], reinit_mlps(0)), model, train, held, config,
                          tensorboard=False)  # fmt: skip
    summary = distiller.run()
    assert [e["step"] for e in distiller.state.evals] == [2, 4]
    assert summary["student_ppl"] == distiller.state.evals[-1]["student_ppl"]
    assert summary["teacher_ppl"] > 1 and summary["student_init_ppl"] > 1
