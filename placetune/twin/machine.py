"""The twin's machines: one or more GPUs, system RAM and a CPU, described by the figures that decide MoE speed.

Spec figures (bandwidths, tensor throughput, PCIe generation) come from vendor spec sheets and
are cited where they are set. Efficiencies and overheads are the twin's calibration: one shared
default each, set so that the published measurements in `calibration.py` come out within their
tolerances, and overridden for a machine only where a cited measurement says so.

Everything the twin produces from these is SIMULATED: it is a benchmark and test instrument for
the search, never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from placetune.errors import PlacetuneError

GB = 10**9
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class TwinGpu:
    """One card: its memory, bandwidth, tensor throughput and its own PCIe link to the host."""

    name: str
    total_bytes: int
    free_bytes: int  # what llama.cpp's device list reports free before loading
    bw_gbs: float  # theoretical memory bandwidth
    tflops: float  # dense FP16 tensor throughput with FP32 accumulate
    pcie_gbs: float  # host-to-device, theoretical, per direction

    def check(self, machine: str) -> None:
        for key in ("total_bytes", "free_bytes", "bw_gbs", "tflops", "pcie_gbs"):
            if getattr(self, key) <= 0:
                raise PlacetuneError(f"twin machine {machine!r}: GPU {self.name!r}: {key} must be positive")
        if self.free_bytes > self.total_bytes:
            raise PlacetuneError(f"twin machine {machine!r}: GPU {self.name!r}: free memory exceeds its total")


@dataclass(frozen=True)
class TwinMachine:
    """A machine as the twin models it (bytes, seconds, GB/s = 10^9 bytes/s).

    The gpu_* fields and pcie_gbs describe the first card (CUDA0); more_gpus the others (CUDA1, ...), in
    llama.cpp's device order. Efficiencies and overheads are shared by every card.
    """

    name: str
    description: str
    gpu_name: str
    gpu_total_bytes: int
    gpu_free_bytes: int  # what llama.cpp's device list reports free before loading (the driver context is gone)
    gpu_bw_gbs: float  # theoretical memory bandwidth
    gpu_tflops: float  # dense FP16 tensor throughput with FP32 accumulate
    pcie_gbs: float  # host-to-device, theoretical, per direction
    cpu_name: str
    cores: int  # physical cores
    ram_bytes: int
    ram_bw_gbs: float  # theoretical (channels x transfer rate x 8 bytes)
    cpu_gflops: float = 1500.0  # all cores, quantized matmul (AVX2/AVX-512): pp without op offload, CPU layers
    # -- calibration (see calibration.py for the published points these reproduce) --
    gpu_bw_eff: float = 0.80  # share of GPU bandwidth a weight or KV read reaches
    ram_bw_eff: float = 0.62  # share of RAM bandwidth CPU-side expert reads reach (50-70% is typical: shared notes)
    compute_eff: float = 0.60  # share of tensor throughput prompt matmuls reach at a large ubatch
    attention_eff: float = 0.80  # ... flash attention reaches (its mma kernels accumulate in FP16 on GeForce,
    #   whose FP16-accumulate rate is twice the FP32-accumulate figure in gpu_tflops)
    pcie_pageable_eff: float = 0.62  # share of PCIe a copy from pageable (mmap) host memory reaches
    pcie_pinned_eff: float = 0.88  # from pinned host buffers (--no-mmap): llama.cpp PR 14990, +35-40% pp
    gpu_layer_overhead_s: float = 55e-6  # per layer on the GPU per generated token: launches, routing, sync
    split_overhead_s: float = 15e-6  # per GPU<->CPU hand-over per generated token
    token_overhead_s: float = 0.3e-3  # per generated token: sampling, batch set-up
    ubatch_overhead_s: float = 2e-3  # per ubatch of a prompt: graph build and launch
    spill_bytes: int = 0  # >0: the driver spills this much past capacity into shared memory (WDDM) instead of OOM
    # -- more cards: CUDA1, ... and the link activations cross between two of them --
    more_gpus: tuple[TwinGpu, ...] = ()
    link_gbs: float = 0.0  # card to card, theoretical, per direction (through the host without peer access)
    # -- loading (the dominant per-trial cost on big models) --
    init_s: float = 2.5  # CUDA and context initialisation
    upload_gbs: float = 6.0  # page cache -> GPU through llama.cpp's staging buffer
    host_copy_gbs: float = 4.0  # page cache -> pinned host buffers (--no-mmap)
    disk_gbs: float = 3.0  # first read of the file from an NVMe disk
    # -- noise: log-normal per sample, a per-load offset, and occasional slow outliers --
    pp_sigma: float = 0.015
    tg_sigma: float = 0.025
    load_sigma: float = 0.01
    outlier_rate: float = 0.02

    def __post_init__(self) -> None:
        for key in ("gpu_total_bytes", "gpu_free_bytes", "gpu_bw_gbs", "gpu_tflops", "pcie_gbs", "cores",
                    "ram_bytes", "ram_bw_gbs", "cpu_gflops"):
            if getattr(self, key) <= 0:
                raise PlacetuneError(f"twin machine {self.name!r}: {key} must be positive")
        if self.gpu_free_bytes > self.gpu_total_bytes:
            raise PlacetuneError(f"twin machine {self.name!r}: free GPU memory exceeds its total")
        for gpu in self.more_gpus:
            gpu.check(self.name)
        if self.more_gpus and self.link_gbs <= 0:
            raise PlacetuneError(f"twin machine {self.name!r}: several GPUs need link_gbs, the link between them")

    @property
    def gpus(self) -> tuple[TwinGpu, ...]:
        """Every card in llama.cpp's order, the first from the gpu_* fields."""
        first = TwinGpu(self.gpu_name, self.gpu_total_bytes, self.gpu_free_bytes, self.gpu_bw_gbs, self.gpu_tflops,
                        self.pcie_gbs)
        return (first, *self.more_gpus)

    @property
    def devices(self) -> tuple[str, ...]:
        """The cards' names as llama.cpp lists them: CUDA0, CUDA1, ..."""
        return tuple(f"CUDA{i}" for i in range(1 + len(self.more_gpus)))


# Desktop CPUs and their RAM. DDR bandwidth = channels x MT/s x 8 bytes.
_RYZEN_16C = dict(cpu_name="AMD Ryzen 9 9950X (16 cores)", cores=16)


MACHINES: dict[str, TwinMachine] = {
    # Seed 000 (../shared/seeds/000_*): "rtx 5090", "Dual channel DDR5-6000 has 96GB/s and a rtx 5090 has 1.8TB/s".
    # RTX 5090: 32 GB GDDR7, 1792 GB/s, 209.5 TFLOPS dense FP16 (FP32 acc), PCIe 5.0 x16 (NVIDIA spec sheet).
    "rtx5090-ddr5x2": TwinMachine(
        name="rtx5090-ddr5x2", description="RTX 5090 32 GB, dual-channel DDR5-6000",
        gpu_name="NVIDIA GeForce RTX 5090", gpu_total_bytes=32607 * MIB, gpu_free_bytes=31900 * MIB,
        gpu_bw_gbs=1792.0, gpu_tflops=209.5, pcie_gbs=63.0, ram_bytes=128 * GIB, ram_bw_gbs=96.0, **_RYZEN_16C,
    ),
    # llmfit PR 755 (AlexsJones/llmfit#755): RTX 2080 8 GB + i9-10900X, "measured ~102 GB/s quad-channel DDR4",
    # 62 GB RAM. RTX 2080: 448 GB/s, 42.4 TFLOPS FP16 (FP32 acc), PCIe 3.0 x16 (NVIDIA Turing whitepaper).
    "rtx2080-ddr4x4": TwinMachine(
        name="rtx2080-ddr4x4", description="RTX 2080 8 GB, quad-channel DDR4 (i9-10900X)",
        gpu_name="NVIDIA GeForce RTX 2080", gpu_total_bytes=7982 * MIB, gpu_free_bytes=7600 * MIB,
        gpu_bw_gbs=448.0, gpu_tflops=42.4, pcie_gbs=15.75, cpu_name="Intel Core i9-10900X (10 cores)", cores=10,
        ram_bytes=62 * GIB, ram_bw_gbs=102.0, cpu_gflops=900.0,
        # PR 755 estimates this card at "roofline 448 GB/s x 0.55"; quad-channel DDR4 on a 2019 HEDT part
        # leaves tg less of its bandwidth than the DDR5 desktops do (set so the PR's 36.7 t/s comes out).
        gpu_bw_eff=0.55, ram_bw_eff=0.50,
    ),
    # r/LocalLLaMA "Qwen3.5-35B-A3B on a single-GPU consumer workstation": RTX 5080 16 GB GDDR7 960 GB/s,
    # Ryzen 9 9950X, 128 GB DDR5-4800 dual channel ~77 GB/s, PCIe 5.0 x16. 112.6 TFLOPS FP16 (NVIDIA spec).
    "rtx5080-ddr5x2": TwinMachine(
        name="rtx5080-ddr5x2", description="RTX 5080 16 GB, dual-channel DDR5-4800",
        gpu_name="NVIDIA GeForce RTX 5080", gpu_total_bytes=16303 * MIB, gpu_free_bytes=15700 * MIB,
        gpu_bw_gbs=960.0, gpu_tflops=112.6, pcie_gbs=63.0, ram_bytes=128 * GIB, ram_bw_gbs=76.8, **_RYZEN_16C,
    ),
    # r/LocalLLaMA "Bigger ubatch made gpt-oss-120b prompt processing much faster on my RTX 3090": the post
    # names no CPU or RAM; a 16-core desktop with dual-channel DDR5-6000 is ASSUMED (its tg of 30-33 t/s with
    # 25-28 expert layers in RAM needs about that bandwidth). RTX 3090: 936 GB/s, 71 TFLOPS FP16 (FP32 acc),
    # PCIe 4.0 x16 (NVIDIA Ampere GA102 whitepaper).
    "rtx3090-ddr5x2": TwinMachine(
        name="rtx3090-ddr5x2", description="RTX 3090 24 GB, dual-channel DDR5-6000 (assumed)",
        gpu_name="NVIDIA GeForce RTX 3090", gpu_total_bytes=24576 * MIB, gpu_free_bytes=24000 * MIB,
        gpu_bw_gbs=936.0, gpu_tflops=71.0, pcie_gbs=31.5, ram_bytes=128 * GIB, ram_bw_gbs=96.0, **_RYZEN_16C,
    ),
    # A 24 GB Ada card for GLM-4.5-Air: RTX 4090, 1008 GB/s, 165.2 TFLOPS FP16 (FP32 acc), PCIe 4.0 x16
    # (NVIDIA Ada whitepaper), with the same desktop as above.
    "rtx4090-ddr5x2": TwinMachine(
        name="rtx4090-ddr5x2", description="RTX 4090 24 GB, dual-channel DDR5-6000",
        gpu_name="NVIDIA GeForce RTX 4090", gpu_total_bytes=24564 * MIB, gpu_free_bytes=24000 * MIB,
        gpu_bw_gbs=1008.0, gpu_tflops=165.2, pcie_gbs=31.5, ram_bytes=128 * GIB, ram_bw_gbs=96.0, **_RYZEN_16C,
    ),
    # Two of the same 4090s in the same desktop. With two cards an AM5 board splits the CPU's x16 slot into x8/x8,
    # so each card has PCIe 4.0 x8 (15.75 GB/s). GeForce 40 cards have no NVLink and the driver gives them no
    # peer access, so a card-to-card copy goes through host memory, at about one x8 link. The first card drives
    # the display (ASSUMED: the desktop takes about 600 MiB of it).
    "rtx4090x2-ddr5x2": TwinMachine(
        name="rtx4090x2-ddr5x2", description="2 x RTX 4090 24 GB (PCIe 4.0 x8 each), dual-channel DDR5-6000",
        gpu_name="NVIDIA GeForce RTX 4090", gpu_total_bytes=24564 * MIB, gpu_free_bytes=23400 * MIB,
        gpu_bw_gbs=1008.0, gpu_tflops=165.2, pcie_gbs=15.75, ram_bytes=128 * GIB, ram_bw_gbs=96.0, **_RYZEN_16C,
        more_gpus=(TwinGpu("NVIDIA GeForce RTX 4090", 24564 * MIB, 24000 * MIB, 1008.0, 165.2, 15.75),),
        link_gbs=15.75,
    ),
    # A 12 GB card under Windows (WDDM's shared-memory fallback spills instead of failing: the spill cliff).
    # RTX 4070: 504 GB/s, 58.3 TFLOPS FP16 (FP32 acc), PCIe 4.0 x16 (NVIDIA Ada whitepaper); an 8-core desktop
    # with dual-channel DDR5-5600 (89.6 GB/s), 64 GB.
    "rtx4070-ddr5x2-wddm": TwinMachine(
        name="rtx4070-ddr5x2-wddm", description="RTX 4070 12 GB (Windows, spills to shared memory), DDR5-5600 x2",
        gpu_name="NVIDIA GeForce RTX 4070", gpu_total_bytes=12282 * MIB, gpu_free_bytes=11500 * MIB,
        gpu_bw_gbs=504.0, gpu_tflops=58.3, pcie_gbs=31.5, cpu_name="AMD Ryzen 7 7700 (8 cores)", cores=8,
        ram_bytes=64 * GIB, ram_bw_gbs=89.6, cpu_gflops=800.0, spill_bytes=3 * GIB,
    ),
    # One 80 GB data-centre card in an 8-channel DDR5 server. H100 PCIe 80 GB: 2039 GB/s, 756 TFLOPS FP16
    # (dense), PCIe 5.0 x16 (NVIDIA H100 datasheet). Xeon Sapphire Rapids, 8 x DDR5-4800 = 307.2 GB/s.
    "h100-ddr5x8": TwinMachine(
        name="h100-ddr5x8", description="H100 PCIe 80 GB, 8-channel DDR5-4800 (32-core Xeon)",
        gpu_name="NVIDIA H100 PCIe", gpu_total_bytes=81559 * MIB, gpu_free_bytes=80500 * MIB,
        gpu_bw_gbs=2039.0, gpu_tflops=756.0, pcie_gbs=63.0, cpu_name="Intel Xeon (Sapphire Rapids, 32 cores)",
        cores=32, ram_bytes=512 * GIB, ram_bw_gbs=307.2, cpu_gflops=3000.0,
    ),
}

