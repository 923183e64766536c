"""``memstore serve``: an OpenAI-compatible HTTP server for a student and its memory.

:mod:`.decoding` runs a student with a KV cache (only each new token reads memory rows),
:mod:`.scheduler` batches every active request into one decoding step (continuous batching),
:mod:`.app` speaks the OpenAI API over HTTP and :mod:`.commands` is the CLI command. Importing the
package imports neither torch nor flask: the CLI registers the command at every start.
"""
