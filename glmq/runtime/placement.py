"""Where each network's weights live during a call: on the GPU, or parked in pinned CPU memory and copied in
for the stage that needs them (staged mode) or block by block (the DiT in offload mode).

Parking is free: every parked tensor keeps one pinned CPU copy made once; moving a network off the GPU only
points its parameters back at that copy. The plan behind the modes is :mod:`glmq.runtime.memory`.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from glmq.runtime.memory import GiB, MemoryMode

# What each stage of a call needs on the GPU (staged and offload modes; see glmq.runtime.memory).
# The VAE leaves for the DiT stage: it has nothing to do there, and its 0.76 GiB (bf16, released size) decide
# whether an edit's DiT stage fits a 12 GiB card (benchmarks/results/plan_tiers_cpu/); it comes back for the
# decode, one more copy of its weights per call.
STAGE_NETS = {"vision": {"ar"}, "ar": {"ar"}, "encode": {"glyph", "vae"}, "dit": {"dit"}, "vae": {"vae"}}


def _debug(msg: str) -> None:
    """Stage-by-stage trace on stderr when GLMQ_DEBUG=1 (for diagnosing crashes in native code)."""
    if os.environ.get("GLMQ_DEBUG") == "1":
        print(f"[glmq debug] {msg}", file=sys.stderr, flush=True)


class Parked:
    """A module whose tensors live in pinned CPU memory (copied once) and visit the GPU on demand.

    ``to_gpu`` copies every parameter and buffer in (asynchronously from pinned memory); ``to_cpu`` just
    points them back at the pinned copies, freeing the GPU copies: weights never change, so nothing is
    copied back. A tensor that is already a pinned CPU tensor is not copied again, so a second ``Parked``
    over the same module (a per-call block streamer) shares the first one's copies.
    """

    def __init__(self, module, device: torch.device, exclude: set | None = None):
        self.device = device
        self.slots = []
        pin = torch.cuda.is_available() and os.environ.get("GLMQ_PIN_MEMORY", "1") != "0"
        self.non_blocking = pin
        for mod in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(mod, kind).items():
                    if t is not None and (id(mod), kind, name) not in (exclude or ()):
                        cpu = t.detach().to("cpu")
                        self.slots.append((mod, kind, name, cpu.pin_memory() if pin else cpu))
        self.to_cpu()

    @staticmethod
    def set(mod, kind, name, value):
        if kind == "_parameters":
            mod._parameters[name].data = value
        else:
            mod._buffers[name] = value

    def to_gpu(self):
        for mod, kind, name, cpu in self.slots:
            self.set(mod, kind, name, cpu.to(self.device, non_blocking=self.non_blocking))

    def to_cpu(self):
        for mod, kind, name, cpu in self.slots:
            self.set(mod, kind, name, cpu)


def slot_keys(module) -> set:
    """(module id, kind, name) of every parameter and buffer of ``module``."""
    return {(id(m), kind, name) for m in module.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items() if t is not None}


class BlockStreamer:
    """Keeps a stack of blocks in pinned CPU memory and copies each to the GPU just before it runs.

    ``resident``: submodule names of each block that stay with the rest of the network instead (the DiT's
    AdaLN ``norm1``, which the loop evaluates for all timesteps up front, outside the blocks' forward).

    With ``GLMQ_PREFETCH=1`` on a GPU the copies overlap the compute: while block i runs, block i + 1 (after
    the last block, the first, for the next step) is already being copied on a side stream, so a step should
    cost about max(compute, copies) instead of their sum, with at most two blocks on the GPU at once (which
    the memory plan counts: :func:`glmq.runtime.memory.stage_peaks`, offload). It is off by default: it has
    not run on a GPU yet (``benchmarks/check_offload_prefetch.py`` is the measurement to make). Off, each
    block copies on the compute stream just before it runs.
    """

    def __init__(self, blocks, device: torch.device, resident: tuple[str, ...] = ()):
        self.handles = []
        self.keys = set()
        self.device = device
        self.parked: list[Parked] = []
        self.prefetch = device.type == "cuda" and os.environ.get("GLMQ_PREFETCH", "0") == "1"
        self.copy_stream = torch.cuda.Stream(device) if self.prefetch else None
        self.pending: dict[int, tuple] = {}  # block index -> (copy-done event, its GPU tensors)
        for i, block in enumerate(blocks):
            keep = set()
            for sub in resident:
                keep |= slot_keys(block.get_submodule(sub))
            parked = Parked(block, device, exclude=keep)
            self.parked.append(parked)
            self.keys |= {(id(m), kind, n) for m, kind, n, _ in parked.slots}
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._bring(i)))
            self.handles.append(block.register_forward_hook(lambda m, a, o, p=parked: p.to_cpu()))

    def _issue(self, i: int) -> tuple:
        """Start copying block ``i`` in on the side stream; its pinned source never changes, so the copy
        need not wait for anything."""
        with torch.cuda.stream(self.copy_stream):
            tensors = [cpu.to(self.device, non_blocking=True) for _, _, _, cpu in self.parked[i].slots]
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done, tensors

    def _bring(self, i: int) -> None:
        parked = self.parked[i]
        if not self.prefetch:
            parked.to_gpu()
            return
        done, tensors = self.pending.pop(i, None) or self._issue(i)  # a miss: the first block of a stage
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for (mod, kind, name, _), t in zip(parked.slots, tensors):
            t.record_stream(compute)  # freed after this block's kernels, not when the hook drops it
            Parked.set(mod, kind, name, t)
        nxt = (i + 1) % len(self.parked)
        if nxt != i and nxt not in self.pending:
            self.pending[nxt] = self._issue(nxt)

    def drop_prefetched(self) -> None:
        """Release the block copied ahead (the first block, after a stage's last step)."""
        self.pending.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.drop_prefetched()


class Placement:
    """The placement of the four networks (``nets``: "ar", "dit", "glyph", "vae") in one memory mode.

    Resident: everything moves to ``device`` once. Staged and offload: every network is parked, and
    :meth:`stage` brings in what a stage needs; offload also streams the DiT's blocks. ``vision`` is the AR's
    vision tower and VQ, which only image-to-image stages bring in.
    """

    def __init__(self, nets: dict, device: torch.device, mode: MemoryMode, vision: tuple = ()):
        self.nets, self.device, self.mode = nets, device, MemoryMode(mode)
        self.parked: dict[str, Parked] = {}
        self.streamers: dict[str, BlockStreamer] = {}
        self._vision_keys = set().union(*(slot_keys(m) for m in vision)) if vision else set()
        if not self.gpu() or self.mode is MemoryMode.RESIDENT:
            for m in nets.values():
                m.to(device)
            return
        streamed = set()
        if self.mode is MemoryMode.OFFLOAD:
            streamed = self._stream_dit().keys
        for name, m in nets.items():
            self.parked[name] = Parked(m, device, streamed)

    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def _stream_dit(self) -> BlockStreamer:
        self.streamers["dit"] = BlockStreamer(self.nets["dit"].transformer_blocks, self.device, resident=("norm1",))
        return self.streamers["dit"]

    def stage(self, stage: str, image_to_image: bool) -> None:
        """Put the networks ``stage`` needs on the GPU and park the others (staged/offload modes).

        Everything that leaves is parked first, then what the stage needs is copied in, so the GPU never holds
        two stages at once (the H200 sequence run, benchmarks/results/memory_sequence_h200/, ran out of memory
        under 16 GiB moving the AR and vision tower in while the DiT was still there). The AR's vision tower
        and VQ only visit for image-to-image, in the ``vision`` stage (without the text decoder; the ``ar``
        stage of an image-to-image call may still take them when ``image_to_image`` is set). Streamed DiT
        blocks are left to their streamer.
        """
        if not self.gpu() or not self.parked:
            return
        if stage != "dit":
            for streamer in self.streamers.values():
                streamer.drop_prefetched()
        keep_on_cpu = set(self.streamers["dit"].keys) if "dit" in self.streamers else set()
        if not image_to_image:
            keep_on_cpu |= self._vision_keys
        only = self._vision_keys if stage == "vision" else None  # the AR's vision tower and VQ, not its decoder
        wanted = STAGE_NETS[stage]
        _debug(f"stage {stage}: moving {sorted(wanted)} to the GPU")
        moves = []
        for name, parked in self.parked.items():
            for mod, kind, pname, cpu in parked.slots:
                key = (id(mod), kind, pname)
                if name in wanted and key not in keep_on_cpu and (only is None or key in only):
                    current = getattr(mod, kind)[pname]
                    if current is None or current.device != self.device:
                        moves.append((mod, kind, pname, cpu, parked.non_blocking))
                else:
                    Parked.set(mod, kind, pname, cpu)
        torch.cuda.empty_cache()  # hand the parked stage's blocks back before the next one arrives
        for mod, kind, pname, cpu, non_blocking in moves:
            Parked.set(mod, kind, pname, cpu.to(self.device, non_blocking=non_blocking))
        if os.environ.get("GLMQ_DEBUG") == "1":
            _debug(f"stage {stage}: placed, {torch.cuda.memory_allocated(self.device) / GiB:.2f} GiB allocated")

    def park_all(self) -> None:
        """Every parked network back to its pinned CPU copy (between calls, and after a failed one)."""
        for streamer in self.streamers.values():
            streamer.drop_prefetched()
        for parked in self.parked.values():
            parked.to_cpu()
        if self.parked and self.gpu():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def call_in(self, mode: MemoryMode, runner):
        """One call in ``mode``: a staged placement streams the DiT's blocks for a call that needs offload
        (``runner``, the DiT loop, then runs its plain blocks: no compiled code or CUDA graph holds stale
        weight addresses). Everything is parked again afterwards, also after a failure."""
        streamer = None
        try:
            if MemoryMode(mode) is MemoryMode.OFFLOAD and self.mode is MemoryMode.STAGED:
                self.park_all()  # the blocks' pinned copies already exist: the streamer reuses them
                streamer = self._stream_dit()
                with runner.eager():
                    yield
            else:
                yield
        finally:
            if streamer is not None:
                streamer.remove()
                del self.streamers["dit"]
            self.park_all()

    def release(self) -> None:
        """Remove the streaming hooks (the modules can then serve another pipeline)."""
        for streamer in self.streamers.values():
            streamer.remove()
        self.streamers.clear()
