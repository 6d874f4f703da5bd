"""Animation: how much the expression code changes a render (sensitivity), and what drives it."""
