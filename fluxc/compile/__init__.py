"""fluxc compile: every piece through TPU-MLIR, cached, combined into the sophon-demo files."""
