"""Command-line interface (typer). Each role has its own module; `main` assembles them."""
