"""fluxc export: FLUX.1 diffusers weights -> one ONNX file per piece + manifest.json.

Downstream commands only need `load_manifest(export_dir)` (fluxc.export.manifest)."""
