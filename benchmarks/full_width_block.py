"""One full-width FLUX.1 block with random weights (dim 3072, 24 heads x 128, torch seed 0)
and inputs for it at a square image size and T5 length: what graph_forms.py,
bm1688_estimate.py, block_breakdown.py and kontext_full_size.py export and compile. Import it
from a script in benchmarks/ (the script's folder is on sys.path).

FLUX.1 Kontext (ref_size > 0): the reference image's tokens follow the image's in the blocks'
hidden states (hidden tokens = image + reference, as fluxc.specs.FluxDims.hidden_tokens), with
FluxKontextPipeline's position ids in the rotary table (patches/rotary.py).

Large token counts (trace_hidden): tracing torch.onnx.export at 8704 tokens materialises the
24 x 8704 x 8704 fp32 attention scores (~7 GB, twice). With trace_hidden the example inputs
have only that many hidden tokens; export them with DYNAMIC_AXES (the hidden-token axis
symbolic), and give the full shapes (returned as usual) to the tools."""
from __future__ import annotations

# the hidden-token axis of each input, for torch.onnx.export(dynamic_axes=...) of a traced block
DYNAMIC_AXES = {
    "double": {"hidden_states": {1: "hidden_tokens"}, "rotary_emb": {1: "joint_tokens"}},
    "single": {"hidden_states": {1: "joint_tokens"}, "rotary_emb": {1: "joint_tokens"}},
}


def block_tokens(size: int, t5_len: int, ref_size: int = 0) -> tuple[int, int]:
    """(hidden tokens, joint tokens) of a square size x size image (and a square ref_size
    reference, FLUX.1 Kontext; 0: none): 2x2-packed latent tokens, text tokens first."""
    n = (size // 16) ** 2 + (ref_size // 16) ** 2
    return n, t5_len + n


def kontext_rotary(t5_len: int, size: int, ref_size: int):
    """Rotary table [1, t5 + image + reference tokens, 1, 64, 2, 2] with FluxKontextPipeline's
    ids (the reference's first id axis 1), as patches/rotary.py builds it for a Kontext export."""
    import numpy as np

    from fluxc.patches.rotary import flux_ids, rotary_table, rotary_table_from_ids

    if not ref_size:
        return rotary_table(t5_len, size, size, axes_dims=(16, 56, 56))
    ref = flux_ids(0, ref_size // 16, ref_size // 16)
    ref[:, 0] = 1
    ids = np.concatenate([flux_ids(t5_len, size // 16, size // 16), ref], axis=0)
    return rotary_table_from_ids(ids, (16, 56, 56))


def full_width_block(kind: str, size: int, t5_len: int, ref_size: int = 0, trace_hidden: int | None = None):
    """(block, example inputs, input names, model_transform's --input_shapes) of a "single"
    or "double" block; the inputs end with the export's rotary table for size x size (and the
    Kontext reference). The shapes are always the full ones; with trace_hidden the example
    inputs have that many hidden tokens (the rotary table's first rows), for an export with
    DYNAMIC_AXES."""
    # deferred: torch and diffusers are heavy, and a script's --help should not load them
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    n, j = block_tokens(size, t5_len, ref_size)
    tn = n if trace_hidden is None else min(int(trace_hidden), n)
    tj = t5_len + tn
    torch.manual_seed(0)
    table = torch.from_numpy(kontext_rotary(t5_len, size, ref_size)[:, :tj].copy())
    if kind == "single":
        blk = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).eval()
        args = (torch.randn(1, tj, 3072), torch.randn(1, 3072), table)
        names, shapes = ["hidden_states", "temb", "rotary_emb"], f"[[1,{j},3072],[1,3072],[1,{j},1,64,2,2]]"
    else:
        blk = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).eval()
        args = (torch.randn(1, tn, 3072), torch.randn(1, t5_len, 3072), torch.randn(1, 3072), table)
        names = ["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"]
        shapes = f"[[1,{n},3072],[1,{t5_len},3072],[1,3072],[1,{j},1,64,2,2]]"
    return blk, args, names, shapes
