"""Torch-free checks of uploads at submit (the API process): checkpoints sniffed and their keys and
shapes compared with the architecture key manifest, npz headers read, optional libraries required.
Nothing here unpickles, imports torch or reads a whole upload."""


class CheckError(Exception):
    """An upload or a spec refused at submit: `code` is the error code the worker would have failed the
    job with later (422 at submit instead)."""

    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail or {}
