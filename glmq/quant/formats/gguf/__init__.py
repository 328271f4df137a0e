"""GGUF, llama.cpp's file format, as glmq reads and writes it: tensor and metadata naming (:mod:`.names`),
the block quantizers and their dequantization (:mod:`.blocks`), and a reader that rebuilds torch tensors
(:mod:`.reader`). Beside glmq's own formats because the runtime loads GGUF folders and the exporter writes
them: both may import the formats, neither the other."""
