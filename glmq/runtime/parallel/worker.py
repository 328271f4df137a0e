"""One GPU's process of a two-GPU pipeline: ``python -m glmq.runtime.parallel.worker`` (started by
:class:`glmq.runtime.parallel.ParallelPipeline`, never by hand).

It joins the ``torch.distributed`` group (NCCL on CUDA plus a gloo group for CPU messages; gloo alone on the
CPU), builds its pipeline (a folder through ``glmq.load``, or a builder the caller names), prepares its role
and then serves requests from the caller over its pipe (:mod:`glmq.runtime.parallel.wire`) until told to close:

- ``latency``: both ranks run every image; the AR is sharded (:mod:`~glmq.runtime.parallel.shard`), the DiT's
  guidance passes split (:mod:`~glmq.runtime.parallel.guidance`); rank 0 decodes and answers;
- ``throughput``: rank 0 runs the AR of each image and sends its prior ids and generator state to rank 1,
  then goes on with the next image's AR; rank 1 runs glyphs, DiT and VAE and answers.

Any exception is sent to the caller as an ``error`` message and ends the process: the caller then stops the
other rank too (it may be waiting in a collective that will never complete). The worker exits by itself
when its caller disappears.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import os
import sys
import threading
import time
import traceback

MODES = ("latency", "throughput")


def _watch_parent(parent_pid: int) -> None:
    """Exit when the caller is gone (killed, crashed): a worker must never hold a GPU for nobody."""
    def run():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=run, name="glmq-parent-watch", daemon=True).start()


class Worker:
    def __init__(self, conn, rank: int, world: int, device: str, groups: dict):
        import torch

        self.conn, self.rank, self.world = conn, rank, world
        self.device = torch.device(device)
        self.device_group, self.cpu_group = groups["device"], groups["cpu"]
        self.pipe = None
        self.mode = None
        self._cancel = False

    # -- set-up ------------------------------------------------------------------------------------------
    def build(self, meta: dict) -> dict:
        import torch

        source = meta["source"]
        if "path" in source:
            from glmq.runtime.load import load

            opts = dict(source.get("options", {}))
            if opts.get("dtype"):
                opts["dtype"] = getattr(torch, opts["dtype"])
            self.pipe = load(source["path"], device=str(self.device), **opts)
        else:
            module, _, name = source["builder"].partition(":")
            builder = getattr(importlib.import_module(module), name)  # named by the caller (glmq bench)
            self.pipe = builder(device=str(self.device), **source.get("args", {}))
        self.mode = meta["mode"]
        info = {"memory_mode": str(self.pipe.mode), "attention_precision": self.pipe.attention_precision,
                "compile": bool(self.pipe.compile),
                "device": str(self.device), "dtype": str(self.pipe.dtype).removeprefix("torch.")}
        if self.mode == "latency":
            from glmq.runtime.parallel.guidance import GuidanceParallelRunner
            from glmq.runtime.parallel.shard import shard_ar

            pipe = self.pipe
            kept = shard_ar(pipe.ar, self.rank, self.world, self.device_group)
            if pipe._runner is not None:
                pipe._runner.remove()
            pipe._runner = GuidanceParallelRunner(
                pipe.transformer, pipe.scheduler_config, rank=self.rank, world=self.world, group=self.device_group,
                device=pipe.device, dtype=pipe.dtype, cuda_graph=pipe.dit_cuda_graph,
                compile=pipe.compile and not pipe.mode.streams_dit)
            info["shard"] = {k: v for k, v in kept.items() if k != "mlp"}
            info["shard"]["mlp_first_layer"] = kept["mlp"][0] if kept["mlp"] else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return info

    # -- requests ----------------------------------------------------------------------------------------
    def _generators(self, meta: dict, tensors: dict) -> list:
        import torch

        gens = []
        for i, spec in enumerate(meta["generators"]):
            device = self.device if spec["device"] == "cuda" else torch.device("cpu")
            if spec["device"] == "cuda" and self.device.type != "cuda":
                raise ValueError("a CUDA generator was given to a pipeline running on the CPU")
            g = torch.Generator(device=device)
            g.set_state(tensors[f"generator{i}"])
            gens.append(g)
        return gens

    def _callback(self, meta: dict):
        if not meta.get("events"):
            return None
        from glmq.runtime.parallel import wire

        def report(stage, done, total):
            wire.send(self.conn, "event", {"stage": stage, "done": int(done), "total": int(total)})

        return report

    def peak_reserved_gib(self) -> float | None:
        """The allocator's peak reserved GiB on this rank's GPU since the request began (None on the CPU)."""
        import torch

        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)

    def cancelled(self) -> bool:
        """Whether the caller asked to stop this request (read from the pipe without waiting)."""
        from glmq.runtime.parallel import wire

        while not self._cancel and self.conn.poll(0):
            if wire.recv(self.conn).kind == "cancel":
                self._cancel = True
        return self._cancel

    def _agree_cancelled(self) -> bool:
        """Rank 0 decides, for both ranks: the two must stop before the same image (a rank that stopped alone
        would leave the other waiting in a collective)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.cancelled()) if self.rank == 0 else 0])
        dist.broadcast(flag, src=0, group=self.cpu_group)
        return bool(flag.item())

    def generate(self, meta: dict, tensors: dict) -> None:
        import torch

        self._cancel = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gens = self._generators(meta, tensors)
        if self.mode == "latency":
            self._latency(meta, gens)
        elif self.rank == 0:
            self._throughput_ar(meta, gens)
        else:
            self._throughput_dit(meta)

    def _call_kwargs(self, meta: dict) -> dict:
        return dict(height=meta["height"], width=meta["width"], num_inference_steps=meta["steps"],
                    guidance_scale=meta["guidance"])

    def _latency(self, meta: dict, gens: list) -> None:
        import torch
        import torch.distributed as dist

        from glmq.runtime.parallel import wire

        out_type = meta["output_type"] if self.rank == 0 else "latent"  # the VAE runs on rank 0 only
        callback = self._callback(meta) if self.rank == 0 else None
        for job in meta["jobs"]:
            if self._agree_cancelled():
                return
            gen = gens[job["generator"]]
            out = self.pipe(job["prompt"], generator=gen, output_type="pt" if out_type == "pil" else out_type,
                            callback=callback, **self._call_kwargs(meta))
            prior = self.pipe.last_prior_token_ids.reshape(-1)
            # Both ranks sampled from the same gathered logits with the same noise: their tokens must agree,
            # or the shards would go on decoding different sequences.
            both = [torch.empty_like(prior) for _ in range(self.world)]
            dist.all_gather(both, prior, group=self.cpu_group)
            if not all(torch.equal(both[0], b) for b in both[1:]):
                raise RuntimeError("the tensor-parallel ranks sampled different AR tokens")
            if self.rank == 0:
                wire.send(self.conn, "image", {"index": job["index"], "times": _times(self.pipe.last_times)},
                          {"image": out, "prior": self.pipe.last_prior_token_ids, "generator": gen.get_state()})

    def _throughput_ar(self, meta: dict, gens: list) -> None:
        import torch
        import torch.distributed as dist

        from glmq.runtime.parallel import wire

        callback = self._callback(meta)
        step_cb = (lambda done, total: callback("AR", done, total)) if callback else None
        pending = []
        jobs = meta["jobs"]
        h, w = meta["height"], meta["width"]
        for n, job in enumerate(jobs):
            if self.cancelled():  # tell rank 1 that no more images come
                stop = torch.tensor([-1, 0, 0], dtype=torch.long)
                pending.append((dist.isend(stop, dst=1, group=self.cpu_group), stop))
                break
            gen = gens[job["generator"]]
            if callback:
                callback("AR", 0, 1)
            t0 = self._now()
            prior, n_tokens, _, _ = self.pipe.generate_prior_tokens(job["prompt"], h, w, generator=gen,
                                                                    step_callback=step_cb)
            ar_s = self._now() - t0
            state = gen.get_state()
            if any(j["generator"] == job["generator"] for j in jobs[n + 1:]):
                # One generator for several images draws as one process would, image after image: this image's
                # starting noise (drawn by rank 1 from ``state``) comes before the next image's AR noise.
                shape = (1, self.pipe.transformer.config.in_channels, h // self.pipe.vae_scale_factor,
                         w // self.pipe.vae_scale_factor)
                torch.randn(shape, generator=gen, device=gen.device, dtype=self.pipe.dtype)
            prior = prior.reshape(1, -1).to(torch.long).contiguous()
            header = torch.tensor([job["index"], prior.shape[1], state.numel()], dtype=torch.long)
            for t in (header, prior, state):  # rank 0 goes on with the next image while these travel
                pending.append((dist.isend(t, dst=1, group=self.cpu_group), t))
            wire.send(self.conn, "ar", {"index": job["index"], "ar_s": ar_s, "ar_tokens": int(n_tokens)})
        for work, _ in pending:
            work.wait()

    def _throughput_dit(self, meta: dict) -> None:
        import torch
        import torch.distributed as dist

        from glmq.runtime.parallel import wire

        callback = self._callback(meta)
        out_type = meta["output_type"]
        by_index = {job["index"]: job for job in meta["jobs"]}
        for _ in meta["jobs"]:
            header = torch.empty(3, dtype=torch.long)
            dist.recv(header, src=0, group=self.cpu_group)
            index, n_prior, n_state = (int(x) for x in header)
            if index < 0:  # the call was cancelled: rank 0 sends no more images
                break
            prior = torch.empty((1, n_prior), dtype=torch.long)
            state = torch.empty(n_state, dtype=torch.uint8)
            dist.recv(prior, src=0, group=self.cpu_group)
            dist.recv(state, src=0, group=self.cpu_group)
            if self.cancelled():  # images rank 0 sent before it heard of the cancel: received, not made
                continue
            job = by_index[index]
            device = self.device if meta["generators"][job["generator"]]["device"] == "cuda" else "cpu"
            gen = torch.Generator(device=device)
            gen.set_state(state)
            out = self.pipe(job["prompt"], generator=gen, prior_token_ids=prior,
                            output_type="pt" if out_type == "pil" else out_type, callback=callback,
                            **self._call_kwargs(meta))
            wire.send(self.conn, "image", {"index": index, "times": _times(self.pipe.last_times)},
                      {"image": out, "prior": prior, "generator": gen.get_state()})

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _times(t) -> dict:
    return dataclasses.asdict(t)


def _error_meta(e: BaseException) -> dict:
    from glmq.errors import GlmqError

    return {"type": type(e).__name__, "message": " ".join(str(e).split()) or type(e).__name__,
            "user_error": isinstance(e, GlmqError), "traceback": traceback.format_exc()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glmq.runtime.parallel.worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--timeout", type=float, required=True)
    args = ap.parse_args(argv)
    _watch_parent(args.parent)

    from multiprocessing.connection import Connection

    conn = Connection(args.fd)
    from glmq.runtime.parallel import wire

    dist = None
    try:
        import torch
        import torch.distributed as dist

        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(args.device))
        elif "OMP_NUM_THREADS" not in os.environ:
            # Two processes on one CPU: each gets its share of the cores. Oversubscribed OpenMP threads spin
            # while the other process computes (the tiny model's latency-mode AR: 22-31 s instead of 3.3 s).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
        store = dist.FileStore(args.store, args.world)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=args.rank, world_size=args.world,
                                timeout=datetime.timedelta(seconds=args.timeout),
                                device_id=torch.device(args.device) if cuda else None)
        cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.timeout)) if cuda else None
        probe = torch.ones(1, device=args.device)
        dist.all_reduce(probe)  # creates the communicators now, not inside a CUDA graph capture
        if float(probe) != args.world:
            raise RuntimeError(f"all-reduce check failed: {float(probe)} != {args.world}")
        worker = Worker(conn, args.rank, args.world, args.device, {"device": None, "cpu": cpu_group})
        msg = wire.recv(conn)
        if msg.kind != "load":
            raise RuntimeError(f"expected a load request, got {msg.kind!r}")
        info = worker.build(msg.meta)
        wire.send(conn, "ready", info)
        while True:
            msg = wire.recv(conn)
            if msg.kind == "close":
                break
            if msg.kind not in ("generate", "cancel"):
                raise RuntimeError(f"unknown request {msg.kind!r}")
            if msg.kind == "cancel":  # for a request that had already finished
                continue
            worker.generate(msg.meta, msg.tensors)
            wire.send(conn, "done", {"peak_reserved_gib": worker.peak_reserved_gib(), "cancelled": worker._cancel})
    except EOFError:  # the caller went away: nothing to report to
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure goes to the caller, which stops the other rank
        meta = _error_meta(e)
        print(meta["traceback"], file=sys.stderr, flush=True)
        try:
            wire.send(conn, "error", meta)
        except OSError:
            pass
        return 1
    finally:
        if dist is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tear down cleanly
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
