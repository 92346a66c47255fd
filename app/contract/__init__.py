"""The contract, torch-free: the REST models, the job spec the API validates and the worker re-validates,
job statuses, task names, the method catalogue and the architecture manifest (docs/ARCHITECTURE.md §1).
Imports nothing from `worker`."""
