"""Memory students end to end: surgery with real memory layers, KD, resume, save -> reload."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from memstore import Store
from memstore_gpt2.cli import main
from memstore_gpt2.lm_training import batch_for_step, lm_logits
from memstore_gpt2.student import (
    build_student_skeleton,
    load_student,
    memory_factory,
    memory_slots,
    read_manifest,
    save_student,
)
from memstore_gpt2.surgery import capture_mlp_inputs, clone_with_mlps, gpt2_blocks, non_mlp_state
from memstore_gpt2.trainer import DistillConfig, Distiller, kd_loss
from memstore_torch.model_memory import split_parameters


def featural_student(model, train, store, k=16, init="mlp", layers=(0, 1)):
    calibration = None
    if init == "mlp":
        batches = [batch_for_step(train, s, 8, seed=9) for s in range(2)]
        calibration = capture_mlp_inputs(model, list(layers), batches)
    factory = memory_factory("featural", store, k=k, init=init, calibration=calibration)
    return clone_with_mlps(model, list(layers), factory)


@pytest.fixture
def store(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'mem.db'}") as s:
        yield s


def test_surgery_with_memory_layers_keeps_other_weights(teacher, blocks, store):
    model, _ = teacher
    student = featural_student(model, blocks[0], store, layers=(1,))
    assert list(memory_slots(student)) == [1]
    for name, tensor in non_mlp_state(model).items():
        assert torch.equal(tensor, non_mlp_state(student)[name]), name
    assert len(store.collection("layer1")) == model.config.n_inner
    dense, memory, sparse = split_parameters(student)
    assert memory and not sparse and all(p.requires_grad for p in dense + memory)


def test_full_k_featural_student_reproduces_the_teacher(teacher, blocks, store):
    model, _ = teacher
    student = featural_student(model, blocks[0], store, k=model.config.n_inner).eval()
    ids = torch.from_numpy(blocks[1][:2])
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(student, ids), lm_logits(model, ids),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_few_steps_lower_the_kd_loss_of_a_random_memory_student(teacher, blocks, store):
    model, _ = teacher
    train, held = blocks
    student = featural_student(model, train, store, k=8, init="random")
    probe = torch.from_numpy(held[:8])

    def kd():
        with torch.no_grad():
            s, t = lm_logits(student.eval(), probe), lm_logits(model, probe)
            return float(kd_loss(s, t, probe, 0.5, 2.0)[1])  # the KL term

    before = kd()
    print("KL", before)
    config = DistillConfig(steps=12, batch_size=8, lr=3e-3, warmup=2, eval_blocks=4, alpha=1.0)
    Distiller(student, model, train, held, config, tensorboard=False).run()
    print("KL", kd())
    assert kd() < 0.95 * before


def test_memory_student_resume_replays_the_uninterrupted_run(teacher, blocks, tmp_path):
    model, tokenizer = teacher
    train, held = blocks
    config = DistillConfig(steps=6, batch_size=4, lr=2e-3, warmup=2, eval_blocks=4,
                           checkpoint_every=0)  # fmt: skip
    runs = {}
    for name in ("straight", "interrupted"):
        out = tmp_path / name
        url = f"sqlite:///{out / 'memory.db'}"
        out.mkdir()
        store = Store(url)
        student = featural_student(model, train, store)
        save_student(student, tokenizer, out, url)
        distiller = Distiller(student, model, train, held, config, out)
        distiller.run(stop_at=None if name == "straight" else 3)
        runs[name] = distiller
        store.close()

    out = tmp_path / "interrupted"
    manifest = read_manifest(out)
    with Store(manifest["db"]) as store:
        resumed = Distiller(build_student_skeleton(out, manifest, store), model, train, held,
                            config, out)  # fmt: skip
        resumed.load_checkpoint()
        assert resumed.state.step == 3
        resumed.run()
        got = [h["train_loss"] for h in resumed.state.history]
        want = [h["train_loss"] for h in runs["straight"].state.history]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
        a = memory_slots(runs["straight"].student)[0]
        b = memory_slots(resumed.student)[0]
        torch.testing.assert_close(a.index.keys, b.index.keys, rtol=1e-5, atol=1e-6)


def test_saved_student_reloads_with_the_same_logits(teacher, blocks, tmp_path):
    model, tokenizer = teacher
    train, held = blocks
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    student = featural_student(model, train, store, k=8)
    Distiller(student, model, train, held, DistillConfig(steps=3, batch_size=4, eval_blocks=2),
              tmp_path / "s").run()  # fmt: skip
    save_student(student, tokenizer, tmp_path / "s", url)
    ids = torch.from_numpy(held[:3])
    with torch.no_grad():
        expected = lm_logits(student.eval(), ids)
    store.close()
    loaded = load_student(tmp_path / "s")
    try:
        with torch.no_grad():
            torch.testing.assert_close(lm_logits(loaded.model, ids), expected)
        assert type(gpt2_blocks(loaded.model)[0].mlp).__name__ == "FeaturalMemory"
    finally:
        loaded.close()


@pytest.mark.slow
def test_cli_distill_json_resume_and_generate(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "student"
    base = ["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
            "--out", str(out), "--k", "16", "--batch-size", "4", "--eval-blocks", "4"]  # fmt: skip
    first = CliRunner().invoke(main, [*base, "--steps", "2", "--json"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output.strip().splitlines()[-1])
    assert {"teacher_ppl", "student_ppl", "steps", "db"} <= summary.keys()
    assert summary["steps"] == 2 and summary["db"].startswith("sqlite:///")
    assert summary["memory_rows"] == {"0": 128, "1": 128}

    again = CliRunner().invoke(main, [*base, "--steps", "2"])
    assert again.exit_code != 0 and "--resume" in again.output

    resumed = CliRunner().invoke(main, [*base, "--steps", "4", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output.strip().splitlines()[-1])["steps"] == 4

    sampled = CliRunner().invoke(main, ["generate", str(out), "--prompt", "The", "--seed", "0",
                                        "--max-new-tokens", "4"])  # fmt: skip
    assert sampled.exit_code == 0 and sampled.output.startswith("The")


def test_associative_student_trains_and_grows_its_memory(teacher, blocks, store):
    model, _ = teacher
    train, held = blocks
    factory = memory_factory("associative", store, k=4, init="random", heads=2, capacity=512)
    student = clone_with_mlps(model, [0], factory)
    Distiller(student, model, train, held, DistillConfig(steps=3, batch_size=2, eval_blocks=2),
              tensorboard=False).run()  # fmt: skip
    for layer in memory_slots(student).values():
        layer.flush()
    assert len(store.collection("layer0")) > 0
