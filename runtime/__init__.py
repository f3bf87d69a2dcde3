"""fluxc.runtime: a small FLUX.1 runtime (numpy + tokenizers; onnxruntime or TPU-MLIR's
simulator or sophon.sail underneath), small enough to copy to a board.

    from fluxc.export.manifest import load_manifest
    from fluxc.runtime.models import open_bmodels, open_onnx
    from fluxc.runtime.pipeline import FluxPipeline

    man = load_manifest("models/onnx")
    models, quant = open_bmodels("cmodel", "models/BM1684X", man.dims, None)   # or open_onnx(man)
    result = FluxPipeline(models, man)("a red fox in the snow", steps=4, seed=42)
    result.image  # HxWx3 uint8

Modules: engine (the interface: open a model, list its nets, process(net, inputs)) with
onnx_engine, cmodel_engine (+ cmodel_client, cmodel_worker.py, wire), sail_engine, and
backends (open one by name), models (which file holds which net), scheduler (numpy
FlowMatchEulerDiscreteScheduler), prompt_tokens (CLIP/T5 tokenisation), pipeline.
"""
