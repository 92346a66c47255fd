"""Torch-free checks of uploads at submit (the API process): checkpoints sniffed and their keys and
shapes compared with the architecture key manifest, npz headers read, optional libraries required.
Nothing here unpickles, imports torch or reads a whole upload."""
