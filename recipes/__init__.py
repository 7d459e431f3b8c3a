"""Bundled YAML recipes; `longlive ... --recipe NAME` finds them by name."""
