"""Which ONNX Runtime execution providers to ask for, with an ordered fallback.

ONNX Runtime takes an ordered provider list and places every node on the first provider of the
list that supports it (ONNX Runtime docs, "Execution Providers"). A device asks by short name:
`cpu`, `cuda`, `tensorrt`, or `auto` (the fastest this build of onnxruntime has: TensorRT,
then CUDA, then CPU). A requested provider missing from `onnxruntime.get_available_providers()`
is dropped with a warning that names it, so a CUDA request on a CPU-only wheel still runs (on
the next provider of the chain); the provider the session actually took comes from
`session.get_providers()`, never from what was asked. Nothing here imports onnxruntime: the
caller passes the available list, which keeps the choice testable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sdr_edge.errors import SdrEdgeError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

PROVIDERS = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
PROVIDER_CHOICES = (*PROVIDERS, "auto")
# What each request falls back through, best first; CPU always closes the chain.
CHAINS = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
    "auto": (TENSORRT, CUDA, CPU),
}


class ProviderError(SdrEdgeError, ValueError):
    """An execution provider name that sdr-edge does not know."""


@dataclass(frozen=True)
class ProviderChoice:
    """The request, the list handed to ONNX Runtime, and the warnings the fallback gave."""

    requested: str
    providers: tuple[str, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)


def short_name(provider: str) -> str:
    """`CUDAExecutionProvider` -> `cuda`; unknown providers keep their ONNX Runtime name."""
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


def provider_name(requested: str) -> str:
    """The normalised short name (cpu, cuda, tensorrt, auto); ProviderError for anything else."""
    name = str(requested).strip().lower()
    if name not in CHAINS:
        raise ProviderError(f"unknown execution provider {requested!r}: choose one of "
                            f"{', '.join(PROVIDER_CHOICES)}")
    return name


def choose_providers(requested: str, available: list[str] | tuple[str, ...]) -> ProviderChoice:
    """The ordered providers for `requested` among `available`; warns for each one missing.

    `auto` warns for nothing: taking the best present provider is what it asks for.
    """
    name = provider_name(requested)
    chain = CHAINS[name]
    chosen = tuple(p for p in chain if p in available)
    if not chosen:  # a build without the CPU provider does not exist, but say so if it does
        raise ProviderError(f"none of {', '.join(chain)} is available in this onnxruntime "
                            f"(it has {', '.join(available) or 'none'})")
    warnings = []
    if name != "auto":
        for wanted in chain:
            if wanted == chosen[0]:
                break
            warnings.append(f"execution provider {wanted} ({short_name(wanted)}) is not "
                            f"available in this onnxruntime (it has {', '.join(available)}); "
                            f"falling back to {chosen[0]}")
    for message in warnings:
        log.warning("%s", message)
    return ProviderChoice(name, chosen, tuple(warnings))


def fallback_warning(choice: ProviderChoice, used: str) -> str | None:
    """A warning when the session took a later provider than the first one asked for.

    ONNX Runtime can list a provider as available yet fail to create it (a CUDA wheel without
    the CUDA libraries on the device); it then runs on the next one in the list.
    """
    if used == choice.providers[0]:
        return None
    message = (f"execution provider {choice.providers[0]} could not be created on this device; "
               f"ONNX Runtime runs on {used}")
    log.warning("%s", message)
    return message
