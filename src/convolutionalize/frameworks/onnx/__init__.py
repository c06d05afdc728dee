"""ONNX adapter: analysis, geometry and rewrite of ONNX classifier graphs."""
