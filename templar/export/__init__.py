"""Exporting reward models for Triton: `scorer` (an RM folder as one torch module), `exporter` (ONNX, checked
against torch), `tensorrt` (GPU engines), `repository` (the Triton entries, rendered from templar.contract's table).
Kept free of imports here: the embedded server needs only `repository`, without torch."""
