"""Mindset: see which memories fire, what each row means, edit them, and watch the model change.

A memory student keeps its feed-forward knowledge as rows of a database, so the rows can be looked
at and changed one by one. This package is that look and that change, shared by the command line
(``memstore trace``, ``explain``, ``rows``, ``edit``) and the local web UI (``memstore mindset``):

* :mod:`~memstore_gpt2.mindset.session` -- a student opened for inspection (checked first: its
  database and collections must exist), its memory layers named by collection;
* :mod:`~memstore_gpt2.mindset.trace` -- which rows each token's forward pass read, with their
  weights: the forward's own record (``MemoryLayer.record_reads``), never a re-computation;
* :mod:`~memstore_gpt2.mindset.vocab` -- what a row's value promotes and suppresses in the
  vocabulary (Geva et al. 2022; LM-Debugger);
* :mod:`~memstore_gpt2.mindset.rows` -- rows with their LRFU facts, sorted and searched, and
  :mod:`~memstore_gpt2.mindset.explain` the contexts of a text that fire a row most;
* :mod:`~memstore_gpt2.mindset.edit` -- delete, zero or scale rows in one transaction, with a
  dry run and greedy generation before and after;
* :mod:`~memstore_gpt2.mindset.web` -- the local web UI (Flask, ``127.0.0.1`` only).

Importing this package imports neither torch nor transformers; each module imports what it needs.
See docs/mindset.md for a worked example.
"""
