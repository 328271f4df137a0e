"""A checkpoint folder checked against what its configs promise: every tensor of an unquantized component
against the upstream model built from its config (:mod:`.validate`), a glmq-quantized one against its
formats' stored tensors, a GGUF one through its reader; and opening a bf16 source for a converter
(:mod:`.source`). Above ``models`` and ``quant.formats``; below the converters, the runtime and the
exporters, which all check what they read the same way."""
