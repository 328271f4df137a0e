"""GLM-Image on two GPUs: tensor-parallel AR and guidance-parallel DiT (``latency``), or the AR of one image
beside the DiT of the previous one (``throughput``). ``glmq.load(path, gpus=2, parallel=...)`` returns a
:class:`~glmq.runtime.parallel.pipeline.ParallelPipeline`; see that module for how the processes work."""

PARALLEL_MODES = ("latency", "throughput")
