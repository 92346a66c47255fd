"""The adaptation engine: pure PyTorch, no HTTP, no database, no Celery.

Importing this package does not import torch. The method catalogue, the architecture manifest and the
job spec it runs are the torch-free contract in `app/contract/`; everything that needs torch lives in
the sub-modules.
"""
