"""An independent generator of the official parameter names and shapes of a U-Net or classifier.

Written from the official ``UNetModel`` / ``EncoderUNetModel`` constructors (guided-diffusion @ 22e0df8
``unet.py``; improved-diffusion uses the same names), independently of the package, so that a
released file can be imitated without its GBs: ``meta_state_dict`` (zero-cost ``device="meta"``
tensors, for everything that reads only shapes) and ``random_state_file`` (a real file whose weights
are random along the last axis and broadcast along the others, so it is small on disk and in memory
until loaded into a model).
"""
import torch

from unet.config import EncoderUNetConfig

def _resblock(sd, prefix, cin, cout, emb, scale_shift):
    sd[f"{prefix}.in_layers.0.weight"] = (cin,)
    sd[f"{prefix}.in_layers.0.bias"] = (cin,)
    sd[f"{prefix}.in_layers.2.weight"] = (cout, cin, 3, 3)
    sd[f"{prefix}.in_layers.2.bias"] = (cout,)
    sd[f"{prefix}.emb_layers.1.weight"] = (2 * cout if scale_shift else cout, emb)
    sd[f"{prefix}.emb_layers.1.bias"] = (2 * cout if scale_shift else cout,)
    sd[f"{prefix}.out_layers.0.weight"] = (cout,)
    sd[f"{prefix}.out_layers.0.bias"] = (cout,)
    sd[f"{prefix}.out_layers.3.weight"] = (cout, cout, 3, 3)
    sd[f"{prefix}.out_layers.3.bias"] = (cout,)
    if cin != cout:
        sd[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        sd[f"{prefix}.skip_connection.bias"] = (cout,)


def _attention(sd, prefix, ch):
    sd[f"{prefix}.norm.weight"] = (ch,)
    sd[f"{prefix}.norm.bias"] = (ch,)
    sd[f"{prefix}.qkv.weight"] = (3 * ch, ch, 1)
    sd[f"{prefix}.qkv.bias"] = (3 * ch,)
    sd[f"{prefix}.proj_out.weight"] = (ch, ch, 1)
    sd[f"{prefix}.proj_out.bias"] = (ch,)


def _encoder(sd, c, in_channels):
    """time_embed, input_blocks, middle_block as UNetModel / EncoderUNetModel build them."""
    C, emb = c.model_channels, 4 * c.model_channels
    factors = {c.image_size // r for r in c.attention_resolutions}
    sd["time_embed.0.weight"], sd["time_embed.0.bias"] = (emb, C), (emb,)
    sd["time_embed.2.weight"], sd["time_embed.2.bias"] = (emb, emb), (emb,)
    ch = int(c.channel_mult[0] * C)
    sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"] = (ch, in_channels, 3, 3), (ch,)
    chans, ds, index = [ch], 1, 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            _resblock(sd, f"input_blocks.{index}.0", ch, int(mult * C), emb, c.use_scale_shift_norm)
            ch = int(mult * C)
            if ds in factors:
                _attention(sd, f"input_blocks.{index}.1", ch)
            chans.append(ch)
            index += 1
        if level != len(c.channel_mult) - 1:
            if c.resblock_updown:
                _resblock(sd, f"input_blocks.{index}.0", ch, ch, emb, c.use_scale_shift_norm)
            else:
                sd[f"input_blocks.{index}.0.op.weight"], sd[f"input_blocks.{index}.0.op.bias"] = (ch, ch, 3, 3), (ch,)
            chans.append(ch)
            ds *= 2
            index += 1
    _resblock(sd, "middle_block.0", ch, ch, emb, c.use_scale_shift_norm)
    _attention(sd, "middle_block.1", ch)
    _resblock(sd, "middle_block.2", ch, ch, emb, c.use_scale_shift_norm)
    return ch, chans, ds, factors


def official_shapes(c):
    """Official parameter name -> shape for a UNetConfig or EncoderUNetConfig."""
    sd = {}
    if isinstance(c, EncoderUNetConfig):
        ch, chans, ds, _ = _encoder(sd, c, c.in_channels)
        assert c.pool == "attention"
        sd["out.0.weight"], sd["out.0.bias"] = (ch,), (ch,)
        side = c.image_size // ds
        sd["out.2.positional_embedding"] = (ch, side * side + 1)
        sd["out.2.qkv_proj.weight"], sd["out.2.qkv_proj.bias"] = (3 * ch, ch, 1), (3 * ch,)
        sd["out.2.c_proj.weight"], sd["out.2.c_proj.bias"] = (c.out_channels, ch, 1), (c.out_channels,)
        return sd
    C, emb = c.model_channels, 4 * c.model_channels
    if c.num_classes is not None:
        sd["label_emb.weight"] = (c.num_classes, emb)
    ch, chans, ds, factors = _encoder(sd, c, c.in_channels * (2 if c.super_res else 1))
    index = 0
    for level, mult in list(enumerate(c.channel_mult))[::-1]:
        for i in range(c.num_res_blocks + 1):
            ich = chans.pop()
            _resblock(sd, f"output_blocks.{index}.0", ch + ich, int(C * mult), emb, c.use_scale_shift_norm)
            ch, position = int(C * mult), 1
            if ds in factors:
                _attention(sd, f"output_blocks.{index}.1", ch)
                position = 2
            if level and i == c.num_res_blocks:
                if c.resblock_updown:
                    _resblock(sd, f"output_blocks.{index}.{position}", ch, ch, emb, c.use_scale_shift_norm)
                else:
                    sd[f"output_blocks.{index}.{position}.conv.weight"] = (ch, ch, 3, 3)
                    sd[f"output_blocks.{index}.{position}.conv.bias"] = (ch,)
                ds //= 2
            index += 1
    sd["out.0.weight"], sd["out.0.bias"] = (ch,), (ch,)
    input_ch = int(c.channel_mult[0] * C)
    sd["out.2.weight"], sd["out.2.bias"] = (c.out_channels, input_ch, 3, 3), (c.out_channels,)
    return sd


def meta_state_dict(c):
    return {k: torch.empty(shape, device="meta") for k, shape in official_shapes(c).items()}




def random_state_file(c, path, seed=0):
    """torch.save an official-format state dict of config ``c``'s shapes, as the official files are
    saved (a bare dict of float32 tensors). Each tensor is random along its last axis and broadcast
    along the others (a small file): weights N(0, 1) / fan_in (so a layer's broadcast sum stays O(1)),
    biases 0.02 N(0, 1), norm scales 1 + 0.05 N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_shapes(c).items():
        row = torch.randn(shape[-1], generator=gen)
        if len(shape) > 1:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            row = row / fan_in
        elif name.endswith(".weight"):
            row = 1.0 + 0.05 * row              # GroupNorm scales
        else:
            row = 0.02 * row
        sd[name] = row.expand(shape)
    torch.save(sd, path)
    return path
