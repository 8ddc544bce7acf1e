"""`medblindtuner serve`: the cloud service's own command (`service.command`)."""

from __future__ import annotations

from medblindtuner.service.command import app

__all__ = ["app"]
