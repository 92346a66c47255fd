"""Service logic between the thin routes and the repositories."""
