"""Torch-free names of the built-in architectures (the API validates specs against them; a test keeps
this list equal to the torch registry). `timm:<name>` and allow-listed `module.path:factory` names are
resolved by the worker."""

BUILTIN_ARCHITECTURES = ("digit_cnn", "resnet18", "resnet34", "resnet50", "vit_small_digits", "wrn28_10")


def is_resolvable_name(name: str) -> bool:
    return name in BUILTIN_ARCHITECTURES or name.startswith("timm:") or (":" in name and not name.startswith(":"))
