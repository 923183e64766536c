"""Changing what the memory knows: delete, zero or scale rows, in one transaction.

* **delete** removes rows from the collection: the layer's top-k then picks other rows instead.
  Product-key rows (a grown student's ``layer<i>.extra``) cannot be deleted: row ``r`` is the key
  ``[r // n_keys, r % n_keys]`` of the layer's sub-keys for ever, so the table has no holes; they
  are zeroed or scaled like any row.
* **zero** sets rows' values to 0: they are still selected (and take a place in the top-k) but
  add nothing -- what LM-Debugger's "switch off" does to an MLP sub-update.
* **scale** multiplies rows' values by a factor (``--scale 102 2`` doubles row 102's push).

An edit checks every id first and writes in one transaction (``Store.transaction()``: the check
and the write cannot be separated by another writer), so it happens whole or not at all. It takes
effect when the student is next loaded, and in every running ``memstore serve`` over the same
memory before its next request (the transaction records the change:
:mod:`memstore_gpt2.memory_changes`). A **dry run** applies the same edit to a loaded copy only,
exactly as the next load would see it (the edited rows are loaded in place of the stored ones),
and writes nothing. An edit refuses to run while a training run holds the database
(:mod:`memstore_gpt2.db_lock`): the run's next checkpoint would silently undo it.

:func:`switched_off` is the in-memory, always-undone variant the web UI uses to compare
generations with some rows off.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from memstore.errors import bad_parameter
from memstore_gpt2.mindset.session import parse_ids

ACTIONS = ("delete", "zero", "scale")


@dataclass(frozen=True)
class Edit:
    """One edit of one layer: ``action`` on rows ``ids`` (``factor`` for scale)."""

    layer: str
    action: str
    ids: tuple[int, ...]
    factor: float | None = None

    @property
    def multiplier(self) -> float:
        return 0.0 if self.action == "zero" else float(self.factor)

    def describe(self) -> str:
        rows = ", ".join(map(str, self.ids))
        if self.action == "scale":
            return f"scale the values of {self.layer} row(s) {rows} by {self.factor:g}"
        verb = "delete" if self.action == "delete" else "zero the values of"
        return f"{verb} {self.layer} row(s) {rows}"


def make_edit(mindset, layer: str, action: str, ids, factor: float | None = None) -> Edit:
    """Validate an edit against the student: the layer, the ids (all must exist) and the factor."""
    if action not in ACTIONS:
        raise bad_parameter("action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    entry = mindset.layer(layer)
    id_list = parse_ids(ids)
    if action == "scale":
        if factor is None or isinstance(factor, bool):
            raise bad_parameter("factor", "is needed to scale rows")
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            raise bad_parameter("factor", f"must be a number, got {factor!r}") from None
        if not math.isfinite(factor):
            raise bad_parameter("factor", f"must be finite, got {factor}")
    elif factor is not None:
        raise bad_parameter("factor", f"applies to scale only, not to {action}")
    rows = entry.collection.get(np.asarray(id_list, np.int64))  # RowNotFoundError: missing ids
    if action == "scale":
        scaled_values(entry.name, rows, factor)  # refuses a factor that overflows float32
    if action == "delete" and entry.product_keys:
        n = entry.layer.config.n_keys
        shown = ",".join(map(str, id_list[:10])) + (",..." if len(id_list) > 10 else "")
        raise bad_parameter(
            "ids",
            f"{shown}: {entry.name} holds product-key rows, which cannot be deleted: each row's "
            f"address is fixed (id r + 1 is the key [r // {n}, r % {n}] of the layer's "
            "sub-keys); zero them instead",
        )
    if action == "delete" and len(id_list) >= len(entry.collection):
        raise bad_parameter(
            "ids",
            f"would delete every row of {entry.name}; a memory layer needs at least one row "
            "(zero them instead)",
        )
    return Edit(entry.name, action, tuple(id_list), factor)


def scaled_values(layer: str, rows, multiplier: float) -> np.ndarray:
    """``rows.values * multiplier`` as float32, or :func:`bad_parameter` naming the rows whose
    values it would make infinite (a finite factor such as 1e38 overflows float32): a memory with
    an infinite value makes every forward that reads it NaN, so such an edit is refused whole,
    before anything is written or previewed. Zeroing gives zeros whatever the values held
    (``0 * inf`` would be NaN: zeroing is how a damaged row is switched off)."""
    if multiplier == 0:
        return np.zeros_like(rows.values)
    with np.errstate(over="ignore", invalid="ignore"):
        values = rows.values * np.float32(multiplier)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        ids = rows.ids[bad].tolist()
        shown = ",".join(map(str, ids[:10])) + (",..." if len(ids) > 10 else "")
        largest = float(np.abs(rows.values[bad]).max())
        raise bad_parameter(
            "factor",
            f"{multiplier:g} would make the values of {layer} row(s) {shown} non-finite "
            f"(|value| up to {largest:g} times {multiplier:g} overflows float32); nothing was "
            "changed",
        )
    return values


def edited_rows(block, edit: Edit):
    """The rows of ``block`` (a RowBlock) as they are after ``edit``."""
    mask = np.isin(block.ids, np.asarray(edit.ids, np.int64))
    if edit.action == "delete":
        return block.take(~mask)
    values = block.values.copy()
    values[mask] = scaled_values(edit.layer, block.take(mask), edit.multiplier)
    return type(block)(
        block.ids, block.keys, values, block.crf, block.last_tick, block.hits, block.created_tick
    )


def preview(mindset, edit: Edit) -> None:
    """Apply ``edit`` to the loaded student only, as the next load would see it; nothing is
    written (the store is not touched). Product-key rows are changed in place (only the edited
    rows are read: the table may hold millions); other layers load the whole edited table."""
    entry = mindset.layer(edit.layer)
    coll = entry.collection
    if entry.product_keys:  # zero or scale: a delete was refused by make_edit
        ids = np.asarray(edit.ids, np.int64)
        values = torch.from_numpy(scaled_values(edit.layer, coll.get(ids), edit.multiplier))
        index = entry.layer.index
        with torch.no_grad():
            index.value_storage[index.slots_of(ids)] = values.to(index.value_storage)
        return
    stats = coll.stats()
    block = edited_rows(coll.export_rows(), edit)
    entry.layer.index.load_block(block, clock=int(stats["clock"]), next_id=stats.get("next_id"))


@contextmanager
def previewed(mindset, edit: Edit) -> Iterator[None]:
    """Within the block the loaded student is as :func:`preview` leaves it; on exit it is as the
    database holds it again (the edited rows restored from the collection for product-key rows,
    the whole table reloaded otherwise)."""
    entry = mindset.layer(edit.layer)
    try:
        preview(mindset, edit)
        yield
    finally:
        if entry.product_keys:
            ids = np.asarray(edit.ids, np.int64)
            index = entry.layer.index
            stored = torch.from_numpy(entry.collection.get(ids).values)
            with torch.no_grad():
                index.value_storage[index.slots_of(ids)] = stored.to(index.value_storage)
        else:
            entry.layer.index.load_collection(entry.collection)


def write(mindset, edit: Edit) -> int:
    """Write ``edit`` to the database in one transaction; returns the number of rows changed.

    The same transaction records the change (:func:`memstore_gpt2.memory_changes.record_change`),
    so every running ``memstore serve`` over this memory re-reads exactly these rows."""
    from memstore_gpt2.memory_changes import record_change

    coll = mindset.layer(edit.layer).collection
    ids = np.asarray(edit.ids, np.int64)
    with mindset.store.transaction() as conn:
        rows = coll.get(ids)  # inside the transaction: the rows cannot vanish before the write
        if edit.action == "delete":
            changed = coll.delete(ids)
        else:
            # checked again here: the rows may have changed since make_edit read them
            coll.update(ids, values=scaled_values(edit.layer, rows, edit.multiplier))
            changed = len(ids)
        record_change(conn, coll.name, ids)
        return changed


@contextmanager
def switched_off(mindset, off: dict[str, list[int]]) -> Iterator[None]:
    """Within the block the given rows (``{layer: ids}``) add nothing (their values are zeroed in
    the loaded copy); their values are restored on exit, and nothing is ever written."""
    saved = []
    try:
        with torch.no_grad():
            for layer, ids in off.items():
                index = mindset.layer(layer).layer.index
                slots = index.slots_of(parse_ids(ids))
                saved.append((index, slots, index.value_storage[slots].clone()))
                index.value_storage[slots] = 0.0
        yield
    finally:
        with torch.no_grad():
            for index, slots, values in reversed(saved):
                index.value_storage[slots] = values


def run_edit(
    student_dir: str,
    layer: str,
    action: str,
    ids,
    factor: float | None = None,
    *,
    prompt: str | None = None,
    dry_run: bool = False,
    db: str | None = None,
    max_new_tokens: int = 30,
    packs: Sequence[str] = (),
) -> dict:
    """The ``memstore edit`` command: validate, (dry-)apply, and generate before and after.
    ``packs``: knowledge packs attached (their layers ``pack.<name>.layer<i>`` can be edited, and
    the text before and after is generated with them acting)."""
    from memstore_gpt2.db_lock import hold_database
    from memstore_gpt2.mindset.session import Mindset, check_student

    db_url = check_student(student_dir, db)
    writer = None if dry_run else hold_database(db_url, student_dir, "edit")
    try:
        mindset = Mindset.open(student_dir, db_url, packs)
        try:
            if prompt is not None:
                mindset.encode(prompt)  # an empty prompt fails before anything is written
            edit = make_edit(mindset, layer, action, ids, factor)
            rows_before = len(mindset.layer(edit.layer).collection)
            before = mindset.greedy(prompt, max_new_tokens) if prompt is not None else None
            if dry_run:
                preview(mindset, edit)
                changed = len(edit.ids)
                rows_after = rows_before - changed if edit.action == "delete" else rows_before
            else:
                changed = write(mindset, edit)
                rows_after = len(mindset.layer(edit.layer).collection)
                # The edit takes effect on the next load: load again, and generate from that.
                mindset.close()
                mindset = Mindset.open(student_dir, db_url, packs)
            after = mindset.greedy(prompt, max_new_tokens) if prompt is not None else None
        finally:
            mindset.close()
    finally:
        if writer is not None:
            writer.release()
    return {
        "layer": edit.layer,
        "action": edit.action,
        "ids": list(edit.ids),
        "factor": edit.factor,
        "dry_run": dry_run,
        "rows_changed": changed,
        "rows_before": rows_before,
        "rows_after": rows_after,
        "description": edit.describe(),
        "prompt": prompt,
        "before": before,
        "after": after,
        "text_changed": None if prompt is None else before != after,
    }
