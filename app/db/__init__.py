"""Database layer: models, engine/session, repositories. SQL lives here and nowhere else."""
