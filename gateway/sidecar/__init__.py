"""The embedded, Dapr-compatible sidecar: workflow and state APIs on SQLite."""
