"""The HTML template of `flywheel report` (package data: ships with the wheel)."""
