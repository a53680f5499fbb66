"""Inference: new image files to patient decisions (predict, the service), ONNX export, and the explain stage."""
