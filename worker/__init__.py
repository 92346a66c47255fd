"""adaptd worker side: the Celery app and tasks (worker/) and the pure-PyTorch engine (worker/adaptation)."""
