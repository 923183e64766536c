"""Extra memory rows (``--memory-rows``): a product-key memory beside each memory layer.

The grown student starts exactly as the student without extra rows, trains its extra values with
row-wise Adagrad (sparse gradients), saves and reloads as GrownMemory slots; plus the model
commands' ``--device`` / ``--precision`` options (CPU only here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from memstore import Store
from memstore.errors import InvalidInputError
from memstore_gpt2.cli import main
from memstore_gpt2.generate import sample_tokens
from memstore_gpt2.lm_training import batch_for_step, lm_logits, resolve_device
from memstore_gpt2.student import (
    MemoryRows,
    extra_rows_shape,
    layer_manifest,
    load_student,
    memory_factory,
    memory_slots,
)
from memstore_gpt2.surgery import capture_mlp_inputs, clone_with_mlps, gpt2_blocks
from memstore_gpt2.trainer import DistillConfig, Distiller, sparse_row_parameters
from memstore_torch import GrownMemory, ProductKeyMemory
from memstore_torch.optim import RowwiseAdagrad


def student(model, train, store, memory_rows: int, **extra):
    batches = [batch_for_step(train, s, 8, seed=9) for s in range(2)]
    calibration = capture_mlp_inputs(model, [0, 1], batches)
    factory = memory_factory("featural", store, k=16, init="mlp", calibration=calibration,
                             memory_rows=MemoryRows(memory_rows, **extra))  # fmt: skip
    torch.manual_seed(0)
    return clone_with_mlps(model, [0, 1], factory)


@pytest.fixture
def store(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'mem.db'}") as s:
        yield s


def test_extra_rows_round_up_to_a_square():
    assert [extra_rows_shape(n) for n in (0, 1, 4, 5, 64, 65, 4096)] == [0, 1, 2, 3, 8, 9, 64]


def test_grown_student_equals_the_student_without_extra_rows_at_step_0(teacher, blocks, tmp_path):
    model, _ = teacher
    with Store(f"sqlite:///{tmp_path / 'a.db'}") as plain_store:
        plain = student(model, blocks[0], plain_store, 0).eval()
        with Store(f"sqlite:///{tmp_path / 'b.db'}") as grown_store:
            grown = student(
                model, blocks[0], grown_store, 50, memory_rows_heads=2, memory_rows_k=4
            ).eval()
            assert all(isinstance(b.mlp, GrownMemory) for b in gpt2_blocks(grown))
            assert len(grown_store.collection("layer0.extra")) == 64  # 50 -> 8 ** 2
            ids = torch.from_numpy(blocks[1][:3])
            with torch.no_grad():
                assert torch.equal(lm_logits(grown, ids), lm_logits(plain, ids))


def test_extra_values_train_with_rowwise_adagrad_and_dense_ones_with_adamw(
    teacher, blocks, store, tmp_path
):
    model, _ = teacher
    grown = student(model, blocks[0], store, 64, memory_rows_heads=2, memory_rows_k=4)
    config = DistillConfig(steps=3, batch_size=4, eval_blocks=2, memory_rows_lr=0.05)
    distiller = Distiller(grown, model, blocks[0], blocks[1], config, tmp_path / "run",
                          tensorboard=False)  # fmt: skip
    values = sparse_row_parameters(grown)
    assert len(values) == 2 and all(v.shape == (64, 32) for v in values)
    assert isinstance(distiller.row_optimizer, RowwiseAdagrad)
    assert [id(p) for p in distiller.row_optimizer.param_groups[0]["params"]] == [
        id(v) for v in values
    ]
    adamw = {id(p) for g in distiller.optimizer.param_groups for p in g["params"]}
    assert not adamw & {id(v) for v in values}
    pk = [m for m in grown.modules() if isinstance(m, ProductKeyMemory)]
    assert all(id(m.sub_keys) in adamw for m in pk)  # the rest of the layer is dense
    distiller.run()
    assert all(bool(v.detach().abs().sum() > 0) for v in values)  # the extra rows learnt
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state = checkpoint["row_optimizer"]["state"]
    assert len(state) == 2 and all(s["sum"].shape == (64,) for s in state.values())
    # the values that trained are the values committed with the checkpoint
    rows = store.collection("layer0.extra").export_rows()
    order = np.argsort(rows.ids)
    assert np.array_equal(rows.values[order], pk[0].memory_values.detach().numpy())


@pytest.mark.slow
def test_cli_memory_rows_saves_reloads_and_generates(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "student"
    args = ["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
            "--out", str(out), "--k", "16", "--batch-size", "4", "--eval-blocks", "4",
            "--steps", "2", "--memory-rows", "60", "--memory-rows-heads", "2",
            "--memory-rows-k", "4", "--device", "cpu", "--json"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["memory_rows"] == {"0": 128 + 64, "1": 128 + 64}
    assert summary["memory_extra_rows"] == {"0": 64, "1": 64}
    assert summary["memory_rows_requested"] == 60 and summary["device"] == "cpu"
    manifest = json.loads((out / "memstore_student.json").read_text())
    entry = manifest["layers"]["0"]
    assert entry["class"] == "GrownMemory"
    assert [p["class"] for p in entry["parts"]] == ["FeaturalMemory", "ProductKeyMemory"]
    assert entry["parts"][1]["config"]["collection"] == "layer0.extra"

    loaded = load_student(out)
    try:
        assert layer_manifest(loaded.model) == manifest["layers"]
        assert isinstance(memory_slots(loaded.model)[0], GrownMemory)
        ids = sample_tokens(loaded.model, [1, 2, 3], max_new_tokens=3, seed=0, precision="bf16")
        assert len(ids) == 6
    finally:
        loaded.close()

    resumed = CliRunner().invoke(main, [*args[:-1], "--steps", "3", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    changed = CliRunner().invoke(main, [*args[:-1], "--memory-rows", "16", "--resume"])
    assert changed.exit_code == 1
    assert "--memory-rows" in changed.output.strip().splitlines()[-1]


def test_cold_trained_rows_are_reused_and_counted(teacher, blocks, store, tmp_path):
    model, _ = teacher
    grown = student(model, blocks[0], store, 64, memory_rows_heads=2, memory_rows_k=4)
    config = DistillConfig(steps=4, batch_size=4, eval_blocks=2, memory_rows_reuse_every=2,
                           memory_rows_reuse_fraction=0.5)  # fmt: skip
    distiller = Distiller(grown, model, blocks[0], blocks[1], config, tmp_path / "run",
                          tensorboard=False)  # fmt: skip
    distiller.run()
    reused = [h["memory_rows_reused"] for h in distiller.state.history if "memory_rows_reused" in h]
    assert len(reused) == 2 and sum(reused) > 0
    stats = [store.collection(f"layer{i}.extra").stats() for i in (0, 1)]
    assert sum(s["evictions"] for s in stats) == sum(reused)
    assert all(s["inserts"] == 64 + s["evictions"] for s in stats)
    # the rows reused last are blank: zero values, a restarted Adagrad accumulator
    layer = next(m for m in grown.modules() if isinstance(m, ProductKeyMemory))
    accumulator = distiller.row_optimizer.state[layer.memory_values]["sum"]
    blank = layer.memory_values.detach().abs().amax(dim=1) == 0
    assert bool((accumulator[blank] == 0).all())


def test_bf16_precision_trains_on_cpu(teacher, blocks, store, tmp_path):
    model, _ = teacher
    grown = student(model, blocks[0], store, 16, memory_rows_heads=1, memory_rows_k=4)
    config = DistillConfig(steps=2, batch_size=4, eval_blocks=2, precision="bf16")
    summary = Distiller(grown, model, blocks[0], blocks[1], config, tmp_path / "run",
                        tensorboard=False).run()  # fmt: skip
    assert np.isfinite(summary["student_ppl"]) and np.isfinite(summary["final_train_loss"])


def test_bad_precision_and_device_are_refused():
    with pytest.raises(ValueError, match="precision"):
        DistillConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["distill", "teacher", "generate"])
def test_cuda_without_cuda_is_a_one_line_error_naming_device(
    tmp_path, teacher_dir, corpus_dir, command
):
    args = {
        "distill": ["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
                    "--out", str(tmp_path / "s")],
        "teacher": ["teacher", "train", "--data", str(corpus_dir), "--out", str(tmp_path / "t")],
        "generate": ["generate", str(teacher_dir), "--prompt", "The"],
    }[command]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--device" in lines[0] and "CUDA" in lines[0], result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_a_run_recorded_before_the_new_options_still_resumes(tmp_path, teacher_dir, corpus_dir):
    """Checkpoints of runs started before --memory-rows/--precision existed lack those options;
    they meant the defaults, so such a run resumes (and a changed value is still refused)."""
    from memstore_gpt2.checkpoint import checkpoint_files
    from memstore_gpt2.distill import OPTION_DEFAULTS

    out = tmp_path / "student"
    args = ["distill", "gpt2", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
            "--out", str(out), "--k", "16", "--batch-size", "4", "--eval-blocks", "4"]  # fmt: skip
    first = CliRunner().invoke(main, [*args, "--steps", "2"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    for path in checkpoint_files(out):  # a finished run keeps checkpoint.pt alone
        payload = torch.load(path, weights_only=True)
        for option in OPTION_DEFAULTS:
            del payload["run"]["options"][option]
        torch.save(payload, path)
    changed = CliRunner().invoke(main, [*args, "--steps", "3", "--resume", "--precision", "bf16"])
    assert changed.exit_code == 1 and "--precision" in changed.output
    resumed = CliRunner().invoke(main, [*args, "--steps", "3", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output.strip().splitlines()[-1])["steps"] == 3


@pytest.mark.parametrize(
    ("option", "value", "history", "counter"),
    [
        # rows one step read together merge when their values are near (a generous threshold
        # here: any two trained rows)
        ("memory_rows_recombine", 10.0, "memory_rows_recombined", "recombinations"),
        # the step's weakest-matched queries claim the coldest row they read
        ("memory_rows_novel", 0.05, "memory_rows_novel", "novel_inserts"),
    ],
)
def test_upkeep_recombines_and_inserts_novel_rows_and_counts_them(
    teacher, blocks, store, tmp_path, option, value, history, counter
):
    """--memory-rows-recombine / --memory-rows-novel run at each upkeep step on the rows that
    step read; what they did is counted in the collections' stats (memstore inspect)."""
    model, _ = teacher
    grown = student(model, blocks[0], store, 64, memory_rows_heads=2, memory_rows_k=4)
    config = DistillConfig(steps=4, batch_size=4, eval_blocks=2, memory_rows_reuse_every=2,
                           memory_rows_reuse_fraction=0.01, **{option: value})  # fmt: skip
    distiller = Distiller(grown, model, blocks[0], blocks[1], config, tmp_path / "run",
                          tensorboard=False)  # fmt: skip
    distiller.run()
    done = [h[history] for h in distiller.state.history if history in h]
    assert len(done) == 2 and sum(done) > 0
    stats = [store.collection(f"layer{i}.extra").stats() for i in (0, 1)]
    assert sum(s[counter] for s in stats) == sum(done)
    with pytest.raises(InvalidInputError, match=option):
        DistillConfig(**{option: -1.0}).validate()
