"""The `milora run` and `milora deploy` commands (plugged into the `milora` CLI by entry points)."""
