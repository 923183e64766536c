"""Surgery replaces exactly the chosen MLPs and leaves every other weight bit-identical."""

from __future__ import annotations

import pytest
import torch

from memstore.errors import InvalidInputError
from memstore_gpt2.surgery import (
    ZeroMlp,
    clone_with_mlps,
    gpt2_blocks,
    keep_mlps,
    non_mlp_state,
    parse_layers,
    reinit_mlps,
    remove_mlps,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [0, 1, 2, 3]), (None, [0, 1, 2, 3]), ("0,2", [0, 2]), ("1-3", [1, 2, 3]),
     ("-1", [3]), ("2,2,0", [0, 2]), ([3, 1], [1, 3])],
)  # fmt: skip
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["4", "0,x", "3-1", "-5", "1;2", ","])
def test_bad_layer_lists_are_rejected_with_the_flag_named(spec):
    with pytest.raises(InvalidInputError, match="layers"):
        parse_layers(spec, 4)


def test_non_mlp_weights_identical_and_teacher_untouched(teacher):
    model, _ = teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = clone_with_mlps(model, [1], remove_mlps)
    assert isinstance(gpt2_blocks(student)[1].mlp, ZeroMlp)
    assert not isinstance(gpt2_blocks(student)[0].mlp, ZeroMlp)
    teacher_rest, student_rest = non_mlp_state(model), non_mlp_state(student)
    assert teacher_rest.keys() == student_rest.keys() and len(teacher_rest) > 10
    for name, tensor in teacher_rest.items():
        assert torch.equal(tensor, student_rest[name]), name
        assert tensor.data_ptr() != student_rest[name].data_ptr(), "clone must not share storage"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert not any(".h.1.mlp." in k for k in student.state_dict())


def test_dense_control_reproduces_teacher_and_reinit_does_not(teacher):
    model, _ = teacher
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        same = clone_with_mlps(model, [0, 1], keep_mlps).eval()(input_ids=ids).logits
        fresh = clone_with_mlps(model, [0, 1], reinit_mlps(0)).eval()(input_ids=ids).logits
    torch.testing.assert_close(same, reference)
    assert not torch.allclose(fresh, reference, atol=1e-3)


def test_factory_must_return_a_module(teacher):
    model, _ = teacher
    with pytest.raises(TypeError, match="not a Module"):
        clone_with_mlps(model, [0], lambda i, mlp: "nope")
