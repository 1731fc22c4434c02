"""Built-in training configs (TOML): `default.toml` is what `fastsft train` runs with no arguments."""
