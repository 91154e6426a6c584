"""Where a plan compiles for: TPU slices by name (compiled here with libtpu, no TPU needed) or
N simulated CPU devices, and the per-chip figures of the roofline estimate."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one accelerator generation.

    Attributes:
      name: generation (``v5p`` ...).
      hbm_bytes: memory a program may use per device, as the TPU compiler reports it
        ("exceeds available HBM (95.74G)", libtpu 0.0.42.1), in bytes.
      peak_flops: dense bf16 FLOP/s per chip.
      hbm_bandwidth: HBM bytes/s per chip.
      ici_bandwidth: bidirectional inter-chip bytes/s per chip (all links together).
      devices_per_chip: JAX devices per chip in the compile-only topology (v4 exposes its
        two TensorCores as two devices; v5p fuses them into one "megacore" device).
    """

    name: str
    hbm_bytes: float
    peak_flops: float | None
    hbm_bandwidth: float | None
    ici_bandwidth: float | None
    devices_per_chip: int = 1


GIB = 2**30
# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} "key specifications" tables; the HBM
# figures are what libtpu 0.0.42.1 reports as available per device when a compile overflows.
CHIPS = {
    # v4: 275 TFLOP/s bf16, 32 GiB at 1200 GB/s; ICI 6 links x 45 GB/s each way (scaling-book)
    "v4": Chip("v4", 15.25 * GIB, 275e12, 1200e9, 540e9, devices_per_chip=2),
    # v5e: 197 TFLOP/s bf16, 16 GB at 819 GB/s, ICI 400 GB/s bidirectional per chip
    "v5e": Chip("v5e", 15.75 * GIB, 197e12, 819e9, 400e9),
    # v5p: 459 TFLOP/s bf16, 95 GB at 2765 GB/s, ICI 1200 GB/s bidirectional per chip
    "v5p": Chip("v5p", 95.74 * GIB, 459e12, 2765e9, 1200e9),
    # v6e (Trillium): 918 TFLOP/s bf16, 32 GB at 1638 GB/s, ICI 800 GB/s bidirectional per chip
    "v6e": Chip("v6e", 31.25 * GIB, 918e12, 1638e9, 800e9),
}

# chips -> torus shape of the standard slices (cloud.google.com/tpu/docs "configurations")
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# marketing-name counting: v4-N / v5p-N count TensorCores (2 per chip), v5e-N / v6e-N chips
_CORES_PER_CHIP_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved ``--topology``: its devices and chip figures.

    Attributes:
      name: what the user asked for (``v5p-64``, ``v6e:4x8``, ``cpu:8``).
      platform: ``tpu`` or ``cpu``.
      topology: the libtpu topology name (``v5p:2x4x4``) or ``cpu:N``.
      chips: number of chips.
      chip: the chip figures (for CPU: host memory shared by the N devices, no roofline).
      devices: the JAX devices to build the mesh on.
    """

    name: str
    platform: str
    topology: str
    chips: int
    chip: Chip
    devices: tuple


TARGET_HELP = (
    "v5p-N / v4-N (N TensorCores, 2 per chip: v5p-64 = 32 chips), v5e-N / v6e-N (N chips), "
    "a libtpu topology name such as v5p:2x4x4 or v6e:4x8, or cpu:N (N simulated CPU devices)"
)


def tpu_topology_name(target: str) -> tuple[str, str]:
    """``v5p-64`` -> ``("v5p", "v5p:2x4x4")``; ``v6e:4x8`` passes through."""
    t = target.strip().lower()
    for alias, gen in _ALIASES.items():
        t = re.sub(rf"^{alias}(?=[-:])", gen, t)
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", t)
    if m:
        return m.group(1), t
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", t)
    if not m:
        raise ValueError(f"unknown topology {target!r}; give {TARGET_HELP}")
    gen, count = m.group(1), int(m.group(2))
    per = _CORES_PER_CHIP_IN_NAME[gen]
    chips = count // per
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if count % per or chips not in shapes:
        sizes = ", ".join(f"{gen}-{c * per}" for c in shapes)
        raise ValueError(f"no standard slice {target!r}; known: {sizes}")
    return gen, f"{gen}:{shapes[chips]}"


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


INSTALL_HINT = (
    'compiling for a TPU topology needs libtpu: pip install "meljax[tpu]" (or '
    'pip install "jax[tpu]" matching your jax version); no TPU is needed, it compiles on this '
    "host. Without it, --topology=cpu:N compiles for N simulated CPU devices."
)


def resolve_target(target: str) -> Target:
    """Devices and chip figures of ``target`` (see ``TARGET_HELP``)."""
    t = target.strip().lower()
    m = re.fullmatch(r"cpu(?::(\d+))?", t)
    if m:
        return _cpu_target(target, int(m.group(1) or 1))
    gen, topology = tpu_topology_name(t)
    if not libtpu_installed():
        raise RuntimeError(INSTALL_HINT)
    # libtpu keeps a host-wide lock file; compiling for a topology never touches a TPU, so
    # several compiling processes (tests, a second plan) may share the library.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu rejects the shape: say which and why
        raise ValueError(f"libtpu cannot build topology {topology!r}: {e}") from None
    devices = tuple(desc.devices)
    chip = CHIPS[gen]
    return Target(
        name=target,
        platform="tpu",
        topology=topology,
        chips=len(devices) // chip.devices_per_chip,
        chip=chip,
        devices=devices,
    )


def _cpu_target(target: str, n: int) -> Target:
    import jax

    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(
            f"--topology={target} needs {n} CPU devices but JAX has {len(devices)}; start the "
            f"process with XLA_FLAGS=--xla_force_host_platform_device_count={n} (the meljax "
            f"plan command sets it itself when JAX has not started yet)"
        )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # the simulated devices share the host's memory
    chip = Chip("cpu", ram / n, None, None, None)
    return Target(target, "cpu", f"cpu:{n}", n, chip, tuple(devices[:n]))


def prepare_process(target: str) -> None:
    """Sets the environment a plan for ``target`` needs before JAX starts (CLI use): compile on
    the host CPU, and for ``cpu:N`` simulate N devices."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    m = re.fullmatch(r"cpu:(\d+)", target.strip().lower())
    if m and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={m.group(1)}"
