"""The entry point: the `pagedserve` CLI, the supervisor of `serve` and its children.

Above every role: it may import any package; no role imports it."""
