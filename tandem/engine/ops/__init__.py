"""Tandem's C++ CPU kernels outside attention (fused elementwise ops) and the build machinery they share with it."""
