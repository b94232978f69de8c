"""Stage entry points: each takes a resolved config and explicit paths (see docs/architecture.md)."""
