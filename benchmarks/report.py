"""What every benchmark records beside its figures, and how it writes them.

Each benchmark writes ``<name>.json`` (for tools) and ``<name>.md`` (for people) into its
``--out-dir`` and prints the table, so a run leaves the same record whichever script made it.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from lscpu (figures mean little without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
        "unknown",
    )


def write_results(out_dir: Path, name: str, result: dict, markdown: str) -> None:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir`` and print the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    (out_dir / f"{name}.md").write_text(text)
    print(text, end="", flush=True)


def package_versions(*names: str) -> dict[str, str]:
    """Python's and each installed distribution's version ("not installed" where missing)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def libjpeg_turbo_version() -> str:
    """The libjpeg-turbo Pillow decodes JPEGs with, as Pillow reports it, else why not."""
    try:
        from PIL import features

        if features.check_feature("libjpeg_turbo"):
            return features.version("libjpeg_turbo") or "yes (version unknown)"
        return "no (Pillow's JPEG is not libjpeg-turbo)"
    except Exception as exc:  # an old Pillow without the feature: say so, do not fail the run
        return f"unknown ({type(exc).__name__})"


def gpu_name() -> str:
    """The first CUDA GPU's name, or "none" (or "none (no torch)")."""
    try:
        import torch
    except ImportError:
        return "none (no torch)"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def format_versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())
