"""Tasks: each bundles data, encoder, head, loss and metrics behind `tasks.base.Task`."""
