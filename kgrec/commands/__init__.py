"""CLI command modules; each defines ``register(app: typer.Typer)``. Heavy imports go inside the commands."""
