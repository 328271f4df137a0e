"""Evaluation and reporting, above the runtime and the converters: model-level fidelity of a quantized
folder against its source (:mod:`.fidelity`), synthetic outlier layers at the released shapes
(:mod:`.outliers`, :mod:`.outlier_eval`), and the report and model card a quantized folder carries
(:mod:`.report`). :func:`.quantize.quantize` is ``glmq quantize``: the conversion with this evaluation."""
