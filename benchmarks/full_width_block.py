"""One full-width FLUX.1 block with random weights (dim 3072, 24 heads x 128, torch seed 0)
and inputs for it at a square image size and T5 length: what graph_forms.py and
bm1688_estimate.py export and compile. Import it from a script in benchmarks/ (the script's
folder is on sys.path)."""
from __future__ import annotations


def full_width_block(kind: str, size: int, t5_len: int):
    """(block, example inputs, input names, model_transform's --input_shapes) of a "single"
    or "double" block; the inputs end with the export's rotary table for size x size."""
    # deferred: torch and diffusers are heavy, and a script's --help should not load them
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from fluxc.patches import rotary_table

    n = (size // 16) ** 2
    j = t5_len + n
    torch.manual_seed(0)
    table = torch.from_numpy(rotary_table(t5_len, size, size, axes_dims=(16, 56, 56)))
    if kind == "single":
        blk = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).eval()
        args = (torch.randn(1, j, 3072), torch.randn(1, 3072), table)
        names, shapes = ["hidden_states", "temb", "rotary_emb"], f"[[1,{j},3072],[1,3072],[1,{j},1,64,2,2]]"
    else:
        blk = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).eval()
        args = (torch.randn(1, n, 3072), torch.randn(1, t5_len, 3072), torch.randn(1, 3072), table)
        names = ["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"]
        shapes = f"[[1,{n},3072],[1,{t5_len},3072],[1,3072],[1,{j},1,64,2,2]]"
    return blk, args, names, shapes
