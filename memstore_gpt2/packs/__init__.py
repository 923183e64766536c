"""Knowledge packs: what a student learns after distillation, kept in its database, attached,
swapped and composed at load (docs/design.md, Knowledge packs; ``memstore learn``, ``--pack``,
``memstore packs``)."""
