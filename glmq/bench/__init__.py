"""glmq bench: seconds per image and peak VRAM per hardware tier."""
