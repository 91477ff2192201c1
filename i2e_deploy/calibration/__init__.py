"""Reduced precision: SNN-aware INT8 (exact 0/1 activations), FP16, quantization-aware
fine-tuning to INT8-exact checkpoints, and the calibration data path."""
