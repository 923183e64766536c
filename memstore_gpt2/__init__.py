"""memstore_gpt2: the GPT-2 application of memstore's memory layers.

Teacher training, surgery (an MLP swapped for a memory layer), knowledge distillation, student
directories, generation and the ``memstore`` command line. It sits on top of :mod:`memstore_torch`
(the layer library) and :mod:`memstore` (the store) and nothing below imports it. Importing the
package imports neither torch nor transformers; each module imports what it needs.
"""
